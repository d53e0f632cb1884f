"""The students' training stages: for each student, off-policy distillation on the teacher's
cached outputs, a checkpoint (the student, loadable on its own), then on-policy distillation on
its own samples scored by the teacher; the Qwen3 report's two stages, each student in turn or
each in a worker process of its own (CPU).

Each finished stage leaves the student in `<run_dir>/checkpoints/<stage>/<name>/`
(save_pretrained); with `resume`, a finished stage is loaded from there instead of trained, and
an unfinished one continues from its newest step checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from distill.checkpoint import StepCheckpoints
from distill.common.errors import ConfigError
from distill.common.tracking import Tracker
from distill.config import Config, StudentConfig
from distill.data import Example, ModeAlternatingBatches
from distill.distributed import Processes
from distill.eval.tasks import Problem
from distill.onpolicy import OnPolicyBatches
from distill.parallel import Engine, make_engine
from distill.stages.evaluation import periodic_eval
from distill.stages.release import CHECKSUMS, save_model_folder
from distill.stages.rollouts import start_rollout_engine
from distill.stages.teacher import TeacherSource, connect
from distill.students.build import build_random, checkpoint_activations, init_from_teacher, load_pretrained
from distill.students.chat import prompt_messages
from distill.train import DataParallel, Schedule, distillation_objective, fit
from distill.workers import run_in_processes


@dataclass
class StudentData:
    """What the students' training stages read: the teacher's cached off-policy samples, the
    on-policy stage's own prompts, and validation problems for periodic eval (None: not used)."""

    examples: dict[str, list[Example]] | None = None
    onpolicy_prompts: list[list[dict]] | None = None
    validation: list[Problem] | None = None


def build_student(student: StudentConfig, teacher: PreTrainedModel | None, *, seed: int) -> PreTrainedModel:
    """A student as configured: a pretrained checkpoint, random init, or the teacher's blocks."""
    if student.init == "pretrained":
        return load_pretrained(student.pretrained)
    model = build_random(student.architecture, seed=seed)
    if student.init == "teacher":
        init_from_teacher(model, teacher, layers=student.teacher_layers, experts=student.teacher_experts)
    return model


def onpolicy_prompts(cfg: Config, train_split: datasets.Dataset) -> list[list[dict]]:
    """The on-policy stage's prompts: training rows after the off-policy stage's, so each stage
    has its own data."""
    start = cfg.pipeline.offpolicy.prompts if "offpolicy" in cfg.pipeline.stages else 0
    stop = min(start + cfg.pipeline.onpolicy.prompts, len(train_split))
    if stop <= start:
        raise ConfigError(f"no training prompts left for the on-policy stage: the train split has {len(train_split)} "
                          f"rows and the off-policy stage takes {start}; lower pipeline.offpolicy.prompts or add data")
    return [prompt_messages(m) for m in train_split.select(range(start, stop))["messages"]]


