"""Run logging: Weights & Biases, and the project's own metrics JSONL in the run directory.

W&B runs online when an API key is configured and offline otherwise (the run still syncs
later with `wandb sync`); `logger=none` turns it off. The JSONL is always written: it is what
tests, plots and the model card read. Metric names are grouped by prefix: train/, teacher/,
eval/think/, eval/no_think/, moe/, perf/.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock

from distill.common.errors import first_line
from distill.common.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id"


@dataclass
class WandbConfig:
    project: str = "distill"
    entity: str | None = None
    # auto: online when an API key is configured, offline otherwise.
    mode: Literal["auto", "online", "offline"] = "auto"
    # Runs of one sweep (`-m`) share a group, named after the sweep's folder; null: no group.
    group: str | None = None


class Tracker:
    """Where a process logs: the run's metrics JSONL (every process that trains writes its own
    records there, appended under a file lock, so a killed run loses no finished record) and, in
    the main process, W&B (one run per run folder: its id is kept in the folder, so a resumed run
    continues the same W&B run)."""

    def __init__(self, run_dir: Path, *, logger: str = "none", config: dict | None = None,
                 wandb: WandbConfig | None = None, run_name: str | None = None,
                 metrics_file: str | None = METRICS_FILE):
        self.run_dir = run_dir
        # metrics_file=None: no JSONL (a data-parallel rank other than the main one).
        self.path = run_dir / metrics_file if metrics_file else None
        self._lock = FileLock(str(self.path) + ".lock") if self.path else None
        self._started = time.time()
        self._wandb = None
        self.wandb_mode = "disabled"
        if logger == "wandb":
            self._wandb = self._start_wandb(config or {}, wandb or WandbConfig(), run_name)

    def _start_wandb(self, config: dict, settings: WandbConfig, run_name: str | None):
        import wandb

        mode = settings.mode
        if mode == "auto":
            mode = "online" if _has_wandb_key() else "offline"
        common = dict(project=settings.project, entity=settings.entity, group=settings.group, config=config,
                      dir=str(self.run_dir), name=run_name, reinit="finish_previous", id=self._wandb_id(),
                      resume="allow")
        try:
            run = wandb.init(mode=mode, **common)
        except Exception as error:  # network or auth failure: keep training, log offline
            print(f"warning: W&B {mode} failed ({first_line(error)}); logging offline instead")
            wandb.teardown()   # the failed attempt still holds the run id in W&B's service process
            mode = "offline"
            run = wandb.init(mode=mode, **common)
        self.wandb_mode = mode
        return run

    def _wandb_id(self) -> str:
        """This run folder's W&B run id: made by its first run, kept in `wandb_id` for resumes."""
        stored = self.run_dir / WANDB_ID_FILE
        if stored.exists():
            return stored.read_text().strip()
        run_id = secrets.token_hex(4)
        atomic_write_text(stored, run_id)
        return run_id

    def define_axis(self, prefix: str) -> None:
        """Plot `prefix/*` against `prefix/step`, so stages run one after the other (two students,
        the teacher bootstrap) each start at step 0 in W&B."""
        if self._wandb is not None:
            self._wandb.define_metric(f"{prefix}/step")
            self._wandb.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            name = prefix.removeprefix("train/").removesuffix("/bootstrap")
            for group in ("moe", "perf", "periodic_eval"):
                self._wandb.define_metric(f"{group}/{name}/*", step_metric=f"{prefix}/step")

    def log(self, metrics: dict[str, Any]) -> None:
        self._write({"time": round(time.time() - self._started, 3), **metrics})
        self._to_wandb(metrics)

    def replay(self, records: list[dict]) -> None:
        """Send to W&B the records a worker process logged (it wrote them to the JSONL itself)."""
        for record in records:
            self._to_wandb({k: v for k, v in record.items() if k != "time"})

    def forget(self, prefix: str, after: int) -> None:
        """Drop the records of the stage logged on `prefix/step` beyond step `after`: a resumed
        stage logs them again from its checkpoint, so each step is in the log once."""
        key = f"{prefix}/step"
        self._rewrite(lambda record: not (key in record and record[key] > after))

    def forget_run_records(self) -> None:
        """Drop what an earlier attempt of this run logged outside any training stage (eval
        results, run totals): a resumed run logs them again. Stage records are kept; each stage
        trims its own (`forget`)."""
        self._rewrite(lambda record: any(k.endswith("/step") for k in record))

    def _rewrite(self, keep) -> None:
        if self.path is None or not self.path.exists():
            return
        with self._lock:
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if (record := _parse(line)) is not None and keep(record)]
            if len(kept) != len(lines):
                atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def _write(self, record: dict) -> None:
        if self.path is None:
            return
        # Opened per record: another process may have rewritten the file (forget) meanwhile.
        with self._lock, open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _to_wandb(self, metrics: dict[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        self._write({"time": round(time.time() - self._started, 3), "table": name, "columns": columns, "rows": rows})
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Table(columns=columns, data=rows)})

    def log_image(self, name: str, path: Path) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(str(path))})

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's records, in order (a line torn by a kill mid-write is left out)."""
    path = run_dir / METRICS_FILE
    records = (_parse(line) for line in path.read_text().splitlines() if line.strip())
    return [record for record in records if record is not None]


def _parse(line: str) -> dict | None:
    try:
        return json.loads(line)
    except ValueError:
        return None
