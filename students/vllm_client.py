"""A model behind a vLLM OpenAI-compatible server, spoken to in token ids: sampling and prompt
log-probabilities.

Everything travels as token ids, never text, so that every model sees the very tokens the
trainer sees: prompts are sent as id lists, responses come back as ids
(`return_tokens_as_token_ids`). Requests are sent concurrently; transient failures (a connection
refused while the server restarts, 5xx) are retried with exponential backoff. An unreachable
server and a server whose tokenizer is not ours stop with one line that says what to do.

The teacher backend (teachers/vllm_backend.py) and the eval backend (eval/backends.py) are both
built on this client; the server itself is started by students/vllm_server.py or by the user.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from distill.common.errors import first_line
from distill.students.chat import Sampling
from distill.students.generation import Generation
from distill.students.vllm_server import ServerError


class RequestRefused(ServerError):
    """The server answered a request with a client error (4xx): `status` and `text` say which."""

    def __init__(self, url: str, status: int, text: str):
        super().__init__(f"vLLM server at {url} refused the request: HTTP {status} {first_line(text)}")
        self.status, self.text = status, text


class VLLMClient:
    def __init__(self, url: str, tokenizer: PreTrainedTokenizerBase, *, model: str | None = None,
                 concurrency: int = 4, retries: int = 5, timeout: float = 600.0, progress: bool = True):
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.concurrency = concurrency    # requests in flight
        self.retries, self.timeout = retries, timeout
        self.progress = progress
        self.real_vocab = len(tokenizer)
        self.http = httpx.Client(timeout=timeout)
        self.model = model or self._served_model()
        self._check_tokenizer()

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

        return self.map(request, list(enumerate(prompts)), desc, per_request=1)

    def prompt_logprobs(self, sequences: list[list[int]], k: int) -> list[list]:
        """vLLM's `prompt_logprobs` for each whole sequence (entry i predicts token i: a dict of
        token id -> {logprob, rank}, with the actual token always included); one request."""
        body = {"model": self.model, "prompt": sequences, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}
        choices = sorted(self.post("/v1/completions", body)["choices"], key=lambda c: c["index"])
        return [choice["prompt_logprobs"] for choice in choices]

    def map(self, request: Callable[[list], list], items: list, desc: str, per_request: int) -> list:
        """`request` over batches of `per_request` items, `concurrency` at a time, results in order."""
        batches = [items[i:i + per_request] for i in range(0, len(items), per_request)]
        out: list = []
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool, \
                tqdm(total=len(items), desc=desc, disable=not self.progress, leave=False) as bar:
            for result in pool.map(request, batches):  # map keeps the input order
                out.extend(result)
                bar.update(len(result))
        return out

    def post(self, path: str, body: dict) -> dict:
        """POST with retries on transport errors and 5xx; a 4xx raises `RequestRefused`."""
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                response = self.http.post(self.url + path, json=body)
            except httpx.ReadTimeout:
                # A request that used the whole timeout would only use it again: say so at once.
                raise ServerError(f"vLLM server at {self.url} did not answer within {self.timeout:.0f} s; raise the "
                                  "timeout (teacher.vllm_timeout for the teacher), or send smaller requests") from None
            except httpx.TransportError as error:
                if attempt == self.retries:
                    raise ServerError(f"vLLM server at {self.url} unreachable ({type(error).__name__}): start it, or "
                                      "check its URL") from None
            else:
                if response.status_code < 500:
                    break
                if attempt == self.retries:
                    raise ServerError(f"vLLM server at {self.url} failed: HTTP {response.status_code} "
                                      f"{response.text[:200]}")
            time.sleep(delay)
            delay *= 2
        if response.status_code != 200:
            raise RequestRefused(self.url, response.status_code, response.text)
        return response.json()

    def close(self) -> None:
        self.http.close()

    def _generate_one(self, prompt: list[int], params: dict) -> Generation:
        choice = self.post("/v1/completions", {"model": self.model, "prompt": prompt, **params})["choices"][0]
        ids = [int(token.removeprefix("token_id:")) for token in choice["logprobs"]["tokens"]]
        logprobs = [float(value) for value in choice["logprobs"]["token_logprobs"]]
        return Generation(ids=ids, finished=choice["finish_reason"] == "stop", logprobs=logprobs)

    def _served_model(self) -> str:
        try:
            response = self.http.get(self.url + "/v1/models", timeout=10.0)
        except httpx.TransportError as error:
            raise ServerError(f"vLLM server at {self.url} unreachable ({type(error).__name__}): start it, or check its "
                              "URL") from None
        models = response.json().get("data", [])
        if not models:
            raise ServerError(f"the server at {self.url} serves no model")
        return models[0]["id"]

    def _check_tokenizer(self) -> None:
        """The server must tokenize exactly as we do: ids are compared one by one downstream."""
        probe = "<|im_start|>user\nWhat is 7*8 mod 10?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ours = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        body = {"model": self.model, "prompt": probe, "add_special_tokens": False}
        theirs = self.post("/tokenize", body).get("tokens")
        if theirs != ours:
            raise ServerError(f"the vLLM server's tokenizer differs from the run's ({self.model} tokenizes a chat probe "
                              f"into {len(theirs or [])} tokens, ours into {len(ours)}): serve the model whose "
                              "tokenizer the run uses, or set data.tokenizer to the server's")
