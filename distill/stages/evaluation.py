"""The eval stage: the harness of `python -m distill.eval` on the run's own models, at the end of
the pipeline (test split) and during training (`pipeline.eval.every`, validation split).

Problems come from the run's dataset: the built-in task is scored by its strict integer check,
a user's dataset by extraction after `</think>` plus math-verify.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datasets
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.common.tracking import Tracker
from distill.config import Config, EvalConfig
from distill.eval.backends import TransformersBackend
from distill.eval.harness import ModeResult, Scorer, evaluate
from distill.eval.report import write_draft_outputs, write_eval_outputs
from distill.eval.speculative import DraftResult, draft_eval
from distill.eval.tasks import Problem, default_score
from distill.eval.tasks.arithmetic import BUILTIN_SOURCE
from distill.eval.tasks.arithmetic import score as arithmetic_score
from distill.students.chat import MODE_SAMPLING, Sampling, prompt_messages


def scorer(cfg: Config) -> Scorer:
    return arithmetic_score if cfg.data.source == BUILTIN_SOURCE else default_score


def eval_problems(split: datasets.Dataset) -> list[Problem]:
    """The split's rows as eval problems: the prompt turns, and the `answer` column (else the text
    after `</think>` of the reference reply)."""
    return [Problem(id=str(i), messages=prompt_messages(row["messages"]), reference=_reference(row))
            for i, row in enumerate(split)]


def _reference(row: dict) -> str:
    if row.get("answer") is not None:
        return str(row["answer"])
    return row["messages"][-1]["content"].split("</think>")[-1].strip()


def eval_sampling(stage: EvalConfig) -> Callable[[str], Sampling | None]:
    """The pipeline's eval sampling: greedy (reproducible, the default) or Qwen3's per-mode sampling."""
    return lambda mode: None if stage.greedy else MODE_SAMPLING[mode]


def evaluate_models(cfg: Config, models: dict[str, PreTrainedModel], tokenizer: PreTrainedTokenizerBase,
                    test_split: datasets.Dataset, tracker: Tracker, run_dir: Path,
                    progress: bool) -> dict[str, dict[str, ModeResult]]:
    """Every model in every mode on the test split; the report goes into `run_dir` and the log."""
    stage = cfg.pipeline.eval
    problems = eval_problems(test_split.select(range(min(stage.problems, len(test_split)))))
    results = {}
    for name, model in models.items():
        backend = TransformersBackend(model, tokenizer, name=name, batch_size=stage.batch_size, progress=progress)
        results[name] = evaluate(backend, problems, scorer(cfg), modes=stage.modes, sampling=eval_sampling(stage),
                                 samples=stage.samples, max_new_tokens=stage.max_new_tokens, pass_k=[stage.samples],
                                 seed=cfg.seed, desc=f"eval {name}")
        for mode, result in results[name].items():
            tracker.log({f"eval/{mode}/{name}/{k}": v for k, v in result.summary().items()})
    write_eval_outputs(results, run_dir, tracker, baseline="teacher", protocol=eval_protocol(cfg))
    return results


def evaluate_drafts(cfg: Config, teacher: PreTrainedModel, students: dict[str, PreTrainedModel],
                    tokenizer: PreTrainedTokenizerBase, test_split: datasets.Dataset, tracker: Tracker, run_dir: Path,
                    progress: bool) -> dict[str, dict[str, DraftResult]]:
    """Every student as a speculative-decoding draft for the teacher, on the teacher's own
    responses with Qwen3's per-mode sampling (how the teacher would be served; greedy agreement
    is reported beside it). `draft.md` and `draft.json` go into `run_dir`, the numbers into the log."""
    draft = cfg.pipeline.eval.draft
    problems = eval_problems(test_split.select(range(min(draft.problems, len(test_split)))))
    results = draft_eval(teacher, students, tokenizer, problems, modes=cfg.pipeline.eval.modes,
                         sampling=lambda mode: MODE_SAMPLING[mode], max_new_tokens=cfg.pipeline.eval.max_new_tokens,
                         gammas=draft.gammas, gamma=draft.gamma, measure_prompts=draft.measure_prompts, seed=cfg.seed,
                         batch_size=draft.batch_size, generate_batch_size=cfg.pipeline.eval.batch_size,
                         progress=progress)
    write_draft_outputs(results, run_dir, tracker, target="teacher", gamma=draft.gamma, protocol=draft_protocol(cfg))
    return results


def draft_protocol(cfg: Config) -> str:
    """One sentence saying how the draft numbers were made (draft.md and model cards)."""
    draft = cfg.pipeline.eval.draft
    return (f"The teacher's own responses to {draft.problems} test prompts per mode (Qwen3's per-mode sampling, at "
            f"most {cfg.pipeline.eval.max_new_tokens} new tokens), read by teacher and student; alpha = Σ min(p, q) "
            f"over both models' sampling distributions (the same temperature, top-k and top-p applied to each). "
            f"Measured: transformers assisted generation on {draft.measure_prompts} prompts per mode, γ={draft.gamma}, "
            "batch 1, against the teacher alone on the same prompts and seeds.")


def validation_problems(cfg: Config, split: datasets.Dataset | None) -> list[Problem] | None:
    """The problems of periodic eval (None when it is off or there is no validation split)."""
    if not cfg.pipeline.eval.every or split is None:
        return None
    return eval_problems(split.select(range(min(cfg.pipeline.eval.periodic_problems, len(split)))))


def periodic_eval(cfg: Config, name: str, tokenizer: PreTrainedTokenizerBase,
                  problems: list[Problem]) -> Callable[[PreTrainedModel], dict]:
    """The harness on validation problems during training: pass@1, thinking tokens and format
    errors per mode, as `periodic_eval/<name>/<mode>/...` metrics."""
    stage = cfg.pipeline.eval

    def run(model: PreTrainedModel) -> dict:
        backend = TransformersBackend(model, tokenizer, name=name, batch_size=stage.batch_size, progress=False)
        results = evaluate(backend, problems, scorer(cfg), modes=stage.modes, sampling=eval_sampling(stage),
                           max_new_tokens=stage.max_new_tokens, seed=cfg.seed, desc=f"periodic eval {name}")
        return {f"periodic_eval/{name}/{mode}/{key}": r.metrics[key] for mode, r in results.items()
                for key in ("pass@1", "mean_thinking_tokens", "format_errors")}

    return run


def eval_protocol(cfg: Config) -> str:
    """One sentence saying how the run's eval table was made (reports and model cards)."""
    stage = cfg.pipeline.eval
    data = "the built-in task's held-out test split" if cfg.data.source == BUILTIN_SOURCE \
        else f"the test split of {cfg.data.source}"
    decoding = "greedy decoding" if stage.greedy else "Qwen3's per-mode sampling"
    return (f"{stage.problems} problems of {data}, {decoding}, {stage.samples} sample(s) per problem and mode, "
            f"at most {stage.max_new_tokens} new tokens (`python -m distill.eval` runs the same harness).")
