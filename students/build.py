"""Build Qwen3 models from a size preset: random init, a pretrained checkpoint, or a teacher's blocks.

Models are transformers' `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM`; this module only turns an
`Architecture` into their config, counts parameters, and copies weights between them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from distill.students import experts
from distill.students.presets import Architecture
from distill.students.tokenizer import BUILTIN_TOKEN_IDS, QWEN3_TOKEN_IDS, TokenIds


def default_token_ids(arch: Architecture) -> TokenIds:
    """Qwen3's ids for a Qwen3-vocabulary model; the built-in tokenizer's for the tiny presets."""
    return QWEN3_TOKEN_IDS if arch.vocab_size > QWEN3_TOKEN_IDS.eos else BUILTIN_TOKEN_IDS


def is_moe(config) -> bool:
    """Whether a model config is a Qwen3 mixture of experts (router logits, a balancing loss)."""
    return config.model_type == Qwen3MoeConfig.model_type


def hf_config(arch: Architecture, token_ids: TokenIds | None = None) -> Qwen3Config | Qwen3MoeConfig:
    """The transformers config for an architecture (fields map 1:1)."""
    token_ids = token_ids or default_token_ids(arch)
    common = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        tie_word_embeddings=arch.tie_word_embeddings,
        max_position_embeddings=arch.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        rms_norm_eps=arch.rms_norm_eps,
        attention_bias=False,
        use_sliding_window=False,
        hidden_act="silu",
        bos_token_id=token_ids.bos,
        eos_token_id=token_ids.eos,
        pad_token_id=token_ids.pad,
    )
    if not arch.is_moe:
        return Qwen3Config(**common)
    # Set every MoE field: Qwen3MoeConfig's defaults (norm_topk_prob false) differ from the release.
    # The experts' forward is transformers' grouped_mm with CPU-friendly gathers (students/experts.py;
    # in memory only: a saved config does not name it).
    return Qwen3MoeConfig(
        **common,
        experts_implementation=experts.NAME,
        num_experts=arch.num_experts,
        num_experts_per_tok=arch.num_experts_per_tok,
        moe_intermediate_size=arch.moe_intermediate_size,
        norm_topk_prob=arch.norm_topk_prob,
        router_aux_loss_coef=arch.router_aux_loss_coef,
        decoder_sparse_step=arch.decoder_sparse_step,
        mlp_only_layers=list(arch.mlp_only_layers),
    )


def build_random(arch: Architecture, token_ids: TokenIds | None = None, *,
                 device: str | torch.device = "cpu", seed: int | None = None) -> PreTrainedModel:
    """A randomly initialised model (transformers' init, std = initializer_range). On the
    `meta` device nothing is allocated: that is how the size table is checked."""
    config = hf_config(arch, token_ids)
    model_class = Qwen3MoeForCausalLM if arch.is_moe else Qwen3ForCausalLM
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(config)
    return model


def load_pretrained(name_or_path: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                    quantization: str = "none", device_map: str | None = None) -> PreTrainedModel:
    """A checkpoint from a local folder or a hub name, as transformers loads it.

    quantization "8bit" / "4bit" (NF4) loads the linear layers through bitsandbytes, for a teacher
    larger than its device; device_map ("auto", or a device) places or shards it with accelerate.
    Such a model stays where it was placed (no .to()). A quantized model's default map is "auto"
    in one process, and this process's own GPU when data-parallel processes share the node (each
    holds its own copy; "auto" would spread every copy over all the GPUs).
    """
    kwargs = {}
    if quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (BitsAndBytesConfig(load_in_8bit=True) if quantization == "8bit" else
                                         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_compute_dtype=dtype))
        if device_map is None and not torch.cuda.is_available():
            device_map = "cpu"
        elif device_map is None:
            data_parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1
            device_map = f"cuda:{torch.cuda.current_device()}" if data_parallel else "auto"
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    return model if quantization != "none" else experts.use_in(model)


@dataclass(frozen=True)
class ParameterCount:
    total: int
    non_embedding: int  # without the input embedding and the output head (tied or not)
    activated: int      # per token: all but the experts a token does not use


def checkpoint_activations(model: PreTrainedModel) -> None:
    """Activation checkpointing per decoder layer: in training mode each layer keeps only its
    input and recomputes the rest in the backward (non-reentrant, so the gradients are those of
    the plain forward). Generation, in eval mode, is unaffected."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.x names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def count_parameters(model: PreTrainedModel) -> ParameterCount:
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    embedding = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    idle = experts * (config.num_experts - config.num_experts_per_tok) // config.num_experts if is_moe(config) else 0
    return ParameterCount(total=total, non_embedding=total - embedding, activated=total - idle)


