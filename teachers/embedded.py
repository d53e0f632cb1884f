"""Where the embedded default teacher is kept: a tiny Qwen3-MoE trained on the built-in task.

It stands in for the frontier model. It is trained once per configuration by the roof's teacher
stage (distill/stages/teacher.py) and kept here, under `<cache>/teachers/<hash>/` as a
transformers folder, the hash taken over everything that shapes it; later runs load it from
there. A folder is stored atomically, so a crash never leaves half a teacher in the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from distill.students import experts

# Bump when the bootstrap recipe changes in a way its configuration does not capture.
RECIPE_VERSION = 1


def cache_folder(cache_dir: Path, material: dict, tokenizer: PreTrainedTokenizerBase) -> Path:
    """The cache entry of the teacher that `material` (architecture, bootstrap, task: plain data)
    and the tokenizer determine."""
    key = {"recipe": RECIPE_VERSION, **material, "vocab": tokenizer.get_vocab(), "template": tokenizer.chat_template}
    return cache_dir / "teachers" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load(folder: Path) -> PreTrainedModel | None:
    """The cached teacher in eval mode, or None when the folder holds none yet."""
    if not (folder / "config.json").exists():
        return None
    return experts.use_in(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)).eval()


def store(folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, description: dict) -> None:
    """Save the trained teacher (with `teacher_config.json` describing it) as the cache entry;
    if another run stored the same teacher first, that one stays."""
    staging = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "teacher_config.json").write_text(json.dumps({**description, "recipe": RECIPE_VERSION}, indent=2))
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, folder)  # atomic: a crash never leaves a half-trained cache entry
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another run cached the same teacher first
