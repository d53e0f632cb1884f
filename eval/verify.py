"""Is an extracted answer equal to the reference? math-verify decides, after a cheap exact check.

math-verify parses both sides as LaTeX or plain expressions into sympy and compares them
symbolically (`1/2` equals `\\frac{1}{2}` and `0.5`; `x=3` equals `3`; `1,000` equals `1000`;
sets and intervals compare as such). Integer answers, the common case, are compared as integers
first, so the symbolic path runs only when it can change the verdict.
"""

from __future__ import annotations

import re
from functools import lru_cache

_INTEGER = re.compile(r"-?\d+")


def equivalent(predicted: str | None, reference: str) -> bool:
    """True when `predicted` states the same value as `reference`."""
    if predicted is None:
        return False
    a, b = predicted.strip(), reference.strip()
    if a == b:
        return True
    plain_a, plain_b = a.replace(",", ""), b.replace(",", "")
    if _INTEGER.fullmatch(plain_a) and _INTEGER.fullmatch(plain_b):
        return int(plain_a) == int(plain_b)
    return _math_verify(a, b)


@lru_cache(maxsize=65536)
def _math_verify(predicted: str, reference: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    try:
        gold = parse(_as_latex(reference), extraction_config=config)
        answer = parse(_as_latex(predicted), extraction_config=config)
        return bool(gold) and bool(answer) and bool(verify(gold, answer))
    except Exception:  # noqa: BLE001 - a parse failure or timeout is "not shown equal"
        return False


def _as_latex(text: str) -> str:
    return text if "$" in text else f"${text}$"