class TeacherInitError(ValueError):
    """The teacher's blocks cannot seed this student (shapes or kinds differ)."""


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def check_teacher_init(s_cfg, t_cfg, *, layers: list[int], experts: list[int] | None) -> tuple[bool, list[int] | None]:
    """Raise `TeacherInitError` unless a student of config `s_cfg` can take the blocks of a
    teacher of config `t_cfg`; returns (whether MLPs are shared, the experts to take). Works on
    configs alone, so a run can refuse before anything is trained."""
    s_moe, t_moe = is_moe(s_cfg), is_moe(t_cfg)
    if len(layers) != s_cfg.num_hidden_layers:
        raise TeacherInitError(f"teacher_layers has {len(layers)} entries but the student has {s_cfg.num_hidden_layers} layers")
    if any(not 0 <= i < t_cfg.num_hidden_layers for i in layers):
        raise TeacherInitError(f"teacher_layers {layers} out of range: the teacher has {t_cfg.num_hidden_layers} layers")
    for name in ("hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        if getattr(s_cfg, name) != getattr(t_cfg, name):
            raise TeacherInitError(
                f"student {name}={getattr(s_cfg, name)} but teacher {name}={getattr(t_cfg, name)}: "
                "to start from the teacher's blocks these must match (use init=random, or override the student's size)"
            )
    if experts == []:
        # `teacher_experts: []` takes no experts, from a MoE or a dense teacher: the student's MoE
        # blocks (any number and width of experts) keep their init, as a dense student's MLPs do.
        if not s_moe:
            raise TeacherInitError("teacher_experts applies only to a MoE student")
        return False, None
    if s_moe and t_moe:
        experts = list(range(s_cfg.num_experts)) if experts is None else experts
        if len(experts) != s_cfg.num_experts or any(not 0 <= e < t_cfg.num_experts for e in experts):
            raise TeacherInitError(
                f"teacher_experts must list {s_cfg.num_experts} expert ids in 0..{t_cfg.num_experts - 1}, got {experts}"
            )
        if s_cfg.moe_intermediate_size != t_cfg.moe_intermediate_size:
            raise TeacherInitError(
                f"student moe_intermediate_size={s_cfg.moe_intermediate_size} but teacher's is "
                f"{t_cfg.moe_intermediate_size}: set teacher_experts=[] to take no experts (the student's stay new)"
            )
    elif s_moe == t_moe and s_cfg.intermediate_size != t_cfg.intermediate_size:
        raise TeacherInitError(
            f"student intermediate_size={s_cfg.intermediate_size} but teacher's is {t_cfg.intermediate_size}"
        )
    elif experts is not None and s_moe != t_moe:
        raise TeacherInitError("teacher_experts applies only to a MoE student of a MoE teacher")
    # A dense student of a MoE teacher (or the reverse) takes everything but the MLP blocks,
    # which keep their random init: the attention, norms and embeddings carry over.
    share_mlp = s_moe == t_moe
    return share_mlp, experts


def init_from_teacher(student: PreTrainedModel, teacher: PreTrainedModel, *,
                      layers: list[int], experts: list[int] | None = None) -> None:
    """Copy the teacher's embeddings, final norm, head and the chosen `layers` into the student.

    Student layer i takes teacher layer `layers[i]`. A MoE student from a MoE teacher also takes
    the chosen `experts` (their router rows and fused expert weights), in order. A dense student
    from a MoE teacher, or a MoE student given `experts=[]`, takes the attention, norms and
    embeddings; its MLPs stay as initialised.
    Anything that cannot be taken raises `TeacherInitError` naming it.
    """
    share_mlp, experts = check_teacher_init(student.config, teacher.config, layers=layers, experts=experts)
    source = teacher.state_dict()
    taken = {}
    for key, tensor in student.state_dict().items():
        if not share_mlp and ".mlp." in key:
            taken[key] = tensor
            continue
        match = _LAYER_KEY.match(key)
        teacher_key = key if match is None else f"model.layers.{layers[int(match.group(1))]}.{match.group(2)}"
        if teacher_key not in source:
            raise TeacherInitError(f"teacher has no tensor '{teacher_key}' for student '{key}'")
        value = source[teacher_key]
        if experts is not None and (".mlp.experts." in key or key.endswith(".mlp.gate.weight")):
            value = value[torch.tensor(experts)]  # experts are the leading dimension of these
        if value.shape != tensor.shape:
            raise TeacherInitError(f"'{key}': student shape {tuple(tensor.shape)} vs teacher {tuple(value.shape)}")
        taken[key] = value.detach().clone()
    student.load_state_dict(taken, strict=True)
