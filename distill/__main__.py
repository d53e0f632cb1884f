"""`python -m distill [GROUP=OPTION] [key=value ...] [-m] [--cfg job] [--help]`

Composes conf/ with Hydra (student presets and the default pair come from Python, so the size
table exists once), validates it into typed dataclasses, and runs the pipeline; with `-m`, one
run per combination of the swept values (distill/common/cli.py). Any problem with the input ends
with one line on stderr naming it and the fix, and exit status 2.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from distill.common import cli
from distill.conf import CONF_DIR
from distill.config import Config, hydra_nodes, printable, validate
from distill.students.presets import PRESETS

USAGE = """usage: python -m distill [GROUP=OPTION ...] [KEY=VALUE ...] [-m] [--cfg job] [--help]

  python -m distill                      the embedded default (tiny MoE teacher, tiny dense + MoE students)
  python -m distill +student=4b          one student of a released size (needs a GPU machine)
  python -m distill +student=0.6b student.steps=300 student.lr=1e-4    that student's own fields
  python -m distill -m loss=forward_kl,reverse_kl   a sweep: one run per value, one W&B group
  python -m distill --cfg job            print the validated config and exit

groups: student ({students}), teacher (embedded, transformers, vllm), data (arithmetic, messages),
        loss (forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd), pipeline (strong_to_weak),
        parallel (ddp, fsdp2, zero3)
"""


def load_config(overrides: list[str]) -> Config:
    """The validated config of these overrides; raises ConfigError with a one-line message."""
    return validate(cli.compose(CONF_DIR, "config", overrides, hydra_nodes()))


def show(config: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(printable(config))


def execute(config: Config) -> None:
    from distill.eval.harness import markdown_table, side_by_side
    from distill.pipeline import run

    summary = run(config)
    if summary.results:
        print(side_by_side(summary.results, "teacher"))
        print()
        print(markdown_table(summary.results))
    print(f"run directory: {summary.run_dir}")
    if summary.teacher_outputs:
        print(f"teacher outputs: {summary.teacher_outputs}")
    for name, path in summary.releases.items():
        print(f"release {name}: {path}")
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in summary.seconds.items()))


COMMAND = cli.Command(
    usage=lambda: USAGE.format(students=", ".join(PRESETS)), load=load_config, show=show,
    folder=lambda config: config.run_dir,
    place=lambda config, folder, group: replace(config, run_dir=folder, wandb=replace(config.wandb, group=group)),
    execute=execute, default_parent="runs")


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, COMMAND)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
