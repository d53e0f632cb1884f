"""Which models an eval compares: `models=[...]` items turned into (name, folder-or-hub-name).

An item is a model folder (a release folder or any `save_pretrained` folder), a run directory of
`python -m distill` (its `models.json` lists the teacher and release folders), or a hub name;
`NAME:PATH` gives it a name. Folders are named after themselves, hub models after their last
path component.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from distill.common.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str   # a local folder or a hub name


def resolve_models(items: list[str]) -> list[ModelSpec]:
    specs: list[ModelSpec] = []
    for item in items:
        name, _, path = item.partition(":") if ":" in item and not item.startswith(("/", ".", "~")) else ("", "", item)
        folder = Path(path).expanduser()
        if (folder / "models.json").is_file():
            listed = json.loads((folder / "models.json").read_text())
            specs += [ModelSpec(f"{name}/{model}" if name else model, where) for model, where in listed.items()]
        elif folder.is_dir():
            if not (folder / "config.json").is_file():
                raise ConfigError(f"models: '{path}' is a folder without config.json: give a model folder (saved by "
                                  "save_pretrained, e.g. a release folder) or a run directory of python -m distill")
            specs.append(ModelSpec(name or folder.resolve().name, str(folder)))
        elif path.startswith(("/", "./", "../", "~")) or path.count("/") > 1:
            raise ConfigError(f"models: no folder '{path}': give an existing model folder, a run directory or a "
                              "hub name (org/model)")
        else:
            specs.append(ModelSpec(name or path.rstrip("/").split("/")[-1], path))
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"models: the name '{duplicates[0]}' is used twice; name them with NAME:PATH")
    return specs
