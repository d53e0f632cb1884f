"""The student's rollouts from a vLLM server whose weights follow the trainer's.

On-policy distillation samples the student at every step. In process, sampling and training take
turns on one model; at scale the peers (TRL, verl, OpenRLHF, NeMo RL) sample with an inference
engine instead and push the trainer's weights into it. `VLLMRollouts` is that engine here: a
vLLM server started for the run on the student's weights (students/vllm_server.py: 127.0.0.1,
stopped by PID, ended with the run), spoken to in token ids (students/vllm_client.py).

Weight sync uses vLLM's own in-place reload, `reload_weights(weights_path=...)`, a method every
vLLM worker has, through a worker extension (students/vllm_worker_extension.py, which also
repairs vLLM 0.32's CPU MoE layers after a reload) called through the server's `/collective_rpc`
endpoint (on with VLLM_SERVER_DEV_MODE=1, which also opens `/reset_prefix_cache` and the RL
endpoints `/update_weight_version` and `/weight_info`). The trainer writes the weights as one safetensors
file in checkpoint layout (students/snapshot.py; on a tmpfs when there is one), renamed into
place whole; the engine reloads them layer by layer, processing each layer as at start-up. Why
this mechanism: it works on every vLLM device, CPU included, with no code inside the server's
environment; vLLM's faster channels (`/init_weight_transfer_engine` with NCCL or CUDA IPC)
stream tensors GPU to GPU and exist only on CUDA. After a reload the prefix cache is reset
(cached keys and values of the old weights must not be reused) and the engine's weight version
set to the trainer's step, which every rank can read back.

Samples come with each token's log-probability under the distribution it was drawn from
(`--logprobs-mode processed_logprobs`: after temperature, top-k/top-p and the real-vocabulary
mask), the behaviour policy of the importance weight in distill/losses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.students.chat import Sampling
from distill.students.generation import Generation
from distill.students.snapshot import write_served_model, write_weights
from distill.students.vllm_client import VLLMClient
from distill.students.vllm_server import ServerError, VLLMServer

# Head sizes vLLM 0.32's CPU attention implements (CPUAttentionBackend.get_supported_head_sizes).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


STUDENT_REMEDY = "give the student a head_dim it has (architecture.head_dim=32), or set rollout.engine=in_process"


def check_servable(config, device: str, *, name: str | None = None, remedy: str = STUDENT_REMEDY) -> None:
    """One clear line for a model (`name`, when given) vLLM cannot serve on this device, before
    anything starts; `remedy` says what to do instead."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if device == "cpu" and head_dim not in CPU_HEAD_SIZES:
        which = f"'{name}'; " if name else ""
        raise ServerError(f"vLLM's CPU attention has no head_dim {head_dim} ({which}it has "
                          f"{', '.join(map(str, CPU_HEAD_SIZES))}): {remedy}")


