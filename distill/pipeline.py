"""The strong-to-weak pipeline, top to bottom: teacher -> off-policy distillation -> eval -> release.

`run(config)` is everything `python -m distill` does after the config is validated. Each stage
is a function of plain objects; the stage list in the config chooses which run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distill.chat import MODE_SAMPLING, MODES, render_prompt
from distill.checkpoint import StepCheckpoints
from distill.config import Config, ConfigError, StudentConfig
from distill.data import (BUILTIN_ARITHMETIC, Example, ModeAlternatingBatches, drop_long_prompts, load_chat_dataset,
                          load_tokenizer, prompt_messages)
from distill.distributed import Processes, processes
from distill.errors import first_line
from distill.files import atomic_write_text, prepare_output_dir
from distill.losses.token_loss import PARAMETER
from distill.losses.vocab import VocabularyMismatch, shared_vocabulary
from distill.memory import check_fits, estimate
from distill.onpolicy import OnPolicyBatches
from distill.parallel import Replicated, check_available, make_engine
from distill.plots import loss_curves
from distill.release import CHECKSUMS, model_card, save_model_folder, write_release
from distill.tracking import Tracker
from distill.train import DataParallel, Schedule, distillation_objective, fit
from eval.backends import TransformersBackend
from eval.harness import ModeResult, Scorer, evaluate
from eval.report import render_markdown, write_eval_outputs
from eval.tasks import Problem, default_score
from eval.tasks import arithmetic
from students.build import (TeacherInitError, build_random, check_teacher_init, count_parameters, hf_config,
                            init_from_teacher, load_pretrained)
from teachers import embedded
from teachers.cache import CacheSpec, prompts_hash, read_cache, tokenizer_hash, write_cache
from teachers.transformers_backend import TransformersTeacher


@dataclass
class RunSummary:
    run_dir: Path
    results: dict[str, dict[str, ModeResult]] = field(default_factory=dict)
    releases: dict[str, Path] = field(default_factory=dict)
    teacher_reused: bool = False
    teacher_outputs: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def run(cfg: Config, *, progress: bool = True) -> RunSummary:
    started = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    proc = processes(device)
    check_available(cfg.parallel, proc)
    if proc.world == 1 and cfg.parallel.strategy != "ddp":
        print(f"warning: parallel={cfg.parallel.strategy} shards the student over several processes; this run has one, "
              "so it trains a whole replica (start several with accelerate launch)")
    if proc.world > 1 and not cfg.run_dir:
        raise ConfigError("a data-parallel run (accelerate launch / torchrun) needs run_dir=PATH, one folder for all "
                          "its processes")
    cache_dir = Path(cfg.cache_dir or os.environ.get("DISTILL_CACHE") or Path.home() / ".cache" / "distill")
    tokenizer = load_tokenizer(tokenizer_name(cfg))
    # before anything is allocated or written
    check_vocabularies_and_memory(cfg, tokenizer, device, shards=proc.world if cfg.parallel.strategy != "ddp" else 1)
    run_dir = prepare_output_dir(cfg.run_dir, key="run_dir", default_parent="runs", needed_bytes=output_bytes(cfg))

    summary = RunSummary(run_dir=run_dir)
    # The main process keeps the run's log (and W&B); the others log nothing of their own.
    tracker = Tracker(run_dir, logger=cfg.logger, config=asdict(cfg), project=cfg.wandb.project,
                      entity=cfg.wandb.entity, mode=cfg.wandb.mode, run_name=run_dir.name) if proc.main else \
        Tracker(run_dir, metrics_file=None)
    cleanup: list = []  # what to stop when the run ends (a vLLM server started for it)
    try:
        if proc.main:
            atomic_write_text(run_dir / "config.json", json.dumps(asdict(cfg), indent=2))
        dataset = load_chat_dataset(cfg.data, cache_dir)
        if cfg.data.source != BUILTIN_ARITHMETIC:
            dataset = drop_long_prompts(dataset, tokenizer, cfg.data, render_prompt)

        tick = time.perf_counter()
        # The main process trains (or loads) the teacher first; the others then find it cached.
        if not proc.main:
            proc.barrier()
        teacher_model, teacher_folder, teacher_name, summary.teacher_reused = build_teacher(
            cfg, tokenizer, dataset, cache_dir, tracker, progress)
        if proc.main:
            proc.barrier()
        if teacher_model is not None and getattr(teacher_model, "hf_device_map", None) is None:
            teacher_model.to(device)  # a quantized or device-mapped teacher stays where it was placed
        if cfg.teacher.serve == "vllm":
            teacher = serve_teacher(cfg, teacher_folder, tokenizer, teacher_name, run_dir, progress, cleanup)
        else:
            teacher = TransformersTeacher(teacher_model, tokenizer, name=teacher_name, progress=progress,
                                          generation_batch_size=cfg.pipeline.offpolicy.generation_batch_size)
        summary.seconds["teacher"] = time.perf_counter() - tick
        tracker.log({"teacher/reused_cache": int(summary.teacher_reused), "perf/teacher_seconds": summary.seconds["teacher"]})

        students: dict[str, PreTrainedModel] = {}
        if {"teacher_outputs", "offpolicy"} & set(cfg.pipeline.stages):
            tick = time.perf_counter()
            if proc.world > 1:   # each process fills its share of the shards
                shares = replace(cfg, pipeline=replace(cfg.pipeline, offpolicy=replace(
                    cfg.pipeline.offpolicy, worker=proc.rank, workers=proc.world)))
                fill_teacher_outputs(shares, teacher, dataset["train"], tracker, run_dir, progress)
                proc.barrier()
            summary.teacher_outputs = fill_teacher_outputs(cfg, teacher, dataset["train"], tracker, run_dir, progress)
            summary.seconds["teacher_outputs"] = time.perf_counter() - tick
        if {"offpolicy", "onpolicy"} & set(cfg.pipeline.stages):
            data = StudentData(
                examples=offpolicy_examples(cfg, teacher.tokenizer, summary.teacher_outputs, tracker)
                if "offpolicy" in cfg.pipeline.stages else None,
                onpolicy_prompts=onpolicy_prompts(cfg, dataset["train"]) if "onpolicy" in cfg.pipeline.stages else None,
                validation=validation_problems(cfg, dataset["validation"]))
            tick = time.perf_counter()
            workers = 1 if proc.world > 1 else student_workers(cfg, device)
            students = {name: build_student(student_cfg, teacher_model, seed=cfg.seed + index).to(device)
                        for index, (name, student_cfg) in enumerate(cfg.students.items())}
            if workers > 1:
                students = train_students_in_workers(cfg, students, data, tokenizer, tracker, run_dir, workers,
                                                     progress, teacher_source(cfg, teacher, teacher_folder))
            else:
                for name, student in students.items():
                    train_student(cfg, name, student, data, tokenizer, lambda: teacher, tracker, run_dir, progress,
                                  proc=proc)
            summary.seconds["train_students"] = time.perf_counter() - tick

        if not proc.main:   # eval, release and the run's files are the main process's
            proc.barrier()
            return summary
        if "eval" in cfg.pipeline.stages:
            tick = time.perf_counter()
            # A teacher that lives only behind its server is evaluated by `python -m eval` instead.
            models = {**({"teacher": teacher_model} if teacher_model is not None else {}), **students}
            summary.results = evaluate_models(cfg, models, tokenizer, dataset["test"], tracker, run_dir, progress)
            summary.seconds["eval"] = time.perf_counter() - tick

        if "release" in cfg.pipeline.stages:
            for name, student in students.items():
                summary.releases[name] = release_student(cfg, name, student, tokenizer, teacher_name, summary.results,
                                                         run_dir)
        # Which folders hold this run's models: `python -m eval RUN_DIR` evaluates them all.
        folders = {**({"teacher": str(teacher_folder)} if teacher_folder else {}),
                   **{name: str(path) for name, path in summary.releases.items()}}
        atomic_write_text(run_dir / "models.json", json.dumps(folders, indent=1))

        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves = loss_curves(records, run_dir / "loss_curves.png")
        if curves is not None:
            tracker.log_image("train/loss_curves", curves)
        summary.seconds["total"] = time.perf_counter() - started
        tracker.log({"perf/total_seconds": summary.seconds["total"]})
        proc.barrier()
    finally:
        for stop in cleanup:
            stop()
        tracker.finish()
    return summary


# --- set-up -------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def tokenizer_name(cfg: Config) -> str:
    """`data.tokenizer`, where "auto" means the built-in tokenizer for the embedded teacher and the
    teacher's own tokenizer otherwise."""
    if cfg.data.tokenizer != "auto":
        return cfg.data.tokenizer
    return "builtin" if cfg.teacher.kind == "embedded" else cfg.teacher.model


