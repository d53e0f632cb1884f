"""Files the program writes: checksums, atomic writes, output folders proven usable up front, and
the one cache folder (datasets, trained teachers)."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from distill.common.errors import ConfigError


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write next to `path`, then rename over it: readers see the old file or the new one."""
    temporary = path.with_suffix(path.suffix + f".tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def prepare_output_dir(requested: str | None, *, key: str, default_parent: str, needed_bytes: int = 0) -> Path:
    """Create the output folder (`requested`, or `<default_parent>/<timestamp>`) and prove it is
    writable, with `needed_bytes` free, before any work starts; `key` is the config key that names
    it, for the one-line error."""
    folder = Path(requested) if requested else Path(default_parent) / time.strftime("%Y%m%d-%H%M%S")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"{key} '{folder}' is not writable ({error.strerror}); set {key}=PATH") from None
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise ConfigError(f"{key} '{folder}' has {free / 2 ** 30:.2f} GiB free but the run writes about "
                          f"{needed_bytes / 2 ** 30:.2f} GiB (checkpoints, teacher outputs, releases): free space, "
                          f"lower checkpoint_keep, or set {key}=PATH on a larger disk")
    return folder


def resolve_cache_dir(configured: str | None) -> Path:
    """Where datasets and trained teachers are cached: `cache_dir=` if set, else $DISTILL_CACHE,
    else ~/.cache/distill (the same folder for `python -m distill`, the eval command and lm-eval)."""
    return Path(configured or os.environ.get("DISTILL_CACHE") or Path.home() / ".cache" / "distill")
