"""On-policy distillation throughput and memory: ours against TRL's GKDTrainer and DistillationTrainer.

Same tiny teacher and student (Qwen3 blocks, random init, the built-in tokenizer), same prompts
and reference replies (the built-in task), batch 8, at most 128 tokens per sequence, 32 new
tokens per rollout, the same divergence (generalised JSD, beta 0.5, on full distributions: our
teacher top-k is the whole vocabulary), sampling at temperature 1, one thread per process. Each
configuration runs in a fresh process; steps/s is timed after `--warmup` steps, peak RSS is the
process's high-water mark.

lambda is GKD's share of on-policy steps. For lambda < 1 TRL scores the dataset's replies with the
teacher at every off-policy step; ours reads them from the teacher-output cache, filled once
before training (the time to fill it is reported apart).

    python bench/onpolicy_vs_trl.py                       # all configurations, 60 steps each
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

BATCH, MAX_LENGTH, NEW_TOKENS = 8, 128, 32


def make_models(folder: Path) -> None:
    """A ~0.7M-parameter student and a ~1.1M-parameter teacher (dense Qwen3), and the tokenizer."""
    import torch

    from distill.students.build import build_random
    from distill.students.presets import get_preset
    from distill.students.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    for name, layers, seed in (("student", 4, 0), ("teacher", 7, 1)):
        model = build_random(get_preset("tiny").override(num_hidden_layers=layers), seed=seed)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        del model
    torch.manual_seed(0)


def conversations(count: int) -> list[list[dict]]:
    """Built-in task problems with their reference replies (thinking mode), prompt + reply <= 128 tokens."""
    from distill.eval.tasks.arithmetic import generate_splits

    problems = generate_splits({"train": count}, min_steps=2, max_steps=4, seed=7)["train"]
    return [p.messages(thinking=True) for p in problems]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_trl(kind: str, lam: float, folder: str, steps: int, warmup: int) -> dict:
    import torch

    torch.set_num_threads(1)
    import datasets
    from transformers import AutoTokenizer, TrainerCallback

    tokenizer = AutoTokenizer.from_pretrained(Path(folder) / "student")
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                marks["start"] = time.perf_counter()
            if state.global_step == steps:
                marks["end"] = time.perf_counter()

    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, max_steps=steps,
                  learning_rate=1e-4, logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True,
                  dataloader_num_workers=0, disable_tqdm=True, seed=0, temperature=1.0)
    rows = conversations(4 * steps * BATCH)
    if kind == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(**common, lmbda=lam, beta=0.5, max_new_tokens=NEW_TOKENS, max_length=MAX_LENGTH)
        dataset = datasets.Dataset.from_list([{"messages": m} for m in rows])
        trainer = GKDTrainer(model=str(Path(folder) / "student"), teacher_model=str(Path(folder) / "teacher"),
                             args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()])
    else:
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(**common, beta=0.5, max_completion_length=NEW_TOKENS, top_k=0, top_p=1.0)
        dataset = datasets.Dataset.from_list([{"prompt": m[:1]} for m in rows])
        trainer = DistillationTrainer(model=str(Path(folder) / "student"), teacher_model=str(Path(folder) / "teacher"),
                                      args=args, train_dataset=dataset, processing_class=tokenizer,
                                      callbacks=[Clock()])
    trainer.train()
    return {"impl": f"trl_{kind}", "lambda": lam, "steps_per_s": (steps - warmup) / (marks["end"] - marks["start"]),
            "peak_rss_mb": peak_rss_mb()}


def run_ours(lam: float, folder: str, steps: int, warmup: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.common.tracking import Tracker
    from distill.config import LossConfig, OnPolicyConfig
    from distill.data import Example, ModeAlternatingBatches
    from distill.onpolicy import OnPolicyBatches
    from distill.students.chat import render_prompt, render_response
    from distill.teachers.transformers_backend import TransformersTeacher
    from distill.train import Schedule, distillation_objective, fit

    tokenizer = AutoTokenizer.from_pretrained(Path(folder) / "student")
    student = AutoModelForCausalLM.from_pretrained(Path(folder) / "student", dtype=torch.float32)
    teacher = TransformersTeacher(AutoModelForCausalLM.from_pretrained(Path(folder) / "teacher", dtype=torch.float32),
                                  tokenizer, name="teacher", progress=False)
    vocab = len(tokenizer)
    rows = conversations(4 * steps * BATCH)
    cfg = OnPolicyConfig(batch_size=BATCH, max_new_tokens=NEW_TOKENS, top_k=vocab, mix=lam, lr=1e-4, warmup_steps=0,
                         loss=LossConfig(divergence="jsd", beta=0.5))
    offpolicy, fill_seconds = None, 0.0
    if lam < 1:
        # The teacher-output cache's job: score the replies once (in memory here).
        tick = time.perf_counter()
        needed = (steps + 1) * BATCH
        prompts = [render_prompt(tokenizer, m[:1], "think") for m in rows[:needed]]
        replies = [render_response(tokenizer, m[1]["content"], "think") for m in rows[:needed]]
        tops = teacher.top_k_logprobs(prompts, replies, vocab)
        examples = [Example(p, r, t.ids, t.logprobs) for p, r, t in zip(prompts, replies, tops)]
        offpolicy = ModeAlternatingBatches({"think": examples}, BATCH, tokenizer.pad_token_id, MAX_LENGTH)
        fill_seconds = time.perf_counter() - tick
    # Rollouts in think mode, like TRL's (one template setting for all prompts).
    cfg_modes = [m[:1] for m in rows]
    batches = OnPolicyBatches(student, teacher, tokenizer, cfg_modes, cfg, steps=steps, max_length=MAX_LENGTH,
                               offpolicy=offpolicy, seed=0, modes=("think",))
    objective = distillation_objective(cfg.loss, vocab, estimator="full")
    marks = {}

    def timed():
        for step in range(steps):
            if step == warmup:
                marks["start"] = time.perf_counter()
            yield next(batches)

    fit(student, timed(), objective, Schedule(steps=steps, lr=1e-4, warmup_steps=0),
        tracker=Tracker(Path(tempfile.mkdtemp()), metrics_file=None), prefix="train/student", desc="ours",
        progress=False, log_every=10_000)
    marks["end"] = time.perf_counter()
    return {"impl": "ours", "lambda": lam, "steps_per_s": (steps - warmup) / (marks["end"] - marks["start"]),
            "peak_rss_mb": peak_rss_mb(), "cache_fill_seconds": round(fill_seconds, 2)}


def in_child(function, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(function, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--impls", nargs="+", default=["trl_gkd", "trl_distillation", "ours"])
    parser.add_argument("--out", default="bench/results/onpolicy_vs_trl.jsonl")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        make_models(Path(folder))
        for lam in args.lambdas:
            for impl in args.impls:
                if impl == "trl_distillation" and lam != 1.0:
                    continue  # DistillationTrainer is on-policy only
                if impl == "ours":
                    row = in_child(run_ours, lam, folder, args.steps, args.warmup)
                else:
                    row = in_child(run_trl, impl.removeprefix("trl_"), lam, folder, args.steps, args.warmup)
                row = {**row, "steps": args.steps, "batch": BATCH, "max_length": MAX_LENGTH, "new_tokens": NEW_TOKENS}
                results.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as handle:
        for row in results:
            handle.write(json.dumps(row) + "\n")
    print("| lambda | impl | steps/s | peak RSS (MB) | vs TRL GKD |")
    print("|---|---|---|---|---|")
    for row in results:
        gkd = next((r for r in results if r["impl"] == "trl_gkd" and r["lambda"] == row["lambda"]), None)
        ratio = f"{row['steps_per_s'] / gkd['steps_per_s']:.2f}x" if gkd else "–"
        print(f"| {row['lambda']} | {row['impl']} | {row['steps_per_s']:.2f} | {row['peak_rss_mb']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
