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
    """Write next to `path`, flush it to the disk, then rename over it: readers, and a machine
    that lost power, see the old file or the new one."""
    temporary = path.with_suffix(path.suffix + f".tmp-{os.getpid()}")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())   # the new content is on disk before its name points at it
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def prepare_output_dir(requested: str | None, *, key: str, default_parent: str, needed_bytes: int = 0) -> Path:
    """Create the output folder (`requested`, or `<default_parent>/<timestamp>`) and prove it is
    writable, with `needed_bytes` free, before any work starts; `key` is the config key that names
    it, for the one-line error."""
    try:
        folder = Path(requested) if requested else new_folder(Path(default_parent))
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as error:
        where = requested or default_parent
        raise ConfigError(f"{key} '{where}' is not writable ({error.strerror}); set {key}=PATH") from None
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise ConfigError(f"{key} '{folder}' has {free / 2 ** 30:.2f} GiB free but the run writes about "
                          f"{needed_bytes / 2 ** 30:.2f} GiB (checkpoints, teacher outputs, releases): free space, "
                          f"lower checkpoint_keep, or set {key}=PATH on a larger disk")
    return folder


def new_folder(parent: Path) -> Path:
    """A folder `<parent>/<YYYYmmdd-HHMMSS>` made now and by no one else: runs started in the same
    second get `-2`, `-3`, ... (mkdir is the arbiter, so two processes never share one)."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for number in range(1, 10_000):
        folder = parent / (stamp if number == 1 else f"{stamp}-{number}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise OSError(f"no free folder name under {parent}")


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to the disk: after a power
    loss a pointer written after this never names files that are not there."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in [*sorted(p for p in folder.rglob("*") if p.is_dir()), folder]:
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def resolve_cache_dir(configured: str | None) -> Path:
    """Where datasets and trained teachers are cached: `cache_dir=` if set, else $DISTILL_CACHE,
    else ~/.cache/distill (the same folder for `python -m distill`, the eval command and lm-eval)."""
    return Path(configured or os.environ.get("DISTILL_CACHE") or Path.home() / ".cache" / "distill")
