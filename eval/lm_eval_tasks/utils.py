"""What lm-evaluation-harness calls for the distill tasks (the YAML files beside this one).

The problems and the scoring are the project's own (`eval/tasks/`): lm-eval loads a task's
problems through `load_problems`, renders the question with the model's chat template
(`--apply_chat_template`, `enable_thinking=True|False` in `--model_args`), generates, and hands
each reply to `process_results`, which scores it exactly as `python -m eval` does. Run lm-eval
with `think_end_token=</think>`: it then passes the text after the reasoning, or the whole reply
when the think block never closes (a format error here, never a guess from the reasoning).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path


def load_problems(task: str = "arithmetic", path: str | None = None, split: str | None = None,
                  limit: int | None = None, cache_dir: str | None = None, **_ignored):
    """{"test": Dataset(id, question, reference, task)}; `path`, `split` and `limit` override the
    task's source (pass them with lm-eval's --metadata '{"path": ...}')."""
    import os

    import datasets

    from distill.eval.tasks import load_task

    definition = load_task(task)
    changes = {k: v for k, v in (("path", path), ("split", split), ("limit", limit)) if v is not None}
    source = replace(definition.source, **changes)
    cache = Path(cache_dir or os.environ.get("DISTILL_CACHE") or Path.home() / ".cache" / "distill")
    problems = definition.load(source, cache)
    rows = [{"id": p.id, "question": p.messages[-1]["content"], "reference": p.reference, "task": task}
            for p in problems]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def doc_to_text(doc: dict) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    from distill.eval.tasks import load_task

    score = load_task(doc["task"]).score(results[0], doc["reference"])
    return {"pass@1": float(score.correct), "format_error": float(score.predicted is None)}
