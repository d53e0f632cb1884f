"""Release folders: a student that loads with plain transformers, with its card and checksums.

Layout: config.json, model.safetensors, tokenizer files (with the chat template),
generation_config.json (thinking-mode sampling), README.md (model card), SHA256SUMS.
The folder is assembled under a temporary name beside its destination and renamed into place,
so a crash never leaves a half-written release.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from distill.chat import MODE_SAMPLING
from distill.files import sha256_file

CHECKSUMS = "SHA256SUMS"


def write_release(destination: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, card: str) -> Path:
    """A release folder: weights (safetensors), tokenizer and chat template, the thinking-mode
    generation config, the model card and SHA256SUMS; written atomically."""

    def extras(staging: Path) -> None:
        think = MODE_SAMPLING["think"]
        GenerationConfig(
            do_sample=True, temperature=think.temperature, top_p=think.top_p, top_k=think.top_k,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=model.config.bos_token_id,
        ).save_pretrained(staging)
        (staging / "README.md").write_text(card)

    return save_model_folder(destination, model, tokenizer, extras)


def save_model_folder(destination: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      extras=None) -> Path:
    """`save_pretrained` (safetensors) of model and tokenizer into a staging folder, then one
    rename: a reader sees the old folder or the new one, never half of one (a stage checkpoint
    or a release)."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if extras is not None:
            extras(staging)
        write_checksums(staging)
        _replace_directory(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


def write_checksums(folder: Path) -> None:
    lines = [f"{sha256_file(path)}  {path.relative_to(folder)}" for path in sorted(folder.rglob("*"))
             if path.is_file() and path.name != CHECKSUMS]
    (folder / CHECKSUMS).write_text("\n".join(lines) + "\n")


def verify_checksums(folder: Path) -> list[str]:
    """Files whose content no longer matches the manifest (empty: the release is intact)."""
    bad = []
    for line in (folder / CHECKSUMS).read_text().splitlines():
        digest, name = line.split("  ", 1)
        if not (folder / name).is_file() or sha256_file(folder / name) != digest:
            bad.append(name)
    return bad


def _replace_directory(staging: Path, destination: Path) -> None:
    """Rename `staging` to `destination`; an older release there is moved aside first and only
    deleted once the new one is in place."""
    old = None
    if destination.exists():
        old = destination.parent / f".{destination.name}.old-{os.getpid()}"
        os.replace(destination, old)
    os.replace(staging, destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def model_card(*, name: str, preset: str, parameters: int, teacher: str, recipe: list[str], eval_table: str) -> str:
    think, no_think = MODE_SAMPLING["think"], MODE_SAMPLING["no_think"]
    recipe_lines = "\n".join(f"- {line}" for line in recipe)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [distill, qwen3, knowledge-distillation]
---

# {name}

A Qwen3-architecture student (`{preset}` preset, {parameters:,} parameters) distilled from
`{teacher}` with the `distill` workbench (strong-to-weak distillation, as in the Qwen3 report).
It loads with plain transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

## Modes and sampling
Thinking mode is the default of the chat template (`enable_thinking=True`); pass
`enable_thinking=False` for non-thinking mode, which pre-fills an empty think block.
- thinking: temperature {think.temperature}, top-p {think.top_p}, top-k {think.top_k} (in `generation_config.json`)
- non-thinking: temperature {no_think.temperature}, top-p {no_think.top_p}, top-k {no_think.top_k}

## Evaluation
{eval_table}

## Recipe
{recipe_lines}

## Files
`{CHECKSUMS}` lists the SHA-256 of every file in this folder.
"""
