"""Run logging: Weights & Biases, and the project's own metrics JSONL in the run directory.

W&B runs online when an API key is configured and offline otherwise (the run still syncs
later with `wandb sync`); `logger=none` turns it off. The JSONL is always written: it is what
tests, plots and the model card read. Metric names are grouped by prefix: train/, teacher/,
eval/think/, eval/no_think/, moe/, perf/.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from distill.common.errors import first_line

METRICS_FILE = "metrics.jsonl"


@dataclass
class WandbConfig:
    project: str = "distill"
    entity: str | None = None
    # auto: online when an API key is configured, offline otherwise.
    mode: Literal["auto", "online", "offline"] = "auto"
    # Runs of one sweep (`-m`) share a group, named after the sweep's folder; null: no group.
    group: str | None = None


class Tracker:
    def __init__(self, run_dir: Path, *, logger: str = "none", config: dict | None = None,
                 wandb: WandbConfig | None = None, run_name: str | None = None,
                 metrics_file: str | None = METRICS_FILE):
        self.run_dir = run_dir
        # metrics_file=None: no JSONL (a worker process whose records the main run replays).
        self.path = run_dir / metrics_file if metrics_file else None
        self._handle = open(self.path, "a", buffering=1) if self.path else None
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
                      dir=str(self.run_dir), name=run_name, reinit="finish_previous")
        try:
            run = wandb.init(mode=mode, **common)
        except Exception as error:  # network or auth failure: keep training, log offline
            print(f"warning: W&B {mode} failed ({first_line(error)}); logging offline instead")
            mode = "offline"
            run = wandb.init(mode=mode, **common)
        self.wandb_mode = mode
        return run

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
        """Log records another process wrote (a student trained in a worker), keeping them whole."""
        for record in records:
            self._write(record)
            self._to_wandb({k: v for k, v in record.items() if k != "time"})

    def _write(self, record: dict) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps(record) + "\n")

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
        if self._handle is not None:
            self._handle.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
