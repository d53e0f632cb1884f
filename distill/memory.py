"""Will a run fit? Estimated before anything is allocated, from parameter counts on `meta`.

Training a student in fp32 with AdamW holds weights (4 B/param), gradients (4 B) and two moment
tensors (8 B): 16 bytes per parameter, before activations. The in-process teacher holds its
weights in its dtype. Students are trained one after the other, so the peak is the largest
student plus the teacher. With parallel=fsdp2 or zero3 over N processes, gradients and optimizer
state are split N ways; the weights are counted whole, since each process builds the student
whole before sharding it and gathers it whole again for rollouts and at the end of each stage.

Activations are counted from the largest micro-batch (`activation_bytes`): what autograd keeps per
token and decoder layer until the backward, or, with activation checkpointing, only each layer's
input plus one layer's worth being recomputed; and the loss's vocabulary-sized working set.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

GIB = 1024 ** 3
BYTES_PER_TRAINED_PARAM = {"weights": 4, "gradients": 4, "optimizer": 8}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "8bit": 1, "4bit": 0.5}
# Headroom for the allocator, temporaries and what the estimate leaves out, as a fraction of the total.
HEADROOM = 0.2


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    teacher: int
    activations: int = 0

    @property
    def total(self) -> int:
        held = self.weights + self.gradients + self.optimizer + self.teacher + self.activations
        return int(held * (1 + HEADROOM))


def estimate(student_params: int, teacher_params: int, teacher_dtype: str, shards: int = 1,
             activations: int = 0) -> MemoryEstimate:
    """Bytes one process needs; `shards`: processes the gradients and optimizer state are split
    over; `activations`: from `activation_bytes`."""
    return MemoryEstimate(
        weights=student_params * BYTES_PER_TRAINED_PARAM["weights"],
        gradients=student_params * BYTES_PER_TRAINED_PARAM["gradients"] // shards,
        optimizer=student_params * BYTES_PER_TRAINED_PARAM["optimizer"] // shards,
        teacher=teacher_params * DTYPE_BYTES[teacher_dtype],
        activations=activations,
    )


def activation_bytes(arch, tokens: int, *, checkpointing: bool, element_bytes: int, loss_bytes: int) -> int:
    """What one micro-batch of `tokens` tokens keeps for the backward (an estimate, from the
    shapes; `arch` a students.presets.Architecture).

    Per token and decoder layer, autograd keeps about: the two norms' inputs and outputs (4H),
    q, k, v, their QK-norm and rotary outputs and the attention output (4q + 4kv + H), and the
    MLP's gate, up, SiLU and product (4I; a MoE layer: for each of its k experts, plus the routed
    copies of the token, 2H). With activation checkpointing a layer keeps only its input (H), and
    one layer at a time holds the rest while it is recomputed. `loss_bytes`: the loss's own
    working set (the chunked loss: a few chunks; the naive one: the logits and their gradient)."""
    hidden, q = arch.hidden_size, arch.num_attention_heads * arch.head_dim
    kv = arch.num_key_value_heads * arch.head_dim
    if arch.num_experts:
        mlp = arch.num_experts_per_tok * (4 * arch.moe_intermediate_size + 2 * hidden) + arch.num_experts
    else:
        mlp = 4 * arch.intermediate_size
    per_layer = 5 * hidden + 4 * q + 4 * kv + mlp
    if checkpointing:
        kept = tokens * (arch.num_hidden_layers * hidden + per_layer)
    else:
        kept = tokens * arch.num_hidden_layers * per_layer
    return kept * element_bytes + loss_bytes


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def check_fits(name: str, estimate_: MemoryEstimate, device: torch.device, key: str = "student") -> None:
    """Raise MemoryError with one line: what is needed, what there is, and the ways out."""
    available = available_bytes(device)
    if estimate_.total <= available:
        return
    g = lambda b: f"{b / GIB:.1f}"  # noqa: E731
    raise MemoryError(
        f"student '{name}' needs about {g(estimate_.total)} GiB on {device.type} (weights {g(estimate_.weights)}, "
        f"gradients {g(estimate_.gradients)}, AdamW state {g(estimate_.optimizer)}, teacher {g(estimate_.teacher)}, "
        f"activations {g(estimate_.activations)}, +{int(HEADROOM * 100)}% headroom) but {g(available)} GiB "
        "is free; use a smaller preset (e.g. +student=0.6b or the default tiny students), shard it across GPUs "
        "(accelerate launch ... parallel=fsdp2 or parallel=zero3), or for activations a smaller batch_size or "
        f"data.max_length, or activation checkpointing ({key}.activation_checkpointing=true)"
    )
