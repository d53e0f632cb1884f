"""`python -m distill.eval models=[PATH_OR_HUB_NAME,...] [task=NAME] [key=value ...] [-m] [--cfg job] [--help]`

Composes conf/eval.yaml with Hydra (tasks are registered from the files in eval/tasks/),
validates it, and evaluates every model in thinking and non-thinking modes side by side; with
`-m`, one eval per combination of the swept values (distill/common/cli.py). Any problem with the
input ends with one line on stderr and exit status 2. (From the repository's root folder,
`python -m eval` is the same command.)
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, replace

from distill.common import cli
from distill.conf import CONF_DIR
from distill.eval.config import EvalRunConfig, validate
from distill.eval.tasks import available, load_task

USAGE = """usage: python -m distill.eval models=[PATH_OR_HUB_NAME,...] [task=NAME] [KEY=VALUE ...] [-m] [--cfg job] [--help]

  python -m distill.eval models=[runs/20261128-120000]                  a run's teacher and students, built-in task
  python -m distill.eval models=[teacher:PATH,student:PATH] task=gsm8k   name models with NAME:PATH
  python -m distill.eval models=[PATH] task=aime task.samples=64         the report's AIME protocol
  python -m distill.eval models=[PATH] budgets=[0,16,32,64]              thinking-budget sweep
  python -m distill.eval models=[PATH] backend.kind=vllm                 generate with a vLLM server
  python -m distill.eval draft_for=runs/RUN models=[runs/RUN]           the students as speculative drafts for the teacher
  python -m distill.eval -m models=[PATH] task=arithmetic,gsm8k          a sweep: one eval per task

tasks: {tasks}
"""


def load_config(overrides: list[str]) -> EvalRunConfig:
    """The validated config of these overrides; raises ConfigError with a one-line message."""
    return validate(cli.compose(CONF_DIR, "eval", overrides, {"task": {name: {"name": name} for name in available()}}))


def show(config: EvalRunConfig) -> str:
    """The config with the task's own defaults filled in, so the printout is what will run."""
    from omegaconf import OmegaConf

    task = load_task(config.task.name)
    shown = asdict(config)
    shown["task"].update(source=asdict(config.task.resolved_source(task)),
                         samples=config.task.samples or task.samples,
                         max_new_tokens=config.task.max_new_tokens or task.max_new_tokens)
    return OmegaConf.to_yaml(shown)


def execute(config: EvalRunConfig) -> None:
    from distill.eval.harness import side_by_side
    from distill.eval.run import run, run_draft
    from distill.eval.speculative import draft_table

    if config.draft_for:
        drafts = run_draft(config)
        print(draft_table(drafts.results, drafts.target, config.draft.gamma))
        print(f"report: {drafts.paths['markdown']}")
        print(f"details: {drafts.paths['json']}")
        print(f"wall time: {drafts.seconds['total']:.0f}s")
        return

    summary = run(config)
    print(side_by_side(summary.results, config.baseline))
    print(f"report: {summary.paths['markdown']}")
    print(f"samples: {summary.paths['json']}")
    print("plots: " + ", ".join(str(p) for k, p in summary.paths.items() if k.endswith("png")))
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in summary.seconds.items()))


COMMAND = cli.Command(
    usage=lambda: USAGE.format(tasks=", ".join(available())), load=load_config, show=show,
    folder=lambda config: config.out_dir,
    place=lambda config, folder, group: replace(config, out_dir=folder, wandb=replace(config.wandb, group=group)),
    execute=execute, default_parent="evals")


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, COMMAND)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
