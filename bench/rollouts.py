"""On-policy stage throughput: the student's rollouts in process, on a vLLM engine in step with
training, and on a vLLM engine sampling ahead while the trainer trains (`rollout.async`).

For each student size, the same on-policy stage (the same prompts, teacher, loss and steps) runs
three ways (the engine ways also `_pinned`, below), one after the other in this process on the
same cores:

- `in_process`: the trainer's own model samples (students/generation.py), then trains; all the
  machine's cores serve torch;
- `vllm_sync`: a vLLM server samples from weights synced every step (rollout.engine=vllm);
- `vllm_async`: the same server samples step t+1 while the trainer trains on step t
  (rollout.async=true, one version stale at most).

With the engine, the cores are split as `rollout.engine_cores` splits them: every process of the
server on the last core (its OpenMP threads bound there too), the trainer on the others while
the engine works, and on every core while it idles (`rollout.lend_cores`, the default; the
`_pinned` variants keep the trainer off the engine's core throughout). The `_bf16` variants
(`vllm_sync_bf16`, `vllm_async_bf16`, also with `_pinned`) serve the engine's copy of the weights
in bfloat16 (`rollout.dtype=bfloat16`), on a server of their own: the trainer stays float32 and
samples come from a rounded copy of its weights, a small shift of the sampling policy like async
staleness (the sampled-token estimator's importance weight corrects both). Startup (the
server's ~1 minute) is reported apart and left out of the stage time, and so is the first step of each
run (one-time costs). Reported per run: stage seconds per step, rollout tokens per second of
stage time, the sampling's and the weight sync's own seconds per step, the share of the stage
the trainer spent waiting for batches (sampling + teacher scoring it could not overlap), and the
mean reverse-KL estimate of the last half of the steps (the same training signal whichever
engine sampled). One JSON line per run on stdout and in --out.

    python bench/rollouts.py --sizes 128x4 512x4 768x8 --lengths 64 256 --steps 6

The teacher is the tiny MoE preset at a fixed seed: its scoring costs every variant the same.
Models are randomly initialised and rarely stop early, so rollouts run to the length asked.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distill.common.tracking import Tracker, read_metrics
from distill.config import LossConfig, OnPolicyConfig, RolloutConfig
from distill.onpolicy import OnPolicyBatches
from distill.stages.rollouts import CoreSplit
from distill.students.build import build_random
from distill.students.presets import PRESETS
from distill.students.rollout_engine import DTYPES, VLLMRollouts
from distill.students.snapshot import checkpoint_tensors
from distill.students.tokenizer import build_tokenizer
from distill.teachers.transformers_backend import TransformersTeacher
from distill.train import Schedule, distillation_objective, fit


class TimedBatches:
    """The stage's batches, counting the seconds the trainer waits for each after the first
    (the first step pays one-time costs: lazy initialisation, the engine's first shapes)."""

    def __init__(self, batches: OnPolicyBatches):
        self.batches, self.waited, self.calls, self.steady_from = batches, 0.0, 0, None

    def __iter__(self):
        return self

    def __next__(self):
        started = time.perf_counter()
        if self.calls == 1:
            self.steady_from = started
        micro = next(self.batches)
        if self.calls >= 1:
            self.waited += time.perf_counter() - started
        self.calls += 1
        return micro


def student_architecture(size: str):
    hidden, layers = (int(x) for x in size.split("x"))
    return PRESETS["tiny"].override(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=3 * hidden,
                                    head_dim=32 if hidden < 256 else 64, num_attention_heads=max(4, hidden // 64),
                                    num_key_value_heads=max(2, hidden // 128))


def run_stage(student, teacher, tokenizer, prompts, cfg: OnPolicyConfig, steps: int, *, engine=None,
              rollout: RolloutConfig | None = None) -> dict:
    batches = OnPolicyBatches(student, teacher, tokenizer, prompts, cfg, steps=steps, max_length=512, engine=engine,
                              rollout=rollout)
    timed = TimedBatches(batches)
    objective = distillation_objective(cfg.loss, len(tokenizer))
    with tempfile.TemporaryDirectory() as folder:
        tracker = Tracker(Path(folder))
        fit(student, timed, objective, Schedule(steps=steps, lr=cfg.lr, warmup_steps=0), tracker=tracker,
            prefix="train/s/onpolicy", desc="bench", progress=False, log_every=1)
        seconds = time.perf_counter() - timed.steady_from    # steps 2.. (the first is a warm-up)
        records = [r for r in read_metrics(Path(folder)) if "train/s/onpolicy/kd_loss" in r]
    batches.close()
    tokens = sum(r["train/s/onpolicy/rollout_tokens"] for r in records[1:]) * cfg.batch_size
    late = [r["train/s/onpolicy/kd_loss"] for r in records[len(records) // 2:]]
    return {"seconds_per_step": seconds / (steps - 1), "rollout_tokens_per_s": tokens / seconds,
            "trainer_wait_share": timed.waited / seconds, "kd_loss_late": statistics.mean(late),
            # the sampling's own seconds per step (the engine's, or in process the decoder's)
            "sample_s": statistics.mean(r["train/s/onpolicy/rollout_sample_s"] * cfg.grad_accum for r in records[1:]),
            "sync_s": statistics.mean(r.get("train/s/onpolicy/rollout_sync_s", 0.0) for r in records[1:]),
            "staleness": statistics.mean(r.get("train/s/onpolicy/rollout_staleness", 0.0) for r in records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["128x4", "512x4"], help="HIDDENxLAYERS of the dense student")
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 256], help="rollout lengths (max_new_tokens)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--engines", nargs="+", default=["in_process", "vllm_sync", "vllm_async", "vllm_sync_pinned",
                                                         "vllm_async_pinned"])
    parser.add_argument("--out", default="bench/results/rollouts_cpu.jsonl")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    tokenizer = build_tokenizer()
    prompts = [[{"role": "user", "content": f"{i % 10}+{i * 7 % 10}*{i % 3 + 2} mod 10"}] for i in range(64)]
    teacher_model = build_random(PRESETS["tiny-moe"], seed=1).eval()
    out = open(args.out, "a")
    for size in args.sizes:
        first = build_random(student_architecture(size), seed=0)
        params = sum(p.numel() for p in first.parameters())
        engines: dict[str, VLLMRollouts] = {}
        for length in args.lengths:
            cfg = OnPolicyConfig(batch_size=args.batch_size, max_new_tokens=length, top_k=20, lr=1e-4,
                                 loss=LossConfig(divergence="reverse_kl"))
            for variant in args.engines:
                student = copy.deepcopy(first)
                if variant == "in_process":
                    os.sched_setaffinity(0, cores)
                    torch.set_num_threads(len(cores))
                    teacher = TransformersTeacher(teacher_model, tokenizer, name="t", progress=False)
                    result = run_stage(student, teacher, tokenizer, prompts, cfg, args.steps)
                    startup = 0.0
                else:
                    # The server on the last core, the trainer (and its teacher) on the others:
                    # CoreSplit, as rollout.engine_cores=[last] does in a run (`_pinned`:
                    # rollout.lend_cores=false, the trainer never uses the engine's core).
                    os.sched_setaffinity(0, cores)
                    torch.set_num_threads(len(cores))
                    startup = 0.0
                    dtype = "bfloat16" if "_bf16" in variant else "float32"
                    if dtype not in engines:   # one server per engine dtype, kept for the size's runs
                        started = time.perf_counter()
                        engines[dtype] = VLLMRollouts(
                            first, tokenizer, Path(tempfile.mkdtemp(prefix="bench-rollouts-")), dtype=dtype,
                            max_model_len=512, log_path=f"/tmp/bench_rollouts_{size}_{dtype}.log",
                            cpus={cores[-1]}).start()
                        startup = time.perf_counter() - started
                    engine = engines[dtype]
                    # every run starts from the same weights
                    engine.load(checkpoint_tensors(first, DTYPES[dtype]), 0)
                    teacher = TransformersTeacher(teacher_model, tokenizer, name="t", progress=False)
                    rollout = RolloutConfig(engine="vllm", async_=variant.startswith("vllm_async"), max_staleness=1,
                                            dtype=dtype)
                    with contextlib.ExitStack() as cleanup:
                        split = CoreSplit([cores[-1]], cleanup, lend="_pinned" not in variant)
                        split.serve(engine)
                        split.attach(student)
                        split.attach(teacher_model)
                        result = run_stage(student, teacher, tokenizer, prompts, cfg, args.steps, engine=engine,
                                           rollout=rollout)
                row = {"size": size, "params_M": round(params / 1e6, 2), "rollout_length": length, "engine": variant,
                       "steps": args.steps, "batch_size": args.batch_size, "cores": len(cores),
                       "engine_startup_s": round(startup, 1), **{k: round(v, 4) for k, v in result.items()}}
                print(json.dumps(row), flush=True)
                out.write(json.dumps(row) + "\n")
                out.flush()
        for engine in engines.values():
            engine.stop()
    os.sched_setaffinity(0, cores)


if __name__ == "__main__":
    main()
