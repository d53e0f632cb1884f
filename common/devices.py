"""Which torch device a run uses: `auto` (CUDA when visible, else the CPU), `cpu` or `cuda`."""

from __future__ import annotations

import torch

from distill.common.errors import ConfigError


def resolve_device(name: str, key: str = "device") -> torch.device:
    """The device `name` asks for; `key` names the config key in the one-line error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}=cuda but no CUDA device is visible; use {key}=auto or {key}=cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
