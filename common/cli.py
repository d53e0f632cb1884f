"""The command line both commands share: Hydra composition, `--help`, `--cfg job` and sweeps.

`python -m distill` and `python -m distill.eval` take Hydra overrides (`group=option`,
`key=value`, `+key=value`). Hydra composes conf/ and parses the overrides, and stops here: each
entry point validates the composed dict into its dataclasses and passes plain objects inward.

Sweeps work as Hydra users expect: `-m` / `--multirun` with comma lists, `range(...)` or
`choice(...)` runs one job per combination of the swept values (their cartesian product, in
order), one after the other, as Hydra's basic launcher does. Every job is validated before the
first one starts. Each job gets its own output folder, `<folder>/<job number>` under the folder
the jobs share (by default `<parent>/<timestamp>`), which also names the W&B group of the sweep;
`sweep.json` there lists each job's overrides and folder.
"""

from __future__ import annotations

import itertools
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.common.errors import ConfigError, UserError
from distill.common.files import atomic_write_text


@dataclass
class CommandLine:
    overrides: list[str]
    show: bool          # --cfg job: print the validated config and exit
    multirun: bool      # -m / --multirun: one job per combination of swept values
    help: bool


def parse(argv: list[str]) -> CommandLine:
    args = list(argv)
    show = "--cfg" in args
    if show:
        at = args.index("--cfg")
        what = args[at + 1] if at + 1 < len(args) else "job"
        if what != "job":
            raise ConfigError(f"--cfg {what}: only --cfg job is supported (it prints the validated config)")
        del args[at:at + 2]
    multirun = bool({"-m", "--multirun"} & set(args))
    args = [a for a in args if a not in ("-m", "--multirun")]
    return CommandLine(overrides=args, show=show, multirun=multirun, help=bool({"-h", "--help"} & set(args)))


def compose(config_dir: Path, config_name: str, overrides: list[str],
            nodes: dict[str, dict[str, dict]] | None = None) -> dict:
    """The composed config, as plain dicts and lists.

    `nodes` are config-store entries {group: {option: node}} registered before composing. Any
    Hydra/OmegaConf error becomes a `ConfigError` with one line. The YAML holds only what options
    change and the dataclasses hold the defaults, so a `key=value` override is applied whether
    or not the composed YAML has the key (as Hydra's `++key=value`); validation then names any
    key that does not exist.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    store = ConfigStore.instance()
    for group, options in (nodes or {}).items():
        for name, node in options.items():
            store.store(group=group, name=name, node=node)
    groups = {path.name for path in config_dir.iterdir() if path.is_dir()} | set(nodes or {})
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            composed = hydra_compose(config_name=config_name, overrides=_values_forced(overrides, groups))
    except MissingConfigException as error:
        group = (error.missing_cfg_file or "").split("/")[0]
        wanted = (error.missing_cfg_file or "").split("/")[-1]
        options = list((nodes or {}).get(group, {})) or list(error.options or [])
        raise ConfigError(f"unknown {group or 'config'} '{wanted}'; valid: {', '.join(options)}") from None
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(" ".join(str(error).split())) from None
    return OmegaConf.to_container(composed, resolve=True)


def _values_forced(overrides: list[str], groups: set[str]) -> list[str]:
    """`key=value` as `++key=value` (set, whether or not the YAML has the key); group choices,
    `+`, `++` and `~` overrides as written."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise ConfigError(" ".join(str(error).split())) from None
    return [o.input_line if o.is_delete() or o.is_add() or o.is_force_add() or o.key_or_group in groups
            else f"++{o.input_line}" for o in parsed]


def sweep(overrides: list[str]) -> list[list[str]]:
    """One override list per job: every combination of the swept values, Hydra's grammar and order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise ConfigError(" ".join(str(error).split())) from None
    choices = [[f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]
    return [list(job) for job in itertools.product(*choices)]


@dataclass
class Command:
    """What an entry point plugs into `main`: how to load, show, place and run one job's config."""

    usage: Callable[[], str]
    load: Callable[[list[str]], Any]               # overrides -> validated config
    show: Callable[[Any], str]                     # the config as YAML
    folder: Callable[[Any], str | None]            # the config's output folder (None: a new one)
    place: Callable[[Any, str, str], Any]          # (config, folder, W&B group) -> that config
    execute: Callable[[Any], None]                 # run one job and print its summary
    default_parent: str                            # where new output folders go


def main(argv: list[str] | None, command: Command) -> int:
    """Parse, validate every job, then show or run them; a user's mistake is one line on stderr and
    exit status 2, an interrupt (Ctrl-C, or SIGTERM, which is handled alike) exit status 130."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        line = parse(sys.argv[1:] if argv is None else argv)
        if line.help:
            print(command.usage())
            return 0
        jobs = sweep(line.overrides) if line.multirun else [line.overrides]
        configs = [command.load(job) for job in jobs]
        if line.multirun:
            configs = _place_jobs(command, jobs, configs, write_index=not line.show)
        if line.show:
            for index, (job, config) in enumerate(zip(jobs, configs)):
                if line.multirun:
                    print(f"# job {index}: {' '.join(job)}")
                print(command.show(config), end="")
            return 0
        for index, (job, config) in enumerate(zip(jobs, configs)):
            if line.multirun:
                print(f"[sweep] job {index + 1}/{len(jobs)}: {' '.join(job) or '(no overrides)'} -> "
                      f"{command.folder(config)}", flush=True)
            command.execute(config)
    except (UserError, MemoryError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        print(f"interrupted: {error}" if str(error) else "interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _place_jobs(command: Command, jobs: list[list[str]], configs: list, write_index: bool) -> list:
    """Each job of a sweep in `<shared folder>/<job number>`, all in one W&B group named after the
    shared folder; a job whose folder was swept keeps its own."""
    folders = {command.folder(config) for config in configs}
    if len(folders) > 1:
        return configs  # the folder itself was swept: each job keeps its own
    shared = folders.pop()
    root = Path(shared) if shared else Path(command.default_parent) / time.strftime("%Y%m%d-%H%M%S")
    placed = [command.place(config, str(root / str(index)), root.name) for index, config in enumerate(configs)]
    if write_index:
        index = [{"job": number, "overrides": job, "folder": str(root / str(number))} for number, job in enumerate(jobs)]
        try:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(root / "sweep.json", json.dumps(index, indent=1))
        except OSError as error:
            raise ConfigError(f"the sweep's folder '{root}' is not writable ({error.strerror}); give a writable one "
                              "with its output-folder key") from None
    return placed
