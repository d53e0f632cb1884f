"""The teacher-outputs stage: the teacher answers the off-policy training prompts in both modes,
with Qwen3's per-mode sampling, and every response token gets its top-k log-probabilities,
written once to the sharded cache (teachers/cache.py); the off-policy stage reads them back as
training examples."""

from __future__ import annotations

import contextlib
from pathlib import Path

import datasets
from filelock import FileLock
from transformers import PreTrainedTokenizerBase

from distill.common.tracking import Tracker
from distill.config import Config
from distill.data import Example
from distill.students.chat import MODE_SAMPLING, MODES, prompt_messages, render_prompt
from distill.teachers.cache import CacheSpec, prompts_hash, read_cache, tokenizer_hash, write_cache


def outputs_dir(cfg: Config, run_dir: Path) -> Path:
    """`pipeline.offpolicy.teacher_outputs`, or `<run_dir>/teacher_outputs`."""
    return Path(cfg.pipeline.offpolicy.teacher_outputs) if cfg.pipeline.offpolicy.teacher_outputs else \
        run_dir / "teacher_outputs"


def fill_teacher_outputs(cfg: Config, teacher, train_split: datasets.Dataset, tracker: Tracker, folder: Path,
                         progress: bool, *, weights: str = "", worker: int = 0, workers: int = 1) -> Path:
    """Produce the shards of the cache in `folder` that are missing (shards already there, of a
    resumed or shared cache, are kept); this is worker `worker` of `workers` processes filling
    disjoint shards; `weights` identifies the teacher's weights (teachers.cache.weights_fingerprint).
    Returns the folder."""
    stage = cfg.pipeline.offpolicy
    rows = train_split.select(range(min(stage.prompts, len(train_split))))
    conversations = [prompt_messages(messages) for messages in rows["messages"]]
    prompts = {mode: [render_prompt(teacher.tokenizer, c, mode) for c in conversations] for mode in MODES}
    spec = cache_spec(cfg, teacher.name, tokenizer_hash(teacher.tokenizer), prompts_hash=prompts_hash(prompts),
                      num_prompts=len(conversations), weights=weights)
    # A shared cache folder may be filled by two runs at once: one at a time, the second finds
    # the first's shards done. (The data-parallel processes of one run fill disjoint shards.)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")) if workers == 1 else contextlib.nullcontext():
        manifest = write_cache(teacher, prompts, folder, spec, worker=worker, workers=workers, progress=progress)
    if manifest is not None:
        tracker.log({"teacher/outputs_rows": manifest.rows, "teacher/outputs_tokens": manifest.tokens,
                     "teacher/outputs_bytes_per_token": manifest.bytes_per_token})
    return folder


def cache_spec(cfg: Config, teacher_name: str, tokenizer_digest: str = "", *, prompts_hash: str, num_prompts: int,
               weights: str) -> CacheSpec:
    """Everything that shapes the teacher's outputs: the teacher (its name, weights and the
    precision it runs in), tokenizer, k, sampling, seed, length budget and the prompts."""
    stage = cfg.pipeline.offpolicy
    precision = cfg.teacher.dtype if cfg.teacher.quantization == "none" else f"{cfg.teacher.quantization} quantized"
    return CacheSpec(teacher=teacher_name, tokenizer_hash=tokenizer_digest, k=stage.top_k, modes=tuple(MODES),
                     sampling={m: vars(s) for m, s in MODE_SAMPLING.items()}, seed=stage.seed,
                     max_new_tokens=stage.max_new_tokens, prompts_hash=prompts_hash, num_prompts=num_prompts,
                     shard_size=stage.shard_size, teacher_weights=weights, teacher_precision=precision)


def offpolicy_examples(cfg: Config, tokenizer: PreTrainedTokenizerBase, folder: Path,
                       tracker: Tracker) -> dict[str, list[Example]]:
    """The cached teacher outputs as training examples, per mode. Truncated responses (no eos
    within the budget) are counted and dropped, never trained on as if complete."""
    stage = cfg.pipeline.offpolicy
    everything = read_cache(folder, tokenizer=tokenizer, k=stage.top_k, keep_truncated=True)
    eos = tokenizer.eos_token_id
    examples: dict[str, list[Example]] = {}
    for mode in MODES:
        rows = everything.get(mode, [])
        kept = [Example(r.prompt, r.response, r.top.ids, r.top.logprobs) for r in rows
                if r.response and r.response[-1] == eos]
        examples[mode] = kept
        tokens = sum(len(e.response) for e in kept)
        tracker.log({f"teacher/{mode}/responses": len(kept),
                     f"teacher/{mode}/truncated": 1 - len(kept) / max(1, len(rows)),
                     f"teacher/{mode}/mean_response_tokens": tokens / max(1, len(kept)),
                     f"teacher/{mode}/mean_topk_mass": float(sum(e.topk_logprobs.exp().sum() for e in kept))
                     / max(1, tokens)})
    return examples
