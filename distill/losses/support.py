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


@dataclass(frozen=True)
class TopKTeacher:
    """Teacher top-k per token: ids [..., K] (integer) and log-probabilities [..., K] at
    temperature 1, sorted or not. Their mass may fall short of one; the rest is the tail."""

    ids: torch.Tensor
    logprobs: torch.Tensor

    def rows(self, index) -> "TopKTeacher":
        return TopKTeacher(self.ids[index], self.logprobs[index])


@dataclass(frozen=True)
class SampledTokenTeacher:
    """Only the teacher's log-probability of each sampled token, [N]: all the sampled-token
    estimator of on-policy distillation needs (any backend gives it, a server too).

    `behavior` [N], when given, is the log-probability each token had under the policy that
    sampled it (an inference engine whose weights may be some steps behind the trainer's); the
    estimator then weighs each token by the truncated importance ratio min(q/behavior, cap)."""

    chosen: torch.Tensor
    behavior: torch.Tensor | None = None
    cap: float = 2.0

    def rows(self, index) -> "SampledTokenTeacher":
        return SampledTokenTeacher(self.chosen[index], None if self.behavior is None else self.behavior[index],
                                   self.cap)


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
    student_logits = _soften(student_logits, temperature)
    if isinstance(teacher, FullTeacher):
        logq_full = log_softmax(student_logits)
        return _full(logq_full, teacher.logits, vocab, temperature), logq_full
    if isinstance(teacher, TopKTeacher):
        return _top_k(student_logits, teacher, temperature, missing_mass)
    raise TypeError(f"teacher must be FullTeacher or TopKTeacher, got {type(teacher).__name__}")


def _soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature  # no [N, V] copy at tau = 1


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
    return log_softmax(_soften(teacher_logits, temperature))


def _top_k(student_logits: torch.Tensor, teacher: TopKTeacher, temperature: float, missing_mass: str):
    ids = teacher.ids.long()
    logp_top = teacher.logprobs.float()
    logq_top = gathered_log_softmax(student_logits, ids)
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


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension, float32, with the normaliser summed in float64.

    At 151,936 entries a float32 sum of exp() is off by about 1e-6 relative; that offset shifts
    every log-probability and, through p = exp(log p), returns multiplied by the divergence
    (~1e-5 at a KL of 10). Partial sums of 1,024 entries in float32, then float64 across them,
    remove it for the price of one small extra pass. Memory is that of torch.log_softmax: only
    the output is kept for backward.
    """
    return _AccurateLogSoftmax.apply(logits.float())


class _AccurateLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):
        out = logits - _logsumexp(logits)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        # grad - softmax * sum(grad), with one [.., V] allocation
        return out.exp().mul_(-grad.sum(-1, keepdim=True)).add_(grad)


def gathered_log_softmax(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits) at `ids` only: [N, V], [N, K] -> [N, K].

    The top-k losses need the student's log-probabilities at K ids and nothing else, so the
    [N, V] log-probabilities are never written: z[ids] - logsumexp(z), with one [N, V] tensor
    in backward (softmax scaled, plus the scatter of the K gradients).
    """
    return _GatheredLogSoftmax.apply(logits.float(), ids)


def _logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """log sum exp over the last dimension, [..., V] -> [..., 1], summed in float64 by blocks
    (a float32 sum over 151,936 entries is off by ~1e-6 relative, which shows in the loss)."""
    peak = logits.amax(-1, keepdim=True)
    shifted = (logits - peak).exp_()
    width, block = shifted.shape[-1], 1024
    whole = width // block * block
    total = shifted[..., whole:].double().sum(-1, keepdim=True)
    if whole:
        total = total + shifted[..., :whole].unflatten(-1, (whole // block, block)).sum(-1).double().sum(-1, keepdim=True)
    return peak + total.log().float()


class _GatheredLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids):
        lse = _logsumexp(logits)
        ctx.save_for_backward(logits, ids, lse)
        return logits.gather(-1, ids) - lse

    @staticmethod
    def backward(ctx, grad):
        logits, ids, lse = ctx.saved_tensors
        # d/dz_j (z_id - lse) = [j = id] - softmax_j
        grad_logits = (logits - lse).exp_().mul_(-grad.sum(-1, keepdim=True))
        return grad_logits.scatter_add_(-1, ids, grad), None


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler's two branches). The input is
    held below -1e-7 so that a top-k holding all of the mass leaves a tail of 1e-7, not log 0."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
