"""What an eval writes: `eval.json` (every sample and its score), `eval.md` (the tables), PNGs
(pass@1 bars per model x mode; the thinking-budget curve) and the same table in W&B.

Every file is written atomically, so a crash never leaves half a report.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.common.files import atomic_write_text
from distill.common.tracking import Tracker
from distill.eval.harness import ModeResult, markdown_table, side_by_side
from distill.eval.plots import budget_curve, mode_comparison
from distill.eval.speculative import DraftResult, draft_table, gamma_table

TABLE_COLUMNS = ["model", "mode", "budget", "pass@1", "mean_thinking_tokens", "mean_answer_tokens", "truncated",
                 "format_errors", "wrong", "samples_per_problem", "problems"]


def budget_table(budgets: dict[str, dict[int, ModeResult]], results: dict[str, dict[str, ModeResult]]) -> str:
    """model | pass@1 at each budget (mean thinking tokens) | no_think."""
    points = sorted({b for per in budgets.values() for b in per})
    lines = ["| model | " + " | ".join(f"budget {b}" for b in points) + " | no_think |",
             "|---|" + "---|" * (len(points) + 1)]
    for model, per in budgets.items():
        cells = [f"{100 * per[b].accuracy:.1f}% ({per[b].metrics['mean_thinking_tokens']:.0f} tok)" if b in per
                 else "–" for b in points]
        no_think = results.get(model, {}).get("no_think")
        cells.append(f"{100 * no_think.accuracy:.1f}%" if no_think else "–")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(results: dict[str, dict[str, ModeResult]], *, baseline: str | None = None,
                    budgets: dict[str, dict[int, ModeResult]] | None = None, title: str | None = None,
                    level: int = 2, protocol: str | None = None) -> str:
    h = "#" * level
    parts = [f"{'#' * (level - 1)} {title}\n" if title else "", f"{protocol}\n" if protocol else "",
             f"{h} Thinking vs non-thinking (pass@1)\n", side_by_side(results, baseline),
             f"\n{h} Details\n", markdown_table(results)]
    if budgets:
        parts += [f"\n{h} Thinking budget (think mode)\n", budget_table(budgets, results)]
    return "\n".join(p for p in parts if p) + "\n"


def write_eval_outputs(results: dict[str, dict[str, ModeResult]], out_dir: Path, tracker: Tracker | None = None, *,
                       baseline: str | None = None, budgets: dict[str, dict[int, ModeResult]] | None = None,
                       title: str | None = None, protocol: str | None = None,
                       meta: dict | None = None) -> dict[str, Path]:
    """Write the report files into `out_dir`; returns {kind: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "eval.json", "markdown": out_dir / "eval.md",
             "modes_png": out_dir / "think_vs_no_think.png"}
    document = {m: {mode: {**r.summary(), "samples": r.samples} for mode, r in per.items()} for m, per in results.items()}
    if budgets:
        for model, per in budgets.items():
            document.setdefault(model, {})["budget"] = {
                str(b): {**r.summary(), "samples": r.samples} for b, r in sorted(per.items())}
    if meta:
        document = {"meta": meta, "models": document}
    atomic_write_text(paths["json"], json.dumps(document, indent=1))
    atomic_write_text(paths["markdown"], render_markdown(results, baseline=baseline, budgets=budgets, title=title,
                                                            protocol=protocol))
    accuracy = {m: {mode: r.accuracy for mode, r in per.items()} for m, per in results.items()}
    _atomic_png(lambda p: mode_comparison(accuracy, p), paths["modes_png"])
    if budgets:
        paths["budget_png"] = out_dir / "thinking_budget.png"
        curves = {m: {b: r.accuracy for b, r in per.items()} for m, per in budgets.items()}
        no_think = {m: per["no_think"].accuracy for m, per in results.items() if "no_think" in per}
        _atomic_png(lambda p: budget_curve(curves, no_think, p), paths["budget_png"])
    if tracker is not None:
        rows = [[model, mode, None, *[r.metrics.get(c) for c in TABLE_COLUMNS[3:]]]
                for model, per in results.items() for mode, r in per.items()]
        rows += [[model, "think", b, *[r.metrics.get(c) for c in TABLE_COLUMNS[3:]]]
                 for model, per in (budgets or {}).items() for b, r in sorted(per.items())]
        tracker.log_table("eval/table", TABLE_COLUMNS, rows)
        tracker.log_image("eval/think_vs_no_think", paths["modes_png"])
        if budgets:
            tracker.log_image("eval/thinking_budget", paths["budget_png"])
    return paths


DRAFT_COLUMNS = ["draft", "mode", "alpha", "greedy_agreement", "tokens_per_forward_iid", "tokens_per_forward",
                 "measured_tokens_per_forward", "measured_speedup"]


def render_draft_markdown(results: dict[str, dict[str, DraftResult]], *, target: str, gamma: int,
                          protocol: str | None = None, level: int = 2) -> str:
    """The draft report: acceptance and tokens per target forward at `gamma`, then every gamma."""
    h = "#" * level
    parts = [f"{h} As speculative-decoding drafts\n", f"{protocol}\n" if protocol else "",
             draft_table(results, target, gamma), "", gamma_table(results)]
    return "\n".join(p for p in parts if p is not None) + "\n"


def write_draft_outputs(results: dict[str, dict[str, DraftResult]], out_dir: Path, tracker: Tracker | None = None, *,
                        target: str, gamma: int, protocol: str | None = None, meta: dict | None = None,
                        prefix: str = "draft") -> dict[str, Path]:
    """`draft.json` and `draft.md` in `out_dir` (atomically), and `draft/<model>/<mode>/...` in the log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "draft.json", "markdown": out_dir / "draft.md"}
    document = {"target": target, "drafts": {name: {mode: r.to_json() for mode, r in per.items()}
                                             for name, per in results.items()}}
    atomic_write_text(paths["json"], json.dumps({"meta": meta, **document} if meta else document, indent=1))
    atomic_write_text(paths["markdown"], render_draft_markdown(results, target=target, gamma=gamma, protocol=protocol))
    if tracker is not None:
        for name, per in results.items():
            for mode, r in per.items():
                tracker.log(r.summary(prefix=f"{prefix}/{name}/{mode}/"))
        rows = [[name, mode, r.alpha, r.greedy_agreement, r.tokens_per_forward_iid.get(gamma),
                 r.tokens_per_forward.get(gamma), r.measured.tokens_per_forward if r.measured else None,
                 r.measured.speedup if r.measured else None] for name, per in results.items() for mode, r in per.items()]
        tracker.log_table(f"{prefix}/table", DRAFT_COLUMNS, rows)
    return paths


def _atomic_png(draw, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    draw(tmp)
    tmp.replace(path)
