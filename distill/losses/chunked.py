"""The memory-efficient path: the loss from the student's final hidden states and its lm_head,
never materialising the (tokens x vocabulary) logits.

At Qwen3's vocabulary a naive step holds several [N, 151,936] float32 tensors (logits, softmax,
their gradients): about 5 GB each at 8,192 tokens. Here the tokens are processed in chunks. For
each chunk the logits are computed, the per-token loss and its gradient with respect to those
logits are taken right away, and that gradient is pushed through the lm_head matmul into the
hidden-state and weight gradients, which are accumulated. Only one chunk's logits exist at a time.
The gradients are exact (same math as the naive path, summed in a different order) and the
backward pass costs nothing extra: it only scales the stored gradients by the upstream gradient.

The loss must therefore be a weighted sum of per-token losses, which is what training uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from distill.losses.support import TeacherDistribution

# Bytes of float32 logits per chunk: a chunk's working set is a few times this.
DEFAULT_CHUNK_BYTES = 128 * 2 ** 20

PerTokenLoss = Callable[[torch.Tensor, TeacherDistribution, torch.Tensor], dict[str, torch.Tensor]]


def chunk_tokens_for(vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's float32 logits take about `chunk_bytes`."""
    return max(1, chunk_bytes // (4 * vocab))


def chunked_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, teacher: TeacherDistribution,
                 targets: torch.Tensor, token_loss: PerTokenLoss, token_weights: torch.Tensor | float, *,
                 vocab: int | None = None, chunk_tokens: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_t token_weights[t] * token_loss(hidden[t] @ W.T, teacher[t], targets[t])["loss"][t].

    hidden: [N, H] final hidden states at the target positions (after the final norm);
    lm_head_weight: [V_embedding, H] (no bias; rows past `vocab` are never used);
    teacher: its rows for the same N tokens; targets: [N]; token_weights: [N] or a scalar (for
    training, 1 / target tokens in the optimizer step).
    Returns (the scalar loss, differentiable in hidden and lm_head_weight; every output of
    `token_loss` as a detached [N] tensor, for logging).
    """
    vocab = vocab or lm_head_weight.shape[0]
    chunk = chunk_tokens or chunk_tokens_for(vocab)
    weights = torch.as_tensor(token_weights, dtype=torch.float32, device=hidden.device)
    if weights.ndim == 0:
        weights = weights.expand(hidden.shape[0])
    keys: list[str] = []
    loss, *values = _ChunkedLoss.apply(hidden, lm_head_weight, teacher, targets, token_loss, weights, vocab, chunk,
                                       keys)
    return loss, dict(zip(keys, values))


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher, targets, token_loss, weights, vocab, chunk, keys):
        used = weight[:vocab]  # a view: padding rows of the embedding are never touched
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        # Accumulate the weight gradient in float32 even for bf16 weights.
        grad_used = torch.zeros(used.shape, dtype=torch.float32, device=used.device) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        collected: dict[str, list[torch.Tensor]] = {}
        # One logits buffer for every chunk: a fresh multi-MB tensor per chunk costs page faults.
        buffer = torch.empty(min(chunk, hidden.shape[0]), used.shape[0], dtype=hidden.dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows]
            logits = torch.mm(h, used.T, out=buffer[:h.shape[0]]).detach().float().requires_grad_()
            with torch.enable_grad():
                out = token_loss(logits, teacher.rows(rows), targets[rows])
                chunk_loss = (out["loss"] * weights[rows]).sum()
            (grad_logits,) = torch.autograd.grad(chunk_loss, logits)
            total += chunk_loss.detach()
            for key, value in out.items():
                collected.setdefault(key, []).append(value.detach())
            del out, chunk_loss, logits
            grad_logits = grad_logits.to(used.dtype)
            if grad_hidden is not None:
                torch.mm(grad_logits, used, out=grad_hidden[rows])
            if grad_used is not None:
                grad_used.addmm_(grad_logits.T.float(), h.float())
        grad_weight = None
        if grad_used is not None:
            if vocab == weight.shape[0] and weight.dtype == torch.float32:
                grad_weight = grad_used
            else:
                grad_weight = torch.zeros_like(weight)
                grad_weight[:vocab] = grad_used
        ctx.save_for_backward(grad_hidden, grad_weight)
        keys.extend(collected)
        values = [torch.cat(parts) for parts in collected.values()]
        ctx.mark_non_differentiable(*values)
        return (total, *values)

    @staticmethod
    def backward(ctx, grad_total, *_unused):
        grad_hidden, grad_weight = ctx.saved_tensors
        # The upstream gradient is a scalar, usually exactly 1: skip the multiply (and its copy).
        if grad_total is not None and not bool(grad_total == 1):
            grad_hidden = grad_hidden * grad_total if grad_hidden is not None else None
            grad_weight = grad_weight * grad_total if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def naive_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, teacher: TeacherDistribution, targets: torch.Tensor,
               token_loss: PerTokenLoss, token_weights: torch.Tensor | float, *,
               vocab: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same quantity with the full [N, vocab] logits materialised (the baseline, and for tests)."""
    vocab = vocab or lm_head_weight.shape[0]
    logits = hidden @ lm_head_weight[:vocab].T
    out = token_loss(logits.float(), teacher, targets)
    loss = (out["loss"] * torch.as_tensor(token_weights, dtype=torch.float32, device=hidden.device)).sum()
    return loss, {key: value.detach() for key, value in out.items()}
