"""The strong-to-weak pipeline, top to bottom: teacher -> teacher outputs -> each student's
off-policy and on-policy stages -> eval -> release.

`run(config)` is everything `python -m distill` does after the config is validated. It reads as
its stages (distill/stages/, one module each); the stage list in the config chooses which run.
Under `accelerate launch` every process runs this function: the main process bootstraps the
teacher while the others wait, the teacher outputs are split by process, the students train
data-parallel, and eval, release and the run's files are the main process's.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from distill.common.devices import resolve_device
from distill.common.errors import ConfigError, Interrupted
from distill.common.files import atomic_write_text, prepare_output_dir, resolve_cache_dir
from distill.common.tracking import Tracker, read_metrics
from distill.common.typed_config import as_dict
from distill.config import Config
from distill.data import drop_long_prompts, load_chat_dataset
from distill.distributed import Processes, processes
from distill.eval.harness import ModeResult
from distill.eval.speculative import DraftResult
from distill.eval.tasks.arithmetic import BUILTIN_SOURCE
from distill.parallel import check_available
from distill.plots import loss_curves
from distill.preflight import check_models, output_bytes, tokenizer_name
from distill.run_folder import check_run_folder, clear_if_asked
from distill.stages.evaluation import evaluate_drafts, evaluate_models, validation_problems
from distill.stages.release import release_student
from distill.stages.teacher import prepare_teacher, teacher_backend, teacher_source
from distill.stages.teacher_outputs import fill_teacher_outputs, offpolicy_examples, outputs_dir
from distill.stages.training import StudentData, build_student, onpolicy_prompts, train_students
from distill.students.tokenizer import load_tokenizer
from distill.teachers.cache import weights_fingerprint


@dataclass
class RunSummary:
    run_dir: Path
    results: dict[str, dict[str, ModeResult]] = field(default_factory=dict)
    drafts: dict[str, dict[str, DraftResult]] = field(default_factory=dict)   # student -> mode -> as a draft
    releases: dict[str, Path] = field(default_factory=dict)
    teacher_reused: bool = False
    teacher_outputs: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def run(cfg: Config, *, progress: bool = True) -> RunSummary:
    """The whole pipeline, as configured. Ctrl-C or SIGTERM stops it (worker processes included)
    with the step checkpoints written so far: the message says how to continue."""
    run_dir: list[Path] = []
    try:
        return _run(cfg, progress, run_dir)
    except KeyboardInterrupt:
        if not run_dir:
            raise Interrupted("nothing was written yet") from None
        raise Interrupted(f"continue this run from its last checkpoints with resume=true run_dir={run_dir[0]}") \
            from None


def _run(cfg: Config, progress: bool, made: list[Path]) -> RunSummary:
    started = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device, proc = start_processes(cfg)
    if proc.main:
        check_run_folder(cfg)
    tokenizer = load_tokenizer(tokenizer_name(cfg))
    check_models(cfg, tokenizer, device, shards=proc.world if cfg.parallel.strategy != "ddp" else 1, world=proc.world)
    # The data, and what the training stages will read of it, are checked before the run folder
    # exists: a bad dataset leaves nothing behind.
    cache_dir = prepare_output_dir(str(resolve_cache_dir(cfg.cache_dir)), key="cache_dir", default_parent="")
    dataset = load_chat_dataset(cfg.data, cache_dir)
    if cfg.data.source != BUILTIN_SOURCE:
        dataset = drop_long_prompts(dataset, tokenizer, cfg.data)
    stages = set(cfg.pipeline.stages)
    prompts = onpolicy_prompts(cfg, dataset["train"]) if "onpolicy" in stages else None
    validation = validation_problems(cfg, dataset.get("validation"))
    if proc.main:
        clear_if_asked(cfg)
    run_dir = prepare_output_dir(cfg.run_dir, key="run_dir", default_parent="runs", needed_bytes=output_bytes(cfg))
    made.append(run_dir)
    summary = RunSummary(run_dir=run_dir)
    # The main process keeps the run's log (and W&B); the others log nothing of their own.
    tracker = Tracker(run_dir, logger=cfg.logger, config=as_dict(cfg), wandb=cfg.wandb, run_name=run_dir.name) \
        if proc.main else Tracker(run_dir, metrics_file=None)
    with tracker, contextlib.ExitStack() as cleanup:  # cleanup: a vLLM server started for the run
        if proc.main:
            atomic_write_text(run_dir / "config.json", json.dumps(as_dict(cfg), indent=2))
            if cfg.resume:
                tracker.forget_run_records()

        with timed(summary, "teacher"), main_process_first(proc):
            teacher = prepare_teacher(cfg, tokenizer, dataset["train"], cache_dir, tracker, progress)
        if teacher.model is not None and getattr(teacher.model, "hf_device_map", None) is None:
            teacher.model.to(device)  # a quantized or device-mapped teacher stays where it was placed
        backend = teacher_backend(cfg, teacher, tokenizer, run_dir, progress, cleanup, proc)
        summary.teacher_reused = teacher.reused
        tracker.log({"teacher/reused_cache": int(teacher.reused), "perf/teacher_seconds": summary.seconds["teacher"]})

        if {"teacher_outputs", "offpolicy"} & stages:
            with timed(summary, "teacher_outputs"):
                folder = outputs_dir(cfg, run_dir)
                weights = weights_fingerprint(teacher.folder)
                if proc.world > 1:   # each process fills its share of the shards
                    fill_teacher_outputs(cfg, backend, dataset["train"], tracker, folder, progress, weights=weights,
                                         worker=proc.rank, workers=proc.world)
                    proc.barrier()
                summary.teacher_outputs = fill_teacher_outputs(cfg, backend, dataset["train"], tracker, folder,
                                                               progress, weights=weights)

        students: dict[str, PreTrainedModel] = {}
        if {"offpolicy", "onpolicy"} & stages:
            data = StudentData(
                examples=offpolicy_examples(cfg, tokenizer, summary.teacher_outputs, tracker)
                if "offpolicy" in stages else None,
                onpolicy_prompts=prompts, validation=validation)
            with timed(summary, "train_students"):
                students = {name: build_student(student_cfg, teacher.model, seed=cfg.seed + index).to(device)
                            for index, (name, student_cfg) in enumerate(cfg.students.items())}
                train_students(cfg, students, data, tokenizer, backend,
                               teacher_source(cfg, teacher, backend) if "onpolicy" in stages else None, tracker,
                               run_dir, progress, proc, workers=1 if proc.world > 1 else student_workers(cfg, device))

        if not proc.main:   # eval, release and the run's files are the main process's
            proc.barrier()
            return summary
        if "eval" in stages:
            with timed(summary, "eval"):
                # A teacher that lives only behind its server is evaluated by `python -m distill.eval` instead.
                models = {**({"teacher": teacher.model} if teacher.model is not None else {}), **students}
                summary.results = evaluate_models(cfg, models, tokenizer, dataset["test"], tracker, run_dir, progress)
                if teacher.model is not None and students and cfg.pipeline.eval.draft.problems:
                    summary.drafts = evaluate_drafts(cfg, teacher.model, students, tokenizer, dataset["test"], tracker,
                                                     run_dir, progress)
        if "release" in stages:
            for name, student in students.items():
                summary.releases[name] = release_student(cfg, name, student, tokenizer, teacher.name, summary.results,
                                                         run_dir, drafts=summary.drafts.get(name))
        write_run_files(run_dir, teacher.folder, summary.releases, tracker)
        summary.seconds["total"] = time.perf_counter() - started
        tracker.log({"perf/total_seconds": summary.seconds["total"]})
        proc.barrier()
    return summary


def start_processes(cfg: Config) -> tuple[torch.device, Processes]:
    """This process's device and place among the data-parallel processes, checked for the run."""
    device = resolve_device(cfg.device)
    proc = processes(device)
    check_available(cfg.parallel, proc)
    if proc.world == 1 and cfg.parallel.strategy != "ddp":
        print(f"warning: parallel={cfg.parallel.strategy} shards the student over several processes; this run has one, "
              "so it trains a whole replica (start several with accelerate launch)")
    if proc.world > 1 and not cfg.run_dir:
        raise ConfigError("a data-parallel run (accelerate launch / torchrun) needs run_dir=PATH, one folder for all "
                          "its processes")
    return device, proc


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


