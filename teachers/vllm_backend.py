"""The teacher behind a vLLM OpenAI-compatible server: generation and top-k log-probabilities.

Built on the id-in, id-out client (students/vllm_client.py). `prompt_logprobs=k` scores any
given sequence (teacher responses now, student rollouts in the on-policy stage); vLLM's prompt
log-probabilities are the raw model distribution (temperature 1, before any sampling
processors), which is what the losses expect. Scoring requests carry many sequences each. A k
above the server's `--max-logprobs` stops with one line that says what to do.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from distill.common.errors import first_line
from distill.students.chat import MODE_SAMPLING, check_mode
from distill.students.generation import Generation
from distill.students.vllm_client import RequestRefused, VLLMClient
from distill.students.vllm_server import ServerError
from distill.teachers.base import TopK


class TeacherServerError(ServerError):
    """The vLLM teacher cannot score as configured; the message says why and what to do."""


class VLLMTeacher:
    def __init__(self, url: str, tokenizer: PreTrainedTokenizerBase, *, name: str | None = None,
                 model: str | None = None, batch_size: int = 32, concurrency: int = 4, retries: int = 5,
                 timeout: float = 600.0, progress: bool = True, margin: int = 16):
        self.client = VLLMClient(url, tokenizer, model=model, concurrency=concurrency, retries=retries,
                                 timeout=timeout, progress=progress)
        self.url, self.tokenizer = self.client.url, tokenizer
        self.name = name or f"vLLM {self.client.model} at {self.url}"
        self.batch_size = batch_size      # sequences per scoring request
        self.margin = margin              # extra log-probabilities asked for, to replace padding rows
        self.real_vocab = len(tokenizer)

    def generate(self, prompts: list[list[int]], mode: str, *, max_new_tokens: int, seed: int,
                 sampled: bool = True) -> list[Generation]:
        return self.client.sample(prompts, max_new_tokens=max_new_tokens, seed=seed,
                                  sampling=MODE_SAMPLING[check_mode(mode)] if sampled else None,
                                  desc=f"teacher generates ({mode})")

    def top_k_logprobs(self, prompts: list[list[int]], responses: list[list[int]], k: int) -> list[TopK]:
        if k > self.real_vocab:
            raise ValueError(f"top_k={k} exceeds the vocabulary ({self.real_vocab} tokens)")

        def request(batch: list[tuple[list[int], list[int]]]) -> list[TopK]:
            # A few more than k: padding rows of the embedding that vLLM ranks among the top are
            # dropped, and k real tokens must remain. A server capped at k gets exactly k.
            asked = k + self.margin
            try:
                entries = self.client.prompt_logprobs([p + r for p, r in batch], asked)
            except RequestRefused as refused:
                if refused.status != 400 or "logprobs" not in refused.text.lower():
                    raise
                if self.margin and asked > self.margin:
                    self.margin = 0
                    return request(batch)
                raise TeacherServerError(f"top_k={asked} is above the vLLM server's max_logprobs "
                                         f"({first_line(refused.text)}): restart the server with --max-logprobs "
                                         f"{asked}, or lower the top-k") from None
            return [self._response_top_k(entry, len(p), r, k) for entry, (p, r) in zip(entries, batch)]

        return self.client.map(request, list(zip(prompts, responses)), "teacher scores", per_request=self.batch_size)

    def _response_top_k(self, prompt_logprobs: list, prompt_len: int, response: list[int], k: int) -> TopK:
        """Rows for the response positions: entry i predicts token i of the whole sequence."""
        response_len = len(response)
        ids = torch.empty(response_len, k, dtype=torch.int32)
        values = torch.empty(response_len, k, dtype=torch.float32)
        chosen = torch.empty(response_len, dtype=torch.float32)
        for j in range(response_len):
            entry = prompt_logprobs[prompt_len + j]
            # vLLM always includes the actual token, ranked or not.
            chosen[j] = entry[str(response[j])]["logprob"]
            # vLLM adds the actual token when it is outside the top-k: keep the asked ranks only,
            # and real tokens only (their mass over the real vocabulary is what the losses use;
            # a padding row's mass falls into the tail).
            top = sorted((v["rank"], int(token), v["logprob"]) for token, v in entry.items()
                         if v["rank"] <= k + self.margin and int(token) < self.real_vocab)[:k]
            if len(top) < k:
                raise TeacherServerError(f"the server's top-{k + self.margin} holds only {len(top)} real tokens (the "
                                         f"rest are embedding padding): raise its --max-logprobs or lower the top-k")
            ids[j] = torch.tensor([t for _, t, _ in top], dtype=torch.int32)
            values[j] = torch.tensor([v for _, _, v in top], dtype=torch.float32)
        return TopK(ids=ids, logprobs=values, chosen=chosen)

    def close(self) -> None:
        self.client.close()
