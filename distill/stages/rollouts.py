"""The on-policy stage's rollout engine for one student: none (the student samples in process),
or a vLLM server on the student's weights (students/rollout_engine.py), started by the main
process when the stage starts, shared with the other data-parallel processes by its URL, and
stopped when the stage ends, however it ends; and on a CPU, how the trainer and the engine share
the cores (CoreSplit).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_layers import GradientCheckpointingLayer

from distill.common.errors import ConfigError
from distill.config import Config
from distill.distributed import Processes
from distill.students.rollout_engine import VLLMRollouts, check_servable, weights_folder


def start_rollout_engine(cfg: Config, name: str, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                         run_dir: Path, proc: Processes, cleanup: contextlib.ExitStack,
                         full_weights=contextlib.nullcontext, device: str = "cpu",
                         teacher_model=None) -> VLLMRollouts | None:
    """The engine `name`'s rollouts come from (None: in process), stopped when `cleanup` closes.
    `full_weights(student)` gives a model with the whole weights (a sharded engine gathers them,
    on every rank); `device` is the trainer's ("cpu", "cuda"); `teacher_model`, an in-process
    teacher's model (anything else: none), which shares the trainer's cores with the student."""
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
    cores = CoreSplit(rollout.engine_cores, cleanup, lend=rollout.lend_cores) \
        if device == "cpu" and rollout.engine_cores else None
    engine = VLLMRollouts(student, tokenizer, folder, cpus=cores.engine_cores if cores else None, **settings)
    cleanup.callback(engine.stop)
    if cores is not None:
        cores.serve(engine)
        for model in (student, teacher_model):
            if isinstance(model, torch.nn.Module):
                cores.attach(model)
    with full_weights(student) as whole:
        engine.start(whole)
    proc.share(engine.url)
    return engine


class CoreSplit:
    """The CPU cores of the trainer and of its rollout engine, for the stage.

    The engine's server processes are bound to `engine_cores`; the trainer's threads run on the
    others while the engine works (sampling, loading weights). With `lend`, the engine's cores
    go back to the trainer whenever it has nothing to do: in step (no `async`) the trainer
    trains while the engine idles, and async the engine often finishes its batch before the
    trainer finishes its step. The switch happens on the trainer's own thread, where torch's
    thread count lives: before each decoder layer's forward and backward of the models passed
    to `attach` (`settle`), so the trainer never runs threads on cores the engine is using for
    longer than one layer. Everything is given back when `cleanup` closes.

    Measured on 2 cores (bench/README.md, "On-policy rollouts"): a 43M student's in-step stage
    1.2x faster lent; async, where the engine is the slower side, no change; a 0.8M student's
    steps slower (its many short parallel regions wait on the server waking on the shared core),
    a size the engine does not pay at anyway.
    """

    def __init__(self, engine_cores: list[int], cleanup: contextlib.ExitStack, *, lend: bool = True,
                 grace: float = 0.1):
        mine = os.sched_getaffinity(0)
        wanted = set(engine_cores)
        if not wanted < mine:
            raise ConfigError(f"rollout.engine_cores={sorted(wanted)} must be some, not all, of this process's "
                              f"cores {sorted(mine)}")
        self.engine_cores, self.all_cores, self.trainer_cores = wanted, mine, mine - wanted
        self.lend, self.engine, self.cleanup, self.grace = lend, None, cleanup, grace
        self.owner = threading.get_ident()
        threads = torch.get_num_threads()
        self.threads = {False: min(threads, len(self.trainer_cores)), True: min(threads, len(mine))}
        self.lent = False
        self._pin(self.trainer_cores, self.threads[False])
        cleanup.callback(self._pin, mine, threads)
        self.hooks: list = []
        cleanup.callback(lambda: [hook.remove() for hook in self.hooks])

    def serve(self, engine) -> None:
        """Lend to the trainer while `engine` (with a `working` count) has nothing to do; the
        engine calls `engine_starts` as it starts working."""
        self.engine = engine
        engine.on_busy = self.engine_starts
        self.cleanup.callback(self._stop_serving)

    def _stop_serving(self) -> None:
        # An engine that outlives the stage (a bench reuses one) no longer moves this process.
        self.engine.on_busy = None
        self.engine = None

    def engine_starts(self) -> None:
        """On the thread that asks the engine for work, as it does: that thread (and the client
        threads it starts, which inherit its cores) leaves the engine's cores at once: woken by
        the server's replies, they would otherwise be run on the server's core. On the trainer's
        thread the whole split settles; elsewhere its torch threads settle at their next layer."""
        if threading.get_ident() == self.owner:
            self.settle()
        else:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, self.trainer_cores)

    def attach(self, model: torch.nn.Module) -> None:
        """Settle before every decoder layer's forward and backward of `model`."""
        if not self.lend:
            return
        for module in model.modules():
            if isinstance(module, GradientCheckpointingLayer):
                self.hooks.append(module.register_forward_pre_hook(lambda *_: self.settle()))
                self.hooks.append(module.register_forward_hook(self._settle_in_backward))

    def settle(self) -> None:
        """On the trainer's thread: every core while the engine idles, the trainer's own while it
        works."""
        if self.engine is None or threading.get_ident() != self.owner:
            return
        # Lent only once the engine has been idle a moment: a server finishes its requests'
        # bookkeeping on its core after the last reply, and threads of ours there would wait on it.
        idle = self.lend and not self.engine.working and time.monotonic() - self.engine.idle_since >= self.grace
        if idle != self.lent:
            self.lent = idle
            self._pin(self.all_cores if idle else self.trainer_cores, self.threads[idle])

    def _settle_in_backward(self, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(lambda grad: self.settle())

    @staticmethod
    def _pin(cores: set[int], threads: int) -> None:
        # Every thread of this process: torch's worker threads keep the affinity they were
        # created with, and may have been created while the trainer was pinned.
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task), cores)
        torch.set_num_threads(threads)
