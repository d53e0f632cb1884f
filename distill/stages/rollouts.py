"""The on-policy stage's rollout engine for one student: none (the student samples in process),
or a vLLM server on the student's weights (students/rollout_engine.py), started by the main
process when the stage starts, shared with the other data-parallel processes by its URL, and
stopped when the stage ends, however it ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.common.errors import ConfigError
from distill.config import Config
from distill.distributed import Processes
from distill.students.rollout_engine import VLLMRollouts, check_servable, weights_folder


def start_rollout_engine(cfg: Config, name: str, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                         run_dir: Path, proc: Processes, cleanup: contextlib.ExitStack,
                         full_weights=contextlib.nullcontext, device: str = "cpu") -> VLLMRollouts | None:
    """The engine `name`'s rollouts come from (None: in process), stopped when `cleanup` closes.
    `full_weights(student)` gives a model with the whole weights (a sharded engine gathers them,
    on every rank); `device` is the trainer's ("cpu", "cuda")."""
    rollout = cfg.rollout
    if rollout.engine == "in_process":
        return None
    check_servable(student.config, device)   # checked before the run (distill/preflight.py); here for direct callers
    settings = dict(dtype=rollout.dtype, max_model_len=rollout.max_model_len or cfg.data.max_length,
                    log_path=run_dir / f"vllm_rollouts_{name.replace('/', '_')}.log",
                    startup_timeout=rollout.startup_timeout, extra_args=rollout.vllm_args)
    if not proc.main:
        with full_weights(student):   # the main rank's gather needs every rank
            pass
        return VLLMRollouts(student, tokenizer, run_dir, url=proc.share(None), **settings).start()
    folder = weights_folder(run_dir, name)
    cleanup.callback(shutil.rmtree, folder, True)
    cores = split_cores(rollout.engine_cores, cleanup) if device == "cpu" else None
    engine = VLLMRollouts(student, tokenizer, folder, cpus=cores, **settings)
    cleanup.callback(engine.stop)
    with full_weights(student) as whole:
        engine.start(whole)
    proc.share(engine.url)
    return engine


def split_cores(engine_cores: list[int], cleanup: contextlib.ExitStack) -> set[int] | None:
    """The engine's cores, taken from this process (and its torch threads) for the stage; given
    back when `cleanup` closes. None: no split (both use every core)."""
    if not engine_cores:
        return None
    mine = os.sched_getaffinity(0)
    wanted = set(engine_cores)
    if not wanted < mine:
        raise ConfigError(f"rollout.engine_cores={sorted(wanted)} must be some, not all, of this process's cores "
                          f"{sorted(mine)}")
    threads = torch.get_num_threads()
    os.sched_setaffinity(0, mine - wanted)
    torch.set_num_threads(min(threads, len(mine - wanted)))
    cleanup.callback(torch.set_num_threads, threads)
    cleanup.callback(os.sched_setaffinity, 0, mine)
    return wanted
