"""Everything `python -m distill.eval` does after the config is validated: load the task, evaluate each
model in each mode (and along the thinking budget), write the report."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from distill.common.devices import resolve_device
from distill.common.errors import ConfigError, UserError, first_line
from distill.common.files import prepare_output_dir, resolve_cache_dir
from distill.common.tracking import Tracker
from distill.eval.backends import Backend, TransformersBackend, VLLMBackend
from distill.eval.config import EvalRunConfig
from distill.eval.harness import ModeResult, evaluate
from distill.eval.models import ModelSpec, resolve_models
from distill.eval.report import write_draft_outputs, write_eval_outputs
from distill.eval.speculative import DraftResult, draft_eval, measure_vllm
from distill.students.chat import render_prompt
from distill.eval.tasks import Source, Task, load_task
from distill.students.rollout_engine import check_servable
from distill.students.vllm_server import VLLMServer, vllm_python

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DraftSummary:
    out_dir: Path
    target: str
    results: dict[str, dict[str, DraftResult]] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalSummary:
    out_dir: Path
    results: dict[str, dict[str, ModeResult]] = field(default_factory=dict)
    budgets: dict[str, dict[int, ModeResult]] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def run(cfg: EvalRunConfig) -> EvalSummary:
    if not cfg.models:
        raise ConfigError("no models to evaluate: set models=[PATH_OR_HUB_NAME,...] (release folders, run "
                          "directories, save_pretrained folders or hub names; NAME:PATH to name one)")
    started = time.perf_counter()
    task, source, max_new_tokens = prepare_task(cfg)
    samples = cfg.task.samples or task.samples
    specs = resolve_models(cfg.models)
    if cfg.backend.url and len(specs) > 1:
        raise ConfigError("backend.url serves one model, but models lists several: drop backend.url and a server is "
                          "started for each model folder, or evaluate one model per call")
    problems = task.load(source, resolve_cache_dir(cfg.cache_dir))
    tokenizers = {spec.name: load_tokenizer(cfg, spec) for spec in specs}  # a model that cannot load fails here
    out_dir = prepare_output_dir(cfg.out_dir, key="out_dir", default_parent="evals")

    summary = EvalSummary(out_dir=out_dir)
    tracker = Tracker(out_dir, logger=cfg.logger, config=asdict(cfg), wandb=cfg.wandb, run_name=f"eval-{out_dir.name}")
    try:
        for spec in specs:
            tick = time.perf_counter()
            backend = open_backend(cfg, spec, tokenizers[spec.name])
            try:
                common = dict(sampling=cfg.mode_sampling, samples=samples, pass_k=cfg.pass_k, seed=cfg.seed,
                              budget_answer_tokens=cfg.budget_answer_tokens)
                summary.results[spec.name] = evaluate(backend, problems, task.score, modes=cfg.modes,
                                                      max_new_tokens=max_new_tokens, desc=f"eval {spec.name}", **common)
                for budget in cfg.budgets:
                    summary.budgets.setdefault(spec.name, {})[budget] = evaluate(
                        backend, problems, task.score, modes=["think"], max_new_tokens=max_new_tokens, budget=budget,
                        desc=f"eval {spec.name}", **common)["think"]
            finally:
                backend.close()
            summary.seconds[spec.name] = time.perf_counter() - tick
            for mode, result in summary.results[spec.name].items():
                tracker.log({f"eval/{mode}/{spec.name}/{k}": v for k, v in result.summary().items()})
            for budget, result in summary.budgets.get(spec.name, {}).items():
                tracker.log({f"eval/budget/{spec.name}/{k}": v for k, v in result.summary().items()}
                            | {f"eval/budget/{spec.name}/budget": budget})
        decoding = "greedy decoding" if cfg.greedy else "per-mode sampling " + ", ".join(
            f"{mode} {cfg.mode_sampling(mode).describe()}" for mode in cfg.modes)
        protocol = (f"Task `{task.name}` ({source.path}, split {source.split}): {len(problems)} problems, {samples} "
                    f"sample(s) per problem and mode, {decoding}, at most {max_new_tokens} new tokens; backend "
                    f"{cfg.backend.kind}.")
        summary.paths = write_eval_outputs(
            summary.results, out_dir, tracker, baseline=cfg.baseline, budgets=summary.budgets or None,
            title=f"Eval: {task.name}", protocol=protocol,
            meta={"task": task.name, "source": asdict(source), "samples": samples, "max_new_tokens": max_new_tokens,
                  "models": {s.name: s.path for s in specs}, "config": asdict(cfg)})
        summary.seconds["total"] = time.perf_counter() - started
    finally:
        tracker.finish()
    return summary


def prepare_task(cfg: EvalRunConfig) -> tuple[Task, Source, int]:
    """The process's threads and progress bars as configured; the task, its data source and its
    token limit with the config's overrides applied."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if not cfg.progress:
        import datasets

        datasets.disable_progress_bars()
    task = load_task(cfg.task.name)
    return task, cfg.task.resolved_source(task), cfg.task.max_new_tokens or task.max_new_tokens


