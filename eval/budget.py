"""Qwen3's thinking budget: when the reasoning reaches the budget, make the model answer now.

Generation runs in two phases on any backend. Phase 1 lets the model think for at most `budget`
tokens. A reply that ended (eos) is done. One that closed its think block and is still answering
continues as it is. One still thinking gets the report's sentence appended ("Considering the
limited time by the user, I have to give the solution based on the thinking directly now.
</think>.") and phase 2 lets it answer in at most `answer_tokens` more tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.eval.backends import Backend
from distill.students.chat import STOP_THINKING, Sampling
from distill.students.generation import Generation


@dataclass
class Reply:
    ids: list[int]             # the model's tokens, and the inserted sentence if any, in order
    finished: bool             # ended with eos (False: cut at the token limit)
    inserted: range = range(0)  # positions in `ids` of the inserted sentence (not the model's tokens)


def generate_with_budget(backend: Backend, prompts: list[list[int]], *, budget: int, answer_tokens: int,
                         sampling: Sampling | None, seed: int, desc: str) -> list[Reply]:
    tokenizer = backend.tokenizer
    end_think = tokenizer.convert_tokens_to_ids("</think>")
    sentence = tokenizer(STOP_THINKING, add_special_tokens=False)["input_ids"]
    if end_think not in sentence:
        raise ValueError("the tokenizer does not keep </think> as one token; the thinking budget needs it")

    first = backend.generate(prompts, max_new_tokens=budget, sampling=sampling, seed=seed, desc=f"{desc} phase 1")
    replies: list[Reply | None] = [None] * len(prompts)
    pending: list[tuple[int, list[int], range]] = []   # (index, prefix so far, inserted positions)
    for i, generation in enumerate(first):
        if generation.finished:
            replies[i] = Reply(generation.ids, True)
        elif end_think in generation.ids:
            pending.append((i, generation.ids, range(0)))
        else:
            own = len(generation.ids)
            pending.append((i, generation.ids + sentence, range(own, own + len(sentence))))
    if pending:
        second: list[Generation] = backend.generate(
            [prompts[i] + prefix for i, prefix, _ in pending], max_new_tokens=answer_tokens, sampling=sampling,
            seed=seed + 1, desc=f"{desc} phase 2")
        for (i, prefix, inserted), generation in zip(pending, second):
            replies[i] = Reply(prefix + generation.ids, generation.finished, inserted)
    return replies  # type: ignore[return-value]
