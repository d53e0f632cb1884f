"""Typed configuration of `python -m distill.eval`, validated like the training config.

These dataclasses hold every default (conf/eval.yaml only picks the task). The eval protocol
follows the Qwen3 report: per-mode sampling (the table in students/chat.py), n samples per
problem, pass@1 averaged over samples and unbiased pass@k, and an optional thinking-budget sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from distill.common.errors import ConfigError
from distill.common.tracking import WandbConfig
from distill.common.typed_config import build_dataclass, with_defaults
from distill.eval.tasks import Source, Task, available
from distill.students.chat import MODE_SAMPLING, MODES, Sampling


@dataclass
class SourceOverrides:
    """Fields of the task's data source to change (null: the task file's default)."""

    path: str | None = None
    subset: str | None = None
    split: str | None = None
    question_column: str | None = None
    answer_column: str | None = None
    limit: int | None = None
    prompt_suffix: str | None = None


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    source: SourceOverrides = field(default_factory=SourceOverrides)
    samples: int | None = None          # per problem and mode; null: the task's default (AIME 16)
    max_new_tokens: int | None = None   # null: the task's default

    def resolved_source(self, task: Task) -> Source:
        changes = {k: v for k, v in vars(self.source).items() if v is not None}
        return replace(task.source, **changes)


@dataclass
class ModeSampling:
    """Sampling per mode (`sampling.think.temperature=...`); Qwen3's recommendation by default."""

    think: Sampling = MODE_SAMPLING["think"]
    no_think: Sampling = MODE_SAMPLING["no_think"]


@dataclass
class BackendConfig:
    # transformers: in-process generation (KV cache, batched); vllm: a vLLM server, the one at
    # `url` (one model), or one started per model from its folder (students/install_vllm.sh).
    kind: Literal["transformers", "vllm"] = "transformers"
    url: str | None = None
    batch_size: int = 64                 # transformers: sequences per generate call
    concurrency: int = 8                 # vllm: requests in flight
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int | None = None     # vllm server started here


@dataclass
class DraftConfig:
    """Models as speculative-decoding drafts (eval/speculative.py): the target answers `problems`
    prompts per mode with its own sampling, both models score those responses, and
    `measure_prompts` prompts per mode are decoded for real with the draft proposing `gamma`."""

    problems: int = 100                  # target responses per mode (0: no draft eval in the pipeline)
    gammas: list[int] = field(default_factory=lambda: list(range(1, 9)))
    gamma: int = 4                       # draft length of the measured decoding and the model card row
    measure_prompts: int = 8             # prompts per mode decoded with and without the draft (0: none)
    batch_size: int = 8                  # sequences per teacher-forced forward


@dataclass
class EvalRunConfig:
    # Models: local folders (a release folder, any save_pretrained folder), run directories of
    # `python -m distill` (their teacher and release folders), or hub names. "NAME:PATH" names one.
    models: list[str] = field(default_factory=list)
    task: TaskConfig = field(default_factory=TaskConfig)
    modes: list[str] = field(default_factory=lambda: list(MODES))
    greedy: bool = False                 # the report samples; greedy is for quick, reproducible checks
    sampling: ModeSampling = field(default_factory=ModeSampling)
    pass_k: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 64])
    seed: int = 0
    # Thinking-budget sweep (think mode): at each budget, Qwen3's stop-thinking sentence and
    # </think> are inserted and the model answers in at most `budget_answer_tokens` more.
    budgets: list[int] = field(default_factory=list)
    budget_answer_tokens: int = 64
    baseline: str | None = None          # the model deltas are taken against; null: the first
    backend: BackendConfig = field(default_factory=BackendConfig)
    # A model (folder, hub name or NAME:PATH): evaluate `models` as speculative-decoding drafts
    # for it (acceptance, expected and measured tokens per target forward) instead of scoring them.
    # Both models' logits are read in process; backend.kind=vllm adds measured greedy decoding
    # through vLLM's draft-model speculator.
    draft_for: str | None = None
    draft: DraftConfig = field(default_factory=DraftConfig)
    out_dir: str | None = None           # default evals/<YYYYmmdd-HHMMSS>
    cache_dir: str | None = None         # the built-in task's data (default as python -m distill)
    trust_remote_code: bool = False
    threads: int = 0
    progress: bool = True
    logger: Literal["wandb", "none"] = "wandb"
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def mode_sampling(self, mode: str) -> Sampling | None:
        return None if self.greedy else getattr(self.sampling, mode)


def validate(raw: dict) -> EvalRunConfig:
    """The composed config over the dataclass defaults, checked. (No models is allowed here, so
    that `--cfg job` prints the defaults; running without models is refused in eval/run.py.)"""
    config = build_dataclass(EvalRunConfig, with_defaults(EvalRunConfig, raw))
    if config.task.name not in available():
        raise ConfigError(f"task: unknown task '{config.task.name}'; valid: {', '.join(available())}")
    for mode in config.modes:
        if mode not in MODES:
            raise ConfigError(f"modes: unknown mode '{mode}'; valid: {', '.join(MODES)}")
    if config.budgets and "think" not in config.modes:
        raise ConfigError("budgets need think mode: the budget limits the thinking; add think to modes")
    checks = {"task.samples": config.task.samples or 1, "task.max_new_tokens": config.task.max_new_tokens or 1,
              "budget_answer_tokens": config.budget_answer_tokens, "backend.batch_size": config.backend.batch_size,
              "backend.concurrency": config.backend.concurrency}
    checks |= {"draft.problems": config.draft.problems or 1, "draft.gamma": config.draft.gamma,
               "draft.batch_size": config.draft.batch_size}
    checks |= {f"draft.gammas[{i}]": g for i, g in enumerate(config.draft.gammas)}
    checks.update({f"pass_k[{i}]": k for i, k in enumerate(config.pass_k)})
    for key, value in checks.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    for i, budget in enumerate(config.budgets):
        if budget < 0:
            raise ConfigError(f"budgets[{i}] must be >= 0 thinking tokens, got {budget}")
    for mode in MODES:
        s = getattr(config.sampling, mode)
        if s.temperature <= 0 or not 0 < s.top_p <= 1 or s.top_k < 0:
            raise ConfigError(f"sampling.{mode}: need temperature > 0, 0 < top_p <= 1, top_k >= 0 (greedy=true for "
                              "greedy decoding)")
    if config.draft.measure_prompts < 0:
        raise ConfigError(f"draft.measure_prompts must be >= 0, got {config.draft.measure_prompts}")
    if config.draft_for and config.backend.url:
        raise ConfigError("draft_for starts its own vLLM servers (the target alone, then with each draft): drop "
                          "backend.url")
    if config.backend.url and config.backend.kind != "vllm":
        raise ConfigError("backend.url is for backend.kind=vllm (a running vLLM server)")
    return config
