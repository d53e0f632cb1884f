"""The run's PNGs: loss curves per training stage, and think vs no-think accuracy per model."""

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


def mode_comparison(accuracy: dict[str, dict[str, float]], path: Path) -> Path:
    """Grouped bars: accuracy of each model in think and no_think mode."""
    models = list(accuracy)
    modes = sorted({m for per_model in accuracy.values() for m in per_model}, key=["think", "no_think"].index)
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(models), 4))
    for i, mode in enumerate(modes):
        xs = [j + i * width for j in range(len(models))]
        values = [100 * accuracy[m].get(mode, float("nan")) for m in models]
        bars = ax.bar(xs, values, width, label=mode)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(models))], models)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 118)  # headroom so the legend never covers a bar
    ax.set_title("Thinking vs non-thinking (test split, greedy)")
    ax.legend(loc="upper center", ncol=len(modes), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