def write_run_files(run_dir: Path, teacher_folder: str | None, releases: dict[str, Path], tracker: Tracker) -> None:
    """`models.json` (which folders hold the run's models: `python -m distill.eval models=[RUN_DIR]`
    evaluates them all) and the loss curves."""
    # Absolute paths: the file is read from other working directories (python -m distill.eval).
    folders = {**({"teacher": _absolute(teacher_folder)} if teacher_folder else {}),
               **{name: str(Path(path).resolve()) for name, path in releases.items()}}
    atomic_write_text(run_dir / "models.json", json.dumps(folders, indent=1))
    curves = loss_curves(read_metrics(run_dir), run_dir / "loss_curves.png")
    if curves is not None:
        tracker.log_image("train/loss_curves", curves)


def _absolute(name_or_folder: str) -> str:
    """A local folder as an absolute path; a hub name as it is."""
    return str(Path(name_or_folder).resolve()) if Path(name_or_folder).exists() else name_or_folder


@contextlib.contextmanager
def timed(summary: RunSummary, stage: str):
    """Record the stage's wall time in the summary."""
    tick = time.perf_counter()
    yield
    summary.seconds[stage] = time.perf_counter() - tick


@contextlib.contextmanager
def main_process_first(proc: Processes):
    """The main process does the block first (trains and caches the teacher); the others then
    do it (and find it cached)."""
    if not proc.main:
        proc.barrier()
    yield
    if proc.main:
        proc.barrier()

