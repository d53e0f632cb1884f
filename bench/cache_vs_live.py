"""A student trained from the teacher-output cache vs one trained from the live teacher.

The same responses (written to the cache by the embedded teacher) are scored twice: read back
from the cache (16-bit log-probabilities, mass restored) and scored live by the in-process teacher
(float32). The default dense student is trained on each with the same seed, data order and steps;
the script prints both loss curves' last points and both students' accuracy in both modes, and
writes the curves to a PNG.

    python bench/cache_vs_live.py --cache-dir /tmp/cache_final          # default: 1,000 prompts, 600 steps
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="cache_vs_live.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from distill.__main__ import load_config
    from distill.common.files import resolve_cache_dir
    from distill.common.tracking import Tracker
    from distill.data import Example, load_chat_dataset
    from distill.plots import loss_curves
    from distill.preflight import tokenizer_name
    from distill.stages.evaluation import evaluate_models
    from distill.stages.teacher import embedded_teacher
    from distill.stages.teacher_outputs import fill_teacher_outputs, offpolicy_examples
    from distill.stages.training import build_student, fit_offpolicy
    from distill.students.tokenizer import load_tokenizer
    from distill.teachers.transformers_backend import TransformersTeacher

    overrides = ["logger=none", f"pipeline.offpolicy.prompts={args.prompts}", f"students.dense.steps={args.steps}"]
    cfg = load_config(overrides + ([f"cache_dir={args.cache_dir}"] if args.cache_dir else []))
    tokenizer = load_tokenizer(tokenizer_name(cfg))
    cache_dir = resolve_cache_dir(cfg.cache_dir)
    dataset = load_chat_dataset(cfg.data, cache_dir)
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch)
        tracker = Tracker(run_dir, logger="none")
        embedded = embedded_teacher(cfg.teacher, cfg.data, tokenizer, dataset["train"], cache_dir, tracker, True)
        model = embedded.model
        teacher = TransformersTeacher(model, tokenizer, name=embedded.name, progress=True)
        cached = offpolicy_examples(cfg, tokenizer, fill_teacher_outputs(cfg, teacher, dataset["train"], tracker,
                                                                         run_dir / "teacher_outputs", True), tracker)
        live = {}
        for mode, items in cached.items():
            tops = teacher.top_k_logprobs([e.prompt for e in items], [e.response for e in items],
                                          cfg.pipeline.offpolicy.top_k)
            live[mode] = [Example(e.prompt, e.response, t.ids, t.logprobs) for e, t in zip(items, tops)]
        difference = max(float((a.topk_logprobs - b.topk_logprobs).abs().max())
                         for mode in cached for a, b in zip(cached[mode], live[mode]))

        students, curves, renamed = {}, {}, []
        for source, examples in (("cache", cached), ("live", live)):
            student = build_student(cfg.students["dense"], model, seed=cfg.seed)
            records = fit_offpolicy(cfg, "dense", student, examples, tokenizer,
                                     Tracker(run_dir, logger="none", metrics_file=None), True)
            students[source] = student
            curves[source] = [(r["train/dense/step"], r["train/dense/kd_loss"]) for r in records]
            renamed += [{k.replace("train/dense/", f"train/{source}/"): v for k, v in r.items()} for r in records]
        results = evaluate_models(cfg, students, tokenizer, dataset["test"], tracker, run_dir, True)
        loss_curves(renamed, Path(args.out))

    summary = {"prompts": args.prompts, "steps": args.steps,
               "max_abs_logprob_difference_cache_vs_live": difference,
               **{f"{source}/final_kd_loss": curves[source][-1][1] for source in curves},
               **{f"{source}/kd_loss_mean_last_100_steps": sum(v for s, v in curves[source] if s > args.steps - 100)
                  / max(1, sum(1 for s, _ in curves[source] if s > args.steps - 100)) for source in curves},
               **{f"{source}/accuracy_{mode}": result.accuracy for source, modes in results.items()
                  for mode, result in modes.items()}}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
