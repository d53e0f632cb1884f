"""The CPU cores shared by the trainer and its rollout engine (distill/stages/rollouts.py,
CoreSplit): the trainer keeps off the engine's cores while the engine works and, lending on,
takes them back whenever it idles, switching before a decoder layer's forward or backward."""

import contextlib
import os
import threading

import pytest
import torch

from conftest import scaled_model
from distill.common.errors import ConfigError
from distill.stages.rollouts import CoreSplit

CORES = sorted(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(CORES) < 2, reason="a core split needs two cores")


class Engine:
    working = False
    idle_since = float("-inf")   # idle for ever


def _seen_per_layer(model, seen):
    """Record the trainer thread's cores and torch threads at each layer's forward and backward
    (after CoreSplit's own hooks, which were registered first)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    def record(where):
        seen.append((where, os.sched_getaffinity(0), torch.get_num_threads()))

    def on_output(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.register_hook(lambda grad: record("backward"))

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.register_forward_pre_hook(lambda *_: record("forward"))
            module.register_forward_hook(on_output)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@needs_two
def test_the_trainer_takes_the_engines_cores_only_while_the_engine_idles(two_threads):
    model, engine = scaled_model("tiny", 0), Engine()
    everything, trainer = set(CORES), set(CORES) - {CORES[-1]}
    ids = torch.randint(0, 200, (2, 12))
    with contextlib.ExitStack() as cleanup:
        split = CoreSplit([CORES[-1]], cleanup)
        split.serve(engine)
        split.attach(model)
        assert os.sched_getaffinity(0) == trainer and torch.get_num_threads() == 1   # pinned from the start
        seen = []
        _seen_per_layer(model, seen)

        engine.working = False     # idle: every core, both threads, forward and backward
        model(input_ids=ids).logits.sum().backward()
        assert seen and all(cores == everything and threads == 2 for _, cores, threads in seen)

        # The engine starts sampling between the forward and the backward: the first layer
        # the backward reaches gives the engine its core back.
        seen.clear()
        loss = model(input_ids=ids).logits.sum()
        engine.working = True
        loss.backward()
        forward = [s for s in seen if s[0] == "forward"]
        backward = [s for s in seen if s[0] == "backward"]
        assert all(cores == everything and threads == 2 for _, cores, threads in forward)
        assert backward and all(cores == trainer and threads == 1 for _, cores, threads in backward)

        # Every thread of the process follows (torch's workers keep the affinity they started with).
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                assert os.sched_getaffinity(int(task)) == trainer
    # Given back when the stage ends.
    assert os.sched_getaffinity(0) == everything and torch.get_num_threads() == 2
    model(input_ids=ids)   # its hooks are gone: no settling after the stage
    assert len(seen) == len(forward) + len(backward) + len(model.model.layers)


@needs_two
def test_without_lending_the_trainer_stays_off_the_engines_cores(two_threads):
    model, engine = scaled_model("tiny", 0), Engine()
    with contextlib.ExitStack() as cleanup:
        split = CoreSplit([CORES[-1]], cleanup, lend=False)
        split.serve(engine)
        split.attach(model)
        seen = []
        _seen_per_layer(model, seen)
        model(input_ids=torch.randint(0, 200, (2, 8))).logits.sum().backward()
        assert seen and all(cores == set(CORES[:-1]) and threads == 1 for _, cores, threads in seen)


@needs_two
def test_only_the_trainers_thread_switches(two_threads):
    """A layer run on another thread (never the trainer's) leaves the split as it is."""
    model, engine = scaled_model("tiny", 0), Engine()
    with contextlib.ExitStack() as cleanup:
        split = CoreSplit([CORES[-1]], cleanup)
        split.serve(engine)
        split.attach(model)
        other = threading.Thread(target=lambda: model(input_ids=torch.randint(0, 200, (1, 4))))
        other.start()
        other.join()
        assert not split.lent and os.sched_getaffinity(0) == set(CORES[:-1])


def test_engine_cores_must_leave_the_trainer_some():
    with contextlib.ExitStack() as cleanup, pytest.raises(ConfigError, match="must be some, not all"):
        CoreSplit(CORES, cleanup)


@needs_two
def test_a_thread_asking_the_engine_for_work_leaves_its_cores_at_once(two_threads):
    """The engine calls `engine_starts` as it starts working: the asking thread is pinned to the
    trainer's cores then (its client threads inherit them); on the trainer's own thread the
    whole split settles without waiting for a layer."""
    engine = Engine()
    with contextlib.ExitStack() as cleanup:
        split = CoreSplit([CORES[-1]], cleanup)
        split.serve(engine)
        assert engine.on_busy == split.engine_starts
        split.settle()                 # idle: lent
        assert split.lent and os.sched_getaffinity(0) == set(CORES)
        seen = {}

        def ask():
            engine.working = True
            engine.on_busy()
            seen["asker"] = os.sched_getaffinity(0)
            child = threading.Thread(target=lambda: seen.setdefault("child", os.sched_getaffinity(0)))
            child.start()
            child.join()

        other = threading.Thread(target=ask)
        other.start()
        other.join()
        assert seen == {"asker": set(CORES[:-1]), "child": set(CORES[:-1])}
        assert split.lent and torch.get_num_threads() == 2    # the trainer's thread settles at its next layer
        engine.on_busy()               # asked on the trainer's thread: settled now
        assert not split.lent and os.sched_getaffinity(0) == set(CORES[:-1]) and torch.get_num_threads() == 1
    # The stage is over: an engine that outlives it no longer moves this process.
    assert engine.on_busy is None and os.sched_getaffinity(0) == set(CORES)


@needs_two
def test_the_cores_are_lent_only_once_the_engine_has_idled_a_moment(two_threads):
    import time

    engine = Engine()
    with contextlib.ExitStack() as cleanup:
        split = CoreSplit([CORES[-1]], cleanup, grace=0.2)
        split.serve(engine)
        engine.idle_since = time.monotonic()      # it just answered its last request
        split.settle()
        assert not split.lent and os.sched_getaffinity(0) == set(CORES[:-1])
        time.sleep(0.25)
        split.settle()
        assert split.lent and os.sched_getaffinity(0) == set(CORES) and torch.get_num_threads() == 2
