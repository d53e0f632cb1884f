"""Data-parallel training over two CPU processes with `accelerate launch`: the processes hold the
same parameters after every stage, and the update is normalised over the whole step (the result
matches one process training on the whole batch). The sharded strategies (parallel=fsdp2, torch
FSDP2; parallel=zero3, DeepSpeed ZeRO-3) hold about half the parameters per process and train
the same students as replicas do; a sharded run resumed from a step checkpoint ends bitwise where
the uninterrupted one did, also after its processes are killed with SIGKILL."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_RUN, survivors_of_killing

ACCELERATE = Path(sys.executable).parent / "accelerate"


def _run(command, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _base(tmp_path):
    return [o for o in TINY_RUN if not o.startswith("pipeline.eval")] + [
        f"cache_dir={tmp_path / 'cache'}", "logger=none", "checkpoint_every=1000"]


LAUNCH = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "distill"]
RECIPE = "pipeline.stages=[teacher,offpolicy,onpolicy,release]"


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path, student: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "release" / student / "model.safetensors")


def test_two_processes_stay_in_step_and_normalise_over_the_whole_step(tmp_path):
    base = _base(tmp_path)
    offpolicy_only = "pipeline.stages=[teacher,offpolicy,release]"
    # the teacher once, so both runs find it cached
    _run([sys.executable, "-m", "distill", *base, "pipeline.stages=[teacher]", f"run_dir={tmp_path / 'warm'}"], tmp_path)
    _run([sys.executable, "-m", "distill", *base, offpolicy_only, "student_workers=1", f"run_dir={tmp_path / 'one'}"],
         tmp_path)
    launch = [*LAUNCH, *base]
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

    # bf16 compute (fp32 weights and optimizer) under each strategy: the same training to bf16's
    # precision, and visibly not fp32's (fp32 runs agree to 1e-5, as asserted above).
    for strategy in ("ddp", "fsdp2", "zero3"):
        run = tmp_path / f"{strategy}_bf16"
        _run([*launch, offpolicy_only, f"parallel={strategy}", "parallel.mixed_precision=bf16", f"run_dir={run}"],
             tmp_path)
        for name in ("dense", "moe"):
            fp32, bf16 = _weights(tmp_path / "two", name), _weights(run, name)
            assert all(bf16[key].dtype == torch.float32 for key in bf16)
            largest = max(float((bf16[key] - fp32[key]).abs().max()) for key in fp32)
            assert 1e-5 < largest < 5e-2, (strategy, name, largest)


def test_sharded_strategies_train_the_same_students_on_half_the_parameters(tmp_path):
    base = _base(tmp_path)
    _run([sys.executable, "-m", "distill", *base, "pipeline.stages=[teacher]", f"run_dir={tmp_path / 'warm'}"], tmp_path)
    # ZeRO-3 keeps parameters below a size threshold whole; 0 partitions all of the tiny ones.
    strategies = {"ddp": [], "fsdp2": ["parallel=fsdp2"], "zero3": ["parallel=zero3", "parallel.param_persistence_threshold=0"]}
    for strategy, overrides in strategies.items():
        _run([*LAUNCH, *base, RECIPE, *overrides, f"run_dir={tmp_path / strategy}"], tmp_path)

    for strategy in ("fsdp2", "zero3"):
        records = _records(tmp_path / strategy)
        for name in ("dense", "moe"):
            for prefix in (f"train/{name}", f"train/{name}/onpolicy"):
                held = [r[f"{prefix}/params_held_fraction"] for r in records if f"{prefix}/params_held_fraction" in r]
                assert held and all(0.4 < fraction <= 0.55 for fraction in held), (strategy, prefix, held)
            assert any(f"train/{name}/onpolicy/kd_loss" in r for r in records)
            # Off-policy, then on-policy on the processes' own rollouts, sharded: the same
            # students as whole replicas train (reductions in another order: float rounding).
            replica, sharded = _weights(tmp_path / "ddp", name), _weights(tmp_path / strategy, name)
            assert set(replica) == set(sharded)
            for key in replica:
                torch.testing.assert_close(sharded[key], replica[key], rtol=0, atol=1e-4)
    assert not any("params_held_fraction" in key for r in _records(tmp_path / "ddp") for key in r)


@pytest.mark.parametrize("strategy", [["parallel=fsdp2"], ["parallel=zero3", "parallel.param_persistence_threshold=0"]],
                         ids=["fsdp2", "zero3"])
def test_sharded_runs_resume_bitwise_from_a_step_checkpoint(tmp_path, strategy):
    base = _base(tmp_path) + [*strategy, "checkpoint_every=3", "checkpoint_keep=100"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run([*LAUNCH, *base, RECIPE, f"run_dir={full}"], tmp_path)
    # The run as a crash during the off-policy stage would leave it: step checkpoints up to step
    # 6, the checkpoint of step 3 gone too (a resumed run that started over would rewrite it).
    shutil.copytree(full, resumed)
    for stale in ("release", "models.json", "checkpoints/offpolicy", "checkpoints/onpolicy", "checkpoints/steps/onpolicy"):
        target = resumed / stale
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    for name in ("dense", "moe"):
        steps = resumed / "checkpoints" / "steps" / "offpolicy" / name
        for late in ("step-000003", "step-000009"):
            shutil.rmtree(steps / late)
        (steps / "latest").write_text("step-000006")
    _run([*LAUNCH, *base, RECIPE, f"run_dir={resumed}", "resume=true"], tmp_path)

    for name in ("dense", "moe"):
        steps = resumed / "checkpoints" / "steps" / "offpolicy" / name
        assert (steps / "step-000009").is_dir() and not (steps / "step-000003").exists()
        before, after = _weights(full, name), _weights(resumed, name)
        assert all(torch.equal(before[key], after[key]) for key in before), name


def test_a_sharded_run_killed_at_random_points_resumes_to_the_same_weights(tmp_path):
    """SIGKILL every process of a two-process fsdp2 run (a preempted node) twice at random
    moments, resume each time: the released students are bitwise those of an uninterrupted run."""
    base = _base(tmp_path) + ["parallel=fsdp2", "checkpoint_every=2", "pipeline.offpolicy.steps=60",
                              "students.dense.steps=60", "students.moe.steps=60", "pipeline.onpolicy.steps=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "ACCELERATE_USE_CPU": "true"}
    launches = iter(range(29_510, 29_600))  # a fresh port each time: a killed run's may linger

    def launch(run_dir, *extra):
        command = [*LAUNCH[:2], "--main_process_port", str(next(launches)), *LAUNCH[2:], *base, RECIPE,
                   f"run_dir={run_dir}", *extra]
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, cwd=os.getcwd())

    assert launch(tmp_path / "straight").wait(timeout=900) == 0
    rng = random.Random(11)
    run, kills, checkpoints_seen = launch(tmp_path / "killed"), 0, 0
    while kills < 2:
        # A launch spends about 10 s starting its processes before it trains.
        time.sleep(rng.uniform(13.0, 20.0) if kills == 0 else rng.uniform(11.0, 15.0))
        if run.poll() is not None:
            break
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        kills += 1
        checkpoints_seen += any((tmp_path / "killed" / "checkpoints" / "steps").glob("*/*/latest"))
        run = launch(tmp_path / "killed", "resume=true")
    assert run.wait(timeout=900) == 0
    assert kills >= 1 and checkpoints_seen, "the run finished, or was killed before any checkpoint: retime the kills"
    for name in ("dense", "moe"):
        before, after = _weights(tmp_path / "straight", name), _weights(tmp_path / "killed", name)
        assert all(torch.equal(before[key], after[key]) for key in before), name


def test_ranks_exit_when_their_launcher_is_killed(tmp_path):
    """SIGKILL only the launcher (accelerate launch) of a two-process run: its ranks notice they
    are orphaned and exit, instead of training on or waiting in a collective for ever."""
    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "ACCELERATE_USE_CPU": "true"}
    command = [*LAUNCH[:2], "--main_process_port", "29611", *LAUNCH[2:], *_base(tmp_path), RECIPE,
               "pipeline.offpolicy.steps=2000", "students.dense.steps=2000", "students.moe.steps=2000",
               f"run_dir={tmp_path / 'run'}"]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, cwd=os.getcwd())
    deadline, ranks = time.monotonic() + 120, []
    while time.monotonic() < deadline and len(ranks) < 2:
        time.sleep(0.5)
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True) if _runs_distill(p)]
    assert len(ranks) == 2, "the two ranks never started"
    time.sleep(5)
    alive = survivors_of_killing(launcher, ranks, timeout=20)
    assert not alive, f"{len(alive)} rank(s) outlived their launcher"


def _runs_distill(process) -> bool:
    import psutil

    try:
        return "distill" in " ".join(process.cmdline())
    except psutil.Error:   # gone, or a zombie, meanwhile
        return False
