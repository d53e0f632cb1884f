"""Divergences between a teacher and a student distribution given over one shared support.

Every function takes `logp` (teacher) and `logq` (student), float log-probabilities of shape
[N, S] over the same S outcomes (the real vocabulary, or the teacher's top-k plus a tail bucket),
and returns [N] per-token values, computed in float32 and never negative (a final clamp removes
float round-off only). p = teacher, q = student throughout, as in the GKD and DistiLLM papers.

Near the ends of a mixture weight, the naive log M - log a cancels catastrophically, and
JSD(beta) divides by beta(1 - beta), which would amplify that error a millionfold at beta = 1e-6.
So the mixture log-ratios are computed directly (logaddexp in `_JSD`, log1p/expm1 in
`kl_to_mixture` for the skew KLs). Forward/reverse KL and JSD carry hand-written gradients: at
full vocabulary autograd would keep several [N, V] tensors per divergence.
"""

from __future__ import annotations

import math

import torch


def forward_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum p (log p - log q): mode-covering, the classic off-policy loss. [N, S] -> [N]."""
    return _clamp(_KL.apply(logp.float(), logq.float()))


def reverse_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum q (log q - log p): mode-seeking, the natural on-policy loss. [N, S] -> [N]."""
    return _clamp(_KL.apply(logq.float(), logp.float()))


class _KL(torch.autograd.Function):
    """KL(a || b) per row from log a, log b, with hand-written gradients: autograd would keep
    a, log a - log b and two masks, four [N, V] tensors at full vocabulary; this keeps none
    beyond its inputs. Outcomes with a = 0 contribute nothing (0 log 0 = 0)."""

    @staticmethod
    def forward(ctx, loga, logb):
        ctx.save_for_backward(loga, logb)
        return _xlogy_terms(loga, loga - logb).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        loga, logb = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        a = loga.exp()
        grad_loga = grad_logb = None
        if ctx.needs_input_grad[0]:
            # d/dlog a of a (log a - log b) = a (log a - log b + 1)
            grad_loga = _xlogy_terms(loga, (loga - logb).add_(1)).mul_(grad)
        if ctx.needs_input_grad[1]:
            grad_logb = a.mul_(-grad)
        return grad_loga, grad_logb


