"""A run folder belongs to one run.

- A folder that already holds a run (its `config.json`) is refused, unless the run continues it
  (`resume=true`) or clears it first (`overwrite=true`);
- a resumed run must train what the stopped one trained: every field that shapes training is
  compared with the stopped run's `config.json`, and a difference stops it with one line naming
  the fields (what only changes where output goes, how it is logged or evaluated, or how many
  threads run may change);
- without `run_dir`, each run gets a folder of its own (`runs/<timestamp>`, `-2`... when two
  start in the same second).
"""

from __future__ import annotations

import json
import shutil
from distill.common.typed_config import as_dict
from pathlib import Path

from distill.common.errors import ConfigError
from distill.config import Config

CONFIG_FILE = "config.json"

# Fields a resumed run may change: where things go, how they are logged and evaluated, how the
# work is spread over threads and processes, how often step checkpoints are kept.
MAY_CHANGE_ON_RESUME = ("resume", "overwrite", "run_dir", "cache_dir", "logger", "wandb", "threads",
                        "student_workers", "device", "checkpoint_every", "checkpoint_keep", "pipeline.eval",
                        "rollout.startup_timeout", "rollout.vllm_args")


def check_run_folder(cfg: Config) -> None:
    """Refuse, before anything is written, a run_dir that holds another run, and a resume whose
    config differs from the stopped run's in what it trains."""
    if not cfg.run_dir:
        return
    folder = Path(cfg.run_dir)
    stored = folder / CONFIG_FILE
    if not stored.exists():
        return    # a new folder, or a run stopped before it wrote anything: nothing to compare
    if cfg.overwrite:
        return
    if not cfg.resume:
        raise ConfigError(f"run_dir '{folder}' already holds a run ({CONFIG_FILE}); continue it with resume=true, "
                          "give another run_dir, or clear it with overwrite=true")
    try:
        before = json.loads(stored.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"resume=true: cannot read {stored} ({error}); that run cannot be checked, start a new "
                          "run_dir") from None
    changed = differences(before, json.loads(json.dumps(as_dict(cfg))))
    if changed:
        shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed[:4])
        more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
        raise ConfigError(f"resume=true: this config trains differently from the run in '{folder}': {shown}{more}; "
                          "resume with the run's values, or start a new run_dir")


def clear_if_asked(cfg: Config) -> None:
    """`overwrite=true`: remove what a previous run left in run_dir (only a folder that holds a run)."""
    if cfg.overwrite and cfg.run_dir and (Path(cfg.run_dir) / CONFIG_FILE).exists():
        folder = Path(cfg.run_dir)
        for entry in folder.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def differences(before: dict, after: dict) -> list[tuple[str, object, object]]:
    """(key, old, new) for every training-relevant leaf that differs, dotted keys in order."""
    old, new = _flatten(before), _flatten(after)
    changed = []
    for key in sorted(set(old) | set(new)):
        if any(key == field or key.startswith(field + ".") for field in MAY_CHANGE_ON_RESUME):
            continue
        if old.get(key) != new.get(key):
            changed.append((key, old.get(key), new.get(key)))
    return changed


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat if flat else {prefix.rstrip("."): node}
    return {prefix.rstrip("."): node}