def weights_folder(run_dir: Path, name: str) -> Path:
    """Where a student's synced weights are written: RAM (/dev/shm) when the machine has it, for
    a write and a read that never touch a disk; else the run folder. Folders in RAM left by runs
    that were killed (their process is gone) are removed first: they hold whole models."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        for left in shm.glob("distill-rollouts-*"):
            owner = left.name.split("-")[2]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                shutil.rmtree(left, ignore_errors=True)
        safe = "".join(c if c.isalnum() else "_" for c in name)
        return Path(tempfile.mkdtemp(prefix=f"distill-rollouts-{os.getpid()}-{safe}-", dir=shm))
    folder = run_dir / "rollout_engine" / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class VLLMRollouts:
    """`with VLLMRollouts(student, tokenizer, folder) as engine:` a server sampling the student;
    `engine.load(tensors, version)` puts newer weights in; `engine.sample(...)` draws rollouts.

    Ranks of a data-parallel run share one server: the main rank starts it (`url=None`) and
    loads weights; the others pass its `url` and `wait_for(version)` before sampling.
    """

    def __init__(self, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path | str, *,
                 dtype: str = "float32", max_model_len: int, log_path: Path | str | None = None,
                 startup_timeout: float = 900.0, extra_args: list[str] = (), url: str | None = None,
                 concurrency: int = 64, cpus: set[int] | None = None):
        self.student, self.tokenizer, self.folder = student, tokenizer, Path(folder)
        self.dtype, self.max_model_len, self.log_path = dtype, max_model_len, log_path
        self.startup_timeout, self.extra_args, self.url = startup_timeout, list(extra_args), url
        self.concurrency, self.cpus = concurrency, cpus
        self.server: VLLMServer | None = None
        self.client: VLLMClient | None = None
        self.version = 0
        self._working, self._lock = 0, threading.Lock()
        self.on_busy = None   # called, on the asking thread, as the engine starts working
        self.idle_since = time.monotonic()   # when it last stopped working

    @property
    def working(self) -> bool:
        """Whether the engine is sampling or loading weights now (a trainer sharing its cores
        reads this)."""
        return self._working > 0

    @contextlib.contextmanager
    def busy(self):
        """Counts the engine as working while the block runs (from any thread); `on_busy` is
        called as it starts working, not again for blocks within."""
        with self._lock:
            starting = self._working == 0
            self._working += 1
        if starting and self.on_busy is not None:
            self.on_busy()
        try:
            yield
        finally:
            with self._lock:
                self._working -= 1
                if not self._working:
                    self.idle_since = time.monotonic()

    def start(self, weights: PreTrainedModel | None = None) -> "VLLMRollouts":
        """Start the server on `weights` (a model holding the student's whole weights; by default
        the student itself), or connect to the one at `url`."""
        if self.url is None:
            served = write_served_model(weights or self.student, self.tokenizer, self.folder / "v0",
                                        DTYPES[self.dtype])
            # The worker extension travels as a copy of one file on the server's path: the vLLM
            # environment has no distill installed.
            extension = self.folder / "extension"
            extension.mkdir(exist_ok=True)
            shutil.copy(Path(__file__).with_name("vllm_worker_extension.py"), extension)
            path = os.pathsep.join(filter(None, [str(extension), os.environ.get("PYTHONPATH")]))
            env = {"VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": path}
            if self.cpus:   # vLLM's CPU worker binds its OpenMP threads to these cores
                env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(self.cpus)))
            self.server = VLLMServer(served, dtype=self.dtype, max_model_len=self.max_model_len, log_path=self.log_path,
                                     startup_timeout=self.startup_timeout, served_name="student", cpus=self.cpus,
                                     env=env,
                                     extra_args=["--logprobs-mode", "processed_logprobs", "--worker-extension-cls",
                                                 "vllm_worker_extension.WeightSync", *self.extra_args])
            try:
                self.url = self.server.start().url
            except BaseException:
                self.stop()
                raise
        self.client = VLLMClient(self.url, self.tokenizer, concurrency=self.concurrency, progress=False)
        if self.server is not None:
            self.client.post("/update_weight_version", {"new_version": "0"})
        return self

    def load(self, tensors: dict[str, torch.Tensor], version: int) -> float:
        """Put `tensors` (students/snapshot.py's checkpoint_tensors) into the engine as weight
        version `version`, in place; returns the seconds it took."""
        started = time.perf_counter()
        with self.busy():
            folder = write_weights(tensors, self.folder / f"v{version}")
            self._rpc("load_trainer_weights", weights_path=str(folder))
            self.client.post("/reset_prefix_cache", {})
            self.client.post("/update_weight_version", {"new_version": str(version)})
        for old in self.folder.glob("v*"):
            if old != folder and old.name != "v0":
                shutil.rmtree(old, ignore_errors=True)
        self.version = version
        return time.perf_counter() - started

    def wait_for(self, version: int, timeout: float = 600.0) -> None:
        """Block until the engine holds weights of `version` or newer (another rank loads them)."""
        deadline = time.monotonic() + timeout
        while True:
            held = str(self.client.http.get(f"{self.url}/weight_info", timeout=30.0).json().get("weight_version"))
            if held.isdigit() and int(held) >= version:   # a server never synced says "default"
                self.version = int(held)
                return
            if time.monotonic() > deadline:
                raise ServerError(f"the rollout engine at {self.url} did not reach weight version {version} within "
                                  f"{timeout:.0f} s (it holds {held})")
            time.sleep(0.05)

    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, sampling: Sampling, seed: int
               ) -> list[Generation]:
        """One rollout per prompt, all requests in flight at once (the engine batches them)."""
        self.client.concurrency = max(1, min(self.concurrency, len(prompts)))
        with self.busy():
            return self.client.sample(prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """The engine's log-probability of each token of each sequence given the ones before it
        (from the second token on): what the trainer's weights give, once synced."""
        out = []
        for sequence, entries in zip(sequences, self.client.prompt_logprobs(sequences, 1)):
            out.append([float(entries[i][str(sequence[i])]["logprob"]) for i in range(1, len(sequence))])
        return out

    def _rpc(self, method: str, **kwargs: str) -> None:
        response = self.client.post("/collective_rpc", {"method": method, "kwargs": kwargs})
        if not isinstance(response, dict) or "results" not in response:
            raise ServerError(f"the rollout engine at {self.url} answered {method} with {response!r}")

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.stop()
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "VLLMRollouts":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
