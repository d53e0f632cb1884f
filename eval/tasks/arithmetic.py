"""The built-in task: multi-step modular arithmetic with a verifiable answer.

A problem is a chain such as `7+3*5-8 mod 10`, evaluated left to right, every intermediate
result reduced modulo 10. The reasoning does one operation a line (`7+3=0`, `0*5=0`,
`0-8=2`) and the answer is the final residue. Each step is a lookup in a small table, but the
chain mixes + and * so the result depends on the order of every step: no summary of the
operands gives it, and a small model must work it out step by step. That is the setting where
the Qwen3 report sees thinking mode win by a wide margin. (Plain +/- chains are a poor choice:
a transformer learns their sum in one pass from the bag of signed operands, while the carries of
multi-digit running totals make each written step harder than the whole.)

Difficulty knob: the number of operations per chain (`min_steps`..`max_steps`), the operations
and the modulus. Splits are disjoint by construction: every question is drawn once per seed and
assigned to exactly one split.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

from eval.extract import final_text
from eval.tasks import Score, Source, Task, chat


@dataclass(frozen=True)
class Problem:
    question: str   # "7+3-5"
    reasoning: str  # "7+3=10\n10-5=5"
    answer: str     # "5"

    def messages(self, thinking: bool = True) -> list[dict[str, str]]:
        """The chat sample: a user turn and the reference assistant turn in either mode."""
        content = f"<think>\n{self.reasoning}\n</think>\n\n{self.answer}" if thinking else self.answer
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": content}]


_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def make_problem(rng: random.Random, min_steps: int, max_steps: int, modulus: int = 10, ops: str = "+*") -> Problem:
    steps = rng.randint(min_steps, max_steps)
    total = rng.randrange(modulus)
    chain, lines = str(total), []
    for _ in range(steps):
        operand, op = rng.randrange(modulus), rng.choice(ops)
        exact = _APPLY[op](total, operand)
        result = exact % modulus
        lines.append(f"{total}{op}{operand}={exact}→{result}")
        chain += f"{op}{operand}"
        total = result
    return Problem(question=f"{chain} mod {modulus}", reasoning="\n".join(lines), answer=str(total))


def generate_splits(
    sizes: dict[str, int], *, min_steps: int, max_steps: int, modulus: int = 10, ops: str = "+*", seed: int
) -> dict[str, list[Problem]]:
    """Disjoint splits, e.g. {"train": 20000, "validation": 500, "test": 500}.

    Problems are drawn from one seeded stream; a question already drawn is skipped, so no
    question appears in two splits (or twice in one).
    """
    if min_steps < 1 or max_steps < min_steps:
        raise ValueError(f"arithmetic: need 1 <= min_steps <= max_steps, got {min_steps}..{max_steps}")
    if modulus < 2 or not ops or set(ops) - set(_APPLY):
        raise ValueError(f"arithmetic: need modulus >= 2 and ops from '+-*', got {modulus} and '{ops}'")
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[Problem]] = {}
    for name, size in sizes.items():
        problems: list[Problem] = []
        attempts = 0
        while len(problems) < size:
            attempts += 1
            if attempts > 100 * size + 10_000:
                raise ValueError(
                    f"arithmetic: cannot draw {size} distinct '{name}' problems with steps "
                    f"{min_steps}..{max_steps} modulo {modulus}; raise max_steps or the modulus"
                )
            problem = make_problem(rng, min_steps, max_steps, modulus, ops)
            if problem.question not in seen:
                seen.add(problem.question)
                problems.append(problem)
        splits[name] = problems
    return splits


_INTEGER = re.compile(r"-?\d+")


def extract_answer(response: str) -> str | None:
    """The integer a response answers with: the whole text after `</think>`, or None when absent.

    A response with an opening `<think>` but no closing tag is a format error (None), never a
    guess from the reasoning.
    """
    final = final_text(response)
    match = _INTEGER.fullmatch(final) if final else None
    return match.group(0) if match else None


def score(response: str, reference: str) -> Score:
    """The built-in task's format is strict: the final text must be exactly one integer."""
    predicted = extract_answer(response)
    return Score(predicted, "whole" if predicted is not None else "none",
                 predicted is not None and int(predicted) == int(reference))


def is_correct(response: str, answer: str) -> bool:
    return score(response, answer).correct


def load(source: Source, cache_dir: Path) -> list:
    """The pipeline's held-out split of the built-in task (same generator, seed and settings as
    `python -m distill` with defaults), or a JSONL of rows with `messages` and `answer`."""
    if source.path == BUILTIN:
        from distill.config import DataConfig
        from distill.data import write_builtin_arithmetic

        files = write_builtin_arithmetic(DataConfig(), cache_dir)
        source = replace(source, path=files[source.split])
    return chat.load(source, cache_dir)


BUILTIN = "builtin:arithmetic"

TASK = Task(
    name="arithmetic",
    load=load,
    source=Source(path=BUILTIN, split="test", question_column="messages", answer_column="answer"),
    score=score,
    max_new_tokens=128,
)
