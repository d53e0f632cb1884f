"""Evidence for the recipe: SFT vs off-policy distillation vs off-policy then on-policy.

Same teacher (the embedded one), same student architecture and initialisation per seed, same
teacher samples (the off-policy cache), same number of student updates:

  (a) sft       cross-entropy on the teacher's sampled text, `updates` steps;
  (b) offpolicy forward KL to the teacher's top-k on those samples, `updates` steps;
  (c) recipe    (b) for `updates - onpolicy` steps, then `onpolicy` steps on the student's own
                rollouts scored by the teacher (reverse KL, lambda 1).

Each arm and seed trains in its own process (one thread); every student is evaluated greedily on
the held-out test split in both modes by the eval harness. Results go to a JSONL file (one line
per arm and seed) and a markdown table (mean and standard deviation over seeds).

    python bench/recipe_evidence.py --cache-dir /tmp/cache_final --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ARMS = ("sft", "offpolicy", "recipe")


def setting_overrides(args) -> list[str]:
    """The student of the experiment (a `moe` student, the only one: from random init at lr 4e-3,
    the default MoE student of the runs below before it started from the teacher's attention)
    and the stages' settings."""
    return ["logger=none", "threads=1", "~students.dense", "students.moe.init=random", "students.moe.lr=4e-3",
            f"students.moe.architecture.hidden_size={args.width}",
            f"students.moe.architecture.moe_intermediate_size={args.width}",
            f"students.moe.architecture.num_hidden_layers={args.layers}",
            f"pipeline.offpolicy.prompts={args.prompts}", f"pipeline.onpolicy.prompts={args.onpolicy_prompts}",
            f"pipeline.onpolicy.max_new_tokens={args.max_new_tokens}",
            f"pipeline.eval.problems={args.problems}"] + ([f"cache_dir={args.cache_dir}"] if args.cache_dir else [])


def train_and_eval(args, arm: str, seed: int, outputs: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from distill.__main__ import load_config
    from distill.common.files import resolve_cache_dir
    from distill.common.tracking import Tracker
    from distill.data import ModeAlternatingBatches, load_chat_dataset
    from distill.eval.backends import TransformersBackend
    from distill.eval.harness import evaluate
    from distill.preflight import tokenizer_name
    from distill.stages.evaluation import eval_problems, eval_sampling, scorer
    from distill.stages.teacher import embedded_teacher
    from distill.stages.teacher_outputs import offpolicy_examples
    from distill.stages.training import StudentData, build_student, fit_offpolicy, fit_onpolicy, onpolicy_prompts
    from distill.students.tokenizer import load_tokenizer
    from distill.teachers.transformers_backend import TransformersTeacher
    from distill.train import Schedule, cross_entropy_objective, fit

    offpolicy_steps = args.updates - (args.onpolicy if arm == "recipe" else 0)
    cfg = load_config(setting_overrides(args) + [f"students.moe.steps={offpolicy_steps}",
                                                    f"pipeline.offpolicy.seed={seed}",
                                                    f"pipeline.onpolicy.steps={max(1, args.onpolicy)}",
                                                    f"pipeline.onpolicy.seed={seed}"])
    tokenizer = load_tokenizer(tokenizer_name(cfg))
    cache_dir = resolve_cache_dir(cfg.cache_dir)
    dataset = load_chat_dataset(cfg.data, cache_dir)
    scratch = Path(outputs) / f"{arm}-{seed}"
    scratch.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(scratch, logger="none", metrics_file=None)
    embedded = embedded_teacher(cfg.teacher, cfg.data, tokenizer, dataset["train"], cache_dir, tracker, False)
    model = embedded.model
    teacher = TransformersTeacher(model, tokenizer, name=Path(embedded.folder).name, progress=False)
    examples = offpolicy_examples(cfg, tokenizer, Path(outputs) / "teacher_outputs", tracker)
    student = build_student(cfg.students["moe"], model, seed=seed)
    problems = eval_problems(dataset["test"].select(range(min(args.problems, len(dataset["test"])))))
    score = scorer(cfg)

    def scores(prefix: str = "") -> dict:
        results = evaluate(TransformersBackend(student, tokenizer, name=arm, progress=False), problems, score,
                           modes=["think", "no_think"], sampling=eval_sampling(cfg.pipeline.eval), max_new_tokens=128)
        return {f"{prefix}{mode}/{k}": r.metrics[k] for mode, r in results.items()
                for k in ("pass@1", "mean_thinking_tokens", "format_errors", "truncated")}

    started, before = time.perf_counter(), {}
    if arm == "sft":
        stage = cfg.pipeline.offpolicy
        batches = ModeAlternatingBatches(examples, stage.batch_size, tokenizer.pad_token_id, cfg.data.max_length,
                                           seed=seed)
        fit(student, batches, cross_entropy_objective(len(tokenizer)),
            Schedule(steps=args.updates, lr=cfg.students["moe"].lr or stage.lr, warmup_steps=stage.warmup_steps),
            tracker=tracker, prefix="train/moe", desc="sft", progress=False)
    else:
        fit_offpolicy(cfg, "moe", student, examples, tokenizer, tracker, False)
        if arm == "recipe":
            pause = time.perf_counter()
            before = scores("before_onpolicy/")   # the same student at the stage boundary
            started += time.perf_counter() - pause
            data = StudentData(examples=examples, onpolicy_prompts=onpolicy_prompts(cfg, dataset["train"]))
            fit_onpolicy(cfg, "moe", student, data, tokenizer, teacher, tracker, False)
    seconds = time.perf_counter() - started
    return {"arm": arm, "seed": seed, "updates": args.updates, "onpolicy_steps": args.onpolicy if arm == "recipe" else 0,
            "train_seconds": round(seconds, 1), **scores(), **before}


def fill_cache(args, outputs: str) -> None:
    """The teacher's off-policy samples, once for every arm and seed."""
    import torch

    torch.set_num_threads(2)
    from distill.__main__ import load_config
    from distill.common.files import resolve_cache_dir
    from distill.common.tracking import Tracker
    from distill.data import load_chat_dataset
    from distill.preflight import tokenizer_name
    from distill.stages.teacher import embedded_teacher
    from distill.stages.teacher_outputs import fill_teacher_outputs, outputs_dir
    from distill.students.tokenizer import load_tokenizer
    from distill.teachers.transformers_backend import TransformersTeacher

    cfg = load_config(setting_overrides(args) + [f"pipeline.offpolicy.teacher_outputs={outputs}/teacher_outputs"])
    tokenizer = load_tokenizer(tokenizer_name(cfg))
    cache_dir = resolve_cache_dir(cfg.cache_dir)
    dataset = load_chat_dataset(cfg.data, cache_dir)
    tracker = Tracker(Path(outputs), logger="none", metrics_file=None)
    embedded = embedded_teacher(cfg.teacher, cfg.data, tokenizer, dataset["train"], cache_dir, tracker, True)
    teacher = TransformersTeacher(embedded.model, tokenizer, name=embedded.name)
    fill_teacher_outputs(cfg, teacher, dataset["train"], tracker, outputs_dir(cfg, Path(outputs)), True)


def table(rows: list[dict]) -> str:
    """Mean ± standard deviation over seeds, and how many seeds reached 90% in thinking mode
    (these students learn the task abruptly, so single runs are bimodal)."""
    lines = ["| arm | seeds | think pass@1 | no_think pass@1 | seeds ≥ 90% think | train s |",
             "|---|---|---|---|---|---|"]
    variants = [(arm, arm, "") for arm in ARMS]
    variants.insert(2, ("recipe", "recipe, at the stage boundary", "before_onpolicy/"))
    for arm, label, prefix in variants:
        mine = [r for r in rows if r["arm"] == arm and f"{prefix}think/pass@1" in r]
        if not mine:
            continue

        def stat(key):
            values = [100 * r[f"{prefix}{key}"] for r in mine]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.1f} ± {spread:.1f}"

        solved = sum(r[f"{prefix}think/pass@1"] >= 0.9 for r in mine)
        seconds = "–" if prefix else f"{statistics.mean(r['train_seconds'] for r in mine):.0f}"
        lines.append(f"| {label} | {len(mine)} | {stat('think/pass@1')} | {stat('no_think/pass@1')} | "
                     f"{solved}/{len(mine)} | {seconds} |")
    lines += ["", "Per seed, think / no_think pass@1 (%):", ""]
    for arm, label, prefix in variants:
        mine = sorted((r for r in rows if r["arm"] == arm and f"{prefix}think/pass@1" in r), key=lambda r: r["seed"])
        if mine:
            lines.append(f"- {label}: " + ", ".join(
                f"seed {r['seed']} {100 * r[prefix + 'think/pass@1']:.1f} / {100 * r[prefix + 'no_think/pass@1']:.1f}"
                for r in mine))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--updates", type=int, default=600, help="student updates per arm")
    parser.add_argument("--onpolicy", type=int, default=150, help="of which on-policy in the recipe arm")
    parser.add_argument("--width", type=int, default=64, help="the MoE student's hidden and expert width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=3000, help="off-policy prompts (teacher samples)")
    parser.add_argument("--onpolicy-prompts", type=int, default=2000)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--problems", type=int, default=500, help="test problems per eval")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--work", default="bench_recipe", help="teacher outputs and scratch")
    parser.add_argument("--out", default="bench/results/recipe_evidence.jsonl")
    parser.add_argument("--table", default=None, help="only print the table of an existing results file")
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]))
        return

    Path(args.work).mkdir(parents=True, exist_ok=True)
    fill_cache(args, args.work)
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    rows = []
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_and_eval, args, arm, seed, args.work) for arm, seed in jobs]
        for future in futures:
            row = future.result()
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as handle:
        for row in rows:
            handle.write(json.dumps({**row, "setting": {k: v for k, v in vars(args).items() if k not in ("out",)}})
                         + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
