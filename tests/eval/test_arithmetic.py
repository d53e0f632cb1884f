"""The built-in task: seeded, disjoint splits, a difficulty knob, correct reasoning, exact checks."""

import random

import pytest

from distill.eval.tasks.arithmetic import extract_answer, generate_splits, is_correct, make_chain


def _evaluate(question: str) -> int:
    chain, modulus = question.split(" mod ")
    total, op = None, None
    for ch in chain:  # operands are single digits with modulus 10
        if ch.isdigit():
            value = int(ch)
            total = value if total is None else {"+": total + value, "-": total - value, "*": total * value}[op] % int(modulus)
        else:
            op = ch
    return total


def test_answers_and_reasoning_are_right():
    rng = random.Random(0)
    for _ in range(300):
        chain = make_chain(rng, 1, 8, ops="+-*")
        assert int(chain.answer) == _evaluate(chain.question)
        lines = chain.reasoning.split("\n")
        assert len(lines) == chain.question.count("+") + chain.question.count("-") + chain.question.count("*")
        assert lines[-1].endswith(f"→{chain.answer}")
        for line in lines:
            exact, residue = line.split("=")[1].split("→")
            assert int(exact) % 10 == int(residue)
        for before, after in zip(lines, lines[1:]):
            assert after.startswith(before.split("→")[1])  # each step continues from the last result


def test_splits_are_seeded_and_disjoint():
    sizes = {"train": 2000, "validation": 200, "test": 200}
    a = generate_splits(sizes, min_steps=2, max_steps=4, seed=7)
    b = generate_splits(sizes, min_steps=2, max_steps=4, seed=7)
    c = generate_splits(sizes, min_steps=2, max_steps=4, seed=8)
    assert a == b and a != c
    questions = [{p.question for p in a[s]} for s in sizes]
    assert [len(q) for q in questions] == [2000, 200, 200]
    assert not (questions[0] & questions[1] or questions[0] & questions[2] or questions[1] & questions[2])


def test_difficulty_knob_sets_chain_length():
    split = generate_splits({"train": 300}, min_steps=5, max_steps=6, seed=0)["train"]
    assert {len(p.reasoning.split("\n")) for p in split} == {5, 6}


def test_impossible_sizes_fail_clearly():
    with pytest.raises(ValueError, match="cannot draw"):
        generate_splits({"train": 5000}, min_steps=1, max_steps=1, seed=0)
    with pytest.raises(ValueError, match="min_steps"):
        generate_splits({"train": 5}, min_steps=3, max_steps=2, seed=0)


@pytest.mark.parametrize("response, expected", [
    ("<think>\n3+4=7\n</think>\n\n7", "7"),
    ("<think>\n\n</think>\n\n7", "7"),
    ("7", "7"),
    (" 7 \n", "7"),
    ("<think>\n3+4=7\n</think>\n\n-3", "-3"),
    ("<think>\n3+4=7\n", None),          # never closed the think block: format error
    ("<think>\n3+4=7\n</think>\n\n", None),
    ("<think>\n3+4=7\n</think>\n\nseven", None),
    ("<think>\n3+4=7\n</think>\n\n7 8", None),
])
def test_answer_extraction(response, expected):
    assert extract_answer(response) == expected


def test_checking_is_exact():
    assert is_correct("<think>\nx\n</think>\n\n7", "7")
    assert not is_correct("<think>\nx\n</think>\n\n17", "7")
    assert not is_correct("<think>\n7", "7")
