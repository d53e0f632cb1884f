"""The run's training PNGs: loss curves per training stage (eval plots live in eval/plots.py)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI boxes
import matplotlib.pyplot as plt  # noqa: E402


def loss_curves(records: list[dict], path: Path) -> Path | None:
    """One line per (stage, loss, mode) found in the metrics records, against that stage's step."""
    series: dict[str, tuple[list, list]] = {}
    for record in records:
        for key, value in record.items():
            if key.endswith(("/ce_think", "/ce_no_think", "/kd_loss_think", "/kd_loss_no_think")) \
                    and isinstance(value, (int, float)):
                stage = key.rsplit("/", 1)[0]
                steps, values = series.setdefault(key, ([], []))
                steps.append(record.get(f"{stage}/step", len(steps)))
                values.append(value)
    if not series:
        return None  # nothing was trained in this run
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, (steps, values) in sorted(series.items()):
        ax.plot(steps, values, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per target token")
    ax.set_yscale("log")
    ax.set_title("Training losses")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
