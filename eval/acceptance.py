"""How often a target model accepts a draft model's tokens under speculative decoding: the math.

Speculative sampling (Leviathan et al., 2023; Chen et al., 2023) draws a token from the draft's
distribution q and keeps it with probability min(1, p/q) under the target's p, so the chance a
drafted token is kept at a given prefix is

    alpha = sum_v min(p(v), q(v)) = 1 - TVD(p, q),

and the tokens it emits are distributed exactly as the target's. p and q here are the
distributions the two decoders actually sample from: each model's logits go through the same
temperature, top-k and top-p (`students.generation.decoding_logits`), each on its own
distribution, as both sides of a speculative decoder apply the request's sampling settings
(transformers' assisted generation does; so does vLLM's). Greedy decoding is the limit
temperature -> 0: both distributions are one-hot and alpha is argmax agreement.

One target forward verifies gamma drafted tokens and always yields one token of its own, so it
produces 1 + (accepted) tokens. With the same alpha at every position, the expectation is the
closed form (1 - alpha^(gamma+1)) / (1 - alpha). From per-position acceptances alpha_t measured
along real responses, `tokens_per_forward` runs the decoding as a renewal process instead: from
position t a forward accepts exactly i drafts with probability alpha_t ... alpha_{t+i-1} (1 -
alpha_{t+i}) (all gamma: the product alone), moves i + 1 positions, and the response ends where
it ends. It sees what the closed form cannot: acceptance that varies along a response (easy
stretches accept runs, hard tokens break them) and responses shorter than a draft.
"""

from __future__ import annotations

import torch

from distill.students.chat import Sampling
from distill.students.generation import decoding_logits


def decoding_distribution(logits: torch.Tensor, sampling: Sampling | None) -> torch.Tensor:
    """[..., V] logits -> the float32 distribution a decoder with these settings samples from
    (one-hot at the argmax for greedy decoding)."""
    logits = logits.float()
    if sampling is None:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return decoding_logits(logits, sampling).softmax(-1)


def acceptance_rates(target_logits: torch.Tensor, draft_logits: torch.Tensor,
                     sampling: Sampling | None) -> torch.Tensor:
    """[T, V] logits of both models at the same T prefixes -> [T] alpha_t = sum_v min(p, q)."""
    p = decoding_distribution(target_logits, sampling)
    q = decoding_distribution(draft_logits, sampling)
    return torch.minimum(p, q).sum(-1).clamp(max=1.0)


def iid_tokens_per_forward(alpha: float, gamma: int) -> float:
    """Expected tokens per target forward with gamma drafts and the same alpha at every position."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def expected_forwards(alphas: list[float], gamma: int) -> float:
    """Expected target forwards to produce a response whose drafted tokens are accepted with
    probabilities `alphas` (one per response position), drafting gamma tokens per forward."""
    length = len(alphas)
    padded = list(alphas) + [0.0] * (gamma + 1)   # nothing is accepted past the response's end
    forwards = [0.0] * (length + gamma + 2)       # forwards[t]: expected forwards from position t on
    for t in range(length - 1, -1, -1):
        expected, run = 1.0, 1.0                  # run: the chance the first i drafts are all accepted
        for i in range(gamma + 1):
            exactly = run if i == gamma else run * (1.0 - padded[t + i])
            expected += exactly * forwards[t + i + 1]
            run *= padded[t + i]
        forwards[t] = expected
    return forwards[0]


def tokens_per_forward(responses: list[list[float]], gamma: int) -> float:
    """Tokens per target forward over a set of responses: all their tokens over all the forwards
    the renewal process expects for them."""
    tokens = sum(len(a) for a in responses)
    forwards = sum(expected_forwards(a, gamma) for a in responses)
    return tokens / forwards if forwards else float("nan")
