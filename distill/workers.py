"""Worker processes for independent jobs of one run (the students, each trained in a process of
its own on a multi-core CPU, where tiny models use cores far better that way than with more
threads per process).

Processes are spawned, not forked: a forked child would inherit this process's torch thread
pools and locks. A job's function and arguments travel by pickle, so the function must be a
module-level one.

The cores are shared out again as jobs end: every worker sees how many jobs are still running
(one shared counter, queued jobs included) and, between training steps, takes
`cores // unfinished jobs` threads (`share_cores`), so the student that trains longest finishes
on every core the others left.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any

import torch

# In a worker: the shared count of jobs still running, and the cores they share.
_running = None
_cores = 0


def run_in_processes(function: Callable, jobs: dict[str, tuple], processes: int, cores: int = 0) -> dict[str, Any]:
    """{name: function(*arguments)} for every job {name: arguments}, `processes` at a time;
    `cores` (0: do not share) are shared out among the running jobs (`share_cores`).

    The first job to fail stops the others at once (the run fails with it; they would otherwise
    train on to the end first) and its error is raised here. The workers end with this
    process: an interrupt here (Ctrl-C, SIGTERM) stops them before it propagates, and a worker
    whose parent is gone (killed, even by SIGKILL) exits by itself."""
    context = multiprocessing.get_context("spawn")
    running = context.Value("i", len(jobs))
    pool = ProcessPoolExecutor(max_workers=processes, mp_context=context, initializer=_start_worker,
                               initargs=(running, cores, os.getpid()))
    try:
        futures = {name: pool.submit(_run_job, function, arguments) for name, arguments in jobs.items()}
        done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
        for future in done:
            if future.exception() is not None:
                future.result()   # raises it; the others are stopped below
        return {name: future.result() for name, future in futures.items()}
    except BaseException:
        for process in list(pool._processes.values()):   # noqa: SLF001 - no public way to stop running jobs
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def share_cores() -> None:
    """In a worker, take this job's share of the cores: `cores // jobs still running` threads.
    Elsewhere (the main process, or sharing off) nothing changes."""
    if _running is None or not _cores:
        return
    threads = max(1, _cores // max(1, _running.value))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def _start_worker(running, cores: int, parent: int) -> None:
    global _running, _cores
    _running, _cores = running, cores
    # Ctrl-C reaches the whole process group: the parent decides what happens to the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent(parent)


def exit_with_parent(parent: int | None = None) -> None:
    """Start a watchdog thread: once this process's parent (`parent`, default the current one)
    is gone and the process re-parented, it exits at once rather than train on and write into a
    run nobody follows (a student worker; a data-parallel rank whose launcher was killed)."""
    parent = parent or os.getppid()
    if os.getppid() != parent:   # already gone
        os._exit(1)
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True, name="parent-watch").start()


def _exit_when_orphaned(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _run_job(function: Callable, arguments: tuple):
    try:
        return function(*arguments)
    finally:
        with _running.get_lock():
            _running.value -= 1