def train_students(cfg: Config, students: dict[str, PreTrainedModel], data: StudentData,
                   tokenizer: PreTrainedTokenizerBase, teacher, source: TeacherSource | None, tracker: Tracker,
                   run_dir: Path, progress: bool, proc: Processes, workers: int) -> None:
    """Train every student through its stages, in place: one after the other in this process, or
    each in a worker process (the weights come back into the same model objects and the
    metrics into this run's log). `teacher` scores on-policy rollouts here; a worker reaches it
    through `source`."""
    if workers <= 1:
        for name, student in students.items():
            train_student(cfg, name, student, data, tokenizer, lambda: teacher, tracker, run_dir, progress, proc=proc)
        return
    cores = cfg.threads or os.cpu_count() or 1
    threads = max(1, cores // workers)
    # Tensors sent to a process each hold a shared-memory file descriptor; thousands of small
    # top-k tensors exhaust the limit, so examples travel as numpy arrays (copied by pickle).
    packed = None if data.examples is None else {
        mode: [(e.prompt, e.response, e.topk_ids.numpy(), e.topk_logprobs.numpy()) for e in items]
        for mode, items in data.examples.items()}
    light = StudentData(examples=None, onpolicy_prompts=data.onpolicy_prompts, validation=data.validation)
    # The model travels as config + weights and is rebuilt there: a pickled transformers model
    # loses the hooks that collect MoE router logits.
    jobs = {name: (cfg, name, student.config, student.state_dict(), packed, light, tokenizer, str(run_dir), threads,
                   position, progress, source)
            for position, (name, student) in enumerate(students.items())}
    results = run_in_processes(_train_in_worker, jobs, workers, cores=cores)
    for name, student in students.items():
        state, records = results[name]
        student.load_state_dict(state)
        student.eval()
        tracker.replay(records)


def _train_in_worker(cfg: Config, name: str, config, state: dict, packed, data: StudentData, tokenizer,
                     run_dir: str, threads: int, position: int, progress: bool, source: TeacherSource | None):
    """A worker process's job: rebuild the student, train it, return its weights and records."""
    torch.set_num_threads(threads)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    student.load_state_dict(state)
    if packed is not None:
        data.examples = {mode: [Example(p, r, torch.from_numpy(i), torch.from_numpy(v)) for p, r, i, v in items]
                         for mode, items in packed.items()}
    # The worker writes its records to the run's log as it goes (nothing is lost if the run is
    # killed); they also come back with the weights, for the main process's W&B run.
    records = train_student(cfg, name, student, data, tokenizer, lambda: connect(cfg, source, tokenizer),
                            Tracker(Path(run_dir)), run_dir=Path(run_dir), progress=progress, position=position)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}, records


def train_student(cfg: Config, name: str, student: PreTrainedModel, data: StudentData, tokenizer,
                  make_teacher: Callable, tracker: Tracker, run_dir: Path, progress: bool, position: int = 0,
                  proc: Processes = Processes()) -> list[dict]:
    """The student's training stages in order: off-policy, a checkpoint, on-policy. Returns the
    logged records. `make_teacher()` gives the teacher that scores on-policy rollouts."""
    records = []
    if cfg.students[name].activation_checkpointing:
        checkpoint_activations(student)
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
            records += fit_offpolicy(cfg, name, student, data.examples, tokenizer, tracker, progress, position,
                                     data.validation, steps, proc)
        else:
            records += fit_onpolicy(cfg, name, student, data, tokenizer, make_teacher(), tracker, progress, position,
                                    steps, proc, run_dir=run_dir)
        if not proc.in_sync(student):
            raise RuntimeError(f"{name}: the processes' parameters differ after the {stage} stage")
        if proc.world > 1:
            tracker.log({f"train/{name}/ranks_in_sync": 1, f"train/{name}/ranks": proc.world})
        # The stage boundary of the recipe: the student, loadable on its own.
        if proc.main:
            save_model_folder(finished, student, tokenizer)
    return records


def fit_offpolicy(cfg: Config, name: str, student: PreTrainedModel, examples: dict[str, list[Example]], tokenizer,
                  tracker: Tracker, progress: bool, position: int = 0, validation: list[Problem] | None = None,
                  checkpoints: StepCheckpoints | None = None, proc: Processes = Processes()) -> list[dict]:
    """Off-policy distillation: the divergence from the teacher's top-k on its own samples."""
    stage, student_cfg = cfg.pipeline.offpolicy, cfg.students[name]
    schedule = Schedule(steps=stage.steps if student_cfg.steps is None else student_cfg.steps,
                        lr=stage.lr if student_cfg.lr is None else student_cfg.lr,
                        warmup_steps=stage.warmup_steps, weight_decay=stage.weight_decay,
                        max_grad_norm=stage.max_grad_norm)
    batches = ModeAlternatingBatches(examples, stage.batch_size, tokenizer.pad_token_id, cfg.data.max_length,
                                     micro_batches=stage.grad_accum, seed=stage.seed, rank=proc.rank, world=proc.world,
                                     pack=cfg.data.pack)
    objective = distillation_objective(cfg.loss, len(tokenizer))
    return fit(student, batches, objective, schedule, tracker=tracker,
               prefix=f"train/{name}", desc=f"distill {name}", progress=progress, position=position,
               periodic=_periodic(cfg, name, tokenizer, validation), checkpoints=checkpoints, resume=cfg.resume,
               data_parallel=_data_parallel(proc), engine=_engine(cfg, student, objective, schedule, stage, proc))


