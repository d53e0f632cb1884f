"""Worker processes for independent jobs of one run (the students, each trained in a process of
its own on a multi-core CPU, where tiny models use cores far better that way than with more
threads per process).

Processes are spawned, not forked: a forked child would inherit this process's torch thread
pools and locks. A job's function and arguments travel by pickle, so the function must be a
module-level one.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def run_in_processes(function: Callable, jobs: dict[str, tuple], processes: int) -> dict[str, Any]:
    """{name: function(*arguments)} for every job {name: arguments}, `processes` at a time."""
    with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(function, *arguments) for name, arguments in jobs.items()}
        return {name: future.result() for name, future in futures.items()}
