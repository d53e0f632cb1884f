"""Batched generation with a KV cache: the teacher's samples, student rollouts and eval replies.

A plain decoding loop over the model's forward pass (left padding, one `DynamicCache`, logits
for the last position only), with Qwen3's sampling (temperature, top-k, top-p) done in torch on
its own seeded `torch.Generator`. It does what `model.generate` does for these models and
nothing more: for small models, generate's per-token machinery (logits processors, stopping
criteria, input preparation) costs as much as the forward pass itself (bench/README.md,
"On-policy step"). Greedy decoding equals `model.generate` token for token (a test checks it).
Embedding rows past the tokenizer's real tokens (Qwen3 pads its embedding) are never produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from distill.students.chat import Sampling
from distill.students.decode import QwenDecoder, cache_argument


@dataclass
class Generation:
    ids: list[int]    # response tokens, up to and including eos when finished
    finished: bool    # False: cut at max_new_tokens (truncated)
    # Each token's log-probability under the distribution it was sampled from, when the sampler
    # reports it (an inference engine); None otherwise.
    logprobs: list[float] | None = None


@torch.inference_mode()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], *,
             max_new_tokens: int, sampling: Sampling | None, batch_size: int = 256, seed: int = 0,
             desc: str = "generate", progress: bool = True, lean: bool | None = None) -> list[Generation]:
    """Responses to tokenised prompts; `sampling=None` is greedy decoding. `lean`: decode with
    the lean Qwen3 decoder (students/decode.py; None: whenever it supports the model).

    Prompts are processed longest first so a batch holds similar lengths; results come back in
    the input order. Sampling draws from a generator seeded with `seed` (the global torch RNG is
    left alone), so a call's samples depend only on its arguments.
    """
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = order[start:start + batch_size]
        for i, generation in zip(chunk, _decode(model, [prompts[i] for i in chunk], eos=tokenizer.eos_token_id,
                                                pad=tokenizer.pad_token_id, vocab=len(tokenizer),
                                                max_new_tokens=max_new_tokens, sampling=sampling,
                                                generator=generator, device=device, lean=lean)):
            results[i] = generation
    return results  # type: ignore[return-value]


def _decode(model, prompts: list[list[int]], *, eos: int, pad: int, vocab: int, max_new_tokens: int,
            sampling: Sampling | None, generator: torch.Generator, device,
            lean: bool | None = None) -> list[Generation]:
    """One batch. `lean`: decode with the lean Qwen3 decoder (None: whenever it supports the model)."""
    batch, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    lean = QwenDecoder.supports(model) if lean is None else lean
    step = _lean_steps(model, input_ids, attention_mask, max_new_tokens) if lean else \
        _transformers_steps(model, input_ids, attention_mask)
    out_tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)
    token = None
    for t in range(max_new_tokens):
        logits = step(token)[:, :vocab]
        token = _next_token(logits.float(), sampling, generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        out_tokens[:, t] = token
        ended = (token == eos) & ~finished
        lengths = torch.where(ended, torch.full_like(lengths, t + 1), lengths)
        finished |= ended
        if bool(finished.all()):
            break
    tokens, lengths, finished = out_tokens.tolist(), lengths.tolist(), finished.tolist()
    return [Generation(ids=tokens[row][:lengths[row]], finished=finished[row]) for row in range(batch)]


def _lean_steps(model, input_ids, attention_mask, max_new_tokens):
    """step(None) -> the prompt's next-token logits; step(tokens) -> the logits after them."""
    decoder = QwenDecoder(model)

    def step(tokens):
        return decoder.prefill(input_ids, attention_mask, max_new_tokens) if tokens is None else decoder.step(tokens)

    return step


def _transformers_steps(model, input_ids, attention_mask):
    """The same with the transformers forward and a `DynamicCache` (any causal LM)."""
    cache, argument = DynamicCache(config=model.config), cache_argument(model)
    state = {"mask": attention_mask, "positions": (attention_mask.cumsum(-1) - 1).clamp(min=0)}

    def step(tokens):
        if tokens is None:
            ids, positions = input_ids, state["positions"]
        else:
            ids, positions = tokens[:, None], state["positions"][:, -1:] + 1
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones((tokens.shape[0], 1))], dim=1)
        state["positions"] = positions
        return model(input_ids=ids, attention_mask=state["mask"], position_ids=positions, use_cache=True,
                     logits_to_keep=1, **{argument: cache}).logits[:, -1]

    return step


def _next_token(logits: torch.Tensor, sampling: Sampling | None, generator: torch.Generator) -> torch.Tensor:
    """[B, V] float32 logits -> [B] token ids: argmax, or a draw after temperature, top-k, top-p."""
    if sampling is None:
        return logits.argmax(-1)
    return torch.multinomial(decoding_logits(logits, sampling).softmax(-1), 1, generator=generator)[:, 0]


def decoding_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[..., V] float32 logits -> the logits tokens are drawn from: divided by the temperature,
    then everything outside the top-k and then outside the top-p nucleus set to -inf (the order
    transformers' warpers use). Its softmax is the distribution the sampler draws from; the draft
    metrics (eval/acceptance.py) compare two models through this same function."""
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, indices = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, sorted_logits)
    return logits