def jsd(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence, scaled to be continuous in beta on [0, 1]:

        [beta KL(p || M) + (1 - beta) KL(q || M)] / (beta (1 - beta)),  M = beta p + (1 - beta) q,

    which equals forward KL at beta = 0 and reverse KL at beta = 1 and tends to them at the ends.
    (The unscaled form vanishes at both ends, so there beta silently acts as a step size.)
    [N, S] -> [N].
    """
    _check_unit("beta", beta)
    if beta == 0.0:
        return forward_kl(logp, logq)
    if beta == 1.0:
        return reverse_kl(logp, logq)
    return _clamp(_JSD.apply(logp.float(), logq.float(), beta))


class _JSD(torch.autograd.Function):
    """Scaled JSD with hand-written gradients. Per outcome, with A = log(p/M) and B = log(q/M),

        value = sum p A / (1 - beta) + q B / beta,
        d value / d log q = q B / beta,   d value / d log p = p A / (1 - beta),

    so the gradients are the value's own terms: one [N, S] tensor is kept for backward (autograd
    would keep about ten). The log-ratio whose term is divided by the small weight is computed
    directly with logaddexp, exact in absolute terms: log(M/q) = logaddexp(log beta + log(p/q),
    log(1 - beta)) for beta < 1/2, log(M/p) = logaddexp(log(1 - beta) - log(p/q), log beta)
    otherwise; the other follows from log(p/q), its error divided by a weight of at least 1/2.
    """

    @staticmethod
    def forward(ctx, logp, logq, beta):
        d = (logp - logq).nan_to_num_(nan=0.0, posinf=1e30, neginf=-1e30)  # log(p/q), p = 0 made finite
        if beta < 0.5:
            b = torch.logaddexp(d + math.log(beta), _scalar(math.log1p(-beta), d)).neg_()  # log(q/M)
            a = d.add_(b)                                                                                 # log(p/M)
        else:
            a = torch.logaddexp(math.log1p(-beta) - d, _scalar(math.log(beta), d)).neg_()  # log(p/M)
            b = d.neg_().add_(a)                                                                            # log(q/M)
        # Where one side is 0 the subtraction above lost the exact limits: log(q/M) = -log(1-beta)
        # where p = 0, log(p/M) = -log(beta) where q = 0.
        b.masked_fill_(torch.isneginf(logp), -math.log1p(-beta))
        a.masked_fill_(torch.isneginf(logq), -math.log(beta))
        p_terms = logp.exp().mul_(a).div_(1.0 - beta)  # p log(p/M) / (1 - beta)
        q_terms = logq.exp().mul_(b).div_(beta)        # q log(q/M) / beta
        del a, b, d
        value = p_terms.sum(-1) + q_terms.sum(-1)
        ctx.save_for_backward(q_terms if ctx.needs_input_grad[1] else None,
                              p_terms if ctx.needs_input_grad[0] else None)
        return value

    @staticmethod
    def backward(ctx, grad):
        q_terms, p_terms = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        return (p_terms * grad if p_terms is not None else None,
                q_terms * grad if q_terms is not None else None, None)


def skew_kl(logp: torch.Tensor, logq: torch.Tensor, alpha: float) -> torch.Tensor:
    """Skew forward KL (DistiLLM): KL(p || alpha p + (1 - alpha) q). alpha = 0 is forward KL. [N, S] -> [N]."""
    _check_unit("alpha", alpha)
    return kl_to_mixture(logp, logq, 1.0 - alpha)


def skew_reverse_kl(logp: torch.Tensor, logq: torch.Tensor, alpha: float) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(q || (1 - alpha) p + alpha q). alpha = 0 is reverse KL. [N, S] -> [N]."""
    _check_unit("alpha", alpha)
    return kl_to_mixture(logq, logp, 1.0 - alpha)


def tvd(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Total variation distance 0.5 sum |p - q|, in [0, 1]. [N, S] -> [N]."""
    return 0.5 * (logp.float().exp() - logq.float().exp()).abs().sum(-1)


def kl_to_mixture(loga: torch.Tensor, logb: torch.Tensor, w: float) -> torch.Tensor:
    """KL(a || (1 - w) a + w b) for w in [0, 1], accurate for every w. [N, S] -> [N].

    Per outcome, log(M / a) = log((1 - w) + w e^d) with d = log b - log a. Near zero (|w (e^d - 1)|
    small) it is log1p(w expm1(d)), free of cancellation; elsewhere logaddexp, free of overflow.
    Outcomes where a = 0 contribute nothing.
    """
    _check_unit("mixture weight", w)
    loga, logb = loga.float(), logb.float()
    present = loga > float("-inf")
    # Finite stand-ins where a = 0, so that the unused branches carry no inf/nan into gradients.
    loga = torch.where(present, loga, torch.zeros_like(loga))
    logb = torch.where(present, logb, torch.zeros_like(logb))
    d = logb - loga
    x = w * torch.expm1(d.clamp(max=60.0))
    near_zero = x.abs() <= 0.5
    small = torch.log1p(torch.where(near_zero, x, torch.zeros_like(x)))
    log_1mw = math.log1p(-w) if w < 1.0 else float("-inf")
    large = torch.logaddexp(_scalar(log_1mw, d), d + math.log(max(w, 1e-45)))
    log_m_over_a = torch.where(near_zero, small, large)
    terms = torch.where(present, -loga.exp() * log_m_over_a, torch.zeros_like(d))
    return _clamp(terms.sum(-1))


def _xlogy_terms(logx: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """x * log_ratio elementwise, 0 where x = 0; reuses `log_ratio`'s memory (no autograd)."""
    return log_ratio.mul_(logx.exp()).masked_fill_(torch.isneginf(logx), 0.0)


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor on `like`'s device and of its dtype, filled there (no host tensor, no copy)."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _clamp(values: torch.Tensor) -> torch.Tensor:
    return values.clamp(min=0.0)


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