def check_vocabularies_and_memory(cfg: Config, tokenizer: PreTrainedTokenizerBase, device: torch.device,
                                  shards: int = 1) -> None:
    """Refuse, before allocating anything, models that cannot use the tokenizer or do not fit."""
    real = len(tokenizer)
    if cfg.teacher.kind == "embedded":
        teacher_arch = embedded.teacher_architecture(cfg.teacher)
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
        arch = student.architecture
        if student.init != "pretrained" and arch.vocab_size < real:
            raise ConfigError(
                f"student '{name}' vocab_size {arch.vocab_size} is smaller than the tokenizer's {real} tokens; set "
                f"students.{name}.architecture.vocab_size to at least {real} (Qwen3 checkpoints use 151936)")
        if student.init == "pretrained":
            _check_same_tokenizer(f"student '{name}'", student.pretrained, tokenizer, False)
        if student.init == "teacher":
            try:
                check_teacher_init(hf_config(arch), teacher_config, layers=student.teacher_layers,
                                   experts=student.teacher_experts)
            except TeacherInitError as error:
                raise ConfigError(f"students.{name} cannot start from the teacher's blocks: {error}") from None
        params = count_parameters(build_random(arch, device="meta")).total
        check_fits(name, estimate(params, teacher_params, teacher_format, shards), device)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _check_same_tokenizer(who: str, name_or_path: str, tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool) -> None:
    """A checkpoint that ships its own tokenizer must ship the run's (padding aside): logits and
    top-k ids are compared id by id."""
    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
        return  # weights only: the run's tokenizer is the only one there is
    try:
        own = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return  # no tokenizer files: the run's tokenizer is the only one there is
    try:
        shared_vocabulary(tokenizer, own)
    except VocabularyMismatch as error:
        raise ConfigError(f"{who} ({name_or_path}): {error}") from None


