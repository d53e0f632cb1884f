"""The off-policy teacher-output cache: sharded Parquet with a manifest, resumable and mergeable.

Generating the teacher's responses and top-k log-probabilities is the most expensive part of
off-policy distillation, so it is done once and stored:

    <dir>/spec.json                 what the cache holds (teacher, tokenizer hash, k, sampling,
                                    seed, prompts); a run with another spec refuses the folder
    <dir>/shards/<mode>-00000.parquet   rows written through `datasets`, each shard atomically
    <dir>/shards/<mode>-00000.json      its sidecar: rows, tokens, truncated, sha256 of the file
    <dir>/manifest.json             written when every shard is present: spec, shards, totals,
                                    bytes per token

A shard is the unit of work and of resumption: it is generated from its prompts with a seed of
its own, written to a temporary file and renamed, then its sidecar is written the same way. A
killed run restarts, skips every shard whose sidecar and checksum agree, and loses or duplicates
no row. Several workers (`worker=i, workers=n`) take disjoint shards of one folder; whichever
finishes last, or `finalize`, writes the manifest.

A row: `prompt_ids`, `response_ids` (int32), `finished`, and for every response token the
teacher's top-k as `topk_ids` (int32, flattened [T * k]) and `topk_logprobs` (float16, flattened),
plus `tail_mass` (float32 [T]), the probability outside the top-k computed before rounding: the
reader rescales the 16-bit top-k so their mass is exactly 1 - tail_mass.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from distill.common.errors import UserError, first_line
from distill.common.files import atomic_write_text, sha256_file
from distill.teachers.base import TopK

FORMAT_VERSION = 1
FEATURES = datasets.Features({
    "example_id": datasets.Value("int64"),
    "prompt_ids": datasets.Sequence(datasets.Value("int32")),
    "response_ids": datasets.Sequence(datasets.Value("int32")),
    "finished": datasets.Value("bool"),
    "topk_ids": datasets.Sequence(datasets.Value("int32")),
    "topk_logprobs": datasets.Sequence(datasets.Value("float16")),
    "tail_mass": datasets.Sequence(datasets.Value("float32")),
})


class CacheError(UserError, ValueError):
    """The cache folder cannot be used as asked; the message says why and what to do."""


@dataclass
class CachedResponse:
    """One row of the cache: the prompt and the teacher's response (ids), whether the response
    ended (eos within the budget), and the teacher's top-k for every response token."""

    prompt: list[int]
    response: list[int]
    finished: bool
    top: TopK


@dataclass(frozen=True)
class CacheSpec:
    """Everything that determines the cache's content. Equal specs produce equal caches."""

    teacher: str
    tokenizer_hash: str
    k: int
    modes: tuple[str, ...]
    sampling: dict
    seed: int
    max_new_tokens: int
    prompts_hash: str
    num_prompts: int
    shard_size: int
    # The teacher's weights (`weights_fingerprint`) and the precision they ran in.
    teacher_weights: str = ""
    teacher_precision: str = ""
    format: int = FORMAT_VERSION

    def to_json(self) -> dict:
        data = asdict(self)
        data["modes"] = list(self.modes)
        return data


@dataclass
class ShardInfo:
    name: str
    mode: str
    index: int
    rows: int
    finished: int
    tokens: int
    bytes: int
    sha256: str
    seconds: float = 0.0


@dataclass
class Manifest:
    spec: dict
    shards: list[dict] = field(default_factory=list)
    rows: int = 0
    finished: int = 0
    tokens: int = 0
    bytes: int = 0
    bytes_per_token: float = 0.0


def tokenizer_hash(tokenizer) -> str:
    material = {"vocab": tokenizer.get_vocab(), "template": tokenizer.chat_template}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def prompts_hash(prompts_by_mode: dict[str, list[list[int]]]) -> str:
    digest = hashlib.sha256()
    for mode in sorted(prompts_by_mode):
        digest.update(mode.encode())
        for prompt in prompts_by_mode[mode]:
            digest.update(np.asarray(prompt, dtype=np.int32).tobytes() + b"|")
    return digest.hexdigest()[:16]