def fit_onpolicy(cfg: Config, name: str, student: PreTrainedModel, data: StudentData, tokenizer, teacher,
                 tracker: Tracker, progress: bool, position: int = 0,
                 checkpoints: StepCheckpoints | None = None, proc: Processes = Processes(),
                 run_dir: Path | None = None) -> list[dict]:
    """On-policy distillation: the student samples (in process, or on the rollout engine of
    `cfg.rollout`), the teacher scores those tokens, the student minimises the divergence on
    them (GKD's lambda mixes in cached teacher samples)."""
    stage = cfg.pipeline.onpolicy
    schedule = Schedule(steps=stage.steps, lr=stage.lr, warmup_steps=stage.warmup_steps,
                        weight_decay=stage.weight_decay, max_grad_norm=stage.max_grad_norm)
    offpolicy = None
    if data.examples is not None and (stage.mix < 1 or (stage.mix_end is not None and stage.mix_end < 1)):
        offpolicy = ModeAlternatingBatches(data.examples, stage.batch_size, tokenizer.pad_token_id,
                                           cfg.data.max_length, micro_batches=stage.grad_accum, seed=stage.seed + 1,
                                           rank=proc.rank, world=proc.world, pack=cfg.data.pack)
    objective = distillation_objective(stage.loss, len(tokenizer), estimator=stage.estimator,
                                       is_cap=cfg.rollout.is_cap)
    engine = _engine(cfg, student, objective, schedule, stage, proc)
    with contextlib.ExitStack() as cleanup:
        rollouts = start_rollout_engine(cfg, name, student, tokenizer, run_dir or Path(cfg.run_dir or "."), proc,
                                        cleanup, full_weights=engine.full_weights_in, device=engine.device.type,
                                        teacher_model=getattr(teacher, "model", None))
        # Rollouts come from the student object itself, or from its weights synced into the
        # engine: a sharding engine gathers the current weights into it for either.
        batches = OnPolicyBatches(student, teacher, tokenizer, data.onpolicy_prompts, stage, steps=stage.steps,
                                  max_length=cfg.data.max_length, offpolicy=offpolicy, seed=stage.seed,
                                  rank=proc.rank, world=proc.world, policy_weights=engine.full_weights_in,
                                  pack=cfg.data.pack, engine=rollouts, rollout=cfg.rollout, barrier=proc.barrier)
        cleanup.callback(batches.close)
        return fit(student, batches, objective, schedule, tracker=tracker, prefix=f"train/{name}/onpolicy",
                   desc=f"on-policy {name}", progress=progress, position=position,
                   periodic=_periodic(cfg, f"{name}/onpolicy", tokenizer, data.validation),
                   checkpoints=checkpoints, resume=cfg.resume, data_parallel=_data_parallel(proc), engine=engine)


def _data_parallel(proc: Processes) -> DataParallel:
    return DataParallel(world_size=proc.world, total=proc.total)


def _engine(cfg: Config, student: PreTrainedModel, objective, schedule: Schedule, stage, proc: Processes) -> Engine:
    """How this stage's processes hold the student (`parallel=`), one optimizer step = the
    stage's `grad_accum` micro-batches."""
    return make_engine(student, objective, lr=schedule.lr, weight_decay=schedule.weight_decay,
                       max_grad_norm=schedule.max_grad_norm, micro_batches=stage.grad_accum, proc=proc,
                       cfg=cfg.parallel)


def _periodic(cfg: Config, name: str, tokenizer, validation: list[Problem] | None):
    if not (cfg.pipeline.eval.every and validation):
        return None
    return cfg.pipeline.eval.every, periodic_eval(cfg, name, tokenizer, validation)