def loss_name(loss) -> str:
    """"jsd(beta=0.5)", "skew_kl(alpha=0.1)", "forward_kl"."""
    parameter = PARAMETER.get(loss.divergence)
    return f"{loss.divergence}({parameter}={getattr(loss, parameter)})" if parameter else loss.divergence


# --- stages -------------------------------------------------------------------------------

def build_teacher(cfg: Config, tokenizer, dataset, cache_dir: Path, tracker: Tracker, progress: bool):
    """(in-process model or None, its folder or hub name, name, reused_from_cache). A
    transformers teacher served by vLLM is not loaded here at all."""
    if cfg.teacher.kind == "embedded":
        if cfg.data.source != BUILTIN_ARITHMETIC:
            raise ConfigError("teacher=embedded is trained on the built-in task only; use data=arithmetic, or "
                              "teacher=transformers teacher.model=PATH_OR_HUB_NAME for your own data")
        model, folder, reused = embedded.load_or_train(cfg.teacher, cfg.data, tokenizer, dataset["train"], cache_dir,
                                                       tracker, progress=progress)
        return model, str(folder), f"embedded tiny Qwen3-MoE teacher ({folder.name})", reused
    if cfg.teacher.serve == "vllm":
        return None, cfg.teacher.model, cfg.teacher.model, False
    dtype = getattr(torch, cfg.teacher.dtype)
    model = load_pretrained(cfg.teacher.model, dtype=dtype, trust_remote_code=cfg.teacher.trust_remote_code,
                            quantization=cfg.teacher.quantization, device_map=cfg.teacher.device_map)
    return model.eval(), cfg.teacher.model, cfg.teacher.model, False


