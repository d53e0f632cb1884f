"""Per-token losses from student logits and a teacher distribution.

Each divergence takes student logits [B, T, V] with a target mask [B, T] (or [N, V] already
selected, mask None), the teacher's distribution for the same positions (`FullTeacher` or
`TopKTeacher`), and its parameters; it returns [N] float32 values, one per target token, unreduced:
the caller divides their sum by the target tokens of the whole optimizer step (see distill/train.py).

`TokenLoss` is the configured mix used in training: a divergence (optionally scaled by tau^2),
plus a weight of cross-entropy on the sampled tokens. `sampled_token_reverse_kl` is the
on-policy estimator that needs only the teacher's log-probability of each sampled token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from distill.losses import divergences
from distill.losses.support import SampledTokenTeacher, TeacherDistribution, aligned_log_probs, gathered_log_softmax

DIVERGENCES = {
    "forward_kl": divergences.forward_kl,
    "reverse_kl": divergences.reverse_kl,
    "jsd": divergences.jsd,
    "skew_kl": divergences.skew_kl,
    "skew_reverse_kl": divergences.skew_reverse_kl,
    "tvd": divergences.tvd,
}
# The parameter each divergence takes, if any.
PARAMETER = {"jsd": "beta", "skew_kl": "alpha", "skew_reverse_kl": "alpha"}


def token_divergence(name: str, student_logits: torch.Tensor, teacher: TeacherDistribution,
                     target_mask: torch.Tensor | None = None, *, beta: float = 0.5, alpha: float = 0.1,
                     temperature: float = 1.0, missing_mass: str = "tail", vocab: int | None = None) -> torch.Tensor:
    """Divergence `name` between teacher and student at every target token -> [N]."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{name}'; valid: {', '.join(DIVERGENCES)}")
    if target_mask is not None:
        student_logits, teacher = student_logits[target_mask], teacher.rows(target_mask)
    logp, logq = aligned_log_probs(student_logits, teacher, vocab=vocab, temperature=temperature,
                                   missing_mass=missing_mass)
    parameter = {"beta": beta, "alpha": alpha}.get(PARAMETER.get(name))
    return DIVERGENCES[name](logp, logq) if parameter is None else DIVERGENCES[name](logp, logq, parameter)


forward_kl = partial(token_divergence, "forward_kl")
reverse_kl = partial(token_divergence, "reverse_kl")
jsd = partial(token_divergence, "jsd")
skew_kl = partial(token_divergence, "skew_kl")
skew_reverse_kl = partial(token_divergence, "skew_reverse_kl")
tvd = partial(token_divergence, "tvd")


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor | None = None, *,
                  vocab: int | None = None) -> torch.Tensor:
    """-log q(target) per target token: logits [B, T, V] + targets/mask [B, T] (or [N, V] + [N]) -> [N]."""
    if target_mask is not None:
        student_logits, targets = student_logits[target_mask], targets[target_mask]
    if vocab is not None:
        student_logits = student_logits[..., :vocab]
    return F.cross_entropy(student_logits.float(), targets.long(), reduction="none")


def sampled_token_reverse_kl(student_logits: torch.Tensor, teacher: SampledTokenTeacher, targets: torch.Tensor, *,
                             vocab: int | None = None) -> dict[str, torch.Tensor]:
    """On-policy reverse KL from the sampled tokens alone: logits [N, V], teacher.chosen [N],
    targets [N] (the tokens the student sampled) -> {"loss", "kd"} [N].

    For y ~ q, log q(y) - log p(y) is an unbiased estimate of KL(q||p) at that position, and
    sg(log q(y) - log p(y)) * log q(y) has the gradient E_q[(log q - log p) grad log q] of the
    KL (the score-function estimator; the E_q[grad log q] term is zero). Per token with no
    credit to later tokens, as in Thinking Machines' on-policy distillation. Unbiased only when
    the samples come from q itself: sample at temperature 1 without top-k/top-p truncation.
    "kd" is the estimate, which averages to the reverse KL.

    Samples from another policy mu (an engine some weight versions behind, or one whose numerics
    differ from the trainer's): with `teacher.behavior` = log mu(y), each token is weighted by
    w = min(q(y) / mu(y), cap), detached, the truncated importance sampling of off-policy
    actor-critic methods (IMPALA's truncated rho; TIS in asynchronous RL trainers). Truncation
    trades a little bias for bounded variance; w = 1 when mu is q. Returns "is_weight" [N] and
    "is_clipped" [N] (1 where the cap bit) too.
    """
    if vocab is not None:
        student_logits = student_logits[..., :vocab]
    logq = gathered_log_softmax(student_logits, targets.long()[:, None])[:, 0]
    estimate = logq.detach() - teacher.chosen.float()
    if teacher.behavior is None:
        return {"loss": estimate * logq, "kd": estimate}
    ratio = torch.exp(logq.detach() - teacher.behavior.float())
    weight = ratio.clamp(max=teacher.cap)
    return {"loss": weight * estimate * logq, "kd": estimate, "is_weight": weight,
            "is_clipped": (ratio > teacher.cap).float()}


@dataclass(frozen=True)
class TokenLoss:
    """The training loss per target token: scale * divergence + ce_weight * cross-entropy.

    Called on rows already selected by the target mask: student logits [N, V], the teacher's rows,
    targets [N]. Returns {"loss": [N], "kd": [N] (unscaled), "ce": [N] when ce_weight > 0}; only
    "loss" carries gradients that matter, the others are for logging.
    """

    divergence: str = "forward_kl"
    beta: float = 0.5
    alpha: float = 0.1
    temperature: float = 1.0
    scale_by_temperature_squared: bool = False
    missing_mass: str = "tail"
    ce_weight: float = 0.0
    vocab: int | None = None

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence '{self.divergence}'; valid: {', '.join(DIVERGENCES)}")

    def __call__(self, student_logits: torch.Tensor, teacher: TeacherDistribution,
                 targets: torch.Tensor) -> dict[str, torch.Tensor]:
        kd = token_divergence(self.divergence, student_logits, teacher, beta=self.beta, alpha=self.alpha,
                              temperature=self.temperature, missing_mass=self.missing_mass, vocab=self.vocab)
        scale = self.temperature ** 2 if self.scale_by_temperature_squared else 1.0
        out = {"loss": scale * kd, "kd": kd}
        if self.ce_weight:
            ce = cross_entropy(student_logits, targets, vocab=self.vocab)
            out["loss"] = out["loss"] + self.ce_weight * ce
            out["ce"] = ce
        return out
