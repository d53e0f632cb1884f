"""What switching the trainer between its own cores and every core costs (CoreSplit's switch,
distill/stages/rollouts.py): a tiny student's forward and backward with and without a switch of
torch's thread count and every thread's affinity to one core and back before each step.

    python bench/core_switch.py

Needs two cores. Prints milliseconds per step either way, three times, alternated.
"""

from __future__ import annotations

import os
import time

import torch

from distill.students.build import build_random
from distill.students.presets import PRESETS

SLEEP = 0.01   # with one core, as while the engine samples; subtracted from the timing


def pin(cores: set[int], threads: int) -> None:
    for task in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(task), cores)
    torch.set_num_threads(threads)


def main() -> None:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("bench/core_switch.py needs two cores")
    # bench/rollouts.py's smallest student (128x4, 0.82M parameters)
    model = build_random(PRESETS["tiny"].override(hidden_size=128, num_hidden_layers=4, intermediate_size=384,
                                                  head_dim=32, num_attention_heads=4, num_key_value_heads=2), seed=0)
    ids = torch.randint(0, 200, (8, 300), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids).logits.sum().backward()

    def seconds_per_step(switch: bool, steps: int = 30) -> float:
        pin(set(cores), 2)
        step()
        started = time.perf_counter()
        for _ in range(steps):
            if switch:
                pin({cores[0]}, 1)
                time.sleep(SLEEP)
                pin(set(cores), 2)
            step()
        return (time.perf_counter() - started) / steps - (SLEEP if switch else 0.0)

    for _ in range(3):
        plain, switched = seconds_per_step(False), seconds_per_step(True)
        print(f"no switch {plain * 1e3:.1f} ms/step, switch {switched * 1e3:.1f} ms/step")


if __name__ == "__main__":
    main()
