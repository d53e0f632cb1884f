"""The MoE experts' forward that distill's models train with: transformers' grouped_mm path, with
its token gathers written as `index_select` on the CPU.

transformers gathers each expert's tokens by advanced indexing (`hidden[perm // top_k]`), whose
backward is `index_put_` with accumulation: on the CPU that scatter was 14% of a training step
of the embedded teacher, where `index_select`'s backward (`index_add_`) is a plain loop. Same
products, same order, same values forward (the gathers copy); backward the token gradients are
summed in another order, so they agree to float rounding. Measured with
`bench/embedded_step.py --experts`: 5.1-5.2 -> 5.8-6.0 steps/s for the teacher's bootstrap step
(bench/README.md).

On other devices (and for the expert layouts this path does not cover) the forward is
transformers' own `grouped_mm`: on CUDA `index_add_` accumulates with atomics, in no fixed
order. The name is registered with transformers' experts interface when this module is
imported, and lives only in the in-memory config (transformers does not save it): a saved
model loads anywhere with transformers' defaults. Models built here (students/build.py) use it
from the start; loaded ones through `use_in`.
"""

from __future__ import annotations

import torch

try:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _grouped_linear, grouped_mm_experts_forward
except ImportError:   # a transformers without this interface: its own experts forward stays
    ALL_EXPERTS_FUNCTIONS = None

# The implementation's name in transformers' registry (None: not available, models keep their default).
NAME = "grouped_mm_index_select" if ALL_EXPERTS_FUNCTIONS is not None else None


def grouped_mm_index_select(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' `grouped_mm_experts_forward`, gathers by `index_select` on the CPU."""
    # (Attributes read with defaults: older transformers releases lack some of them.)
    covered = (hidden_states.device.type == "cpu" and getattr(self, "gate_up_proj", None) is not None
               and hasattr(self, "_apply_gate") and getattr(self, "has_gate", True) and not getattr(self, "has_bias", False)
               and not getattr(self, "has_post_expert_norm", False) and not getattr(self, "_is_expert_parallel", False))
    if not covered:
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    top_k, (tokens, hidden) = top_k_index.size(-1), hidden_states.shape
    # Sort the (token, expert) pairs by expert, so each expert's tokens are one contiguous group.
    expert_ids, order = torch.sort(top_k_index.reshape(-1))
    selected = hidden_states.index_select(0, order // top_k)
    weights = top_k_weights.reshape(-1).index_select(0, order)
    per_expert = torch.histc(expert_ids.float(), bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
    transposed = getattr(self, "is_transposed", False)
    out = self._apply_gate(_grouped_linear(selected, self.gate_up_proj, offsets, is_transposed=transposed))
    out = _grouped_linear(out, self.down_proj, offsets, is_transposed=transposed) * weights.unsqueeze(-1)
    # Back to (token, k) order, then each token's top-k outputs summed (a reshape and a sum, as
    # transformers does, rather than a scatter).
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.size(0), device=order.device)
    return out.index_select(0, inverse).view(tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)


def use_in(model: torch.nn.Module) -> torch.nn.Module:
    """A loaded model (from_pretrained) on transformers' default grouped_mm experts takes this
    forward instead; any other choice, and a model without experts, stays as it is."""
    if NAME is not None and getattr(model.config, "_experts_implementation", None) == "grouped_mm":
        model.set_experts_implementation(NAME)
    return model


if ALL_EXPERTS_FUNCTIONS is not None:
    ALL_EXPERTS_FUNCTIONS.register(NAME, grouped_mm_index_select)
