"""The teacher stage: the model whose outputs the students learn from, ready to answer and score.

- `teacher=embedded`: the tiny Qwen3-MoE of the built-in task, bootstrapped here (cross-entropy
  on the reference replies in both modes, thinking-mode fusion as in Qwen3) once per
  configuration and cached (teachers/embedded.py);
- `teacher=transformers`: any checkpoint, loaded in process (bf16, or 8-/4-bit, or device-mapped);
- `teacher.serve=vllm`: its outputs come from a vLLM server, the one at `teacher.url` or one
  started on its folder for the run.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
from filelock import FileLock, Timeout
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.checkpoint import StepCheckpoints
from distill.common.errors import ConfigError
from distill.common.tracking import Tracker
from distill.config import Config, DataConfig, TeacherConfig
from distill.data import Example, ModeAlternatingBatches
from distill.distributed import Processes
from distill.eval.tasks.arithmetic import BUILTIN_SOURCE
from distill.students.build import build_random, load_pretrained
from distill.students.chat import MODES, prompt_messages, reference_reply, render_prompt, render_response
from distill.students.presets import Architecture, get_preset
from distill.students.vllm_server import VLLMServer
from distill.teachers import embedded
from distill.teachers.transformers_backend import TransformersTeacher
from distill.teachers.vllm_backend import VLLMTeacher
from distill.train import Schedule, cross_entropy_objective, fit


@dataclass
class TeacherModel:
    """The teacher as the stages need it."""

    model: PreTrainedModel | None   # in process; None when it lives only behind its vLLM server
    folder: str | None              # its folder or hub name (worker processes, models.json)
    name: str                       # how reports and the cache spec name it
    reused: bool = False            # the embedded teacher came from the cache


def teacher_architecture(cfg: TeacherConfig) -> Architecture:
    """The embedded teacher's architecture: its preset with `teacher.overrides` applied."""
    return get_preset(cfg.preset).override(**cfg.overrides)


def prepare_teacher(cfg: Config, tokenizer: PreTrainedTokenizerBase, train_split: datasets.Dataset,
                    cache_dir: Path, tracker: Tracker, progress: bool) -> TeacherModel:
    """Bootstrap (or load from the cache) the embedded teacher, or load a checkpoint; a teacher
    served by vLLM is not loaded here at all."""
    if cfg.teacher.kind == "embedded":
        if cfg.data.source != BUILTIN_SOURCE:
            raise ConfigError("teacher=embedded is trained on the built-in task only; use data=arithmetic, or "
                              "teacher=transformers teacher.model=PATH_OR_HUB_NAME for your own data")
        return embedded_teacher(cfg.teacher, cfg.data, tokenizer, train_split, cache_dir, tracker, progress)
    if cfg.teacher.serve == "vllm":
        return TeacherModel(None, cfg.teacher.model, cfg.teacher.model)
    model = load_pretrained(cfg.teacher.model, dtype=getattr(torch, cfg.teacher.dtype),
                            trust_remote_code=cfg.teacher.trust_remote_code, quantization=cfg.teacher.quantization,
                            device_map=cfg.teacher.device_map)
    return TeacherModel(model.eval(), cfg.teacher.model, cfg.teacher.model)


