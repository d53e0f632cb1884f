"""Checks made before a run allocates or writes anything: the tokenizer the models share, the
students' vocabularies and initialisation against the teacher, memory, and room on disk.

Each failure is one line naming the problem and the way out (a `ConfigError`, or a
`MemoryError` giving the memory needed).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from distill.common.errors import ConfigError, first_line
from distill.config import Config
from distill.losses.chunked import DEFAULT_CHUNK_BYTES
from distill.losses.vocab import VocabularyMismatch, shared_vocabulary
from distill.memory import activation_bytes, check_fits, estimate
from distill.stages.teacher import teacher_architecture
from distill.students.build import TeacherInitError, build_random, check_teacher_init, count_parameters, hf_config
from distill.students.rollout_engine import check_servable
from distill.students.vllm_server import ServerError, vllm_python

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def tokenizer_name(cfg: Config) -> str:
    """`data.tokenizer`, where "auto" means the built-in tokenizer for the embedded teacher and the
    teacher's own tokenizer otherwise."""
    if cfg.data.tokenizer != "auto":
        return cfg.data.tokenizer
    return "builtin" if cfg.teacher.kind == "embedded" else cfg.teacher.model


def output_bytes(cfg: Config) -> int:
    """About what a run writes: per student its step checkpoints (weights + AdamW state), stage
    folders and release; the teacher's outputs (top-k per response token)."""
    total = 0
    for student in cfg.students.values():
        weights = 4 * count_parameters(build_random(student.architecture, device="meta")).total
        total += weights * 3 * cfg.checkpoint_keep * 2 + weights * 3
    off = cfg.pipeline.offpolicy
    total += 2 * off.prompts * off.max_new_tokens * (8 * off.top_k + 16)
    return total


def check_models(cfg: Config, tokenizer: PreTrainedTokenizerBase, device: torch.device, shards: int = 1,
                 world: int = 1) -> None:
    """Refuse, before allocating anything, models that cannot use the tokenizer, cannot start as
    configured, or do not fit (`shards`: processes a sharding engine splits a student over;
    `world`: data-parallel processes, which share each micro-batch's rows)."""
    real = len(tokenizer)
    if cfg.teacher.kind == "embedded":
        teacher_arch = teacher_architecture(cfg.teacher)
        teacher_params = count_parameters(build_random(teacher_arch, device="meta")).total
        teacher_config = hf_config(teacher_arch)
    else:
        try:
            teacher_config = AutoConfig.from_pretrained(cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code)
        except (OSError, ValueError) as error:  # no such folder or hub name; a folder with no model config
            raise ConfigError(f"cannot load teacher '{cfg.teacher.model}' ({first_line(error)}); give a "
                              "local folder saved by save_pretrained, or a hub name with network access") from None
        with torch.device("meta"):
            teacher_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(teacher_config).parameters())
    teacher_vocab = teacher_config.vocab_size
    if teacher_vocab < real:
        raise ConfigError(f"teacher vocab_size {teacher_vocab} is smaller than the tokenizer's {real} tokens: "
                          "teacher and tokenizer do not belong together; set data.tokenizer to the teacher's")
    if cfg.teacher.kind != "embedded":
        _check_same_tokenizer("teacher", cfg.teacher.model, tokenizer, cfg.teacher.trust_remote_code)
    teacher_format = cfg.teacher.dtype if cfg.teacher.quantization == "none" else cfg.teacher.quantization
    if cfg.teacher.serve == "vllm" and cfg.teacher.kind == "transformers":
        teacher_params = 0  # it lives on its server, not in this process
    for name, student in cfg.students.items():
        key = "student" if cfg.student is not None else f"students.{name}"
        arch = student.architecture
        if student.init != "pretrained" and arch.vocab_size < real:
            raise ConfigError(
                f"student '{name}' vocab_size {arch.vocab_size} is smaller than the tokenizer's {real} tokens; set "
                f"{key}.architecture.vocab_size to at least {real} (Qwen3 checkpoints use 151936)")
        if student.init == "pretrained":
            _check_same_tokenizer(f"student '{name}'", student.pretrained, tokenizer, False)
        if student.init == "teacher":
            try:
                check_teacher_init(hf_config(arch), teacher_config, layers=student.teacher_layers,
                                   experts=student.teacher_experts)
            except TeacherInitError as error:
                raise ConfigError(f"{key} cannot start from the teacher's blocks: {error}") from None
        params = count_parameters(build_random(arch, device="meta")).total
        activations = micro_batch_activations(cfg, student, real, world, device)
        check_fits(name, estimate(params, teacher_params, teacher_format, shards, activations), device, key)
    check_rollout_engine(cfg, device, world)


def check_rollout_engine(cfg: Config, device: torch.device, world: int) -> None:
    """`rollout.engine=vllm`: the vLLM environment exists, every student is one vLLM serves on
    this device, and data-parallel async sampling is at most one version ahead."""
    if "onpolicy" not in cfg.pipeline.stages or cfg.rollout.engine != "vllm":
        return
    if cfg.rollout.async_ and world > 1 and cfg.rollout.max_staleness > 1:
        raise ConfigError(f"rollout.async=true with {world} processes samples one version ahead at most (the ranks "
                          f"share one engine, which loads weights between steps): set rollout.max_staleness=1")
    for name, student in cfg.students.items():
        config = AutoConfig.from_pretrained(student.pretrained) if student.init == "pretrained" \
            else hf_config(student.architecture)
        try:
            check_servable(config, device.type)
        except ServerError as error:
            raise ConfigError(f"student '{name}': {error}") from None
    vllm_python()   # one line when the vLLM environment is missing


def micro_batch_activations(cfg: Config, student, vocab: int, world: int, device: torch.device) -> int:
    """Activation bytes of the largest micro-batch a process trains on: its share of the rows,
    each at most data.max_length tokens (packed rows are filled up to that)."""
    stages = cfg.pipeline
    rows = max(stages.offpolicy.batch_size, stages.onpolicy.batch_size)
    tokens = -(-rows // world) * cfg.data.max_length
    element = 2 if cfg.parallel.mixed_precision == "bf16" else 4
    losses = (cfg.loss, stages.onpolicy.loss)
    if all(loss.implementation == "chunked" for loss in losses):
        # A chunk's float32 logits, their gradient and softmax: about four chunk budgets.
        budget = cfg.loss.chunk_bytes or DEFAULT_CHUNK_BYTES[device.type if device.type in DEFAULT_CHUNK_BYTES
                                                             else "cpu"]
        loss = 4 * min(budget, tokens * vocab * 4)
    else:
        loss = 3 * tokens * vocab * 4   # the logits, their log-softmax and their gradient, float32
    return activation_bytes(student.architecture, tokens, checkpointing=student.activation_checkpointing,
                            element_bytes=element, loss_bytes=loss)


def _check_same_tokenizer(who: str, name_or_path: str, tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool) -> None:
    """A checkpoint that ships its own tokenizer must ship the run's (padding aside): logits and
    top-k ids are compared id by id."""
    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
        return  # weights only: the run's tokenizer is the only one there is
    try:
        own = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        if folder.is_dir():   # it ships tokenizer files that do not load: the check cannot be made
            raise ConfigError(f"{who} ({name_or_path}): its tokenizer files do not load ({first_line(error)}); fix or "
                              "remove them (the run's tokenizer is then used)") from None
        return  # a hub name with no tokenizer reachable: the run's tokenizer is the only one there is
    try:
        shared_vocabulary(tokenizer, own)
    except VocabularyMismatch as error:
        raise ConfigError(f"{who} ({name_or_path}): {error}") from None
