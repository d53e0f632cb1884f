"""Typed run configuration: the composed Hydra config is validated into these dataclasses.

These dataclasses hold every default (conf/ holds only which options a run picks and what each
option changes; a test checks that composing conf/ with no overrides gives exactly `Config()`).
Hydra stays at the edge (distill/__main__.py composes); everything below it receives plain
dataclasses. Validation is strict: an unknown key, a wrong type or an unknown choice raises
`ConfigError` with one line naming the key and the valid choices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from distill.common.errors import ConfigError
from distill.common.tracking import WandbConfig
from distill.common.typed_config import as_dict, build_dataclass, with_defaults
from distill.eval.config import DraftConfig
from distill.eval.tasks.arithmetic import BUILTIN_SOURCE, ArithmeticConfig
from distill.students.presets import PRESETS, Architecture


@dataclass
class StudentConfig:
    preset: str
    architecture: Architecture
    # random: transformers' init; pretrained: load `pretrained` (path or hub name);
    # teacher: copy the teacher's embeddings, norms, `teacher_layers` (and `teacher_experts`).
    init: Literal["random", "pretrained", "teacher"] = "random"
    pretrained: str | None = None
    teacher_layers: list[int] | None = None
    teacher_experts: list[int] | None = None
    # Per-student training length and peak learning rate (null: pipeline.offpolicy's).
    steps: int | None = None
    lr: float | None = None
    # Keep only each decoder layer's input for the backward and recompute the rest there: far
    # less activation memory for about a third more compute (the gradients are the same).
    activation_checkpointing: bool = False


@dataclass
class BootstrapConfig:
    """How the embedded teacher learns the built-in task (both modes, cross-entropy).

    It learns the task abruptly (a plateau, then the thinking-mode loss drops to ~0), and a lower
    peak learning rate gets there sooner: about step 400 at 1e-3, against about 1,600 at 4e-3
    (bench/README.md, "The embedded default on this CPU")."""

    steps: int = 700
    batch_size: int = 24
    lr: float = 1e-3
    warmup_steps: int = 50
    seed: int = 0


@dataclass
class TeacherConfig:
    # embedded: a tiny Qwen3-MoE trained here on the built-in task, cached by config hash;
    # transformers: an in-process checkpoint (path or hub name) in `model`.
    kind: Literal["embedded", "transformers"] = "embedded"
    model: str | None = None
    preset: str = "tiny-moe"
    overrides: dict[str, Any] = field(default_factory=dict)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    # Who produces the teacher's outputs: the in-process model, or a vLLM server: the one at
    # `url`, or one started for the run on the teacher's folder (students/install_vllm.sh).
    # In process: bitsandbytes 8-bit / 4-bit (NF4) weights, and an accelerate device map
    # ("auto" shards a teacher larger than one device across the visible ones).
    quantization: Literal["none", "8bit", "4bit"] = "none"
    device_map: str | None = None
    serve: Literal["in_process", "vllm"] = "in_process"
    url: str | None = None
    vllm_concurrency: int = 4
    vllm_timeout: float = 600.0     # seconds one request to the server may take (never retried)


@dataclass
class DataConfig:
    # "builtin:arithmetic", a .jsonl/.json/.parquet file, or a hub dataset name; rows need a
    # `messages` column (chat turns) and, for scoring, an `answer` column.
    source: str = BUILTIN_SOURCE
    # auto: the built-in byte-level tokenizer for the embedded teacher, the teacher's own
    # otherwise; or "builtin", or a path / hub name.
    tokenizer: str = "auto"
    messages_column: str = "messages"
    answer_column: str = "answer"
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    max_length: int = 256
    # Training micro-batches pack short sequences several to a row as wide as the batch's longest
    # (positions restart per sequence and attention stays inside it: the loss is the same as
    # one padded row per sequence, with less padding); false: one right-padded row each.
    pack: bool = True
    # Unusable rows (malformed turns, a prompt longer than max_length) are skipped and counted
    # while they are at most this share of a split; above it the run stops.
    max_malformed: float = 0.01


@dataclass
class LossConfig:
    """The distillation loss (see distill/losses/). p = teacher, q = student."""

    # forward_kl KL(p||q) | reverse_kl KL(q||p) | jsd (scaled: forward KL at beta=0, reverse at 1)
    # | skew_kl KL(p||a p+(1-a) q) | skew_reverse_kl KL(q||(1-a) p+a q) | tvd
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"] = "forward_kl"
    beta: float = 0.5             # jsd only
    alpha: float = 0.1            # skew_kl / skew_reverse_kl only
    # How the teacher's probability outside its top-k is treated: "tail" keeps one extra
    # bucket on both sides; "renormalize" rescales both sides over the top-k.
    missing_mass: Literal["tail", "renormalize"] = "tail"
    temperature: float = 1.0      # distillation temperature, separate from any sampling temperature
    scale_by_temperature_squared: bool = False
    ce_weight: float = 0.0
    # chunked: from hidden states + lm_head, never the full [tokens, vocab] logits (the default);
    # naive: materialise the logits (for comparison).
    implementation: Literal["chunked", "naive"] = "chunked"
    # float32 logits per chunk of the chunked loss, in bytes (a chunk's working set is a few times
    # that); 0: 128 MiB on a CPU, 1 GiB on a GPU.
    chunk_bytes: int = 0


@dataclass
class OffPolicyConfig:
    """Off-policy distillation: the teacher answers training prompts in both modes."""

    prompts: int = 2000         # distinct training prompts; each is answered in both modes
    top_k: int = 20             # teacher log-probabilities kept per response token
    max_new_tokens: int = 128
    generation_batch_size: int = 256
    steps: int = 2000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    # The teacher's outputs are written once as a sharded Parquet cache and read from there
    # (teachers/cache.py). "" = <run_dir>/teacher_outputs; a shared folder is reused (and
    # resumed) by later runs with the same teacher, prompts and sampling.
    teacher_outputs: str = ""
    shard_size: int = 256       # prompts per shard: the unit of work and of resumption


@dataclass
class OnPolicyConfig:
    """On-policy distillation: the student samples, the teacher scores those very tokens, and the
    student minimises the divergence on its own samples (the Qwen3 report's second stage)."""

    prompts: int = 2000          # training prompts after the off-policy ones (its own data)
    steps: int = 60
    batch_size: int = 32         # rollouts (or off-policy sequences) per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_new_tokens: int = 128
    top_k: int = 20              # teacher log-probabilities per sampled token (estimator "full")
    # full: the divergence over the teacher's top-k + tail at every sampled position;
    # sampled_token: the reverse-KL score-function estimator from log p(y) of the sampled token.
    estimator: Literal["full", "sampled_token"] = "full"
    loss: LossConfig = field(default_factory=lambda: LossConfig(divergence="reverse_kl"))
    # GKD's lambda: the chance that a step is on-policy (else a batch of the teacher's cached
    # off-policy samples); it moves linearly from `mix` to `mix_end` (null: constant).
    mix: float = 1.0
    mix_end: float | None = None
    # Rollout sampling. Temperature 1 without truncation samples from the student's own
    # distribution, which the reverse-KL estimators assume.
    temperature: float = 1.0
    top_p: float = 1.0
    sample_top_k: int = 0
    # A rollout cut at max_new_tokens: "prefix" trains on its tokens without an end (no eos
    # target), "drop" leaves it out. Either way it is counted (train/<student>/rollout_truncated).
    truncated: Literal["prefix", "drop"] = "prefix"
    seed: int = 0


@dataclass
class RolloutConfig:
    """How the on-policy stage samples the student: in this process with the trainer's own
    weights (`in_process`, the CPU default), or on a vLLM server started for the run on the
    student's weights, which follow the trainer's (`vllm`; students/rollout_engine.py)."""

    engine: Literal["in_process", "vllm"] = "in_process"
    sync_every: int = 1          # vllm: optimizer steps between weight syncs to the engine
    # vllm: sample the next steps' rollouts while the trainer trains on this one's, from weights
    # at most `max_staleness` versions (optimizer steps) behind the trainer's.
    async_: bool = field(default=False, metadata={"key": "async"})
    max_staleness: int = 1
    # sampled_token estimator: each rollout token is weighted by the truncated importance ratio
    # min(q_trainer / q_sampler, is_cap) (samples from older weights, or other numerics).
    is_cap: float = 2.0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"   # the engine's weights
    max_model_len: int | None = None   # None: data.max_length
    vllm_args: list[str] = field(default_factory=list)   # more server flags (e.g. --gpu-memory-utilization 0.3)
    # CPU: the cores the engine runs on; the trainer keeps the others while the engine works ([] =
    # both use every core). Async sampling overlaps only when each side has cores of its own.
    engine_cores: list[int] = field(default_factory=list)
    # CPU, with engine_cores: the trainer also uses the engine's cores whenever the engine has
    # nothing to sample (distill/stages/rollouts.py, CoreSplit).
    lend_cores: bool = True
    startup_timeout: float = 900.0


@dataclass
class EvalConfig:
    """The eval stage (eval/harness.py): at the end of the pipeline on the test split, and
    periodically during training on the validation split."""

    problems: int = 500          # from the test split
    max_new_tokens: int = 128
    batch_size: int = 256
    modes: list[str] = field(default_factory=lambda: ["think", "no_think"])
    greedy: bool = True          # false: Qwen3's per-mode sampling, `samples` per problem
    samples: int = 1
    every: int = 0               # periodic eval every N optimizer steps of each student; 0 = off
    periodic_problems: int = 100  # from the validation split
    # Each student as a speculative-decoding draft for the teacher, on the teacher's own sampled
    # responses to `draft.problems` test prompts per mode (0: off); eval/speculative.py.
    draft: DraftConfig = field(default_factory=DraftConfig)


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    offpolicy: OffPolicyConfig = field(default_factory=OffPolicyConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class ParallelConfig:
    """How data-parallel processes (accelerate launch / torchrun) hold the student: `ddp` a whole
    replica each; `fsdp2` (torch FSDP2) and `zero3` (DeepSpeed ZeRO-3) split parameters,
    gradients and optimizer state over them. One process always trains as ddp."""

    strategy: Literal["ddp", "fsdp2", "zero3"] = "ddp"
    # bf16: forward and backward in bfloat16, weights, AdamW state and gradient reduction in
    # float32 (ddp: autocast; fsdp2: its MixedPrecisionPolicy; zero3: DeepSpeed's bf16 mode).
    mixed_precision: Literal["none", "bf16"] = "none"
    reshard_after_forward: bool = True        # fsdp2: free a layer's gathered weights after its forward
    offload_optimizer: bool = False           # zero3: AdamW state in CPU memory
    offload_params: bool = False              # zero3: parameters in CPU memory between uses
    # zero3, None = sized from the student's hidden size H as transformers' "auto" does:
    # parameters under 10*H elements stay whole; gradient-reduce buckets of H*H elements,
    # parameter prefetch of 0.9*H*H (DeepSpeed's own default buckets, 5e8 elements, are 2 GB in fp32).
    param_persistence_threshold: int | None = None
    bucket_size: int | None = None


@dataclass
class Config:
    # The students this run trains, by name (the default pair: `default_students`).
    students: dict[str, StudentConfig] = field(default_factory=lambda: default_students())
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    run_dir: str | None = None          # default: runs/<YYYYmmdd-HHMMSS>
    cache_dir: str | None = None        # default: $DISTILL_CACHE or ~/.cache/distill (datasets, teachers)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0            # torch intra-op threads; 0 = one per core
    student_workers: int = 0    # processes training students; 0 = auto (one per student on a CPU)
    logger: Literal["wandb", "none"] = "wandb"
    wandb: WandbConfig = field(default_factory=WandbConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Step checkpoints of every training stage (<run_dir>/checkpoints/steps/), the newest `keep`;
    # resume=true continues the run in run_dir from its newest checkpoints and finished stages.
    checkpoint_every: int = 100
    checkpoint_keep: int = 2
    resume: bool = False
    # A run_dir that holds another run is refused; overwrite=true clears it first.
    overwrite: bool = False
    # `+student=NAME` on the command line: one student of that preset instead of the `students`
    # pair, set as student.FIELD (student.steps=30); it trains under the preset's name.
    student: StudentConfig | None = None


STAGES = ("teacher", "teacher_outputs", "offpolicy", "onpolicy", "eval", "release")


def default_students() -> dict[str, StudentConfig]:
    """The embedded default's pair. Both start from the teacher's attention, norms and embeddings
    and learn new MLPs: the dense one a SwiGLU of width 256, the MoE one the teacher's 8 experts
    top-2 at a quarter of their width (the same MLP parameters, a quarter active per token).
    Random init cost the MoE student 2,000 steps to learn the task; from the teacher's attention
    both learn it in a few hundred (bench/README.md)."""
    return {
        "dense": StudentConfig(preset="tiny", architecture=PRESETS["tiny"], init="teacher",
                               teacher_layers=[0, 1, 2, 3], steps=400),
        "moe": StudentConfig(preset="tiny-moe", architecture=PRESETS["tiny-moe"].override(
            moe_intermediate_size=32), init="teacher", teacher_layers=[0, 1, 2, 3],
            teacher_experts=[], steps=400),
    }


def hydra_nodes() -> dict[str, dict[str, dict]]:
    """Config-store entries made from Python, so the size table and the default pair exist once:
    group `student` (one option per preset, for `+student=NAME`) and group `students` (`pair`,
    which conf/config.yaml picks)."""
    return {"student": {name: _plain(asdict(StudentConfig(preset=name, architecture=arch)))
                        for name, arch in PRESETS.items()},
            "students": {"pair": {name: _plain(asdict(s)) for name, s in default_students().items()}}}


def _plain(node):
    """Tuples as lists: what YAML and OmegaConf hold."""
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    return [_plain(v) for v in node] if isinstance(node, (list, tuple)) else node


def printable(config: Config) -> dict:
    """The validated config as it can be overridden: with +student=NAME, the one student at
    `student` (student.steps=30), not the pair it replaced."""
    shown = _plain(as_dict(config))
    del shown["students" if config.student is not None else "student"]
    return shown


def _student_key(config: Config, name: str) -> str:
    return "student" if config.student is not None else f"students.{name}"


def validate(raw: dict) -> Config:
    """Turn the composed config (plain containers, over the dataclass defaults) into a checked
    `Config`."""
    if raw.get("student") is not None and "preset" not in raw["student"]:
        raise ConfigError("student.FIELD sets the student of +student=NAME: add +student=NAME (e.g. +student=0.6b), "
                          "or set students.dense.FIELD / students.moe.FIELD of the default pair")
    config = build_dataclass(Config, with_defaults(Config, raw))
    if config.data.source == "???":
        raise ConfigError("data.source is required for data=messages (a .jsonl/.parquet file or a hub dataset name)")
    if config.student is not None:
        config.students = {config.student.preset: config.student}
    if not config.students:
        raise ConfigError("no students: keep the default pair (students.dense, students.moe) or add +student=NAME")
    for name, student in config.students.items():
        key = _student_key(config, name)
        if student.preset not in PRESETS:
            raise ConfigError(f"{key}.preset: unknown size '{student.preset}'; valid: {', '.join(PRESETS)}")
        if student.init == "pretrained" and not student.pretrained:
            raise ConfigError(f"{key}: init=pretrained needs {key}.pretrained=PATH_OR_HUB_NAME")
        if student.init == "teacher" and student.teacher_layers is None:
            raise ConfigError(f"{key}: init=teacher needs {key}.teacher_layers=[i,j,...]")
        if student.steps is not None and student.steps <= 0:
            raise ConfigError(f"{key}.steps must be positive, got {student.steps} (null: pipeline.offpolicy.steps)")
    if config.teacher.preset not in PRESETS:
        raise ConfigError(f"teacher.preset: unknown size '{config.teacher.preset}'; valid: {', '.join(PRESETS)}")
    if config.teacher.kind == "transformers" and config.teacher.model in (None, "", "???"):
        raise ConfigError("teacher.model is required for teacher=transformers (a local folder or a hub name)")
    for stage in config.pipeline.stages:
        if stage not in STAGES:
            raise ConfigError(f"pipeline.stages: unknown stage '{stage}'; valid: {', '.join(STAGES)}")
    for mode in config.pipeline.eval.modes:
        if mode not in ("think", "no_think"):
            raise ConfigError(f"pipeline.eval.modes: unknown mode '{mode}'; valid: think, no_think")
    for key, loss in (("loss", config.loss), ("pipeline.onpolicy.loss", config.pipeline.onpolicy.loss)):
        for name, value in (("beta", loss.beta), ("alpha", loss.alpha)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}.{name} must lie in [0, 1], got {value}")
    if config.teacher.serve == "vllm" and config.teacher.kind == "transformers":
        for name, student in config.students.items():
            if student.init == "teacher":
                raise ConfigError(f"{_student_key(config, name)}.init=teacher needs the teacher in process; with teacher.serve=vllm "
                                  "only its server is used: start the student from random init or a checkpoint")
    if config.resume and not config.run_dir:
        raise ConfigError("resume=true continues a run: give its folder with run_dir=PATH")
    if config.resume and config.overwrite:
        raise ConfigError("resume=true continues the run in run_dir and overwrite=true clears it: choose one")
    onpolicy = config.pipeline.onpolicy
    for name, value in (("mix", onpolicy.mix), ("mix_end", onpolicy.mix_end)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"pipeline.onpolicy.{name} must lie in [0, 1], got {value}")
    if "onpolicy" in config.pipeline.stages and (onpolicy.mix < 1 or (onpolicy.mix_end or 1) < 1) and \
            "offpolicy" not in config.pipeline.stages:
        raise ConfigError("pipeline.onpolicy.mix < 1 mixes in off-policy batches, which need the offpolicy stage: "
                          "add offpolicy to pipeline.stages or set pipeline.onpolicy.mix=1")
    if onpolicy.estimator == "sampled_token" and (onpolicy.temperature != 1 or onpolicy.top_p != 1 or
                                                  onpolicy.sample_top_k):
        raise ConfigError("pipeline.onpolicy.estimator=sampled_token assumes samples from the student itself: set "
                          "pipeline.onpolicy.temperature=1 top_p=1 sample_top_k=0, or use estimator=full")
    if not 0 < onpolicy.top_p <= 1 or onpolicy.temperature <= 0 or onpolicy.sample_top_k < 0:
        raise ConfigError("pipeline.onpolicy: need temperature > 0, 0 < top_p <= 1 and sample_top_k >= 0")
    if config.rollout.async_ and config.rollout.engine != "vllm":
        raise ConfigError("rollout.async=true samples while the trainer trains, which needs a separate engine: set "
                          "rollout.engine=vllm, or rollout.async=false")
    if config.rollout.engine_cores and config.rollout.engine != "vllm":
        raise ConfigError("rollout.engine_cores places a rollout engine: set rollout.engine=vllm, or rollout.engine_cores=[]")
    if config.rollout.is_cap < 1:
        raise ConfigError(f"rollout.is_cap must be at least 1 (1 = weights never above one), got {config.rollout.is_cap}")
    _check_positive(config)
    return config


def _check_positive(config: Config) -> None:
    checks = {
        "pipeline.offpolicy.steps": config.pipeline.offpolicy.steps,
        "pipeline.offpolicy.batch_size": config.pipeline.offpolicy.batch_size,
        "pipeline.offpolicy.grad_accum": config.pipeline.offpolicy.grad_accum,
        "pipeline.offpolicy.top_k": config.pipeline.offpolicy.top_k,
        "pipeline.offpolicy.prompts": config.pipeline.offpolicy.prompts,
        "pipeline.offpolicy.shard_size": config.pipeline.offpolicy.shard_size,
        "pipeline.offpolicy.max_new_tokens": config.pipeline.offpolicy.max_new_tokens,
        "pipeline.onpolicy.steps": config.pipeline.onpolicy.steps,
        "pipeline.onpolicy.batch_size": config.pipeline.onpolicy.batch_size,
        "pipeline.onpolicy.grad_accum": config.pipeline.onpolicy.grad_accum,
        "pipeline.onpolicy.prompts": config.pipeline.onpolicy.prompts,
        "pipeline.onpolicy.top_k": config.pipeline.onpolicy.top_k,
        "pipeline.onpolicy.max_new_tokens": config.pipeline.onpolicy.max_new_tokens,
        "pipeline.eval.problems": config.pipeline.eval.problems,
        "checkpoint_every": config.checkpoint_every,
        "rollout.sync_every": config.rollout.sync_every,
        "rollout.max_staleness": config.rollout.max_staleness,
        "checkpoint_keep": config.checkpoint_keep,
        "pipeline.eval.samples": config.pipeline.eval.samples,
        "pipeline.eval.periodic_problems": config.pipeline.eval.periodic_problems,
        "pipeline.eval.every": config.pipeline.eval.every + 1,  # 0 means off
        "pipeline.eval.draft.problems": config.pipeline.eval.draft.problems + 1,  # 0 means off
        "pipeline.eval.draft.measure_prompts": config.pipeline.eval.draft.measure_prompts + 1,  # 0 means none
        "pipeline.eval.draft.gamma": config.pipeline.eval.draft.gamma,
        "pipeline.eval.draft.batch_size": config.pipeline.eval.draft.batch_size,
        **{f"pipeline.eval.draft.gammas[{i}]": g for i, g in enumerate(config.pipeline.eval.draft.gammas)},
        "teacher.bootstrap.steps": config.teacher.bootstrap.steps,
        "loss.temperature": config.loss.temperature,
        "loss.chunk_bytes": config.loss.chunk_bytes + 1,  # 0 means the device's default
    }
    for key, value in checks.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
