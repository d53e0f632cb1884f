"""Answer extraction: which part of a reply is the answer, and what the answer says.

The answer is taken from the text after the closing `</think>` only, never from the reasoning: a
reply that opens a think block and never closes it is a format error, not a guess. Within that
final text the forms are tried in order of how explicitly they mark an answer:

1. `\\boxed{...}` (or `\\fbox{...}`), the last one, with nested braces;
2. `#### answer` (GSM8K's form), the last one, to the end of its line;
3. a stated answer: "the answer is X", "Answer: X", "= X" at the very end;
4. the whole final text when it is one short token-like answer (a number, a letter, `\\frac12`);
5. the last number in the final text.

`extract` returns an `Extraction` that names the form used, so reports can show how answers were
found, and `None` as the answer when the reply has no answer at all (a format error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

END_THINK = "</think>"
START_THINK = "<think>"


@dataclass(frozen=True)
class Extraction:
    answer: str | None   # None: no answer (a format error)
    form: str            # boxed | hash | stated | whole | last_number | unclosed_think | none


def final_text(response: str) -> str | None:
    """The text after the last `</think>`; None when a think block is opened and never closed.

    A leading "." is dropped: Qwen3's thinking-budget sentence ends in "</think>.", so a reply cut
    by the budget has it in front of the answer.
    """
    if START_THINK in response and END_THINK not in response:
        return None
    final = response.rsplit(END_THINK, 1)[-1].strip()
    if final.startswith(".") and not final[1:2].isdigit():
        final = final[1:].strip()
    return final


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` / `\\fbox{...}`, braces balanced; None if absent."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start:i - 1].strip()
    # `\boxed 5` (no braces) is valid LaTeX for a single token.
    bare = re.findall(r"\\boxed\s+([^\s$]+)", text)
    return bare[-1] if bare else None


_HASH = re.compile(r"####\s*([^\n]+)")
_STATED = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:)\s*[:\s]*(.+?)\s*(?:\.\s*$|$|\n)", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract(response: str) -> Extraction:
    """The answer a reply gives (see the module docstring for the order of forms)."""
    final = final_text(response)
    if final is None:
        return Extraction(None, "unclosed_think")
    if not final:
        return Extraction(None, "none")
    boxed = last_boxed(final)
    if boxed:
        return Extraction(boxed, "boxed")
    hashes = _HASH.findall(final)
    if hashes:
        return Extraction(_clean(hashes[-1]), "hash")
    stated = _STATED.findall(final)
    if stated and _clean(stated[-1]):
        return Extraction(_clean(stated[-1]), "stated")
    single = _clean(final)
    if len(single.split()) == 1 and len(single) <= 40:  # one short token-like answer: "72", "B", "\\frac{1}{2}"
        return Extraction(single, "whole")
    numbers = _NUMBER.findall(final)
    if numbers:
        return Extraction(numbers[-1].rstrip(".,"), "last_number")
    return Extraction(None, "none")


def _clean(answer: str) -> str:
    """Strip the wrapping that is not part of an answer: `$...$`, bold, a final period, a currency sign."""
    answer = answer.strip()
    answer = re.sub(r"^\*\*(.*)\*\*$", r"\1", answer).strip()
    if len(answer) >= 2 and answer[0] == "$" and answer[-1] == "$":
        answer = answer.strip("$").strip()
    if answer.startswith("\\(") and answer.endswith("\\)"):
        answer = answer[2:-2].strip()
    answer = answer.rstrip(".").strip()
    return re.sub(r"^\\?\$(?=-?\d)", "", answer)  # a currency sign: "$18" -> "18"


def gsm8k_reference(solution: str) -> str:
    """The final answer of a GSM8K reference solution ("... #### 72"): "72"."""
    if "####" not in solution:
        return solution.strip()
    return _clean(solution.rsplit("####", 1)[1]).replace(",", "")
