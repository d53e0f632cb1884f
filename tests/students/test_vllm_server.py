"""A vLLM server started for a run goes when the process that started it dies, even by SIGKILL."""

import os
import subprocess
import sys
import time

import psutil

from conftest import needs_vllm, survivors_of_killing

pytestmark = needs_vllm


def test_the_server_dies_with_the_process_that_started_it(tmp_path, vllm_model_dir):
    pid_file = tmp_path / "server.pid"
    script = tmp_path / "starter.py"
    script.write_text(
        "import threading, time\n"
        "from distill.students.vllm_server import VLLMServer\n"
        f"server = VLLMServer({str(vllm_model_dir)!r}, max_logprobs=24, max_model_len=512,\n"
        f"                    log_path={str(tmp_path / 'server.log')!r})\n"
        "threading.Thread(target=server.start, daemon=True).start()\n"
        "while server.process is None:\n"
        "    time.sleep(0.05)\n"
        f"open({str(pid_file)!r}, 'w').write(str(server.process.pid))\n"
        "time.sleep(600)\n")
    starter = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    server = psutil.Process(int(pid_file.read_text()))
    time.sleep(20)   # well into its start-up (imports, model load)
    alive = survivors_of_killing(starter, [server, *server.children(recursive=True)], timeout=60)
    assert not alive, f"{len(alive)} server process(es) outlived the process that started them"
