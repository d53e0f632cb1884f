"""Datasets and token batches.

Every source goes through `datasets`: the built-in arithmetic task is written once as JSONL
files (train/validation/test, eval/tasks/arithmetic.py) and loaded exactly like a user's
JSONL/Parquet file or hub dataset with a `messages` column. `TokenBatch` is what the training
loop consumes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from distill.common.errors import ConfigError, first_line
from distill.config import DataConfig
from distill.eval.tasks.arithmetic import BUILTIN_SOURCE, write_splits
from distill.students.chat import prompt_messages, render_prompt


def load_chat_dataset(cfg: DataConfig, cache_dir: Path) -> datasets.DatasetDict:
    """The train/validation/test splits with a `messages` column (and `answer` when present)."""
    if cfg.source == BUILTIN_SOURCE:
        loaded = datasets.load_dataset("json", data_files=write_splits(cfg.arithmetic, cache_dir))
    else:
        loaded = _load_user_dataset(cfg.source, cfg.messages_column)
    if cfg.messages_column != "messages":
        loaded = loaded.rename_column(cfg.messages_column, "messages")
    if cfg.answer_column != "answer" and cfg.answer_column in loaded["train"].column_names:
        loaded = loaded.rename_column(cfg.answer_column, "answer")
    for split in loaded:
        if len(loaded[split]) == 0:
            raise ConfigError(f"dataset '{cfg.source}' split '{split}' is empty")
    if cfg.source != BUILTIN_SOURCE:
        loaded = datasets.DatasetDict({split: drop_malformed(rows, f"dataset '{cfg.source}' split '{split}'",
                                                             malformed_reason, cfg.max_malformed)
                                       for split, rows in loaded.items()})
    return loaded


ROLES = ("system", "user", "assistant")


def malformed_reason(row: dict) -> str | None:
    """Why a chat row cannot be used (None: it can): turns must be {role, content} mappings with a
    known role and text content, with a user turn to answer."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages is not a non-empty list of turns"
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            return f"a turn is not {{role: system|user|assistant, content: text}}: {str(turn)[:60]}"
    if not any(turn["role"] == "user" for turn in messages):
        return "no user turn"
    return None


def drop_malformed(rows: datasets.Dataset, what: str, reason, threshold: float) -> datasets.Dataset:
    """Skip the rows `reason(row)` refuses, saying how many, while they are at most `threshold` of
    the rows; above it, stop with one line naming the first bad row and why."""
    reasons = [reason(row) for row in rows]
    bad = [i for i, r in enumerate(reasons) if r is not None]
    if not bad:
        return rows
    if len(bad) > threshold * len(rows):
        raise ConfigError(f"{what}: {len(bad)} of {len(rows)} rows are unusable (row {bad[0]}: {reasons[bad[0]]}); "
                          f"fix them, or allow up to a share of them with data.max_malformed (now {threshold})")
    print(f"warning: {what}: skipped {len(bad)} of {len(rows)} unusable rows (row {bad[0]}: {reasons[bad[0]]})")
    keep = set(range(len(rows))) - set(bad)
    return rows.select(sorted(keep))


def drop_long_prompts(loaded: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase,
                      cfg: DataConfig) -> datasets.DatasetDict:
    """Rows whose prompt leaves no room for a reply within data.max_length, counted and skipped
    like malformed rows."""
    def too_long(row):
        length = len(render_prompt(tokenizer, prompt_messages(row["messages"]), "think"))
        return None if length < cfg.max_length - 1 else (f"its prompt is {length} tokens, data.max_length is "
                                                           f"{cfg.max_length}; raise data.max_length")
    return datasets.DatasetDict({split: drop_malformed(rows, f"dataset '{cfg.source}' split '{split}'", too_long,
                                                       cfg.max_malformed) for split, rows in loaded.items()})


