"""The teacher's distribution in its two forms, and both sides brought onto one support.

A teacher gives either its full logits (`FullTeacher`, in-process teachers) or, per token, the
ids and log-probabilities of its top-k tokens (`TopKTeacher`, a vLLM server or the off-policy
cache). `aligned_log_probs` turns (student logits, teacher) into two [N, S] log-distributions over
the same S outcomes, which is all the divergences in `divergences.py` need:

- full logits: S is the shared real vocabulary. Both sides are sliced to it explicitly, so a
  teacher whose embedding is padded to 152,064 and a student padded to 151,936 still compare
  token for token, and padding rows never receive probability.
- top-k: S is the teacher's K tokens plus, with `missing_mass="tail"`, one bucket for everything
  else, on both sides (the student's full softmax gathered at the teacher's ids, its tail the rest
  of its mass). With `missing_mass="renormalize"` both sides are renormalised over the K tokens.
  Either way both sides are proper distributions, so no divergence can come out negative.

Temperature: both sides are softened by the distillation temperature tau (never the sampling
temperature). For a top-k teacher this is exact under "renormalize"; under "tail" the tail is
treated as a single outcome, the only option without the teacher's full logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MISSING_MASS_POLICIES = ("tail", "renormalize")


@dataclass(frozen=True)
class FullTeacher:
    """Teacher logits over its whole embedding: [..., V_teacher] (any float dtype)."""

    logits: torch.Tensor

    def rows(self, index) -> "FullTeacher":
        return FullTeacher(self.logits[index])

    def __len__(self) -> int:
        return self.logits.shape[0]


@dataclass(frozen=True)
class TopKTeacher:
    """Teacher top-k per token: ids [..., K] (integer) and log-probabilities [..., K] at
    temperature 1, sorted or not. Their mass may fall short of one; the rest is the tail."""

    ids: torch.Tensor
    logprobs: torch.Tensor

    def rows(self, index) -> "TopKTeacher":
        return TopKTeacher(self.ids[index], self.logprobs[index])

    def __len__(self) -> int:
        return self.ids.shape[0]


TeacherDistribution = FullTeacher | TopKTeacher


def aligned_log_probs(student_logits: torch.Tensor, teacher: TeacherDistribution, *, vocab: int | None = None,
                      temperature: float = 1.0, missing_mass: str = "tail") -> tuple[torch.Tensor, torch.Tensor]:
    """(log p teacher, log q student), each [N, S] float32, over one support.

    student_logits: [N, V_student]. vocab: the real vocabulary shared by teacher and student; the
    logits are sliced to it. Without it, full-logit widths must agree (a silent misalignment is
    the bug this refuses) and top-k ids index the student's whole width.
    """
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if missing_mass not in MISSING_MASS_POLICIES:
        raise ValueError(f"unknown missing_mass '{missing_mass}'; valid: {', '.join(MISSING_MASS_POLICIES)}")
    if vocab is not None:
        if student_logits.shape[-1] < vocab:
            raise ValueError(f"student logits have {student_logits.shape[-1]} entries, fewer than the shared vocabulary "
                             f"of {vocab}")
        student_logits = student_logits[..., :vocab]
    logq_full = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, FullTeacher):
        return _full(logq_full, teacher.logits, vocab, temperature), logq_full
    if isinstance(teacher, TopKTeacher):
        return _top_k(logq_full, teacher, temperature, missing_mass)
    raise TypeError(f"teacher must be FullTeacher or TopKTeacher, got {type(teacher).__name__}")


def _full(logq_full: torch.Tensor, teacher_logits: torch.Tensor, vocab: int | None, temperature: float) -> torch.Tensor:
    width = logq_full.shape[-1]
    if vocab is not None:
        if teacher_logits.shape[-1] < vocab:
            raise ValueError(f"teacher logits have {teacher_logits.shape[-1]} entries, fewer than the shared vocabulary "
                             f"of {vocab}")
        teacher_logits = teacher_logits[..., :vocab]
    elif teacher_logits.shape[-1] != width:
        raise ValueError(f"teacher logits have {teacher_logits.shape[-1]} entries and the student's {width}: pass "
                         "vocab= the real vocabulary they share (padding rows differ between checkpoints)")
    return torch.log_softmax(teacher_logits.float() / temperature, dim=-1)


def _top_k(logq_full: torch.Tensor, teacher: TopKTeacher, temperature: float, missing_mass: str):
    ids = teacher.ids.long()
    logp_top = teacher.logprobs.float()
    logq_top = logq_full.gather(-1, ids)
    if missing_mass == "renormalize":
        logp = torch.log_softmax(logp_top / temperature, dim=-1)
        logq = logq_top - torch.logsumexp(logq_top, dim=-1, keepdim=True)
        return logp, logq
    # Tail bucket: the teacher's mass outside its top-k (stored values may sum a hair above one
    # after 16-bit rounding, hence the clamp), and the student's rest, computed as log(1 - sum q)
    # without cancellation when its top-k holds almost everything.
    teacher_tail = torch.log1p(-logp_top.exp().sum(-1, keepdim=True).clamp(max=1.0 - 1e-6))
    logp = torch.cat([logp_top, teacher_tail], dim=-1)
    if temperature != 1.0:
        logp = torch.log_softmax(logp / temperature, dim=-1)
    student_tail = log1mexp(torch.logsumexp(logq_top, dim=-1, keepdim=True))
    return logp, torch.cat([logq_top, student_tail], dim=-1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler's two branches). The input is
    held below -1e-7 so that a top-k holding all of the mass leaves a tail of 1e-7, not log 0."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
