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
from distill.eval.report import write_eval_outputs
from distill.eval.tasks import load_task
from distill.students.vllm_server import VLLMServer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if not cfg.progress:
        import datasets

        datasets.disable_progress_bars()
    task = load_task(cfg.task.name)
    source = cfg.task.resolved_source(task)
    samples = cfg.task.samples or task.samples
    max_new_tokens = cfg.task.max_new_tokens or task.max_new_tokens
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
    from transformers import AutoModelForCausalLM

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
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=DTYPES[cfg.backend.dtype],
                                                     trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load model '{spec.path}' ({first_line(error, 200)}): give a local folder saved by "
                        "save_pretrained, or a hub name with network access") from None
    return TransformersBackend(model.to(device).eval(), tokenizer, name=spec.name,
                               batch_size=cfg.backend.batch_size, progress=cfg.progress)

