"""Eval PNGs: pass@1 bars per model x mode, and accuracy against the thinking budget."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI boxes
import matplotlib.pyplot as plt  # noqa: E402


def mode_comparison(accuracy: dict[str, dict[str, float]], path: Path, title: str = "Thinking vs non-thinking") -> Path:
    """Grouped bars: pass@1 of each model in think and no_think mode."""
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
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(0, 118)  # headroom so the legend never covers a bar
    ax.set_title(title)
    ax.legend(loc="upper center", ncol=len(modes), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def budget_curve(curves: dict[str, dict[int, float]], no_think: dict[str, float], path: Path,
                 title: str = "Thinking budget") -> Path:
    """pass@1 against the thinking budget per model, with each model's non-thinking level dashed."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (model, points) in enumerate(curves.items()):
        color = f"C{i}"
        budgets = sorted(points)
        ax.plot(budgets, [100 * points[b] for b in budgets], marker="o", color=color, label=f"{model} (think)")
        if model in no_think:
            ax.axhline(100 * no_think[model], color=color, linestyle="--", linewidth=1, label=f"{model} (no_think)")
    ax.set_xlabel("thinking budget (tokens)")
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
