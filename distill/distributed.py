"""Data-parallel training across processes, with accelerate as the engine.

`accelerate launch -m distill ...` (or torchrun) starts one process per device. Every process
runs the pipeline; the student stages are data-parallel: each optimizer step's micro-batches are
split by rank (every rank draws the same batch and keeps its share of the rows; on-policy, its
share of the prompts, sampled with its own seed), the loss is divided by the target tokens of the
whole step over all ranks, and the gradients are averaged across ranks before the update, so
every rank holds the same parameters after every step (checked after each stage) and the update
equals one process's on the whole batch. Work that must happen once (the teacher bootstrap,
checkpoints, eval, release, the run's log) happens on the main process while the others wait.

On a CPU machine: `accelerate launch --multi_gpu --num_processes 2 -m distill ...` with
OMP_NUM_THREADS=1 (`--cpu --num_processes 2` silently starts one process).

This module says where a process stands and averages replicas' gradients; whether the processes
hold whole replicas or shards of the student (`parallel=ddp|fsdp2|zero3`) is distill/parallel.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from distill import PARENT_AT_START
from distill.common.errors import ConfigError
from distill.workers import exit_with_parent


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    accelerator: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def share(self, value):
        """The main process's `value` (any picklable object), in every process."""
        if self.world == 1:
            return value
        holder = [value if self.main else None]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def total(self, count: int) -> int:
        """The sum of `count` over all processes."""
        if self.world == 1:
            return count
        value = torch.tensor([count], dtype=torch.long, device=self.accelerator.device)
        torch.distributed.all_reduce(value)
        return int(value.item())

    def average_gradients(self, model: torch.nn.Module) -> None:
        """Average every gradient over the processes (what DDP does during backward)."""
        if self.world == 1:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def in_sync(self, model: torch.nn.Module) -> bool:
        """Do all processes hold bitwise the same parameters? (A sum of the weights' bytes.)"""
        if self.world == 1:
            return True
        flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
        signature = flat.view(torch.int32).to(torch.int64).sum()[None]
        low, high = signature.clone(), signature.clone()
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        return bool(low == high)


def processes(device: torch.device) -> Processes:
    """This process's place: one process unless launched by accelerate / torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    # A rank whose launcher is killed exits instead of waiting in a collective for peers that are gone.
    exit_with_parent(PARENT_AT_START)
    accelerator = Accelerator(cpu=device.type == "cpu")
    plugin = {DistributedType.FSDP: "fsdp2", DistributedType.DEEPSPEED: "zero3"}.get(accelerator.distributed_type)
    if plugin is not None:
        # Its settings would be silently ignored: distill shards the student itself.
        raise ConfigError(f"accelerate was launched with its {accelerator.distributed_type.value} plugin, which distill "
                          f"does not use: launch with conf/accelerate/multi_gpu.yaml (or --multi_gpu) and set "
                          f"parallel={plugin}")
    return Processes(accelerator.process_index, accelerator.num_processes, accelerator)