def serve_teacher(cfg: Config, folder: str, tokenizer, name: str, run_dir: Path, progress: bool, cleanup: list):
    """The vLLM teacher: the server at teacher.url, or one started now on the teacher's folder
    (stopped when the run ends, also on error)."""
    from teachers.vllm_backend import VLLMTeacher
    from teachers.vllm_server import VLLMServer

    url = cfg.teacher.url
    if not url:
        top_k = max(cfg.pipeline.offpolicy.top_k, cfg.pipeline.onpolicy.top_k)
        server = VLLMServer(folder, max_logprobs=max(20, top_k + 16), dtype=cfg.teacher.dtype,
                            log_path=run_dir / "vllm_server.log")
        cleanup.append(server.stop)
        url = server.start().url
    return VLLMTeacher(url, tokenizer, name=f"{name} (vLLM)", progress=progress,
                       concurrency=cfg.teacher.vllm_concurrency)


def build_student(student: StudentConfig, teacher: PreTrainedModel | None, *, seed: int) -> PreTrainedModel:
    if student.init == "pretrained":
        return load_pretrained(student.pretrained)
    model = build_random(student.architecture, seed=seed)
    if student.init == "teacher":
        init_from_teacher(model, teacher, layers=student.teacher_layers, experts=student.teacher_experts)
    return model


def teacher_outputs_dir(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.pipeline.offpolicy.teacher_outputs) if cfg.pipeline.offpolicy.teacher_outputs else \
        run_dir / "teacher_outputs"


def fill_teacher_outputs(cfg: Config, teacher, train_split, tracker: Tracker, run_dir: Path, progress: bool) -> Path:
    """The teacher answers the training prompts in both modes with the per-mode sampling, and
    every response token gets its top-k log-probabilities, written to the sharded cache. Shards
    already there (a resumed or shared cache) are kept."""
    stage = cfg.pipeline.offpolicy
    rows = train_split.select(range(min(stage.prompts, len(train_split))))
    conversations = [prompt_messages(messages) for messages in rows["messages"]]
    prompts = {mode: [render_prompt(teacher.tokenizer, c, mode) for c in conversations] for mode in MODES}
    spec = CacheSpec(teacher=teacher.name, tokenizer_hash=tokenizer_hash(teacher.tokenizer), k=stage.top_k,
                     modes=tuple(MODES), sampling={m: vars(s) for m, s in MODE_SAMPLING.items()}, seed=stage.seed,
                     max_new_tokens=stage.max_new_tokens, prompts_hash=prompts_hash(prompts),
                     num_prompts=len(conversations), shard_size=stage.shard_size)
    folder = teacher_outputs_dir(cfg, run_dir)
    manifest = write_cache(teacher, prompts, folder, spec, worker=stage.worker, workers=stage.workers,
                           progress=progress)
    if manifest is not None:
        tracker.log({"teacher/outputs_rows": manifest.rows, "teacher/outputs_tokens": manifest.tokens,
                     "teacher/outputs_bytes_per_token": manifest.bytes_per_token})
    return folder


def offpolicy_examples(cfg: Config, tokenizer, folder: Path, tracker: Tracker) -> dict[str, list[Example]]:
    """The cached teacher outputs, per mode. Truncated responses (no eos within the budget) are
    counted and dropped, never trained on as if complete."""
    stage = cfg.pipeline.offpolicy
    everything = read_cache(folder, tokenizer=tokenizer, k=stage.top_k, keep_truncated=True)
    eos = tokenizer.eos_token_id
    examples: dict[str, list[Example]] = {}
    for mode in MODES:
        rows = everything.get(mode, [])
        kept = [e for e in rows if e.response and e.response[-1] == eos]
        examples[mode] = kept
        tokens = sum(len(e.response) for e in kept)
        tracker.log({f"teacher/{mode}/responses": len(kept),
                     f"teacher/{mode}/truncated": 1 - len(kept) / max(1, len(rows)),
                     f"teacher/{mode}/mean_response_tokens": tokens / max(1, len(kept)),
                     f"teacher/{mode}/mean_topk_mass": float(sum(e.topk_logprobs.exp().sum() for e in kept))
                     / max(1, tokens)})
    return examples


