"""The teacher interface the pipeline depends on, whatever serves the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from distill.students.generation import Generation


@dataclass
class TopK:
    """The teacher's top-k next-token distribution at each response position.

    ids [T, K] int32 and logprobs [T, K] float32 (temperature 1, over the real vocabulary),
    row j for the j-th response token, sorted by decreasing probability. chosen [T] float32:
    the log-probability of the actual j-th response token, in or outside the top-k (the
    sampled-token estimator of on-policy distillation needs only this).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    chosen: torch.Tensor | None = None


class Teacher(Protocol):
    name: str
    tokenizer: PreTrainedTokenizerBase

    def generate(self, prompts: list[list[int]], mode: str, *, max_new_tokens: int, seed: int,
                 sampled: bool = True) -> list[Generation]:
        """Responses to tokenised prompts (rendered in `mode`), with the mode's sampling."""
        ...

    def top_k_logprobs(self, prompts: list[list[int]], responses: list[list[int]], k: int) -> list[TopK]:
        """For each (prompt, response), the top-k distribution predicting every response token."""
        ...