def write_cache(teacher, prompts_by_mode: dict[str, list[list[int]]], directory: Path | str, spec: CacheSpec, *,
                worker: int = 0, workers: int = 1, progress: bool = True) -> Manifest | None:
    """Produce this worker's missing shards; returns the manifest once every shard is present
    (None while other workers' shards are still missing)."""
    directory = Path(directory)
    for mode in spec.modes:
        if len(prompts_by_mode[mode]) != spec.num_prompts:
            raise CacheError(f"{len(prompts_by_mode[mode])} {mode} prompts but the spec says {spec.num_prompts}")
    (directory / "shards").mkdir(parents=True, exist_ok=True)
    _claim_spec(directory, spec)
    _remove_abandoned_temporaries(directory / "shards")
    jobs = [(mode, index) for mode in spec.modes for index in range(_shard_count(len(prompts_by_mode[mode]), spec))]
    todo = [(mode, index) for number, (mode, index) in enumerate(jobs)
            if number % workers == worker and not _valid_sidecar(directory, mode, index)]
    quiet = not progress and datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        for mode, index in tqdm(todo, desc="teacher output shards", disable=not progress):
            _write_shard(teacher, prompts_by_mode[mode], directory, spec, mode, index, progress)
    finally:
        if quiet:
            datasets.enable_progress_bars()
    return finalize(directory, required=False)


def finalize(directory: Path | str, *, required: bool = True) -> Manifest | None:
    """Check every shard (sidecar and checksum) and write manifest.json; with required=False,
    return None instead of raising while shards are missing."""
    directory = Path(directory)
    if not (directory / "spec.json").exists():
        raise CacheError(f"{directory} is not a teacher-output cache (no spec.json)")
    saved = read_json(directory / "spec.json")
    spec = CacheSpec(**{**saved, "modes": tuple(saved["modes"])})
    shards = []
    for mode in spec.modes:
        for index in range(_shard_count(spec.num_prompts, spec)):
            info = _valid_sidecar(directory, mode, index)
            if info is None:
                if required:
                    raise CacheError(f"{directory}: shard {mode}-{index:05d} is missing or damaged; run the teacher "
                                     "outputs stage again on this folder to produce it")
                return None
            shards.append(asdict(info))
    manifest = Manifest(spec=spec.to_json(), shards=shards, rows=sum(s["rows"] for s in shards),
                        finished=sum(s["finished"] for s in shards), tokens=sum(s["tokens"] for s in shards),
                        bytes=sum(s["bytes"] for s in shards))
    manifest.bytes_per_token = manifest.bytes / max(1, manifest.tokens)
    atomic_write_text(directory / "manifest.json", json.dumps(asdict(manifest), indent=2))
    return manifest


