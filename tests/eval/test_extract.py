"""Answer extraction and checking: the text after </think>, in boxed, ####, stated and plain
forms, checked with math-verify; format errors apart from wrong answers."""

import pytest

from distill.eval.extract import extract, final_text, gsm8k_reference, last_boxed
from distill.eval.tasks import default_score
from distill.eval.verify import equivalent

T = "<think>\nsome reasoning with 99 and \\boxed{41}\n</think>\n\n"

# (response, expected answer or None, expected form)
CASES = [
    # boxed
    (T + "The answer is \\boxed{72}.", "72", "boxed"),
    (T + "\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "boxed"),
    (T + "So $x = \\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt{3}}{2}", "boxed"),
    (T + "first \\boxed{3}, corrected: \\boxed{4}", "4", "boxed"),
    (T + "\\boxed{ 1,000 }", "1,000", "boxed"),
    (T + "\\fbox{B}", "B", "boxed"),
    (T + "\\boxed 5", "5", "boxed"),
    (T + "\\boxed{\\{1, 2\\}}", "\\{1, 2\\}", "boxed"),
    (T + "\\boxed{(-\\infty, 3]}", "(-\\infty, 3]", "boxed"),
    (T + "\\boxed{x^{2}+1} is it", "x^{2}+1", "boxed"),
    # GSM8K's ####
    (T + "She has 5 + 3 = 8 apples.\n#### 8", "8", "hash"),
    (T + "#### 1,234", "1,234", "hash"),
    (T + "#### $18.", "18", "hash"),
    (T + "#### 3\nsome trailing words", "3", "hash"),
    # stated
    (T + "The answer is 42.", "42", "stated"),
    (T + "Final answer: 17", "17", "stated"),
    (T + "the final answer is $\\frac{3}{4}$.", "\\frac{3}{4}", "stated"),
    (T + "Answer: **12**", "12", "stated"),
    (T + "ANSWER IS: 5", "5", "stated"),
    # the whole final text
    (T + "7", "7", "whole"),
    (T + "-3", "-3", "whole"),
    (T + "  12.5  ", "12.5", "whole"),
    (T + "C", "C", "whole"),
    (T + "$\\pi$", "\\pi", "whole"),
    ("<think>\n\n</think>\n\n9", "9", "whole"),       # non-thinking: the empty block
    ("5", "5", "whole"),                                # no think block at all
    # last number
    (T + "I counted 3 cats and then 4 dogs", "4", "last_number"),
    (T + "It costs 1,500 dollars in total", "1,500", "last_number"),
    # the thinking budget's sentence ends in "</think>." before the answer
    ("<think>\nabc Considering the limited time by the user, I have to give the solution based on the thinking "
     "directly now.\n</think>.\n\n6", "6", "whole"),
    ("<think>\n x\n</think>\n\n.5", ".5", "whole"),      # a leading-dot number is kept
    # format errors: never a guess from the reasoning
    ("<think>\nthe answer is 41 \\boxed{41}", None, "unclosed_think"),
    ("<think>\n1+1=2\n", None, "unclosed_think"),
    (T, None, "none"),
    (T + "   \n ", None, "none"),
    (T + "I do not know how to solve this one", None, "none"),
]


@pytest.mark.parametrize("response, answer, form", CASES)
def test_extraction(response, answer, form):
    found = extract(response)
    assert (found.answer, found.form) == (answer, form)


def test_there_are_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_answers_only_come_from_after_think():
    # The reasoning holds a boxed 41 in T; the answer after </think> wins, and without one the
    # reasoning is never used.
    assert extract(T + "8").answer == "8"
    assert extract(T).answer is None
    assert final_text("<think>\nopen") is None


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{a{b{c}}d}", "a{b{c}}d"), ("no box", None), ("\\boxed{unclosed", None), ("\\boxed{1} \\boxed{2}", "2"),
])
def test_last_boxed_balances_braces(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("predicted, reference, same", [
    ("72", "72", True), ("72.0", "72", True), ("1,000", "1000", True), ("0.5", "\\frac{1}{2}", True),
    ("1/2", "\\frac12", True), ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", True), ("x=3", "3", True),
    ("\\{2, 1\\}", "\\{1, 2\\}", True), ("2\\pi", "2 \\pi", True), ("10\\%", "10", True),
    ("3", "4", False), ("-7", "7", False), ("\\frac{1}{3}", "0.33", False), (None, "1", False),
    ("B", "B", True), ("B", "C", False),
])
def test_equivalence_with_math_verify(predicted, reference, same):
    assert equivalent(predicted, reference) is same


def test_default_score_separates_format_errors_from_wrong_answers():
    wrong = default_score(T + "\\boxed{5}", "6")
    assert (wrong.predicted, wrong.correct) == ("5", False)
    missing = default_score("<think>\nstill thinking", "6")
    assert (missing.predicted, missing.correct, missing.form) == (None, False, "unclosed_think")
    assert default_score(T + "The answer is $\\frac{6}{2}$.", "3").correct


@pytest.mark.parametrize("solution, answer", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"), ("#### 1,200", "1200"), ("#### -5", "-5"),
    ("plain 9", "plain 9"),
])
def test_gsm8k_reference(solution, answer):
    assert gsm8k_reference(solution) == answer
