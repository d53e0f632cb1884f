"""Step checkpoints of a training stage, so that a killed run resumes where it was.

A checkpoint is a folder `step-000120/` holding everything the next step depends on:

- `model.safetensors`: the weights (safetensors, never pickle);
- `optimizer.pt`: the AdamW state and the torch RNG state, tensors and numbers only, read back
  with `torch.load(weights_only=True)`;
- `state.json`: the step, the batch stream's position (its shuffling RNG and queues), the metric
  accumulators and the records logged so far.

It is assembled under a temporary name and renamed into place, then `latest` is rewritten
atomically to name it; older checkpoints beyond `keep` are removed. A crash at any moment leaves
`latest` naming a complete checkpoint (or none). Restoring gives bitwise the state the
uninterrupted run had after that step (a test kills runs with SIGKILL and compares).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from distill.files import atomic_write_text

LATEST = "latest"


class StepCheckpoints:
    def __init__(self, folder: Path, every: int, keep: int = 2, *, writer: bool = True):
        if every <= 0 or keep <= 0:
            raise ValueError(f"checkpoints need every > 0 and keep > 0, got every={every} keep={keep}")
        # writer=False: restore only (data-parallel processes other than the main one read the
        # main process's checkpoints and write none).
        self.folder, self.every, self.keep, self.writer = Path(folder), every, keep, writer

    def due(self, step: int, steps: int) -> bool:
        """After optimizer step `step` (1-based): save now? (Never after the last: the stage's own
        output takes over there.)"""
        return self.writer and step % self.every == 0 and step < steps

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:06d}"
        staging = self.folder / f".{name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        save_model(model, str(staging / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, staging / "optimizer.pt")
        (staging / "state.json").write_text(json.dumps({"step": step, **state}))
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

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """Load the newest checkpoint into model and optimizer; returns its state (None: none yet)."""
        folder = self.latest()
        if folder is None:
            return None
        load_model(model, str(folder / "model.safetensors"))
        saved = torch.load(folder / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        return json.loads((folder / "state.json").read_text())
