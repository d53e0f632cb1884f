"""The release stage: each student as a folder that loads with plain transformers, with its model
card (the run's eval table and the recipe that made it) and checksums.

Layout: config.json, model.safetensors, tokenizer files (with the chat template),
generation_config.json (thinking-mode sampling), README.md (model card), SHA256SUMS.
The folder is assembled under a temporary name beside its destination and renamed into place,
so a crash never leaves a half-written release (stage checkpoints are written the same way).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from distill.common.files import sha256_file
from distill.config import Config, LossConfig
from distill.eval.harness import ModeResult
from distill.eval.report import render_markdown
from distill.losses.token_loss import PARAMETER
from distill.eval.speculative import DraftResult, card_line, draft_table
from distill.stages.evaluation import draft_protocol, eval_protocol
from distill.students.build import count_parameters
from distill.students.chat import MODE_SAMPLING

CHECKSUMS = "SHA256SUMS"


def release_student(cfg: Config, name: str, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    teacher_name: str, results: dict[str, dict[str, ModeResult]], run_dir: Path,
                    drafts: dict[str, DraftResult] | None = None) -> Path:
    """`<run_dir>/release/<name>/`, its card showing the teacher's and this student's eval rows,
    and this student's numbers as a speculative-decoding draft for the teacher."""
    shown = {k: v for k, v in results.items() if k in ("teacher", name)}
    gamma = cfg.pipeline.eval.draft.gamma
    card = model_card(
        draft=f"{card_line(drafts, teacher_name, gamma)}\n\n{draft_protocol(cfg)}\n\n"
              f"{draft_table({name: drafts}, teacher_name, gamma)}" if drafts else None,
        name=f"distill-{name}", preset=cfg.students[name].preset, parameters=count_parameters(student).total,
        teacher=teacher_name, recipe=recipe_lines(cfg, name),
        eval_table=render_markdown(shown, baseline="teacher", level=3, protocol=eval_protocol(cfg))
        if shown else "Not evaluated in this run.")
    return write_release(run_dir / "release" / name, student, tokenizer, card)


def loss_name(loss: LossConfig) -> str:
    """"jsd(beta=0.5)", "skew_kl(alpha=0.1)", "forward_kl"."""
    parameter = PARAMETER.get(loss.divergence)
    return f"{loss.divergence}({parameter}={getattr(loss, parameter)})" if parameter else loss.divergence


def recipe_lines(cfg: Config, name: str) -> list[str]:
    """How the student was made, for its model card."""
    stages, student_cfg = cfg.pipeline.stages, cfg.students[name]
    lines = [f"student init: {student_cfg.init}" + (
        f" (teacher layers {student_cfg.teacher_layers}"
        f"{', experts ' + str(student_cfg.teacher_experts) if student_cfg.teacher_experts else ''}"
        f"{'; its experts new' if student_cfg.teacher_experts == [] else ''})"
        if student_cfg.init == "teacher" else "")]
    if "offpolicy" in stages:
        off = cfg.pipeline.offpolicy
        steps = off.steps if student_cfg.steps is None else student_cfg.steps
        lr = off.lr if student_cfg.lr is None else student_cfg.lr
        lines += [f"off-policy distillation: the teacher answered {off.prompts} training prompts in both modes "
                  f"(thinking {MODE_SAMPLING['think'].describe()}; non-thinking {MODE_SAMPLING['no_think'].describe()}); "
                  f"loss {loss_name(cfg.loss)} over its top-{off.top_k} log-probabilities (missing mass: "
                  f"{cfg.loss.missing_mass}), cross-entropy weight {cfg.loss.ce_weight}, temperature "
                  f"{cfg.loss.temperature}; {steps} optimizer steps of {off.batch_size * off.grad_accum} sequences, "
                  f"AdamW peak lr {lr}, warm-up {off.warmup_steps} then cosine"]
    if "onpolicy" in stages:
        on = cfg.pipeline.onpolicy
        mix = f"lambda {on.mix}" + (f" to {on.mix_end}" if on.mix_end is not None else "")
        lines += [f"on-policy distillation: the student answered {on.prompts} other prompts in both modes "
                  f"(sampling T {on.temperature}, top-p {on.top_p}, top-k {on.sample_top_k or 'off'}; at most "
                  f"{on.max_new_tokens} tokens) and the teacher scored its tokens; loss {loss_name(on.loss)} "
                  f"({'sampled-token estimator' if on.estimator == 'sampled_token' else f'over its top-{on.top_k}'}), "
                  f"{mix}; {on.steps} optimizer steps of {on.batch_size * on.grad_accum} rollouts, AdamW peak lr "
                  f"{on.lr}"]
    return lines


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


def model_card(*, name: str, preset: str, parameters: int, teacher: str, recipe: list[str], eval_table: str,
               draft: str | None = None) -> str:
    think, no_think = MODE_SAMPLING["think"], MODE_SAMPLING["no_think"]
    draft_section = f"\n## As a speculative-decoding draft\n{draft}\n" if draft else ""
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
- thinking: {think.describe()} (in `generation_config.json`)
- non-thinking: {no_think.describe()}

## Evaluation
{eval_table}
{draft_section}
## Recipe
{recipe_lines}

## Files
`{CHECKSUMS}` lists the SHA-256 of every file in this folder.
"""
