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
assigned to exactly one split. The splits are written once per setting as JSONL under the cache
(`write_splits`), and every reader (the pipeline's data, this task, lm-eval) loads those files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from distill.eval.extract import final_text
from distill.eval.tasks import Score, Source, Task, chat

# The data source name of the built-in task (`data.source`, and this task's default source).
BUILTIN_SOURCE = "builtin:arithmetic"
SPLITS = ("train", "validation", "test")


@dataclass
class ArithmeticConfig:
    """How the built-in task's splits are drawn (`data.arithmetic.*`)."""

    min_steps: int = 3          # operations per chain: the difficulty knob
    max_steps: int = 5
    modulus: int = 10
    ops: str = "+*"
    train_size: int = 50000
    validation_size: int = 500
    test_size: int = 500
    seed: int = 1234


@dataclass(frozen=True)
class Chain:
    """One chain with its worked reasoning and answer."""

    question: str   # "7+3-5"
    reasoning: str  # "7+3=10\n10-5=5"
    answer: str     # "5"

    def messages(self, thinking: bool = True) -> list[dict[str, str]]:
        """The chat sample: a user turn and the reference assistant turn in either mode."""
        content = f"<think>\n{self.reasoning}\n</think>\n\n{self.answer}" if thinking else self.answer
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": content}]


_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def make_chain(rng: random.Random, min_steps: int, max_steps: int, modulus: int = 10, ops: str = "+*") -> Chain:
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
    return Chain(question=f"{chain} mod {modulus}", reasoning="\n".join(lines), answer=str(total))


def generate_splits(
    sizes: dict[str, int], *, min_steps: int, max_steps: int, modulus: int = 10, ops: str = "+*", seed: int
) -> dict[str, list[Chain]]:
    """Disjoint splits, e.g. {"train": 20000, "validation": 500, "test": 500}.

    Chains are drawn from one seeded stream; a question already drawn is skipped, so no
    question appears in two splits (or twice in one).
    """
    if min_steps < 1 or max_steps < min_steps:
        raise ValueError(f"arithmetic: need 1 <= min_steps <= max_steps, got {min_steps}..{max_steps}")
    if modulus < 2 or not ops or set(ops) - set(_APPLY):
        raise ValueError(f"arithmetic: need modulus >= 2 and ops from '+-*', got {modulus} and '{ops}'")
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[Chain]] = {}
    for name, size in sizes.items():
        chains: list[Chain] = []
        attempts = 0
        while len(chains) < size:
            attempts += 1
            if attempts > 100 * size + 10_000:
                raise ValueError(
                    f"arithmetic: cannot draw {size} distinct '{name}' problems with steps "
                    f"{min_steps}..{max_steps} modulo {modulus}; raise max_steps or the modulus"
                )
            chain = make_chain(rng, min_steps, max_steps, modulus, ops)
            if chain.question not in seen:
                seen.add(chain.question)
                chains.append(chain)
        splits[name] = chains
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


def write_splits(settings: ArithmeticConfig, cache_dir: Path) -> dict[str, str]:
    """The splits as JSONL files under `cache_dir`, generated once per setting; {split: path}."""
    key = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir / "data" / f"arithmetic-{key}"
    files = {split: str(folder / f"{split}.jsonl") for split in SPLITS}
    if all(Path(f).exists() for f in files.values()):
        return files
    splits = generate_splits(
        {"train": settings.train_size, "validation": settings.validation_size, "test": settings.test_size},
        min_steps=settings.min_steps, max_steps=settings.max_steps, modulus=settings.modulus, ops=settings.ops,
        seed=settings.seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, chains in splits.items():
        temporary = folder / f".{split}.jsonl.tmp-{os.getpid()}"
        with open(temporary, "w") as handle:
            for chain in chains:
                handle.write(json.dumps({"messages": chain.messages(thinking=True), "answer": chain.answer}) + "\n")
        os.replace(temporary, files[split])  # atomic: a reader never sees half a split
    return files


def load(source: Source, cache_dir: Path) -> list:
    """The pipeline's held-out split of the built-in task (same generator, seed and settings as
    `python -m distill` with defaults), or a JSONL of rows with `messages` and `answer`."""
    if source.path == BUILTIN_SOURCE:
        source = replace(source, path=write_splits(ArithmeticConfig(), cache_dir)[source.split])
    return chat.load(source, cache_dir)

TASK = Task(
    name="arithmetic",
    load=load,
    source=Source(path=BUILTIN_SOURCE, split="test", question_column="messages", answer_column="answer"),
    score=score,
    max_new_tokens=128,
)
