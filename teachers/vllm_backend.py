"""The teacher behind a vLLM OpenAI-compatible server: generation and top-k log-probabilities.

Everything travels as token ids, never text, so that teacher and student see the same tokens:
prompts are sent as id lists, responses come back as ids (`return_tokens_as_token_ids`), and
`prompt_logprobs=k` scores any given sequence (teacher responses now, student rollouts in the
on-policy stage). vLLM's prompt log-probabilities are the raw model distribution (temperature 1,
before any sampling processors), which is what the losses expect.

Requests are batched (many prompts per request) and sent concurrently; transient failures (a
connection refused while the server restarts, 5xx) are retried with exponential backoff. A k above
the server's `--max-logprobs`, an unreachable server and a server whose tokenizer is not ours each
stop with one line that says what to do.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from distill.chat import MODE_SAMPLING, Sampling, check_mode
from distill.errors import UserError, first_line
from distill.generation import Generation
from teachers.base import TopK


class TeacherServerError(UserError, RuntimeError):
    """The vLLM teacher cannot be used as configured; the message says why and what to do."""


class _LogprobsLimit(Exception):
    """The server refused k + margin log-probabilities; try again with the margin dropped."""


class VLLMTeacher:
    def __init__(self, url: str, tokenizer: PreTrainedTokenizerBase, *, name: str | None = None,
                 model: str | None = None, batch_size: int = 32, concurrency: int = 4, retries: int = 5,
                 timeout: float = 600.0, progress: bool = True, margin: int = 16):
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.batch_size = batch_size      # prompts per request
        self.concurrency = concurrency    # requests in flight
        self.retries = retries
        self.progress = progress
        self.real_vocab = len(tokenizer)
        self.margin = margin              # extra log-probabilities asked for, to replace padding rows
        self.client = httpx.Client(timeout=timeout)
        self.model = model or self._served_model()
        self.name = name or f"vLLM {self.model} at {self.url}"
        self._check_tokenizer()

    # --- the Teacher interface ------------------------------------------------------------

    def generate(self, prompts: list[list[int]], mode: str, *, max_new_tokens: int, seed: int,
                 sampled: bool = True) -> list[Generation]:
        return self.sample(prompts, max_new_tokens=max_new_tokens, seed=seed,
                           sampling=MODE_SAMPLING[check_mode(mode)] if sampled else None,
                           desc=f"teacher generates ({mode})")

    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, sampling: Sampling | None, seed: int,
               desc: str = "vLLM generates") -> list[Generation]:
        """Responses to tokenised prompts with the given sampling (None: greedy); prompt i is
        sampled with seed `seed * 1_000_003 + i`, so results do not depend on batching."""
        # allowed_token_ids: never sample an embedding-padding row (vLLM samples over the whole
        # embedding; the tokenizer's real tokens are all there is).
        params = {"max_tokens": max_new_tokens, "logprobs": 0, "return_tokens_as_token_ids": True,
                  "skip_special_tokens": False, "stop_token_ids": [self.tokenizer.eos_token_id],
                  "include_stop_str_in_output": True, "allowed_token_ids": list(range(self.real_vocab))}
        if sampling is not None:
            params.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        else:
            params.update(temperature=0.0)

        def request(batch: list[tuple[int, list[int]]]) -> list[Generation]:
            return [self._generate_one(p, {**params, "seed": seed * 1_000_003 + index}) for index, p in batch]

        return self._map(request, list(enumerate(prompts)), desc, per_request=1)

    def top_k_logprobs(self, prompts: list[list[int]], responses: list[list[int]], k: int) -> list[TopK]:
        if k > self.real_vocab:
            raise ValueError(f"top_k={k} exceeds the vocabulary ({self.real_vocab} tokens)")

        def request(batch: list[tuple[list[int], list[int]]]) -> list[TopK]:
            # A few more than k: padding rows of the embedding that vLLM ranks among the top are
            # dropped, and k real tokens must remain. A server capped at k gets exactly k.
            asked = k + self.margin
            body = {"model": self.model, "prompt": [p + r for p, r in batch], "max_tokens": 1, "temperature": 0.0,
                    "prompt_logprobs": asked}
            try:
                answer = self._post("/v1/completions", body, k=asked)
            except _LogprobsLimit:
                if self.margin == 0:
                    raise
                self.margin = 0
                return request(batch)
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            return [self._response_top_k(c["prompt_logprobs"], len(p), r, k) for c, (p, r) in zip(choices, batch)]

        return self._map(request, list(zip(prompts, responses)), "teacher scores", per_request=self.batch_size)

    # --- pieces ---------------------------------------------------------------------------

    def _generate_one(self, prompt: list[int], params: dict) -> Generation:
        choice = self._post("/v1/completions", {"model": self.model, "prompt": prompt, **params})["choices"][0]
        ids = [int(token.removeprefix("token_id:")) for token in choice["logprobs"]["tokens"]]
        finished = choice["finish_reason"] == "stop"
        return Generation(ids=ids, finished=finished)

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

    def _map(self, request, items: list, desc: str, per_request: int) -> list:
        batches = [items[i:i + per_request] for i in range(0, len(items), per_request)]
        out: list = []
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool, \
                tqdm(total=len(items), desc=desc, disable=not self.progress, leave=False) as bar:
            for result in pool.map(request, batches):  # map keeps the input order
                out.extend(result)
                bar.update(len(result))
        return out

    def _post(self, path: str, body: dict, *, k: int | None = None) -> dict:
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                response = self.client.post(self.url + path, json=body)
            except httpx.TransportError as error:
                if attempt == self.retries:
                    raise TeacherServerError(f"vLLM server at {self.url} unreachable ({type(error).__name__}): start "
                                             "it, or check teacher.url") from None
            else:
                if response.status_code < 500:
                    break
                if attempt == self.retries:
                    raise TeacherServerError(f"vLLM server at {self.url} failed: HTTP {response.status_code} "
                                             f"{response.text[:200]}")
            time.sleep(delay)
            delay *= 2
        if response.status_code == 400 and k is not None and "logprobs" in response.text.lower():
            if self.margin and k > self.margin:
                raise _LogprobsLimit()
            raise TeacherServerError(f"top_k={k} is above the vLLM server's max_logprobs ({first_line(response.text)}):"
                                     f" restart the server with --max-logprobs {k}, or lower the top-k")
        if response.status_code != 200:
            raise TeacherServerError(f"vLLM server at {self.url} refused the request: HTTP {response.status_code} "
                                     f"{first_line(response.text)}")
        return response.json()

    def _served_model(self) -> str:
        try:
            response = self.client.get(self.url + "/v1/models", timeout=10.0)
        except httpx.TransportError as error:
            raise TeacherServerError(f"vLLM server at {self.url} unreachable ({type(error).__name__}): start it, or "
                                     "check teacher.url") from None
        models = response.json().get("data", [])
        if not models:
            raise TeacherServerError(f"the server at {self.url} serves no model")
        return models[0]["id"]

    def _check_tokenizer(self) -> None:
        """The server must tokenize exactly as we do: ids are compared one by one downstream."""
        probe = "<|im_start|>user\nWhat is 7*8 mod 10?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ours = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        body = {"model": self.model, "prompt": probe, "add_special_tokens": False}
        theirs = self._post("/tokenize", body).get("tokens")
        if theirs != ours:
            raise TeacherServerError(f"the vLLM server's tokenizer differs from the run's ({self.model} tokenizes a "
                                     f"chat probe into {len(theirs or [])} tokens, ours into {len(ours)}): serve the "
                                     "teacher whose tokenizer the run uses, or set data.tokenizer to the server's")

    def close(self) -> None:
        self.client.close()