@dataclass
class StudentData:
    """What the students' training stages read: the teacher's cached off-policy samples, the
    on-policy stage's own prompts, and validation problems for periodic eval."""

    examples: dict[str, list[Example]] | None = None
    onpolicy_prompts: list[list[dict]] | None = None
    validation: list[Problem] | None = None


def onpolicy_prompts(cfg: Config, train_split) -> list[list[dict]]:
    """The on-policy stage's prompts: training rows after the off-policy stage's, so each stage
    has its own data."""
    start = cfg.pipeline.offpolicy.prompts if "offpolicy" in cfg.pipeline.stages else 0
    stop = min(start + cfg.pipeline.onpolicy.prompts, len(train_split))
    if stop <= start:
        raise ConfigError(f"no training prompts left for the on-policy stage: the train split has {len(train_split)} "
                          f"rows and the off-policy stage takes {start}; lower pipeline.offpolicy.prompts or add data")
    return [prompt_messages(m) for m in train_split.select(range(start, stop))["messages"]]


def validation_problems(cfg: Config, split) -> list[Problem] | None:
    if not cfg.pipeline.eval.every:
        return None
    problems, _ = eval_problems(cfg, split.select(range(min(cfg.pipeline.eval.periodic_problems, len(split)))))
    return problems


def train_student(cfg: Config, name: str, student: PreTrainedModel, data: StudentData, tokenizer, make_teacher,
                  tracker: Tracker, run_dir: Path, progress: bool, position: int = 0,
                  proc: Processes = Processes()) -> list[dict]:
    """The student's training stages in order: off-policy, a checkpoint, on-policy. Returns the
    logged records. `make_teacher()` gives the teacher that scores on-policy rollouts.

    Each finished stage leaves the student in `<run_dir>/checkpoints/<stage>/<name>/`
    (save_pretrained); with `resume`, a finished stage is loaded from there instead of trained,
    and an unfinished one continues from its newest step checkpoint."""
    records = []
    for stage in ("offpolicy", "onpolicy"):
        if (stage == "offpolicy" and data.examples is None) or (stage == "onpolicy" and data.onpolicy_prompts is None):
            continue
        finished = run_dir / "checkpoints" / stage / name
        if cfg.resume and (finished / CHECKSUMS).exists():
            student.load_state_dict(AutoModelForCausalLM.from_pretrained(finished, dtype=torch.float32).state_dict())
            continue
        steps = StepCheckpoints(run_dir / "checkpoints" / "steps" / stage / name, cfg.checkpoint_every,
                                cfg.checkpoint_keep, writer=proc.main, barrier=proc.barrier)
        if stage == "offpolicy":
            records += _fit_offpolicy(cfg, name, student, data.examples, tokenizer, tracker, progress, position,
                                      data.validation, steps, proc)
        else:
            records += _fit_onpolicy(cfg, name, student, data, tokenizer, make_teacher(), tracker, progress, position,
                                     steps, proc)
        if not proc.in_sync(student):
            raise RuntimeError(f"{name}: the processes' parameters differ after the {stage} stage")
        if proc.world > 1:
            tracker.log({f"train/{name}/ranks_in_sync": 1, f"train/{name}/ranks": proc.world})
        # The stage boundary of the recipe: the student, loadable on its own.
        if proc.main:
            save_model_folder(finished, student, tokenizer)
    return records


def _fit_offpolicy(cfg: Config, name: str, student: PreTrainedModel, examples: dict[str, list[Example]], tokenizer,
                   tracker: Tracker, progress: bool, position: int = 0, validation: list[Problem] | None = None,
                   checkpoints: StepCheckpoints | None = None, proc: Processes = Processes()) -> list[dict]:
    stage, student_cfg = cfg.pipeline.offpolicy, cfg.students[name]
    schedule = Schedule(steps=student_cfg.steps or stage.steps, lr=student_cfg.lr or stage.lr,
                        warmup_steps=stage.warmup_steps, weight_decay=stage.weight_decay,
                        max_grad_norm=stage.max_grad_norm)
    batches = ModeAlternatingBatches(examples, stage.batch_size, tokenizer.pad_token_id, cfg.data.max_length,
                                     micro_batches=stage.grad_accum, seed=stage.seed, rank=proc.rank, world=proc.world)
    objective = distillation_objective(cfg.loss, len(tokenizer))
    return fit(student, batches, objective, schedule, tracker=tracker,
               prefix=f"train/{name}", desc=f"distill {name}", progress=progress, position=position,
               periodic=_periodic(cfg, name, tokenizer, validation), checkpoints=checkpoints, resume=cfg.resume,
               data_parallel=data_parallel(proc), engine=_engine(cfg, student, objective, schedule, stage, proc))


