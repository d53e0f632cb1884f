"""Step checkpoints of a training stage, so that a killed run resumes where it was.

A checkpoint is a folder `step-000120/` holding everything the next step depends on:

- `model.safetensors`: the weights (safetensors, never pickle), whole even when the processes
  train shards of them (gathered first);
- `optimizer.pt` (ddp, fsdp2): the whole AdamW state, or `zero3-rankNNNNN-of-NNNNN.pt` (zero3):
  each process's partition of the fp32 weights and AdamW state; tensors and numbers only, read
  back with `torch.load(weights_only=True)`; the engine (distill/parallel.py) writes these;
- `rng.pt`: the torch RNG state;
- `state.json`: the step, the batch stream's position (its shuffling RNG and queues), the metric
  accumulators and the records logged so far.

It is assembled under a temporary name and renamed into place, then `latest` is rewritten
atomically to name it; older checkpoints beyond `keep` are removed. Everything is flushed to the
disk (fsync) before `latest` names it, so a crash at any moment, a power loss included, leaves
`latest` naming a complete checkpoint (or none). Restoring gives bitwise the state the
uninterrupted run had after that step (a test kills runs with SIGKILL and compares).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from distill.common.files import atomic_write_text, fsync_tree
from distill.parallel import Engine

LATEST = "latest"
RNG_FILE = "rng.pt"


class StepCheckpoints:
    def __init__(self, folder: Path, every: int, keep: int = 2, *, writer: bool = True, barrier=lambda: None):
        if every <= 0 or keep <= 0:
            raise ValueError(f"checkpoints need every > 0 and keep > 0, got every={every} keep={keep}")
        # writer=False: the data-parallel processes other than the main one take part in saving
        # (sharded weights are gathered, a collective) but write nothing; all read to restore.
        self.folder, self.every, self.keep, self.writer = Path(folder), every, keep, writer
        self.barrier = barrier  # waits for every process (ZeRO-3 processes each write a part)

    def due(self, step: int, steps: int) -> bool:
        """After optimizer step `step` (1-based): save now? (Never after the last: the stage's own
        output takes over there.)"""
        return step % self.every == 0 and step < steps

    def save(self, step: int, engine: Engine, state: dict) -> Path | None:
        """Every process calls this; the engine gathers what is sharded, and each process writes
        its own part, if it has one, into the staging folder."""
        name = f"step-{step:06d}"
        staging = self.folder / f".{name}.partial"
        if self.writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        self.barrier()
        engine.save(staging, write=self.writer)
        self.barrier()
        if not self.writer:
            return None
        torch.save(torch.get_rng_state(), staging / RNG_FILE)
        (staging / "state.json").write_text(json.dumps({"step": step, **state}))
        fsync_tree(staging)   # on the disk before `latest` names it, and before older ones go
        final = self.folder / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        atomic_write_text(self.folder / LATEST, name)
        for old in sorted(p for p in self.folder.glob("step-*") if p.is_dir())[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> Path | None:
        pointer = self.folder / LATEST
        if not pointer.exists():
            return None
        folder = self.folder / pointer.read_text().strip()
        return folder if (folder / "state.json").exists() else None

    def restore(self, engine: Engine) -> dict | None:
        """Load the newest checkpoint into the engine's model and optimizer; returns its state
        (None: none yet)."""
        folder = self.latest()
        if folder is None:
            return None
        engine.load(folder)
        torch.set_rng_state(torch.load(folder / RNG_FILE, weights_only=True))
        return json.loads((folder / "state.json").read_text())
