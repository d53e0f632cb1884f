"""Eval tasks, one file each: how problems are made or loaded, and how an answer is checked.

A task file defines `TASK = Task(...)`; `python -m distill.eval task=NAME` imports
`eval/tasks/NAME.py`, so adding a task is adding that one small file: the Hydra `task` group is
registered from the files found here, and the task's own defaults (source, samples, token limit)
live in its `TASK`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distill.common.errors import UserError, first_line
from distill.eval.extract import Extraction, extract
from distill.eval.verify import equivalent


class TaskError(UserError, ValueError):
    """A task cannot be loaded as configured; the message says why and what to do."""


@dataclass(frozen=True)
class Problem:
    id: str
    messages: list[dict]   # the prompt: the conversation up to the assistant's turn
    reference: str         # the reference final answer


@dataclass(frozen=True)
class Score:
    predicted: str | None  # None: no answer found (a format error)
    form: str              # how the answer was found (eval/extract.py)
    correct: bool


@dataclass(frozen=True)
class Source:
    """Where a task's problems come from, and which columns hold them (`datasets` loads it)."""

    path: str = ""                  # a .jsonl/.json/.parquet file, a folder saved by datasets, or a hub name
    subset: str | None = None       # the hub config name (gsm8k: "main")
    split: str = "test"
    question_column: str = "question"
    answer_column: str = "answer"
    limit: int = 0                  # the first N problems; 0 = all
    # Appended to each question (Qwen3's math prompt asks for a boxed answer).
    prompt_suffix: str = ""


def default_score(response: str, reference: str) -> Score:
    """The answer after `</think>` (boxed, ####, stated, or plain) checked with math-verify."""
    found: Extraction = extract(response)
    return Score(found.answer, found.form, equivalent(found.answer, reference))


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[Source, Path], list[Problem]]   # (source, cache dir) -> problems
    source: Source = Source()                       # the defaults of this task
    score: Callable[[str, str], Score] = default_score
    samples: int = 1                                # default n samples per problem and mode
    max_new_tokens: int = 2048                      # default generation budget


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def load_task(name: str) -> Task:
    """`TASK` of eval/tasks/<name>.py."""
    if name not in available():
        raise TaskError(f"unknown task '{name}'; valid: {', '.join(available())} (a task is one file in eval/tasks/)")
    return importlib.import_module(f"{__name__}.{name}").TASK


def load_rows(source: Source) -> list[dict]:
    """The rows of a task's source through `datasets`: a local file or folder, or a hub dataset."""
    import datasets

    if not source.path:
        raise TaskError("the task has no source: set task.source.path to a .jsonl/.parquet file or a hub dataset name")
    path = Path(source.path)
    try:
        if path.suffix.lower() in (".jsonl", ".json", ".parquet"):
            if not path.is_file():
                raise TaskError(f"task.source.path: no file '{path}'")
            kind = "parquet" if path.suffix.lower() == ".parquet" else "json"
            rows = datasets.load_dataset(kind, data_files={source.split: str(path)}, split=source.split)
        elif path.is_dir():
            loaded = datasets.load_from_disk(str(path)) if (path / "dataset_dict.json").exists() or \
                (path / "dataset_info.json").exists() else datasets.load_dataset(str(path))
            rows = loaded[source.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            rows = datasets.load_dataset(source.path, source.subset, split=source.split)
    except TaskError:
        raise
    except Exception as error:  # noqa: BLE001 - datasets raises many types; the user needs one line
        raise TaskError(f"cannot load task data '{source.path}' (split '{source.split}'): {first_line(error)}; give a "
                        "local .jsonl/.parquet file, or a hub dataset name with network access") from None
    for column in (source.question_column, source.answer_column):
        if column not in rows.column_names:
            raise TaskError(f"task data '{source.path}' has no column '{column}' (columns: "
                            f"{', '.join(rows.column_names)}); set task.source.question_column / answer_column")
    if len(rows) == 0:
        raise TaskError(f"task data '{source.path}' split '{source.split}' is empty")
    if source.limit:
        rows = rows.select(range(min(source.limit, len(rows))))
    return rows.to_list()


def question_problems(source: Source, reference: Callable[[str], str] = str) -> list[Problem]:
    """Problems from rows with a question column and an answer column (GSM8K, MATH, AIME)."""
    problems = []
    for index, row in enumerate(load_rows(source)):
        question = str(row[source.question_column]).strip() + source.prompt_suffix
        problems.append(Problem(id=str(row.get("id", row.get("unique_id", index))),
                                messages=[{"role": "user", "content": question}],
                                reference=reference(str(row[source.answer_column]))))
    return problems
