"""Datasets and token batches.

Every source goes through `datasets`: the built-in arithmetic task is written once as JSONL
files (train/validation/test, eval/tasks/arithmetic.py) and loaded exactly like a user's
JSONL/Parquet file or hub dataset with a `messages` column. `TokenBatch` is what the training
loop consumes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from distill.common.errors import ConfigError, first_line
from distill.config import DataConfig
from distill.eval.tasks.arithmetic import BUILTIN_SOURCE, write_splits
from distill.students.chat import MODES, prompt_messages, render_prompt


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
        # Checked as the file holds them, before any split is carved out: a bad row is named by
        # its line in a JSONL file.
        lines = Path(cfg.source).suffix.lower() == ".jsonl"
        loaded = datasets.DatasetDict({split: drop_malformed(rows, f"dataset '{cfg.source}' split '{split}'",
                                                             malformed_reason, cfg.max_malformed, lines=lines)
                                       for split, rows in loaded.items()})
        loaded = _hold_out(loaded)
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


def drop_malformed(rows: datasets.Dataset, what: str, reason, threshold: float, *,
                   lines: bool = False) -> datasets.Dataset:
    """Skip the rows `reason(row)` refuses, saying how many, while they are at most `threshold` of
    the rows; above it, stop with one line naming the first bad row (`lines`: by its line in
    the file) and why."""
    reasons = [reason(row) for row in rows]
    bad = [i for i, r in enumerate(reasons) if r is not None]
    if not bad:
        return rows
    first = f"line {bad[0] + 1}" if lines else f"row {bad[0]}"
    if len(bad) > threshold * len(rows):
        raise ConfigError(f"{what}: {len(bad)} of {len(rows)} rows are unusable ({first}: {reasons[bad[0]]}); "
                          f"fix them, or allow up to a share of them with data.max_malformed (now {threshold})")
    print(f"warning: {what}: skipped {len(bad)} of {len(rows)} unusable rows ({first}: {reasons[bad[0]]})")
    keep = set(range(len(rows))) - set(bad)
    return rows.select(sorted(keep))


def drop_long_prompts(loaded: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase,
                      cfg: DataConfig) -> datasets.DatasetDict:
    """Rows whose prompt leaves no room for a reply within data.max_length, counted and skipped
    like malformed rows."""
    def too_long(row):
        # The longer of the two modes' renderings (the non-thinking one carries an empty think block).
        length = max(len(render_prompt(tokenizer, prompt_messages(row["messages"]), mode)) for mode in MODES)
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
        if suffix == ".jsonl":
            _check_json_lines(path)
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
    return loaded


def _hold_out(loaded: datasets.DatasetDict) -> datasets.DatasetDict:
    """Splits the source lacks, held out of train (fixed by a seed) so that evaluation never sees
    training prompts: test (the final eval: a tenth, at most 500 rows), then validation (periodic
    eval: a twentieth, at most 200)."""
    for split, share, most in (("test", 10, 500), ("validation", 20, 200)):
        if split not in loaded and len(loaded["train"]) >= 2:
            held = loaded["train"].train_test_split(test_size=min(most, max(1, len(loaded["train"]) // share)), seed=0)
            loaded = datasets.DatasetDict({**loaded, "train": held["train"], split: held["test"]})
    return loaded


def _check_json_lines(path: Path) -> None:
    """One line naming the first line of a JSONL file that is not UTF-8 or not a JSON object."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ConfigError(f"dataset '{path}' line {number} is not UTF-8 text (byte {error.start}); save the "
                                  "file as UTF-8") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError as error:
                raise ConfigError(f"dataset '{path}' line {number} is not JSON ({error.msg}); give one JSON object "
                                  "per line") from None
            if not isinstance(row, dict):
                raise ConfigError(f"dataset '{path}' line {number} is not a JSON object; give one object per line, "
                                  "e.g. {\"messages\": [...]}")


@dataclass
class Example:
    """One training sequence: prompt and response ids, and optionally the teacher's top-k
    distribution for each response token ([R, K]) and its log-probability of each actual
    response token ([R], for the sampled-token estimator); for a rollout, the log-probability
    each token had under the policy that sampled it ([R], for the importance weight of a rollout
    sampled by older weights)."""

    prompt: list[int]
    response: list[int]
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    token_logprobs: torch.Tensor | None = None
    sample_logprobs: torch.Tensor | None = None


