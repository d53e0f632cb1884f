"""Data-parallel training over two CPU processes with `accelerate launch`: the processes hold the
same parameters after every stage, and the update is normalised over the whole step (the result
matches one process training on the whole batch)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import TINY_RUN

ACCELERATE = Path(sys.executable).parent / "accelerate"


def _run(command, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_stay_in_step_and_normalise_over_the_whole_step(tmp_path):
    base = [o for o in TINY_RUN if not o.startswith("pipeline.eval")] + [
        f"cache_dir={tmp_path / 'cache'}", "logger=none", "checkpoint_every=1000"]
    offpolicy_only = "pipeline.stages=[teacher,offpolicy,release]"
    # the teacher once, so both runs find it cached
    _run([sys.executable, "-m", "distill", *base, "pipeline.stages=[teacher]", f"run_dir={tmp_path / 'warm'}"], tmp_path)
    _run([sys.executable, "-m", "distill", *base, offpolicy_only, "student_workers=1", f"run_dir={tmp_path / 'one'}"],
         tmp_path)
    launch = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "distill", *base]
    _run([*launch, offpolicy_only, f"run_dir={tmp_path / 'two'}"], tmp_path)
    _run([*launch, "pipeline.stages=[teacher,offpolicy,onpolicy,release]", f"run_dir={tmp_path / 'two_recipe'}"],
         tmp_path)

    for run in ("two", "two_recipe"):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for name in ("dense", "moe"):
            synced = [r for r in records if f"train/{name}/ranks_in_sync" in r]
            assert synced and all(r[f"train/{name}/ranks"] == 2 for r in synced)
        assert len({r.get("train/dense/ranks") for r in records} - {None}) == 1
    # One process on the whole batch vs two on half of it each: the same dense student (the
    # MoE balancing loss is a per-batch statistic, so the MoE student differs by design).
    one = load_file(tmp_path / "one" / "release" / "dense" / "model.safetensors")
    two = load_file(tmp_path / "two" / "release" / "dense" / "model.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)