def _fit_onpolicy(cfg: Config, name: str, student: PreTrainedModel, data: StudentData, tokenizer, teacher,
                  tracker: Tracker, progress: bool, position: int = 0,
                  checkpoints: StepCheckpoints | None = None, proc: Processes = Processes()) -> list[dict]:
    stage = cfg.pipeline.onpolicy
    schedule = Schedule(steps=stage.steps, lr=stage.lr, warmup_steps=stage.warmup_steps,
                        weight_decay=stage.weight_decay, max_grad_norm=stage.max_grad_norm)
    offpolicy = None
    if data.examples is not None and (stage.mix < 1 or (stage.mix_end is not None and stage.mix_end < 1)):
        offpolicy = ModeAlternatingBatches(data.examples, stage.batch_size, tokenizer.pad_token_id,
                                           cfg.data.max_length, micro_batches=stage.grad_accum, seed=stage.seed + 1,
                                           rank=proc.rank, world=proc.world)
    objective = distillation_objective(stage.loss, len(tokenizer), estimator=stage.estimator)
    engine = _engine(cfg, student, objective, schedule, stage, proc)
    # Rollouts come from the student object itself: a sharding engine gathers the current
    # weights into it for each step's sampling.
    batches = OnPolicyBatches(student, teacher, tokenizer, data.onpolicy_prompts, stage, steps=stage.steps,
                              max_length=cfg.data.max_length, offpolicy=offpolicy, seed=stage.seed, rank=proc.rank,
                              world=proc.world, policy_weights=engine.full_weights_in)
    return fit(student, batches, objective, schedule, tracker=tracker, prefix=f"train/{name}/onpolicy",
               desc=f"on-policy {name}", progress=progress, position=position,
               periodic=_periodic(cfg, f"{name}/onpolicy", tokenizer, data.validation),
               checkpoints=checkpoints, resume=cfg.resume, data_parallel=data_parallel(proc),
               engine=engine)


def data_parallel(proc: Processes) -> DataParallel:
    return DataParallel(world_size=proc.world, total=proc.total)


def _engine(cfg: Config, student: PreTrainedModel, objective, schedule: Schedule, stage, proc: Processes) -> Replicated:
    """How this stage's processes hold the student (`parallel=`), one optimizer step = the
    stage's `grad_accum` micro-batches."""
    return make_engine(student, objective, lr=schedule.lr, weight_decay=schedule.weight_decay,
                       max_grad_norm=schedule.max_grad_norm, micro_batches=stage.grad_accum, proc=proc,
                       cfg=cfg.parallel)


def _periodic(cfg: Config, name: str, tokenizer, validation: list[Problem] | None):
    if not (cfg.pipeline.eval.every and validation):
        return None
    return cfg.pipeline.eval.every, periodic_eval(cfg, name, tokenizer, validation)


def periodic_eval(cfg: Config, name: str, tokenizer, problems: list[Problem]):
    """The eval harness on validation problems during training: pass@1 and thinking tokens per mode."""
    stage = cfg.pipeline.eval
    score = arithmetic.score if cfg.data.source == BUILTIN_ARITHMETIC else default_score

    def run(model: PreTrainedModel) -> dict:
        backend = TransformersBackend(model, tokenizer, name=name, batch_size=stage.batch_size, progress=False)
        results = evaluate(backend, problems, score, modes=stage.modes, sampling=eval_sampling(stage),
                           max_new_tokens=stage.max_new_tokens, seed=cfg.seed, desc=f"periodic eval {name}")
        return {f"periodic_eval/{name}/{mode}/{key}": r.metrics[key] for mode, r in results.items()
                for key in ("pass@1", "mean_thinking_tokens", "format_errors")}

    return run


