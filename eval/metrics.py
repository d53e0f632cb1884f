"""pass@k and the per-mode summary of scored samples.

pass@k is the unbiased estimator of Chen et al. (2021): with n samples of which c are correct,
the chance that k drawn without replacement contain a correct one is 1 - C(n-c, k) / C(n, k),
averaged over problems. It is computed as a product, 1 - prod_{i=n-c+1..n} (1 - k/i), which
never forms the huge binomials. pass@1 is then the mean fraction of correct samples.
"""

from __future__ import annotations

from collections import defaultdict


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples (of n, c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def summarize(samples: list[dict], ks: list[int]) -> dict[str, float]:
    """Per-mode numbers from scored samples (each with problem, correct, predicted, finished,
    thinking_tokens, answer_tokens, format_error).

    pass@1 is averaged over all samples; pass@k over problems, for each k up to the number of
    samples per problem; token means and the truncation and format-error rates are over samples.
    """
    by_problem: dict[str, list[bool]] = defaultdict(list)
    for s in samples:
        by_problem[s["problem"]].append(bool(s["correct"]))
    n = min((len(v) for v in by_problem.values()), default=0)
    total = max(1, len(samples))
    out = {"pass@1": sum(s["correct"] for s in samples) / total}
    for k in ks:
        if 1 < k <= n:
            out[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in by_problem.values()) / max(1, len(by_problem))
    out.update({
        "mean_thinking_tokens": sum(s["thinking_tokens"] for s in samples) / total,
        "mean_answer_tokens": sum(s["answer_tokens"] for s in samples) / total,
        "truncated": sum(not s["finished"] for s in samples) / total,
        "format_errors": sum(s["format_error"] for s in samples) / total,
        "wrong": sum(not s["correct"] and not s["format_error"] for s in samples) / total,
        "samples_per_problem": n,
        "problems": len(by_problem),
    })
    return out
