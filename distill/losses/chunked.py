"""The memory-efficient path: the loss from the student's final hidden states and its lm_head,
never materialising the (tokens x vocabulary) logits.

At Qwen3's vocabulary a naive step holds several [N, 151,936] float32 tensors (logits, softmax,
their gradients): about 5 GB each at 8,192 tokens. Here the tokens are processed in chunks. For
each chunk the logits are computed, the per-token loss and its gradient with respect to those
logits are taken right away, and that gradient is pushed through the lm_head matmul into the
hidden-state and weight gradients, which are accumulated. Only one chunk's logits exist at a time.
The backward pass costs nothing extra: it only scales the stored gradients by the upstream
gradient. The loss must therefore be a weighted sum of per-token losses, which is what training uses.

Precision. The three vocabulary products (logits, the hidden-state gradient, the weight gradient)
run in the compute dtype: bf16 (or fp16) under autocast or when the weights are 16-bit, which is
what tensor cores take, with float32 accumulation inside each matmul and a float32 running sum of
the weight gradient across chunks; float32 inputs without autocast keep float32 throughout, the
exact path. The per-token math (log-softmax normaliser, divergences) is always float32.

Chunk size comes from a memory budget: `chunk_bytes` of float32 logits per chunk (a chunk's
working set is a few times that), by default 128 MiB on a CPU and 1 GiB on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from distill.losses.support import TeacherDistribution

# Bytes of float32 logits per chunk, by device type. On a CPU small chunks stay in cache-friendly
# sizes; on a GPU large ones keep the matmuls long enough for the tensor cores.
DEFAULT_CHUNK_BYTES = {"cpu": 128 * 2 ** 20, "cuda": 2 ** 30}

# A 16-bit weight-gradient product is taken for at least this many tokens at a time (matmuls
# with a short inner dimension run far below peak: 4x on this project's CPU at 220 tokens against
# 440), and VOCAB_BLOCK vocabulary rows at a time (its buffer: VOCAB_BLOCK x H, still in cache
# when it is added to the float32 sum).
GROUP_TOKENS = 400
VOCAB_BLOCK = 4096

PerTokenLoss = Callable[[torch.Tensor, TeacherDistribution, torch.Tensor], dict[str, torch.Tensor]]


def chunk_tokens_for(vocab: int, device: torch.device, chunk_bytes: int | None = None) -> int:
    """Tokens per chunk so that one chunk's float32 logits take about `chunk_bytes` (default:
    the device type's)."""
    budget = chunk_bytes or DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES["cpu"])
    return max(1, budget // (4 * vocab))


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the vocabulary products run in: autocast's when it is on for this device, else
    the lower precision of the two inputs (float32 when both are)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return min((hidden.dtype, weight.dtype), key=lambda dtype: torch.finfo(dtype).bits)


def chunked_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, teacher: TeacherDistribution,
                 targets: torch.Tensor, token_loss: PerTokenLoss, token_weights: torch.Tensor | float, *,
                 vocab: int | None = None, chunk_tokens: int | None = None,
                 chunk_bytes: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_t token_weights[t] * token_loss(hidden[t] @ W.T, teacher[t], targets[t])["loss"][t].

    hidden: [N, H] final hidden states at the target positions (after the final norm);
    lm_head_weight: [V_embedding, H] (no bias; rows past `vocab` are never used);
    teacher: its rows for the same N tokens; targets: [N]; token_weights: [N] or a scalar (for
    training, 1 / target tokens in the optimizer step). `chunk_tokens` fixes the chunk size;
    otherwise it follows `chunk_bytes` (see `chunk_tokens_for`).
    Returns (the scalar loss, float32, differentiable in hidden and lm_head_weight; every output
    of `token_loss` as a detached [N] tensor, for logging).
    """
    vocab = vocab or lm_head_weight.shape[0]
    chunk = chunk_tokens or chunk_tokens_for(vocab, hidden.device, chunk_bytes)
    weights = torch.as_tensor(token_weights, dtype=torch.float32, device=hidden.device)
    if weights.ndim == 0:
        weights = weights.expand(hidden.shape[0])
    keys: list[str] = []
    loss, *values = _ChunkedLoss.apply(hidden, lm_head_weight, teacher, targets, token_loss, weights, vocab, chunk,
                                       compute_dtype(hidden, lm_head_weight), keys)
    return loss, dict(zip(keys, values))


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher, targets, token_loss, weights, vocab, chunk, dtype, keys):
        # The products below are explicit matmuls (some with out=), which autocast never casts:
        # the inputs are cast to the compute dtype here, once.
        used = weight[:vocab].detach().to(dtype)     # padding rows of the embedding are never touched
        inputs = hidden.detach().to(dtype)
        tokens = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        # The weight gradient is summed over chunks in float32, whatever the weights' dtype.
        grad_used = torch.zeros(used.shape, dtype=torch.float32, device=used.device) if weight.requires_grad else None
        # In a 16-bit dtype the weight gradient is taken for a group of chunks at once, from their
        # logit gradients kept in that dtype: a matmul whose inner dimension (tokens) is short
        # runs far below peak. float32 sums each chunk straight into the gradient.
        sixteen_bit = grad_used is not None and dtype != torch.float32
        group = -(-GROUP_TOKENS // chunk) * chunk if sixteen_bit else chunk
        pending = torch.empty(min(group, tokens), used.shape[0], dtype=dtype, device=used.device) if sixteen_bit \
            else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        collected: dict[str, list[torch.Tensor]] = {}
        # One logits buffer for every chunk: a fresh multi-MB tensor per chunk costs page faults.
        buffer = torch.empty(min(chunk, tokens), used.shape[0], dtype=dtype, device=hidden.device)
        # No tokens (a micro-batch whose rollouts were all dropped) still runs one empty chunk, so
        # the loss is 0 with every per-token output present (empty).
        for group_start in range(0, max(tokens, 1), group):
            group_stop = min(group_start + group, tokens)
            for start in range(group_start, group_stop, chunk):
                rows = slice(start, min(start + chunk, group_stop))
                h = inputs[rows]
                logits = torch.mm(h, used.T, out=buffer[:h.shape[0]]).float().requires_grad_()
                with torch.enable_grad():
                    out = token_loss(logits, teacher.rows(rows), targets[rows])
                    chunk_loss = (out["loss"] * weights[rows]).sum()
                (grad_logits,) = torch.autograd.grad(chunk_loss, logits)
                total += chunk_loss.detach()
                for key, value in out.items():
                    collected.setdefault(key, []).append(value.detach())
                del out, chunk_loss, logits
                if sixteen_bit:
                    grad_logits = pending[start - group_start:rows.stop - group_start].copy_(grad_logits)
                else:
                    grad_logits = grad_logits.to(dtype)
                if grad_hidden is not None:
                    if grad_hidden.dtype == dtype:
                        torch.mm(grad_logits, used, out=grad_hidden[rows])
                    else:
                        grad_hidden[rows] = torch.mm(grad_logits, used)
                if grad_used is not None and not sixteen_bit:
                    grad_used.addmm_(grad_logits.T, h)
            if sixteen_bit:
                _add_product(grad_used, pending[:group_stop - group_start], inputs[group_start:group_stop])
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
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def _add_product(total: torch.Tensor, grad_logits: torch.Tensor, inputs: torch.Tensor) -> None:
    """total (float32 [V, H]) += grad_logits.T @ inputs, the product in their 16-bit dtype, a block
    of vocabulary rows at a time: matmuls cannot accumulate a 16-bit product into a float32 tensor
    in place on every device, so each block's product goes through a small buffer."""
    buffer = torch.empty(min(VOCAB_BLOCK, total.shape[0]), total.shape[1], dtype=inputs.dtype, device=inputs.device)
    for block in range(0, total.shape[0], VOCAB_BLOCK):
        rows = slice(block, block + VOCAB_BLOCK)
        product = buffer[:total[rows].shape[0]]
        total[rows] += torch.mm(grad_logits[:, rows].T, inputs, out=product)


def naive_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, teacher: TeacherDistribution, targets: torch.Tensor,
               token_loss: PerTokenLoss, token_weights: torch.Tensor | float, *,
               vocab: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same quantity with the full [N, vocab] logits materialised (the baseline, and for tests).
    Under autocast the product runs in the autocast dtype, as lm_head does in a model's forward."""
    vocab = vocab or lm_head_weight.shape[0]
    logits = torch.nn.functional.linear(hidden, lm_head_weight[:vocab])
    out = token_loss(logits.float(), teacher, targets)
    loss = (out["loss"] * torch.as_tensor(token_weights, dtype=torch.float32, device=hidden.device)).sum()
    return loss, {key: value.detach() for key, value in out.items()}