def student_workers(cfg: Config, device: torch.device) -> int:
    """How many processes train the students: one per student on a multi-core CPU (each with
    its share of the cores; tiny models use cores far better this way than with more threads),
    one otherwise."""
    if cfg.student_workers:
        return cfg.student_workers
    if device.type != "cpu":
        return 1
    cores = cfg.threads or os.cpu_count() or 1
    return max(1, min(len(cfg.students), cores))


def teacher_source(cfg: Config, teacher, folder: str | None) -> tuple[str, str] | None:
    """How a worker process reaches the teacher for on-policy scoring: the vLLM server's URL, or
    the folder (or hub name) it loads in process."""
    if "onpolicy" not in cfg.pipeline.stages:
        return None
    if cfg.teacher.serve == "vllm":
        return "vllm", teacher.url
    return "folder", folder


def _teacher_from_source(cfg: Config, source: tuple[str, str], tokenizer, progress: bool):
    kind, where = source
    if kind == "vllm":
        from teachers.vllm_backend import VLLMTeacher

        return VLLMTeacher(where, tokenizer, progress=False, concurrency=cfg.teacher.vllm_concurrency)
    model = load_pretrained(where, dtype=getattr(torch, cfg.teacher.dtype), trust_remote_code=cfg.teacher.trust_remote_code,
                            quantization=cfg.teacher.quantization, device_map=cfg.teacher.device_map)
    return TransformersTeacher(model.eval(), tokenizer, name=where, progress=False)


def train_students_in_workers(cfg: Config, students: dict[str, PreTrainedModel], data: StudentData, tokenizer,
                              tracker: Tracker, run_dir: Path, workers: int, progress: bool,
                              source: tuple[str, str] | None) -> dict[str, PreTrainedModel]:
    """Train each (initialised) student in its own process, all its stages there; the trained
    weights come back into the same model objects and the metrics are replayed into this run's log."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (cfg.threads or os.cpu_count() or 1) // workers)
    jobs = {}
    # Tensors sent to a process each hold a shared-memory file descriptor; thousands of small
    # top-k tensors exhaust the limit, so examples travel as numpy arrays (copied by pickle).
    packed = None if data.examples is None else {
        mode: [(e.prompt, e.response, e.topk_ids.numpy(), e.topk_logprobs.numpy()) for e in items]
        for mode, items in data.examples.items()}
    light = StudentData(examples=None, onpolicy_prompts=data.onpolicy_prompts, validation=data.validation)
    # spawn, not fork: a forked child inherits this process's torch thread pools and locks.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for position, (name, student) in enumerate(students.items()):
            # The model travels as config + weights and is rebuilt there: a pickled transformers
            # model loses the hooks that collect MoE router logits.
            jobs[name] = pool.submit(_train_student_worker, cfg, name, student.config, student.state_dict(), packed,
                                     light, tokenizer, str(run_dir), threads, position, progress, source)
        results = {name: job.result() for name, job in jobs.items()}
    for name, student in students.items():
        state, records = results[name]
        student.load_state_dict(state)
        student.eval()
        tracker.replay(records)
    return students


def _train_student_worker(cfg: Config, name: str, config, state: dict, packed, data: StudentData, tokenizer,
                          run_dir: str, threads: int, position: int, progress: bool, source):
    torch.set_num_threads(threads)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    student.load_state_dict(state)
    if packed is not None:
        data.examples = {mode: [Example(p, r, torch.from_numpy(i), torch.from_numpy(v)) for p, r, i, v in items]
                         for mode, items in packed.items()}
    # The records come back with the weights; the main process writes them to the run's log.
    records = train_student(cfg, name, student, data, tokenizer,
                            lambda: _teacher_from_source(cfg, source, tokenizer, progress),
                            Tracker(Path(run_dir), metrics_file=None), run_dir=Path(run_dir), progress=progress,
                            position=position)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}, records


def eval_problems(cfg: Config, split) -> tuple[list[Problem], Scorer]:
    """The split's rows as eval problems, and how they are scored: the built-in task's strict
    integer check, or extraction after </think> plus math-verify for a user's dataset."""
    problems = [Problem(id=str(i), messages=prompt_messages(row["messages"]), reference=_reference(row))
                for i, row in enumerate(split)]
    return problems, (arithmetic.score if cfg.data.source == BUILTIN_ARITHMETIC else default_score)