def _load_user_dataset(source: str, messages_column: str) -> datasets.DatasetDict:
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".parquet"):
        if not path.exists():
            raise ConfigError(f"data.source file '{source}' does not exist")
        if path.stat().st_size == 0:
            raise ConfigError(f"dataset '{source}' is empty: give a file with one chat row per line")
        try:
            loaded = datasets.load_dataset("parquet" if suffix == ".parquet" else "json", data_files=str(path))
        except Exception as error:  # noqa: BLE001 - malformed JSON/Parquet surfaces as many types
            raise ConfigError(f"cannot read dataset '{source}' ({first_line(error)}): give JSON lines (one chat row per line) or "
                              "a Parquet file") from None
    else:
        try:
            loaded = datasets.load_dataset(source)
        except Exception as error:  # datasets raises many types for a missing or offline dataset
            raise ConfigError(f"cannot load dataset '{source}' ({first_line(error)}); give a .jsonl/.parquet "
                              "file or a hub dataset name with network access") from None
    if "train" not in loaded:
        raise ConfigError(f"dataset '{source}' has no 'train' split (splits: {', '.join(loaded)})")
    if len(loaded["train"]) == 0:
        raise ConfigError(f"dataset '{source}' is empty")
    if messages_column not in loaded["train"].column_names:
        raise ConfigError(f"dataset '{source}' has no '{messages_column}' column (columns: "
                          f"{', '.join(loaded['train'].column_names)}); set data.messages_column")
    if "test" not in loaded and len(loaded["train"]) >= 2:
        # Hold out a fixed slice so evaluation never sees training prompts.
        held = loaded["train"].train_test_split(test_size=min(500, max(1, len(loaded["train"]) // 10)), seed=0)
        loaded = datasets.DatasetDict(train=held["train"], test=held["test"])
    return loaded


@dataclass
class Example:
    """One training sequence: prompt and response ids, and optionally the teacher's top-k
    distribution for each response token ([R, K]) and its log-probability of each actual
    response token ([R], for the sampled-token estimator)."""

    prompt: list[int]
    response: list[int]
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    token_logprobs: torch.Tensor | None = None


@dataclass
class TokenBatch:
    """Right-padded sequences in logit coordinates: position t predicts input_ids[:, t + 1].

    input_ids, attention_mask: [B, L]; target_mask: [B, L] True where the next token is a
    response token (prompt tokens never count; the final eos always does);
    targets: [B, L] the next token; topk_ids / topk_logprobs: [B, L, K] or None;
    token_logprobs: [B, L] the teacher's log-probability of each target token, or None.
    `stats` are numbers about how the batch was made (on-policy rollouts), logged with the step.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    targets: torch.Tensor
    topk_ids: torch.Tensor | None
    topk_logprobs: torch.Tensor | None
    mode: str | None = None     # "think" / "no_think" when every row is of one mode
    token_logprobs: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def num_targets(self) -> int:
        return int(self.target_mask.sum())


def collate(examples: list[Example], pad_id: int, max_length: int, mode: str | None = None,
            stats: dict[str, float] | None = None) -> TokenBatch:
    lengths = [min(len(e.prompt) + len(e.response), max_length) for e in examples]
    width = max(lengths)
    batch, k = len(examples), (examples[0].topk_ids.shape[-1] if examples[0].topk_ids is not None else 0)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    target_mask = torch.zeros((batch, width), dtype=torch.bool)
    targets = torch.zeros((batch, width), dtype=torch.long)
    topk_ids = torch.zeros((batch, width, k), dtype=torch.long) if k else None
    topk_logprobs = torch.zeros((batch, width, k), dtype=torch.float32) if k else None
    chosen = torch.zeros((batch, width), dtype=torch.float32) if examples[0].token_logprobs is not None else None
    for row, (example, length) in enumerate(zip(examples, lengths)):
        sequence = torch.tensor((example.prompt + example.response)[:length])
        input_ids[row, :length] = sequence
        attention_mask[row, :length] = 1
        start = len(example.prompt) - 1          # logit position predicting the first response token
        stop = length - 1                        # last position that has a next token
        if stop <= start:
            continue
        # Target positions are chosen by index, never by token id: with pad == eos the final eos
        # still counts.
        target_mask[row, start:stop] = True
        targets[row, :stop] = sequence[1:length]
        if k:
            topk_ids[row, start:stop] = example.topk_ids[:stop - start].long()
            topk_logprobs[row, start:stop] = example.topk_logprobs[:stop - start].float()
        if chosen is not None:
            chosen[row, start:stop] = example.token_logprobs[:stop - start].float()
    return TokenBatch(input_ids, attention_mask, target_mask, targets, topk_ids, topk_logprobs, mode, chosen,
                      dict(stats or {}))


class ModeAlternatingBatches:
    """Endless optimizer steps, each a list of `micro_batches` batches, alternating the modes.

    One mode per micro-batch keeps padding low: no_think replies are a few tokens, think
    replies tens. Each mode's examples are reshuffled every epoch; a mode with no examples is
    skipped. Resumable: `state_dict()` after step n, loaded into a fresh instance, yields
    exactly what step n + 1 onwards would have. Data-parallel: every rank draws the same batch and
    keeps rows rank, rank + world, ...
    """

    def __init__(self, examples: dict[str, list[Example]], batch_size: int, pad_id: int, max_length: int, *,
                 micro_batches: int = 1, seed: int = 0, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world
        self.examples, self.batch_size, self.pad_id, self.max_length = examples, batch_size, pad_id, max_length
        self.micro_batches = micro_batches
        self.rng = random.Random(seed)
        self.modes = [mode for mode in examples if examples[mode]]
        if not self.modes:
            raise ValueError("no training examples in any mode")
        self.orders: dict[str, list[int]] = {mode: [] for mode in self.modes}
        self.turn = 0

    def __iter__(self):
        return self

    def __next__(self) -> list[TokenBatch]:
        step = []
        for _ in range(self.micro_batches):
            mode = self.modes[self.turn % len(self.modes)]
            self.turn += 1
            while len(self.orders[mode]) < self.batch_size:
                order = list(range(len(self.examples[mode])))
                self.rng.shuffle(order)
                self.orders[mode].extend(order)
            chosen, self.orders[mode] = self.orders[mode][:self.batch_size], self.orders[mode][self.batch_size:]
            mine = chosen[self.rank::self.world]
            step.append(collate([self.examples[mode][i] for i in mine], self.pad_id, self.max_length, mode))
        return step

    def state_dict(self) -> dict:
        return {"rng": rng_state(self.rng), "orders": self.orders, "turn": self.turn}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(rng_from_state(state["rng"]))
        self.orders, self.turn = {m: list(v) for m, v in state["orders"].items()}, state["turn"]


def rng_state(rng: random.Random) -> list:
    """A `random.Random` state as JSON-able lists."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def rng_from_state(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss
