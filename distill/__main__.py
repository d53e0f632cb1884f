"""`python -m distill [GROUP=OPTION] [key=value ...] [--cfg job] [--help]`

Composes conf/ with Hydra's compose API (student presets come from students/presets.py),
validates it into typed dataclasses, and runs the pipeline. Any problem with the input ends
with one line on stderr naming it and the fix, and exit status 2.
"""

from __future__ import annotations

import os
import sys

from distill.errors import UserError

USAGE = """usage: python -m distill [GROUP=OPTION ...] [KEY=VALUE ...] [--cfg job] [--help]

  python -m distill                      the embedded default (tiny MoE teacher, tiny dense + MoE students)
  python -m distill +student=4b          one student of a released size (needs a GPU machine)
  python -m distill --cfg job            print the composed config and exit

groups: student ({students}), teacher (embedded, transformers, vllm), data (arithmetic, messages),
        loss (forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd), pipeline (strong_to_weak)
"""


def load_config(overrides: list[str]):
    """(typed Config, composed plain dict); raises ConfigError with a one-line message."""
    from conf import compose
    from distill.config import student_node, validate
    from students.presets import PRESETS

    composed = compose("config", overrides, {"student": {name: student_node(name) for name in PRESETS}})
    return validate(composed), composed


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        from students.presets import PRESETS

        print(USAGE.format(students=", ".join(PRESETS)))
        return 0
    show = None
    if "--cfg" in args:
        at = args.index("--cfg")
        show = args[at + 1] if at + 1 < len(args) else "job"
        del args[at:at + 2]
    try:
        config, composed = load_config(args)
        if show is not None:
            from dataclasses import asdict

            from omegaconf import OmegaConf

            # The validated config: defaults applied, +student=NAME already in `students`.
            print(OmegaConf.to_yaml(asdict(config)), end="")
            return 0
        from distill.pipeline import run

        summary = run(config)
    except (UserError, MemoryError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    from eval.harness import markdown_table, side_by_side

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
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