def embedded_teacher(cfg: TeacherConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase,
                     train_split: datasets.Dataset, cache_dir: Path, tracker: Tracker, progress: bool) -> TeacherModel:
    """The cached embedded teacher, or a new one bootstrapped and cached."""
    material = {"architecture": teacher_architecture(cfg).to_dict(), "bootstrap": asdict(cfg.bootstrap),
                "task": asdict(data.arithmetic), "source": data.source, "max_length": data.max_length}
    folder = embedded.cache_folder(cache_dir, material, tokenizer)
    name = f"embedded tiny Qwen3-MoE teacher ({folder.name})"
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One run bootstraps a cache entry; another one on the same cache waits for it, then loads it.
    lock = FileLock(str(folder.parent / f".{folder.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another run that is training the embedded teacher into {folder} ...", flush=True)
        lock.acquire()
    try:
        model = embedded.load(folder)
        if model is not None:
            return TeacherModel(model, str(folder), name, reused=True)
        # Step checkpoints beside the cache entry: a killed bootstrap continues where it was (the
        # entry's name is the hash of everything that shapes the teacher, so any checkpoint there fits).
        steps = StepCheckpoints(folder.parent / f".{folder.name}.steps", every=200, keep=1)
        model = bootstrap(cfg, data, tokenizer, train_split, tracker, progress=progress, checkpoints=steps)
        embedded.store(folder, model, tokenizer, {"teacher": asdict(cfg), "task": asdict(data.arithmetic)})
        shutil.rmtree(steps.folder, ignore_errors=True)
    finally:
        lock.release()
    return TeacherModel(model.eval(), str(folder), name)


def bootstrap(cfg: TeacherConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase, train_split: datasets.Dataset,
              tracker: Tracker, *, progress: bool = True, checkpoints: StepCheckpoints | None = None) -> PreTrainedModel:
    """Train the embedded teacher from random init: next-token cross-entropy on the reference
    replies, every training prompt in both modes (with its reasoning, and with an empty think
    block and the answer alone)."""
    model = build_random(teacher_architecture(cfg), seed=cfg.bootstrap.seed)
    boot = cfg.bootstrap
    examples = {mode: ReferenceExamples(train_split, tokenizer, mode) for mode in MODES}
    schedule = Schedule(steps=boot.steps, lr=boot.lr, warmup_steps=boot.warmup_steps)
    batches = ModeAlternatingBatches(examples, boot.batch_size, tokenizer.pad_token_id, data.max_length,
                                     micro_batches=1, seed=boot.seed, pack=data.pack)
    fit(model, batches, cross_entropy_objective(len(tokenizer)), schedule, tracker=tracker, prefix="teacher/bootstrap",
        desc="teacher bootstrap", progress=progress, checkpoints=checkpoints, resume=checkpoints is not None)
    return model


class ReferenceExamples(Sequence):
    """The training split's reference replies in one mode, each rendered through the chat template
    when a batch first draws it. The bootstrap reads about a sixth of the split's 50,000 rows;
    rendering all of them in both modes up front took 30-45 s of a 3-minute bootstrap."""

    def __init__(self, rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, mode: str):
        self.rows, self.tokenizer, self.mode = rows, tokenizer, mode

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Example:
        messages = self.rows[index]["messages"]
        return Example(prompt=render_prompt(self.tokenizer, prompt_messages(messages), self.mode),
                       response=render_response(self.tokenizer, reference_reply(messages), self.mode))


def teacher_backend(cfg: Config, teacher: TeacherModel, tokenizer: PreTrainedTokenizerBase, run_dir: Path,
                    progress: bool, cleanup: contextlib.ExitStack, proc: Processes = Processes()):
    """What answers and scores: the in-process model, or its vLLM server (the one at teacher.url,
    or one started now on the teacher's folder by the main process, shared by every
    data-parallel process, and stopped when `cleanup` closes)."""
    if cfg.teacher.serve != "vllm":
        return TransformersTeacher(teacher.model, tokenizer, name=teacher.name, progress=progress,
                                   generation_batch_size=cfg.pipeline.offpolicy.generation_batch_size)
    url = cfg.teacher.url
    if not url:
        if proc.main:
            top_k = max(cfg.pipeline.offpolicy.top_k, cfg.pipeline.onpolicy.top_k)
            server = VLLMServer(teacher.folder, max_logprobs=max(20, top_k + 16), dtype=cfg.teacher.dtype,
                                log_path=run_dir / "vllm_server.log")
            cleanup.callback(server.stop)
            url = server.start().url
        url = proc.share(url)
    return VLLMTeacher(url, tokenizer, name=f"{teacher.name} (vLLM)", progress=progress,
                       concurrency=cfg.teacher.vllm_concurrency, timeout=cfg.teacher.vllm_timeout)


@dataclass(frozen=True)
class TeacherSource:
    """How another process reaches the teacher for on-policy scoring: a vLLM server's URL, or a
    folder (or hub name) it loads itself."""

    kind: str    # "vllm" | "folder"
    where: str


def teacher_source(cfg: Config, teacher: TeacherModel, backend) -> TeacherSource:
    return TeacherSource("vllm", backend.url) if cfg.teacher.serve == "vllm" else TeacherSource("folder", teacher.folder)


def connect(cfg: Config, source: TeacherSource, tokenizer: PreTrainedTokenizerBase):
    """The teacher backend a worker process scores with, from its `TeacherSource`."""
    if source.kind == "vllm":
        return VLLMTeacher(source.where, tokenizer, progress=False, concurrency=cfg.teacher.vllm_concurrency,
                           timeout=cfg.teacher.vllm_timeout)
    model = load_pretrained(source.where, dtype=getattr(torch, cfg.teacher.dtype),
                            trust_remote_code=cfg.teacher.trust_remote_code, quantization=cfg.teacher.quantization,
                            device_map=cfg.teacher.device_map)
    return TransformersTeacher(model.eval(), tokenizer, name=source.where, progress=False)