def read_cache(directory: Path | str, *, tokenizer=None, k: int | None = None,
               keep_truncated: bool = False) -> dict[str, list[CachedResponse]]:
    """The responses per mode from a finished cache, checked against the run's tokenizer and k."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise CacheError(f"{directory} has no manifest.json: the cache is incomplete; run the teacher outputs stage "
                         "on it to finish it")
    manifest = read_json(manifest_path)
    spec = manifest["spec"]
    if tokenizer is not None and spec["tokenizer_hash"] != tokenizer_hash(tokenizer):
        raise CacheError(f"{directory} was made with another tokenizer ({spec['tokenizer_hash']}); use the teacher's "
                         "tokenizer of that cache, or produce a new cache")
    if k is not None and k > spec["k"]:
        raise CacheError(f"{directory} holds the teacher's top-{spec['k']}, fewer than the top-{k} asked for")
    keep = k or spec["k"]
    responses: dict[str, list[CachedResponse]] = {}
    for shard in manifest["shards"]:
        path = directory / "shards" / shard["name"]
        if sha256_file(path) != shard["sha256"]:
            raise CacheError(f"{path} does not match its checksum in manifest.json: the file is damaged; delete it "
                             "and its .json sidecar and run the teacher outputs stage again")
        table = datasets.Dataset.from_parquet(str(path), features=FEATURES, keep_in_memory=True).with_format("numpy")
        for row in table:
            if not (row["finished"] or keep_truncated):
                continue
            length = len(row["response_ids"])
            ids = torch.from_numpy(np.asarray(row["topk_ids"]).reshape(length, spec["k"])[:, :keep].copy())
            values = torch.from_numpy(np.asarray(row["topk_logprobs"], dtype=np.float32).reshape(length, spec["k"]))
            values = _restore_mass(values, torch.from_numpy(np.asarray(row["tail_mass"], dtype=np.float32)))
            responses.setdefault(shard["mode"], []).append(CachedResponse(
                row["prompt_ids"].tolist(), row["response_ids"].tolist(), bool(row["finished"]),
                TopK(ids=ids, logprobs=values[:, :keep].contiguous())))
    return responses


# --- shards -----------------------------------------------------------------------------------

def _write_shard(teacher, prompts: list[list[int]], directory: Path, spec: CacheSpec, mode: str, index: int,
                 progress: bool) -> ShardInfo:
    started = time.perf_counter()
    first = index * spec.shard_size
    chunk = prompts[first:first + spec.shard_size]
    # A seed per shard: a shard regenerated after a crash is the same shard.
    seed = spec.seed * 1_000_003 + index * 2 + spec.modes.index(mode)
    generations = teacher.generate(chunk, mode, max_new_tokens=spec.max_new_tokens, seed=seed)
    tops = teacher.top_k_logprobs(chunk, [g.ids for g in generations], spec.k)
    rows = {name: [] for name in FEATURES}
    for offset, (prompt, generation, top) in enumerate(zip(chunk, generations, tops)):
        exact = top.logprobs.double()
        tail = (1.0 - exact.exp().sum(-1)).clamp(min=0.0)
        rows["example_id"].append(first + offset)
        rows["prompt_ids"].append(prompt)
        rows["response_ids"].append(generation.ids)
        rows["finished"].append(generation.finished)
        rows["topk_ids"].append(top.ids.reshape(-1).tolist())
        rows["topk_logprobs"].append(top.logprobs.reshape(-1).to(torch.float16).tolist())
        rows["tail_mass"].append(tail.float().tolist())
    name = f"{mode}-{index:05d}.parquet"
    path = directory / "shards" / name
    temporary = path.with_suffix(f".tmp-{os.getpid()}")
    datasets.Dataset.from_dict(rows, features=FEATURES).to_parquet(str(temporary))
    os.replace(temporary, path)
    info = ShardInfo(name=name, mode=mode, index=index, rows=len(chunk), finished=sum(rows["finished"]),
                     tokens=sum(len(r) for r in rows["response_ids"]), bytes=path.stat().st_size,
                     sha256=sha256_file(path), seconds=round(time.perf_counter() - started, 3))
    atomic_write_text(path.with_suffix(".json"), json.dumps(asdict(info)))
    return info


def _valid_sidecar(directory: Path, mode: str, index: int) -> ShardInfo | None:
    sidecar = directory / "shards" / f"{mode}-{index:05d}.json"
    parquet = sidecar.with_suffix(".parquet")
    if not (sidecar.exists() and parquet.exists()):
        return None
    try:
        info = ShardInfo(**json.loads(sidecar.read_text()))
    except (ValueError, TypeError):
        return None
    return info if info.sha256 == sha256_file(parquet) else None


def _remove_abandoned_temporaries(shards: Path) -> None:
    """Delete the half-written files of writers that were killed (their PID is gone); a live
    worker's file in progress is left alone."""
    for temporary in shards.glob("*.tmp-*"):
        pid = temporary.name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            temporary.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_json(path: Path) -> dict:
    """A cache's JSON file, or one line naming it when it is damaged."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CacheError(f"{path} is damaged ({first_line(error)}); delete it (or the whole cache folder) and run the "
                         "teacher outputs stage again to rebuild it") from None


def weights_fingerprint(name_or_folder: str | None) -> str:
    """What identifies a teacher's weights without reading them: for a local folder, the name,
    size and modification time of its config and weight files (a retrained or replaced
    checkpoint changes them); for a hub name, the name itself."""
    if not name_or_folder:
        return ""
    folder = Path(name_or_folder)
    if not folder.is_dir():
        return str(name_or_folder)
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix in (".safetensors", ".bin", ".pt", ".gguf") or path.name in ("config.json",
                                                                                    "model.safetensors.index.json"):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def _claim_spec(directory: Path, spec: CacheSpec) -> None:
    path = directory / "spec.json"
    if path.exists():
        existing = read_json(path)
        if existing != spec.to_json():
            changed = sorted(key for key in existing.keys() | spec.to_json().keys()
                             if existing.get(key) != spec.to_json().get(key))
            raise CacheError(f"{directory} holds a cache made with other settings ({', '.join(changed)} differ); use "
                             "a new folder, or delete this one")
        return
    atomic_write_text(path, json.dumps(spec.to_json(), indent=2))


def _shard_count(prompts: int, spec: CacheSpec) -> int:
    return math.ceil(prompts / spec.shard_size)


def _restore_mass(logprobs: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Rescale 16-bit top-k probabilities so that they sum to exactly 1 - tail (per token)."""
    kept = (1.0 - tail.double()).clamp(min=1e-12).log()
    return (logprobs.double() + (kept - torch.logsumexp(logprobs.double(), -1)).unsqueeze(-1)).float()
