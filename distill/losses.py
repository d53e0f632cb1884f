"""Distillation losses: pure functions of student logits and the teacher's top-k distribution.

Shapes: N target tokens (already masked and flattened), V student vocabulary, K teacher top-k.
Everything is computed in float32. Per-token values are returned unreduced; the caller divides
their sum by the number of target tokens in the whole optimizer step (all micro-batches), never
per micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def teacher_topk_distribution(teacher_logprobs: torch.Tensor, missing_mass: str, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities over K + 1 buckets (the top-k, then the tail) from top-k log-probs.

    teacher_logprobs: [N, K] log p of the teacher's top-k tokens (temperature 1).
    missing_mass: "tail" keeps the teacher's probability outside its top-k as bucket K;
      "renormalize" rescales the top-k to sum to one (the tail bucket is then empty, -inf).
    temperature: applied to the K + 1 buckets (the tail treated as one outcome).
    Returns [N, K + 1] log-probabilities that sum to one per row.
    """
    logprobs = teacher_logprobs.float()
    tail = torch.log1p(-logprobs.exp().sum(-1).clamp(max=1.0 - 1e-6)).unsqueeze(-1)
    if missing_mass == "renormalize":
        tail = torch.full_like(tail, float("-inf"))
    elif missing_mass != "tail":
        raise ValueError(f"unknown missing_mass '{missing_mass}'; valid: tail, renormalize")
    buckets = torch.cat([logprobs, tail], dim=-1) / temperature
    return torch.log_softmax(buckets, dim=-1)


def student_topk_distribution(student_logits: torch.Tensor, teacher_ids: torch.Tensor, missing_mass: str,
                              temperature: float = 1.0) -> torch.Tensor:
    """The student's log-probabilities over the same K + 1 buckets.

    student_logits: [N, V]; teacher_ids: [N, K] (ids < V). The student's full softmax is gathered
    at the teacher's ids; the tail bucket holds the rest of its mass ("tail"), or is dropped and
    the top-k renormalised ("renormalize").
    Returns [N, K + 1].
    """
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    top = logq.gather(-1, teacher_ids.long())
    if missing_mass == "renormalize":
        top = top - torch.logsumexp(top, dim=-1, keepdim=True)
        tail = torch.full_like(top[:, :1], float("-inf"))
    else:
        # log(1 - sum q_top), computed without cancellation when the top-k holds almost all mass.
        tail = _log1mexp(torch.logsumexp(top, dim=-1, keepdim=True))
    return torch.cat([top, tail], dim=-1)


def forward_kl(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, *,
               missing_mass: str = "tail", temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || q_student) per token over the teacher's top-k (+ tail) buckets.

    student_logits [N, V], teacher_ids [N, K], teacher_logprobs [N, K] -> [N], each >= 0.
    """
    logp = teacher_topk_distribution(teacher_logprobs, missing_mass, temperature)
    logq = student_topk_distribution(student_logits, teacher_ids, missing_mass, temperature)
    p = logp.exp()
    # 0 * log 0 = 0: buckets where the teacher has no mass contribute nothing.
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(-1).clamp(min=0.0)  # clamp only removes float round-off below zero


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log q(target) per token: student_logits [N, V], targets [N] -> [N]."""
    return F.cross_entropy(student_logits.float(), targets.long(), reduction="none")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
