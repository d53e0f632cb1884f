"""Does the distillation loss change how good a speculative-decoding draft the student is?

Same teacher (the embedded one), same teacher samples (the default run's off-policy cache), same
student architecture, initialisation per seed and number of updates; only the off-policy loss
differs: forward KL, reverse KL or total variation over the teacher's top-k (+ tail). Each
student is scored greedily on the held-out test split in both modes (pass@1, the pipeline's eval)
and as a draft for the teacher (alpha, greedy agreement, tokens per target forward at gamma 4:
expected and measured with transformers assisted generation; eval/speculative.py).

Each loss and seed trains in its own process (one thread). Results go to a JSONL file (one line
per loss and seed) and a markdown table (mean and standard deviation over seeds).

    python bench/draft_losses.py --outputs /tmp/default_hd32 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

LOSSES = ("forward_kl", "reverse_kl", "tvd")


def train_and_score(args, loss: str, seed: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from distill.__main__ import load_config
    from distill.common.files import resolve_cache_dir
    from distill.common.tracking import Tracker
    from distill.data import load_chat_dataset
    from distill.eval.backends import TransformersBackend
    from distill.eval.harness import evaluate
    from distill.eval.speculative import draft_eval
    from distill.preflight import tokenizer_name
    from distill.stages.evaluation import eval_problems, eval_sampling, scorer
    from distill.stages.teacher import embedded_teacher
    from distill.stages.teacher_outputs import offpolicy_examples
    from distill.stages.training import build_student, fit_offpolicy
    from distill.students.chat import MODE_SAMPLING
    from distill.students.tokenizer import load_tokenizer

    overrides = ["logger=none", "threads=1", f"loss={loss}", f"pipeline.offpolicy.seed={seed}"]
    overrides += [f"students.{args.student}.steps={args.updates}"] if args.updates else []
    overrides += [f"cache_dir={args.cache_dir}"] if args.cache_dir else []
    cfg = load_config(overrides)
    tokenizer = load_tokenizer(tokenizer_name(cfg))
    cache_dir = resolve_cache_dir(cfg.cache_dir)
    dataset = load_chat_dataset(cfg.data, cache_dir)
    tracker = Tracker(Path(args.work), logger="none", metrics_file=None)
    teacher = embedded_teacher(cfg.teacher, cfg.data, tokenizer, dataset["train"], cache_dir, tracker, False).model
    examples = offpolicy_examples(cfg, tokenizer, Path(args.outputs) / "teacher_outputs", tracker)
    student = build_student(cfg.students[args.student], teacher, seed=seed)
    started = time.perf_counter()
    fit_offpolicy(cfg, args.student, student, examples, tokenizer, tracker, False)
    seconds = time.perf_counter() - started

    test = dataset["test"]
    problems = eval_problems(test.select(range(min(args.problems, len(test)))))
    results = evaluate(TransformersBackend(student, tokenizer, name=loss, progress=False), problems, scorer(cfg),
                       modes=["think", "no_think"], sampling=eval_sampling(cfg.pipeline.eval),
                       max_new_tokens=cfg.pipeline.eval.max_new_tokens)
    drafts = draft_eval(teacher, {loss: student}, tokenizer, problems[:args.draft_problems],
                        modes=["think", "no_think"], sampling=lambda mode: MODE_SAMPLING[mode],
                        max_new_tokens=cfg.pipeline.eval.max_new_tokens, gammas=[4], gamma=4,
                        measure_prompts=args.measure_prompts, seed=seed, progress=False)[loss]
    row = {"loss": loss, "seed": seed, "student": args.student, "train_seconds": round(seconds, 1)}
    for mode in ("think", "no_think"):
        d = drafts[mode]
        row |= {f"{mode}/pass@1": results[mode].accuracy, f"{mode}/alpha": d.alpha,
                f"{mode}/greedy_agreement": d.greedy_agreement, f"{mode}/expected_tpf": d.tokens_per_forward[4],
                f"{mode}/measured_tpf": d.measured.tokens_per_forward if d.measured else None}
    return row


def table(rows: list[dict]) -> str:
    def stat(mine, key, scale=1.0, digits=1):
        values = [scale * r[key] for r in mine if r.get(key) is not None]
        if not values:
            return "–"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"

    lines = ["| loss | seeds | mode | pass@1 (%) | alpha | greedy agreement | tokens/forward γ=4, expected | measured |",
             "|---|---|---|---|---|---|---|---|"]
    for loss in LOSSES:
        mine = [r for r in rows if r["loss"] == loss]
        if not mine:
            continue
        for mode in ("think", "no_think"):
            lines.append(f"| {loss} | {len(mine)} | {mode} | {stat(mine, f'{mode}/pass@1', 100)} | "
                         f"{stat(mine, f'{mode}/alpha', digits=3)} | {stat(mine, f'{mode}/greedy_agreement', digits=3)} | "
                         f"{stat(mine, f'{mode}/expected_tpf', digits=2)} | {stat(mine, f'{mode}/measured_tpf', digits=2)} |")
    lines += ["", "Per seed, think pass@1 (%) / think alpha / no_think alpha:", ""]
    for loss in LOSSES:
        mine = sorted((r for r in rows if r["loss"] == loss), key=lambda r: r["seed"])
        if mine:
            lines.append(f"- {loss}: " + ", ".join(
                f"seed {r['seed']} {100 * r['think/pass@1']:.1f} / {r['think/alpha']:.3f} / {r['no_think/alpha']:.3f}"
                for r in mine))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--student", default="dense", choices=["dense", "moe"])
    parser.add_argument("--updates", type=int, default=0, help="off-policy updates (0: the default recipe's)")
    parser.add_argument("--outputs", help="a run folder whose teacher_outputs/ to train from")
    parser.add_argument("--problems", type=int, default=500, help="test problems for pass@1")
    parser.add_argument("--draft-problems", type=int, default=100, help="of which the teacher answers for alpha")
    parser.add_argument("--measure-prompts", type=int, default=8, help="prompts decoded with the draft, per mode")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--work", default="/tmp/bench_draft_losses", help="scratch")
    parser.add_argument("--out", default="bench/results/draft_losses.jsonl")
    parser.add_argument("--table", default=None, help="only print the table of an existing results file")
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]))
        return
    if not args.outputs:
        parser.error("--outputs RUN_DIR is needed: the run folder whose teacher_outputs/ the students learn from")

    Path(args.work).mkdir(parents=True, exist_ok=True)
    jobs = [(loss, seed) for seed in args.seeds for loss in args.losses]
    rows = []
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_and_score, args, loss, seed) for loss, seed in jobs]
        for future in futures:
            row = future.result()
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as handle:
        for row in rows:
            handle.write(json.dumps({**row, "setting": {k: v for k, v in vars(args).items() if k != "out"}}) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
