"""Score a model in thinking and non-thinking modes on problems with checkable answers.

`evaluate` renders each problem in each mode with the same chat template as training, draws n
samples per problem (per-mode sampling, or greedy), and scores the text after `</think>`. Per
mode it reports pass@1 averaged over samples, unbiased pass@k, mean thinking tokens (inside the
think block, the model's own) and answer tokens (after it), the truncation rate (no eos within
the limit) and format errors (no closing `</think>`, or no answer) counted apart from wrong
answers. With `budget`, think mode runs under Qwen3's thinking budget (eval/budget.py).

The same function runs inside training (periodic eval), at the end of the pipeline, and in
`python -m eval`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from distill.eval.backends import Backend
from distill.eval.budget import Reply, generate_with_budget
from distill.eval.metrics import summarize
from distill.eval.tasks import Problem, Score
from distill.students.chat import Sampling, render_prompt

Scorer = Callable[[str, str], Score]
NO_THINK_PREFIX = "<think>\n\n</think>\n\n"   # pre-filled by the template in no_think mode


@dataclass
class ModeResult:
    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """pass@1: the fraction of correct samples."""
        return self.metrics["pass@1"]

    def summary(self) -> dict[str, float]:
        return dict(self.metrics)


def evaluate(backend: Backend, problems: list[Problem], score: Scorer, *, modes: list[str],
             sampling: Callable[[str], Sampling | None], max_new_tokens: int, samples: int = 1,
             pass_k: list[int] = (1,), seed: int = 0, budget: int | None = None, budget_answer_tokens: int = 64,
             desc: str = "eval") -> dict[str, ModeResult]:
    """{mode: ModeResult}; `sampling(mode)` gives the mode's sampling (None: greedy)."""
    tokenizer = backend.tokenizer
    end_think = tokenizer.convert_tokens_to_ids("</think>")
    results = {}
    for mode in modes:
        rendered = [render_prompt(tokenizer, p.messages, mode) for p in problems]
        prompts = [ids for ids in rendered for _ in range(samples)]   # problem i, sample j at i * samples + j
        label = f"{desc} ({mode}{f', budget {budget}' if budget is not None and mode == 'think' else ''})"
        if budget is not None and mode == "think":
            replies = generate_with_budget(backend, prompts, budget=budget, answer_tokens=budget_answer_tokens,
                                           sampling=sampling(mode), seed=seed, desc=label)
        else:
            replies = [Reply(g.ids, g.finished) for g in backend.generate(
                prompts, max_new_tokens=max_new_tokens, sampling=sampling(mode), seed=seed, desc=label)]
        scored = []
        for index, reply in enumerate(replies):
            problem = problems[index // samples]
            ids = reply.ids[:-1] if reply.finished else reply.ids   # the eos is not part of the text
            thinking, answer = _token_counts(ids, reply.inserted, end_think, mode)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if mode == "no_think":
                text = NO_THINK_PREFIX + text   # the pre-filled block belongs to the reply
            result = score(text, problem.reference)
            scored.append({
                "problem": problem.id, "sample": index % samples, "prompt": problem.messages[-1]["content"],
                "response": text, "reference": problem.reference, "predicted": result.predicted, "form": result.form,
                "correct": bool(result.correct), "format_error": result.predicted is None,
                "finished": reply.finished, "thinking_tokens": thinking, "answer_tokens": answer,
                "budget_forced": bool(reply.inserted),
            })
        results[mode] = ModeResult(summarize(scored, list(pass_k)), scored)
    return results


def _token_counts(ids: list[int], inserted: range, end_think: int, mode: str) -> tuple[int, int]:
    """(thinking, answer) tokens the model wrote: before and after `</think>`, inserted text excluded."""
    if end_think in ids:
        cut = ids.index(end_think)
        if cut in inserted:  # the budget closed the block: the model's thinking ends where the sentence starts
            return inserted.start, len(ids) - inserted.stop
        return cut, len(ids) - cut - 1
    return (len(ids), 0) if mode == "think" else (0, len(ids))


def markdown_table(results: dict[str, dict[str, ModeResult]]) -> str:
    """model x mode: pass@1 (and pass@k), thinking and answer tokens, truncation, format errors."""
    ks = sorted({k for per in results.values() for r in per.values() for k in r.metrics if k.startswith("pass@")
                 and k != "pass@1"}, key=lambda k: int(k[5:]))
    lines = ["| model | mode | pass@1 | " + "".join(f"{k} | " for k in ks)
             + "thinking tokens | answer tokens | truncated | format errors |",
             "|---|---|---|" + "---|" * len(ks) + "---|---|---|---|"]
    for model, per_mode in results.items():
        for mode, r in per_mode.items():
            m = r.metrics
            lines.append(f"| {model} | {mode} | {100 * m['pass@1']:.1f}% | "
                         + "".join(f"{100 * m[k]:.1f}% | " if k in m else "– | " for k in ks)
                         + f"{m['mean_thinking_tokens']:.1f} | {m['mean_answer_tokens']:.1f} | "
                         f"{100 * m['truncated']:.1f}% | {100 * m['format_errors']:.1f}% |")
    return "\n".join(lines)


def side_by_side(results: dict[str, dict[str, ModeResult]], baseline: str | None = None) -> str:
    """model | think | no_think | think − no_think | Δ vs the baseline in each mode (pass@1, points)."""
    models = list(results)
    baseline = baseline if baseline in results else (models[0] if models else None)
    modes = [m for m in ("think", "no_think") if any(m in per for per in results.values())]
    header = "| model | " + " | ".join(modes) + (" | think − no_think" if len(modes) == 2 else "") \
        + "".join(f" | Δ {mode} vs {baseline}" for mode in modes) + " |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for model in models:
        per = results[model]
        cells = [f"{100 * per[m].accuracy:.1f}%" if m in per else "–" for m in modes]
        if len(modes) == 2:
            cells.append(f"{100 * (per['think'].accuracy - per['no_think'].accuracy):+.1f}"
                         if {"think", "no_think"} <= set(per) else "–")
        for m in modes:
            base = results[baseline].get(m)
            cells.append("–" if model == baseline or m not in per or base is None
                         else f"{100 * (per[m].accuracy - base.accuracy):+.1f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
