"""Checkpoint and resume: a training stage interrupted at any step and resumed ends bitwise equal
to an uninterrupted one, in process and after SIGKILL of the whole run."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN, scaled_model
from distill.checkpoint import StepCheckpoints
from distill.common.tracking import Tracker
from distill.config import LossConfig
from distill.data import Example, ModeAlternatingBatches
from distill.train import Schedule, distillation_objective, fit

REAL = 261


def _examples(seed=0, count=40, k=4):
    g = torch.Generator().manual_seed(seed)
    out = {"think": [], "no_think": []}
    for i in range(count):
        length = int(torch.randint(2, 9, (1,), generator=g))
        ids = torch.stack([torch.randperm(REAL, generator=g)[:k] for _ in range(length)])
        logprobs = torch.log_softmax(torch.randn(length, k + 1, generator=g), -1)[:, :k]
        response = torch.randint(0, 256, (length,), generator=g).tolist()
        out["think" if i % 2 else "no_think"].append(Example([1, 2, 3], response, ids, logprobs))
    return out


class Interrupted(Exception):
    pass


def _train(folder, steps=12, stop_at=None, resume=False):
    torch.manual_seed(0)
    model = scaled_model("tiny", 0, None)
    batches = ModeAlternatingBatches(_examples(), 4, 0, 64, micro_batches=2, seed=3)
    source = batches
    if stop_at is not None:
        class Stopping:   # dies while fetching step `stop_at`, like a kill mid-run
            def __iter__(self):
                return self

            def __next__(self):
                if source.turn // 2 == stop_at:
                    raise Interrupted
                return next(source)

            def state_dict(self):
                return source.state_dict()

            def load_state_dict(self, state):
                source.load_state_dict(state)
        batches = Stopping()
    records = fit(model, batches, distillation_objective(LossConfig(), REAL), Schedule(steps=steps, lr=1e-2, warmup_steps=2),
                  tracker=Tracker(Path(folder), metrics_file=None), prefix="train/s", desc="t", progress=False,
                  log_every=2, checkpoints=StepCheckpoints(Path(folder) / "ckpt", every=3, keep=2), resume=resume)
    return model, records


def test_interrupted_and_resumed_training_is_bitwise_the_uninterrupted_one(tmp_path):
    reference, reference_records = _train(tmp_path / "a")
    with pytest.raises(Interrupted):
        _train(tmp_path / "b", stop_at=7)
    saved = sorted(p.name for p in (tmp_path / "b" / "ckpt").glob("step-*"))
    assert saved == ["step-000003", "step-000006"]          # every 3 steps, the newest 2 kept
    with pytest.raises(Interrupted):                           # resumed from 6, killed again at 10
        _train(tmp_path / "b", stop_at=10, resume=True)
    resumed, records = _train(tmp_path / "b", resume=True)    # from 9 to the end
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    def metrics(rs):   # the logged metrics too, all but the timings
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rs]
    assert metrics(records) == metrics(reference_records)


def test_checkpoints_hold_no_pickled_objects(tmp_path):
    _train(tmp_path / "c")
    folder = StepCheckpoints(tmp_path / "c" / "ckpt", every=3).latest()
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "optimizer.pt", "rng.pt", "state.json"}
    torch.load(folder / "optimizer.pt", weights_only=True)   # tensors and numbers only


def _weights(run_dir: Path) -> dict[str, str]:
    return {p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((run_dir / "release").glob("*/model.safetensors"))}


def test_a_run_killed_at_random_points_resumes_to_the_same_weights(tmp_path):
    """SIGKILL the whole run (all its processes) three times at random moments, resume each
    time: the released students are bitwise those of an uninterrupted run."""
    base = [o for o in TINY_RUN] + [f"cache_dir={tmp_path / 'cache'}", "checkpoint_every=2", "logger=none",
                                    "pipeline.offpolicy.steps=16", "students.dense.steps=16", "students.moe.steps=16",
                                    "pipeline.onpolicy.steps=8", "pipeline.eval.problems=4"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}

    def launch(run_dir, *extra):
        return subprocess.Popen([sys.executable, "-m", "distill", *base, f"run_dir={run_dir}", *extra], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    assert launch(tmp_path / "straight").wait(timeout=600) == 0
    rng = random.Random(7)
    run = launch(tmp_path / "killed")
    kills = 0
    while kills < 3:
        time.sleep(rng.uniform(2.0, 6.0))
        if run.poll() is not None:
            break
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        kills += 1
        run = launch(tmp_path / "killed", "resume=true")
    assert run.wait(timeout=600) == 0
    assert kills >= 2, "the run finished before it could be killed: make it longer"
    assert _weights(tmp_path / "killed") == _weights(tmp_path / "straight") and _weights(tmp_path / "straight")
    # The students' log holds each logged step once, as the uninterrupted run's does (the teacher
    # was trained by the first run only).
    def logged_steps(run_dir):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return sorted((key, record[key]) for record in records for key in record
                      if key.startswith("train/") and key.endswith("/step"))
    assert logged_steps(tmp_path / "killed") == logged_steps(tmp_path / "straight")


def test_a_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from distill.train import TrainingDiverged

    model = scaled_model("tiny", 0, None)
    source = ModeAlternatingBatches(_examples(), 4, 0, 64, micro_batches=2, seed=3)

    class Poisoned:   # the teacher's log-probabilities of step 5 are NaN
        count = 0

        def __iter__(self):
            return self

        def __next__(self):
            self.count += 1
            step = next(source)
            if self.count == 5:
                step[1].topk_logprobs[:] = float("nan")
            return step

        def state_dict(self):
            return source.state_dict()

    checkpoints = StepCheckpoints(tmp_path / "ckpt", every=2)
    with pytest.raises(TrainingDiverged) as error:
        fit(model, Poisoned(), distillation_objective(LossConfig(), REAL), Schedule(steps=10, lr=1e-2, warmup_steps=0),
            tracker=Tracker(tmp_path, metrics_file=None), prefix="train/s", desc="distill s", progress=False,
            checkpoints=checkpoints)
    message = str(error.value)
    assert "the loss is nan at step 5" in message and "step-000004" in message and "\n" not in message
    assert checkpoints.latest().name == "step-000004"
