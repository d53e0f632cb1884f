"""Batched generation with a transformers model (KV cache, left padding), shared by the teacher
backend, the eval harness and, later, student rollouts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from distill.chat import Sampling


@dataclass
class Generation:
    ids: list[int]    # response tokens, up to and including eos when finished
    finished: bool    # False: cut at max_new_tokens (truncated)


@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], *,
             max_new_tokens: int, sampling: Sampling | None, batch_size: int = 256, seed: int = 0,
             desc: str = "generate", progress: bool = True) -> list[Generation]:
    """Responses to tokenised prompts; `sampling=None` is greedy decoding.

    Prompts are processed longest first so a batch holds similar lengths; results come back in
    the input order.
    """
    model.eval()
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # Never sample an embedding-padding row (past the tokenizer's real tokens): Qwen3 pads its
    # embedding to a multiple of 128, and an untrained row's logit is arbitrary.
    padding_rows = list(range(len(tokenizer), model.get_output_embeddings().weight.shape[0]))
    config = GenerationConfig(
        suppress_tokens=padding_rows or None,
        max_new_tokens=max_new_tokens,
        do_sample=sampling is not None,
        temperature=sampling.temperature if sampling else None,
        top_p=sampling.top_p if sampling else None,
        top_k=sampling.top_k if sampling else None,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
    )
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                attention_mask[row, width - len(prompts[i]):] = 1
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config)
            for row, i in enumerate(chunk):
                new = output[row, width:].tolist()
                if eos in new:
                    results[i] = Generation(ids=new[:new.index(eos) + 1], finished=True)
                else:
                    results[i] = Generation(ids=[t for t in new if t != pad], finished=False)
    finally:
        torch.random.set_rng_state(generator_state)
    return results  # type: ignore[return-value]
