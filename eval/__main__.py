"""`python -m eval models=[PATH_OR_HUB_NAME,...] [task=NAME] [key=value ...] [--cfg job] [--help]`

Composes conf/eval.yaml with Hydra (tasks are registered from the files in eval/tasks/),
validates it, and evaluates every model in thinking and non-thinking modes side by side. Any
problem with the input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys

from distill.errors import UserError

USAGE = """usage: python -m eval models=[PATH_OR_HUB_NAME,...] [task=NAME] [KEY=VALUE ...] [--cfg job] [--help]

  python -m eval models=[runs/20261128-120000]                  a run's teacher and students, built-in task
  python -m eval models=[teacher:PATH,student:PATH] task=gsm8k   name models with NAME:PATH
  python -m eval models=[PATH] task=aime task.samples=64         the report's AIME protocol
  python -m eval models=[PATH] budgets=[0,16,32,64]              thinking-budget sweep
  python -m eval models=[PATH] backend.kind=vllm                 generate with a vLLM server

tasks: {tasks}
"""


def load_config(overrides: list[str]):
    """(typed EvalRunConfig, composed plain dict); raises ConfigError with a one-line message."""
    from conf import compose
    from eval.config import validate
    from eval.tasks import available

    composed = compose("eval", overrides, {"task": {name: {"name": name} for name in available()}})
    return validate(composed), composed


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        from eval.tasks import available

        print(USAGE.format(tasks=", ".join(available())))
        return 0
    show = "--cfg" in args
    if show:
        at = args.index("--cfg")
        del args[at:at + 2]
    try:
        config, _ = load_config(args)
        if show:
            from dataclasses import asdict

            from omegaconf import OmegaConf

            from eval.tasks import load_task

            # The task's own defaults filled in, so the printed config is what will run.
            task = load_task(config.task.name)
            shown = asdict(config)
            shown["task"].update(source=asdict(config.task.resolved_source(task)),
                                 samples=config.task.samples or task.samples,
                                 max_new_tokens=config.task.max_new_tokens or task.max_new_tokens)
            print(OmegaConf.to_yaml(shown), end="")
            return 0
        from eval.run import run

        summary = run(config)
    except (UserError, MemoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    from eval.harness import side_by_side

    print(side_by_side(summary.results, config.baseline))
    print(f"report: {summary.paths['markdown']}")
    print(f"samples: {summary.paths['json']}")
    print("plots: " + ", ".join(str(p) for k, p in summary.paths.items() if k.endswith("png")))
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in summary.seconds.items()))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