def run_draft(cfg: EvalRunConfig) -> DraftSummary:
    """`draft_for=TARGET`: every model of `models` as a speculative-decoding draft for TARGET, on
    the task's prompts in each mode (eval/speculative.py)."""
    if not cfg.models:
        raise ConfigError("draft_for needs drafts: set models=[PATH,...] (the models to try as drafts for the target)")
    started = time.perf_counter()
    task, source, max_new_tokens = prepare_task(cfg)
    target_spec = draft_target(cfg.draft_for)
    specs = [s for s in resolve_models(cfg.models) if s.path != target_spec.path]  # a run dir lists its teacher too
    if not specs:
        raise ConfigError(f"models: nothing to try as a draft besides the target '{cfg.draft_for}' itself")
    tokenizer = load_tokenizer(cfg, target_spec)
    for spec in specs:
        if load_tokenizer(cfg, spec).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"models: '{spec.name}' does not share the tokenizer of the target '{target_spec.name}'; "
                              "a draft must propose the target's own token ids")
    problems = task.load(source, resolve_cache_dir(cfg.cache_dir))[:cfg.draft.problems]
    if cfg.backend.kind == "vllm":
        check_vllm_can_serve(cfg, [target_spec, *specs])
    device = resolve_device(cfg.backend.device, key="backend.device")
    target = load_model(cfg, target_spec).to(device)
    drafts = {spec.name: load_model(cfg, spec).to(device) for spec in specs}
    out_dir = prepare_output_dir(cfg.out_dir, key="out_dir", default_parent="evals")
    summary = DraftSummary(out_dir=out_dir, target=target_spec.name)
    tracker = Tracker(out_dir, logger=cfg.logger, config=asdict(cfg), wandb=cfg.wandb, run_name=f"draft-{out_dir.name}")
    try:
        summary.results = draft_eval(
            target, drafts, tokenizer, problems, modes=cfg.modes, sampling=cfg.mode_sampling,
            max_new_tokens=max_new_tokens, gammas=cfg.draft.gammas, gamma=cfg.draft.gamma,
            measure_prompts=cfg.draft.measure_prompts, seed=cfg.seed, batch_size=cfg.draft.batch_size,
            generate_batch_size=cfg.backend.batch_size, progress=cfg.progress)
        if cfg.backend.kind == "vllm" and cfg.draft.measure_prompts:
            prompt_sets = {mode: [render_prompt(tokenizer, p.messages, mode) for p in problems[:cfg.draft.measure_prompts]]
                           for mode in cfg.modes}
            measured = measure_vllm(target_spec.path, {s.name: s.path for s in specs}, tokenizer, prompt_sets,
                                    gamma=cfg.draft.gamma, max_new_tokens=max_new_tokens,
                                    max_model_len=cfg.backend.max_model_len, log_dir=out_dir, progress=cfg.progress)
            for name, per_mode in measured.items():
                for mode, result in per_mode.items():
                    summary.results[name][mode].measured_vllm = result
        decoding = "greedy decoding" if cfg.greedy else "per-mode sampling " + ", ".join(
            f"{mode} {cfg.mode_sampling(mode).describe()}" for mode in cfg.modes)
        protocol = (f"Task `{task.name}`: the target's own responses to {len(problems)} prompts per mode ({decoding}, "
                    f"at most {max_new_tokens} new tokens), read by both models; measured decoding on the first "
                    f"{cfg.draft.measure_prompts} prompts per mode, γ={cfg.draft.gamma}, batch 1, transformers "
                    f"assisted generation on {device.type}"
                    + (" and, greedy, vLLM's draft-model speculator." if cfg.backend.kind == "vllm" else "."))
        summary.paths = write_draft_outputs(summary.results, out_dir, tracker, target=target_spec.name,
                                            gamma=cfg.draft.gamma, protocol=protocol,
                                            meta={"task": task.name, "target": target_spec.path,
                                                  "drafts": {s.name: s.path for s in specs}, "config": asdict(cfg)})
        summary.seconds["total"] = time.perf_counter() - started
    finally:
        tracker.finish()
    return summary


