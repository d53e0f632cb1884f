"""Worker processes share the cores out again as jobs end."""

import time

import torch

from distill import workers


def _threads_seen(outlive_the_others: bool) -> int:
    """A job's thread count after `share_cores`: at once, or once it is the last job running."""
    if outlive_the_others:
        deadline = time.monotonic() + 60
        while workers._running.value > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    workers.share_cores()
    return torch.get_num_threads()


def test_the_last_running_job_takes_every_core():
    seen = workers.run_in_processes(_threads_seen, {"short": (False,), "long": (True,)}, processes=2, cores=2)
    assert seen == {"short": 1, "long": 2}


def test_without_sharing_threads_stay_as_set():
    before = torch.get_num_threads()
    workers.share_cores()   # the main process: nothing to share
    assert torch.get_num_threads() == before
