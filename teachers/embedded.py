"""The embedded default teacher: a tiny Qwen3-MoE trained here on the built-in task.

It stands in for the frontier model. Like Qwen3's flagships after thinking-mode fusion, it
learns the task in both modes: with step-by-step reasoning inside <think>...</think>, and with
an empty think block and the answer alone. Training happens once per configuration: the result
is cached under `<cache>/teachers/<hash>/` (a transformers folder) and reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from distill.chat import MODES, render_prompt, render_response
from distill.checkpoint import StepCheckpoints
from distill.config import DataConfig, TeacherConfig
from distill.data import Example, ModeAlternatingBatches, prompt_messages, reference_reply
from distill.tracking import Tracker
from distill.train import Schedule, cross_entropy_objective, fit
from students.build import build_random
from students.presets import get_preset

# Bump when the bootstrap recipe changes in a way the config does not capture.
RECIPE_VERSION = 1


def teacher_architecture(cfg: TeacherConfig):
    return get_preset(cfg.preset).override(**cfg.overrides)


def cache_key(cfg: TeacherConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of everything that determines the trained teacher."""
    material = {
        "recipe": RECIPE_VERSION,
        "architecture": teacher_architecture(cfg).to_dict(),
        "bootstrap": asdict(cfg.bootstrap),
        "task": asdict(data.arithmetic),
        "source": data.source,
        "max_length": data.max_length,
        "vocab": tokenizer.get_vocab(),
        "template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def load_or_train(cfg: TeacherConfig, data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
                  train_split: datasets.Dataset, cache_dir: Path, tracker: Tracker, *,
                  progress: bool = True) -> tuple[PreTrainedModel, Path, bool]:
    """(model, folder, reused): the cached teacher, or a new one trained and cached."""
    folder = cache_dir / "teachers" / cache_key(cfg, data_cfg, tokenizer)
    if (folder / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return model.eval(), folder, True
    # Step checkpoints beside the cache entry: a killed bootstrap continues where it was (the
    # entry's name is the hash of everything that shapes the teacher, so any checkpoint there fits).
    steps = StepCheckpoints(folder.parent / f".{folder.name}.steps", every=200, keep=1)
    model = train_teacher(cfg, data_cfg, tokenizer, train_split, tracker, progress=progress, checkpoints=steps)
    staging = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "teacher_config.json").write_text(json.dumps(
        {"teacher": asdict(cfg), "task": asdict(data_cfg.arithmetic), "recipe": RECIPE_VERSION}, indent=2))
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, folder)  # atomic: a crash never leaves a half-trained cache entry
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another run cached the same teacher first
    shutil.rmtree(steps.folder, ignore_errors=True)
    return model.eval(), folder, False


def train_teacher(cfg: TeacherConfig, data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
                  train_split: datasets.Dataset, tracker: Tracker, *, progress: bool = True,
                  checkpoints: StepCheckpoints | None = None) -> PreTrainedModel:
    model = build_random(teacher_architecture(cfg), seed=cfg.bootstrap.seed)
    boot = cfg.bootstrap
    examples = {mode: [] for mode in MODES}
    for row in train_split:
        prompt = prompt_messages(row["messages"])
        reply = reference_reply(row["messages"])
        for mode in MODES:
            examples[mode].append(Example(prompt=render_prompt(tokenizer, prompt, mode),
                                          response=render_response(tokenizer, reply, mode)))
    schedule = Schedule(steps=boot.steps, lr=boot.lr, warmup_steps=boot.warmup_steps)
    batches = ModeAlternatingBatches(examples, boot.batch_size, tokenizer.pad_token_id, data_cfg.max_length,
                                     micro_batches=1, seed=boot.seed)
    fit(model, batches, cross_entropy_objective(len(tokenizer)), schedule, tracker=tracker, prefix="teacher/bootstrap",
        desc="teacher bootstrap", progress=progress, checkpoints=checkpoints, resume=checkpoints is not None)
    return model
