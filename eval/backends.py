"""Where eval generations come from: a transformers model in process, or a vLLM server.

Both take token ids and return token ids (`distill.students.generation.Generation`), so the harness, the
thinking budget and the scoring are the same code for either, and both render prompts with the
same chat template as training.
"""

from __future__ import annotations

from typing import Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.students.chat import Sampling
from distill.students.generation import Generation, generate
from distill.students.vllm_client import VLLMClient


class Backend(Protocol):
    name: str
    tokenizer: PreTrainedTokenizerBase

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, sampling: Sampling | None, seed: int,
                 desc: str) -> list[Generation]:
        """Responses (ids up to and including eos when finished) to tokenised prompts."""

    def close(self) -> None: ...


class TransformersBackend:
    """In-process decoding with the project's own loop (students/generation.py): batched, KV cache,
    left padding, longest prompts first; greedy tokens equal `model.generate`'s."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, name: str,
                 batch_size: int = 64, progress: bool = True):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batch_size, self.progress = batch_size, progress

    def generate(self, prompts, *, max_new_tokens, sampling, seed, desc):
        if max_new_tokens <= 0:
            return [Generation(ids=[], finished=False) for _ in prompts]
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                        batch_size=self.batch_size, seed=seed, desc=desc, progress=self.progress)

    def close(self) -> None:
        pass


class VLLMBackend:
    """A vLLM server's completions endpoint, with ids in and out (students/vllm_client.py)."""

    def __init__(self, url: str, tokenizer: PreTrainedTokenizerBase, *, name: str, concurrency: int = 8,
                 progress: bool = True, on_close=None):
        self.client = VLLMClient(url, tokenizer, concurrency=concurrency, progress=progress)
        self.tokenizer, self.name = tokenizer, name
        self._on_close = on_close

    def generate(self, prompts, *, max_new_tokens, sampling, seed, desc):
        if max_new_tokens <= 0:
            return [Generation(ids=[], finished=False) for _ in prompts]
        return self.client.sample(prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, desc=desc)

    def close(self) -> None:
        self.client.close()
        if self._on_close is not None:
            self._on_close()
