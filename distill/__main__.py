"""`python -m distill [GROUP=OPTION] [key=value ...] [--cfg job] [--help]`

Composes conf/ with Hydra's compose API (student presets come from students/presets.py),
validates it into typed dataclasses, and runs the pipeline. Any problem with the input ends
with one line on stderr naming it and the fix, and exit status 2.
"""

from __future__ import annotations

import os
import sys

from distill.config import ConfigError
from distill.errors import UserError

USAGE = """usage: python -m distill [GROUP=OPTION ...] [KEY=VALUE ...] [--cfg job] [--help]

  python -m distill                      the embedded default (tiny MoE teacher, tiny dense + MoE students)
  python -m distill +student=4b          one student of a released size (needs a GPU machine)
  python -m distill --cfg job            print the composed config and exit

groups: student ({students}), teacher (embedded, transformers), data (arithmetic, messages),
        loss (forward_kl), pipeline (strong_to_weak)
"""


def compose(overrides: list[str]):
    """The composed config (an OmegaConf DictConfig): conf/ plus the student presets."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    from conf import CONF_DIR
    from distill.config import student_node
    from students.presets import PRESETS

    store = ConfigStore.instance()
    for name in PRESETS:
        store.store(group="student", name=name, node=student_node(name))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def load_config(overrides: list[str]):
    """(typed Config, composed DictConfig); raises ConfigError with a one-line message."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from distill.config import validate
    from students.presets import PRESETS

    try:
        composed = compose(overrides)
    except MissingConfigException as error:
        group = (error.missing_cfg_file or "").split("/")[0]
        wanted = (error.missing_cfg_file or "").split("/")[-1]
        options = list(PRESETS) if group == "student" else list(error.options or [])
        raise ConfigError(f"unknown {group or 'config'} '{wanted}'; valid: {', '.join(options)}") from None
    except (HydraException, OmegaConfBaseException) as error:
        message = " ".join(str(error).split())
        if message.startswith("Could not override '"):
            # A key the config does not have: compose it anyway so validation can name the
            # valid keys at that level.
            key = message.split("'")[1]
            retried = [f"+{o}" if o.split("=")[0] == key else o for o in overrides]
            if retried != overrides:
                return load_config(retried)
        raise ConfigError(message) from None
    return validate(OmegaConf.to_container(composed, resolve=True)), composed


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
    from eval.harness import markdown_table

    if summary.results:
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