@dataclass
class TokenBatch:
    """Sequences laid in rows, in logit coordinates: position t predicts input_ids[:, t + 1].

    input_ids, attention_mask: [B, L], attention_mask 1 on real tokens and 0 on padding;
    target_mask: [B, L] True where the next token is a response token (prompt tokens never
    count; the final eos always does); targets: [B, L] the next token; topk_ids / topk_logprobs:
    [B, L, K] or None; token_logprobs: [B, L] the teacher's log-probability of each target token,
    or None; sample_logprobs: [B, L] the sampling policy's log-probability of each target token
    (rollouts from an inference engine), or None. `position_ids` [B, L] is set when rows are packed (several sequences per row, each
    starting again at position 0; the model then keeps attention inside each sequence); None
    means one right-padded sequence per row.
    `stats` are numbers about how the batch was made (padding, on-policy rollouts), logged with
    the step.
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
    position_ids: torch.Tensor | None = None
    sample_logprobs: torch.Tensor | None = None

    @property
    def num_targets(self) -> int:
        return int(self.target_mask.sum())

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """What the model is called with: packed rows by their positions (transformers then
        builds a block-diagonal causal mask from where the positions restart), padded rows by
        their attention mask. Call it without a KV cache (`use_cache=False`): transformers looks
        for packed rows only then."""
        if self.position_ids is not None:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def collate(examples: list[Example], pad_id: int, max_length: int, mode: str | None = None,
            stats: dict[str, float] | None = None, pack: bool = False) -> TokenBatch:
    """Examples (each cut to `max_length` tokens) as one batch: a row each, right-padded, or with
    `pack` several per row in rows as wide as the longest (`pack_rows`). The stats record the padding
    share of the layout used and of the one-per-row layout (`padding_unpacked`)."""
    lengths = [min(len(e.prompt) + len(e.response), max_length) for e in examples]
    rows = pack_rows(lengths) if pack else [[i] for i in range(len(examples))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    batch, k = len(rows), (examples[0].topk_ids.shape[-1] if examples[0].topk_ids is not None else 0)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long) if pack else None
    target_mask = torch.zeros((batch, width), dtype=torch.bool)
    targets = torch.zeros((batch, width), dtype=torch.long)
    topk_ids = torch.zeros((batch, width, k), dtype=torch.long) if k else None
    topk_logprobs = torch.zeros((batch, width, k), dtype=torch.float32) if k else None
    chosen = torch.zeros((batch, width), dtype=torch.float32) if examples[0].token_logprobs is not None else None
    sampled = torch.zeros((batch, width), dtype=torch.float32) if examples[0].sample_logprobs is not None else None
    for row, members in enumerate(rows):
        offset = 0
        for index in members:
            example, length = examples[index], lengths[index]
            at = slice(offset, offset + length)
            sequence = torch.tensor((example.prompt + example.response)[:length])
            input_ids[row, at] = sequence
            attention_mask[row, at] = 1
            if position_ids is not None:
                position_ids[row, at] = torch.arange(length)
            begin, offset = offset, offset + length
            start = begin + len(example.prompt) - 1   # logit position predicting the first response token
            stop = begin + length - 1                 # last position whose next token is this example's
            if stop <= start:
                continue
            # Target positions are chosen by index, never by token id: with pad == eos the final
            # eos still counts.
            target_mask[row, start:stop] = True
            targets[row, begin:stop] = sequence[1:length]
            if k:
                topk_ids[row, start:stop] = example.topk_ids[:stop - start].long()
                topk_logprobs[row, start:stop] = example.topk_logprobs[:stop - start].float()
            if chosen is not None:
                chosen[row, start:stop] = example.token_logprobs[:stop - start].float()
            if sampled is not None:
                sampled[row, start:stop] = example.sample_logprobs[:stop - start].float()
        if position_ids is not None and offset < width:
            # The row's padding tail counts on from its last sequence, so that it forms one more
            # sequence of its own that no real token attends to.
            position_ids[row, offset:] = torch.arange(width - offset)
    real = sum(lengths)
    layout = {"padding": 1 - real / (batch * width),
              "padding_unpacked": 1 - real / (len(examples) * max(lengths))}
    return TokenBatch(input_ids, attention_mask, target_mask, targets, topk_ids, topk_logprobs, mode, chosen,
                      {**layout, **(stats or {})}, position_ids, sampled)


def pack_rows(lengths: list[int]) -> list[list[int]]:
    """Indices of `lengths` grouped into rows as wide as the longest sequence (first fit,
    longest first). Rows are never wider than one padded row would be, so attention, whose cost
    grows with the square of a row's width, costs no more than padding would; what packing
    removes is the padding of the shorter sequences."""
    width = max(lengths)
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r in range(len(rows)) if fill[r] + lengths[i] <= width), None)
        if row is None:
            rows.append([])
            fill.append(0)
            row = len(rows) - 1
        rows[row].append(i)
        fill[row] += lengths[i]
    return [sorted(row) for row in rows]


class ModeAlternatingBatches:
    """Endless optimizer steps, each a list of `micro_batches` batches, alternating the modes.

    One mode per micro-batch keeps padding low: no_think replies are a few tokens, think
    replies tens; `pack` lays each micro-batch's sequences several to a row (`collate`). Each mode's examples are reshuffled every epoch; a mode with no examples is
    skipped. Resumable: `state_dict()` after step n, loaded into a fresh instance, yields
    exactly what step n + 1 onwards would have. Data-parallel: every rank draws the same batch and
    keeps rows rank, rank + world, ...
    """

    def __init__(self, examples: dict[str, Sequence[Example]], batch_size: int, pad_id: int, max_length: int, *,
                 micro_batches: int = 1, seed: int = 0, rank: int = 0, world: int = 1, pack: bool = False):
        self.rank, self.world, self.pack = rank, world, pack
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
            step.append(collate([self.examples[mode][i] for i in mine], self.pad_id, self.max_length, mode,
                                pack=self.pack))
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