def check_vllm_can_serve(cfg: EvalRunConfig, specs: list[ModelSpec]) -> None:
    """One line, before any server starts, when vLLM is missing or cannot serve one of the models."""
    from transformers import AutoConfig

    vllm_python()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for spec in specs:
        config = AutoConfig.from_pretrained(spec.path, trust_remote_code=cfg.trust_remote_code)
        check_servable(config, device, name=spec.name, remedy="measure with backend.kind=transformers")


def draft_target(item: str) -> ModelSpec:
    """The one model `draft_for` names; a run directory names its teacher."""
    specs = resolve_models([item])
    if len(specs) > 1:
        specs = [s for s in specs if s.name.split("/")[-1] == "teacher"]
    if len(specs) != 1:
        raise ConfigError(f"draft_for: '{item}' is not one model: give a model folder, a hub name, or a run directory "
                          "with a teacher")
    return specs[0]


def load_model(cfg: EvalRunConfig, spec: ModelSpec):
    """The model behind `spec` in process, in eval mode, in `backend.dtype`."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=DTYPES[cfg.backend.dtype],
                                                     trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load model '{spec.path}' ({first_line(error, 200)}): give a local folder saved by "
                        "save_pretrained, or a hub name with network access") from None
    return model.eval()


def load_tokenizer(cfg: EvalRunConfig, spec: ModelSpec):
    """The model's own tokenizer: each model is prompted with its own chat template."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the tokenizer of model '{spec.path}' ({first_line(error, 200)}): give a local "
                        "folder saved by save_pretrained, or a hub name with network access") from None


def open_backend(cfg: EvalRunConfig, spec: ModelSpec, tokenizer) -> Backend:
    """The model behind `spec`, ready to generate."""
    if cfg.backend.kind == "vllm":
        if cfg.backend.url:
            return VLLMBackend(cfg.backend.url, tokenizer, name=spec.name, concurrency=cfg.backend.concurrency,
                               progress=cfg.progress)
        server = VLLMServer(spec.path, dtype=cfg.backend.dtype, max_model_len=cfg.backend.max_model_len).start()
        try:
            return VLLMBackend(server.url, tokenizer, name=spec.name, concurrency=cfg.backend.concurrency,
                               progress=cfg.progress, on_close=server.stop)
        except BaseException:
            server.stop()
            raise
    device = resolve_device(cfg.backend.device, key="backend.device")
    return TransformersBackend(load_model(cfg, spec).to(device), tokenizer, name=spec.name,
                               batch_size=cfg.backend.batch_size, progress=cfg.progress)