def _reference(row: dict) -> str:
    if row.get("answer") is not None:
        return str(row["answer"])
    return row["messages"][-1]["content"].split("</think>")[-1].strip()


def evaluate_models(cfg: Config, models: dict[str, PreTrainedModel], tokenizer, test_split, tracker: Tracker,
                    run_dir: Path, progress: bool) -> dict[str, dict[str, ModeResult]]:
    stage = cfg.pipeline.eval
    problems, score = eval_problems(cfg, test_split.select(range(min(stage.problems, len(test_split)))))
    results = {}
    for name, model in models.items():
        backend = TransformersBackend(model, tokenizer, name=name, batch_size=stage.batch_size, progress=progress)
        results[name] = evaluate(backend, problems, score, modes=stage.modes, sampling=eval_sampling(stage),
                                 samples=stage.samples, max_new_tokens=stage.max_new_tokens, pass_k=[stage.samples],
                                 seed=cfg.seed, desc=f"eval {name}")
        for mode, result in results[name].items():
            tracker.log({f"eval/{mode}/{name}/{k}": v for k, v in result.summary().items()})
    write_eval_outputs(results, run_dir, tracker, baseline="teacher", protocol=eval_protocol(cfg))
    return results


def eval_protocol(cfg: Config) -> str:
    stage = cfg.pipeline.eval
    data = "the built-in task's held-out test split" if cfg.data.source == BUILTIN_ARITHMETIC \
        else f"the test split of {cfg.data.source}"
    decoding = "greedy decoding" if stage.greedy else "Qwen3's per-mode sampling"
    return (f"{stage.problems} problems of {data}, {decoding}, {stage.samples} sample(s) per problem and mode, "
            f"at most {stage.max_new_tokens} new tokens (`python -m eval` runs the same harness).")


def eval_sampling(stage):
    """The pipeline's eval sampling: greedy (reproducible, the default) or Qwen3's per-mode sampling."""
    return lambda mode: None if stage.greedy else MODE_SAMPLING[mode]


def recipe_lines(cfg: Config, name: str) -> list[str]:
    """How the student was made, for its model card."""
    stages, student_cfg = cfg.pipeline.stages, cfg.students[name]
    lines = [f"student init: {student_cfg.init}" + (
        f" (teacher layers {student_cfg.teacher_layers}"
        f"{', experts ' + str(student_cfg.teacher_experts) if student_cfg.teacher_experts else ''})"
        if student_cfg.init == "teacher" else "")]
    if "offpolicy" in stages:
        off = cfg.pipeline.offpolicy
        lines += [f"off-policy distillation: the teacher answered {off.prompts} training prompts in both modes "
                  f"(thinking T 0.6 / top-p 0.95 / top-k 20; non-thinking T 0.7 / top-p 0.8 / top-k 20); "
                  f"loss {loss_name(cfg.loss)} over its top-{off.top_k} log-probabilities (missing mass: "
                  f"{cfg.loss.missing_mass}), cross-entropy weight {cfg.loss.ce_weight}, temperature "
                  f"{cfg.loss.temperature}; {student_cfg.steps or off.steps} optimizer steps of "
                  f"{off.batch_size * off.grad_accum} sequences, AdamW peak lr {student_cfg.lr or off.lr}, "
                  f"warm-up {off.warmup_steps} then cosine"]
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


def release_student(cfg: Config, name: str, student: PreTrainedModel, tokenizer, teacher_name: str,
                    results: dict[str, dict[str, ModeResult]], run_dir: Path) -> Path:
    shown = {k: v for k, v in results.items() if k in ("teacher", name)}
    card = model_card(
        name=f"distill-{name}", preset=cfg.students[name].preset, parameters=count_parameters(student).total,
        teacher=teacher_name,
        recipe=recipe_lines(cfg, name),
        eval_table=render_markdown(shown, baseline="teacher", level=3, protocol=eval_protocol(cfg))
        if shown else "Not evaluated in this run.",
    )
    return write_release(run_dir / "release" / name, student, tokenizer, card)



