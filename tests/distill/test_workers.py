"""Worker processes share the cores out again as jobs end, and the first failure stops them all."""

import time

import pytest
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


def _fail_or_wait(fail: bool) -> str:
    if fail:
        raise ValueError("job failed")
    time.sleep(120)   # a peer that would wait for the failed job (a collective) for a long time
    return "finished"


def test_a_failed_job_stops_the_others_at_once():
    started = time.monotonic()
    with pytest.raises(ValueError, match="job failed"):
        # The waiting job is first: its result alone would keep the caller for two minutes.
        workers.run_in_processes(_fail_or_wait, {"waits": (False,), "fails": (True,)}, processes=2)
    assert time.monotonic() - started < 60
