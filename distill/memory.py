"""Will a run fit? Estimated before anything is allocated, from parameter counts on `meta`.

Training a student in fp32 with AdamW holds weights (4 B/param), gradients (4 B) and two moment
tensors (8 B): 16 bytes per parameter, before activations. The in-process teacher holds its
weights in its dtype. Students are trained one after the other, so the peak is the largest
student plus the teacher. With parallel=fsdp2 or zero3 over N processes, gradients and optimizer
state are split N ways; the weights are counted whole, since each process builds the student
whole before sharding it and gathers it whole again for rollouts and at the end of each stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

GIB = 1024 ** 3
BYTES_PER_TRAINED_PARAM = {"weights": 4, "gradients": 4, "optimizer": 8}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "8bit": 1, "4bit": 0.5}
# Headroom for activations, logits and the allocator, as a fraction of the total.
ACTIVATION_MARGIN = 0.2


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    teacher: int

    @property
    def total(self) -> int:
        return int((self.weights + self.gradients + self.optimizer + self.teacher) * (1 + ACTIVATION_MARGIN))


def estimate(student_params: int, teacher_params: int, teacher_dtype: str, shards: int = 1) -> MemoryEstimate:
    """Bytes one process needs; `shards`: processes the gradients and optimizer state are split over."""
    return MemoryEstimate(
        weights=student_params * BYTES_PER_TRAINED_PARAM["weights"],
        gradients=student_params * BYTES_PER_TRAINED_PARAM["gradients"] // shards,
        optimizer=student_params * BYTES_PER_TRAINED_PARAM["optimizer"] // shards,
        teacher=teacher_params * DTYPE_BYTES[teacher_dtype],
    )


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def check_fits(name: str, estimate_: MemoryEstimate, device: torch.device) -> None:
    """Raise MemoryError with one line: what is needed, what there is, and the ways out."""
    available = available_bytes(device)
    if estimate_.total <= available:
        return
    g = lambda b: f"{b / GIB:.1f}"  # noqa: E731
    raise MemoryError(
        f"student '{name}' needs about {g(estimate_.total)} GiB on {device.type} (weights {g(estimate_.weights)}, "
        f"gradients {g(estimate_.gradients)}, AdamW state {g(estimate_.optimizer)}, teacher {g(estimate_.teacher)}, "
        f"+{int(ACTIVATION_MARGIN * 100)}% activations) but {g(available)} GiB is free; use a smaller preset "
        "(e.g. +student=0.6b or the default tiny students), or shard it across GPUs (accelerate launch ... "
        "parallel=fsdp2 or parallel=zero3)"
    )
