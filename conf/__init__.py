"""Hydra configuration (YAML), and the one function that composes it.

A package so the files ship with non-editable installs too. Two primary configs:
`config.yaml` for `python -m distill` (groups: student, registered from students/presets.py so
the size table exists once; teacher, data, loss, pipeline) and `eval.yaml` for `python -m eval`
(group task, registered from the files in eval/tasks/).
"""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent


def compose(config_name: str, overrides: list[str], nodes: dict[str, dict[str, dict]] | None = None):
    """The composed config (an OmegaConf container resolved to plain dicts/lists).

    `nodes` are config-store entries {group: {option: node}} registered before composing. Any
    Hydra/OmegaConf error becomes a `ConfigError` with one line; an override of a key the
    config lacks is composed anyway (as `+key=value`) so that validation can name the valid keys.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from distill.config import ConfigError

    store = ConfigStore.instance()
    for group, options in (nodes or {}).items():
        for name, node in options.items():
            store.store(group=group, name=name, node=node)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = hydra_compose(config_name=config_name, overrides=overrides)
    except MissingConfigException as error:
        group = (error.missing_cfg_file or "").split("/")[0]
        wanted = (error.missing_cfg_file or "").split("/")[-1]
        options = list((nodes or {}).get(group, {})) or list(error.options or [])
        raise ConfigError(f"unknown {group or 'config'} '{wanted}'; valid: {', '.join(options)}") from None
    except (HydraException, OmegaConfBaseException) as error:
        message = " ".join(str(error).split())
        if message.startswith("Could not override '"):
            key = message.split("'")[1]
            retried = [f"+{o}" if o.split("=")[0] == key else o for o in overrides]
            if retried != overrides:
                return compose(config_name, retried, nodes)
        raise ConfigError(message) from None
    return OmegaConf.to_container(composed, resolve=True)
