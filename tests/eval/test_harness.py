"""The eval harness on scripted generations: mode renderings, token counts, truncation and
format errors, n samples and pass@k, and Qwen3's thinking-budget mechanism."""

from math import comb

import pytest

from distill.eval.harness import evaluate, markdown_table, side_by_side
from distill.eval.metrics import pass_at_k, summarize
from distill.eval.tasks import Problem, default_score
from distill.students.chat import STOP_THINKING
from distill.students.generation import Generation


class ScriptedBackend:
    """Answers each prompt with the next scripted text; records what it was asked."""

    name = "scripted"

    def __init__(self, tokenizer, replies):
        self.tokenizer = tokenizer
        self.replies = list(replies)   # (text, finished) per call, in order
        self.calls = []

    def generate(self, prompts, *, max_new_tokens, sampling, seed, desc):
        self.calls.append({"prompts": [self.tokenizer.decode(p) for p in prompts], "max_new_tokens": max_new_tokens,
                           "sampling": sampling, "seed": seed})
        out = []
        for _ in prompts:
            text, finished = self.replies.pop(0)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens]
            if finished:
                ids.append(self.tokenizer.eos_token_id)
            out.append(Generation(ids=ids, finished=finished))
        return out

    def close(self):
        pass


PROBLEMS = [Problem(id="a", messages=[{"role": "user", "content": "2+3"}], reference="5"),
            Problem(id="b", messages=[{"role": "user", "content": "4*4"}], reference="16")]


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_its_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            closed = 1.0 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)


def test_pass_at_k_edges_and_large_n():
    assert pass_at_k(64, 0, 64) == 0.0 and pass_at_k(64, 1, 64) == 1.0
    assert pass_at_k(64, 16, 1) == pytest.approx(16 / 64)
    # no overflow where the binomials are astronomically large
    assert pass_at_k(1000, 10, 500) == pytest.approx(1 - comb(990, 500) / comb(1000, 500), rel=1e-9)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def test_summary_averages_pass_at_1_over_samples_and_pass_at_k_over_problems():
    samples = [dict(problem=p, correct=c, finished=True, thinking_tokens=t, answer_tokens=1, format_error=f)
               for p, c, t, f in [("a", True, 10, False), ("a", False, 20, False), ("a", False, 30, True),
                                  ("b", False, 40, False), ("b", False, 50, True), ("b", False, 60, False)]]
    m = summarize(samples, [1, 2, 3, 4])
    assert m["pass@1"] == pytest.approx(1 / 6)
    assert m["pass@2"] == pytest.approx((pass_at_k(3, 1, 2) + 0.0) / 2)
    assert m["pass@3"] == pytest.approx(0.5) and "pass@4" not in m   # k above n is not reported
    assert m["format_errors"] == pytest.approx(2 / 6) and m["wrong"] == pytest.approx(3 / 6)
    assert m["mean_thinking_tokens"] == pytest.approx(35) and m["problems"] == 2


def test_modes_render_with_the_template_and_are_scored_after_think(tokenizer):
    replies = [("<think>\n2+3=5\n</think>\n\n5", True), ("<think>\n4*4=16\n</think>\n\n61", True),   # think
               ("5", True), ("16", True)]                                                             # no_think
    backend = ScriptedBackend(tokenizer, replies)
    results = evaluate(backend, PROBLEMS, default_score, modes=["think", "no_think"], sampling=lambda m: None,
                       max_new_tokens=64)
    think_prompt, no_think_prompt = backend.calls[0]["prompts"][0], backend.calls[1]["prompts"][0]
    assert think_prompt == "<|im_start|>user\n2+3<|im_end|>\n<|im_start|>assistant\n"
    assert no_think_prompt == "<|im_start|>user\n2+3<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    think, no_think = results["think"], results["no_think"]
    assert think.accuracy == 0.5 and no_think.accuracy == 1.0
    assert [s["predicted"] for s in think.samples] == ["5", "61"]
    assert think.samples[0]["thinking_tokens"] == n_tokens(tokenizer, "<think>\n2+3=5\n")
    assert think.samples[0]["answer_tokens"] == n_tokens(tokenizer, "\n\n5")
    assert no_think.metrics["mean_thinking_tokens"] == 0
    assert no_think.samples[1]["response"] == "<think>\n\n</think>\n\n16"
    assert think.metrics["format_errors"] == 0 and think.metrics["wrong"] == 0.5


def test_truncation_and_format_errors_are_counted_apart(tokenizer):
    replies = [("<think>\n2+3=5 and on and on", False),      # truncated inside the think block
               ("<think>\nx\n</think>\n\nno idea", True)]     # closed, but no answer
    results = evaluate(ScriptedBackend(tokenizer, replies), PROBLEMS, default_score, modes=["think"],
                       sampling=lambda m: None, max_new_tokens=64)
    m = results["think"].metrics
    assert m["truncated"] == 0.5 and m["format_errors"] == 1.0 and m["wrong"] == 0.0 and m["pass@1"] == 0.0
    assert results["think"].samples[0]["thinking_tokens"] == n_tokens(tokenizer, "<think>\n2+3=5 and on and on")


def test_n_samples_per_problem_give_pass_at_k(tokenizer):
    # problem a: 1 of 4 correct; problem b: 0 of 4
    replies = [(f"<think>\n</think>\n\n{x}", True) for x in ["5", "4", "4", "4", "1", "2", "3", "4"]]
    backend = ScriptedBackend(tokenizer, replies)
    sampling = object()
    results = evaluate(backend, PROBLEMS, default_score, modes=["think"], sampling=lambda m: sampling,
                       max_new_tokens=16, samples=4, pass_k=[1, 2, 4], seed=7)
    assert len(backend.calls[0]["prompts"]) == 8 and backend.calls[0]["sampling"] is sampling
    assert backend.calls[0]["seed"] == 7
    m = results["think"].metrics
    assert m["pass@1"] == pytest.approx(1 / 8)
    assert m["pass@2"] == pytest.approx(pass_at_k(4, 1, 2) / 2) and m["pass@4"] == pytest.approx(0.5)
    assert [s["sample"] for s in results["think"].samples] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_thinking_budget_inserts_the_stop_sentence_only_when_needed(tokenizer):
    budget = 12
    long_thinking = "<think>\n" + "1+1=2\n" * 10            # still thinking at the budget
    replies = [
        # phase 1 (one per problem): a still thinks at the budget; b closed its block and answers
        (long_thinking, False), ("<think>\nok\n</think>\n\n1", False),
        # phase 2: the answers
        ("5", True), ("6", True),
    ]
    backend = ScriptedBackend(tokenizer, replies)
    results = evaluate(backend, PROBLEMS, default_score, modes=["think"], sampling=lambda m: None,
                       max_new_tokens=64, budget=budget, budget_answer_tokens=8)
    phase1, phase2 = backend.calls
    assert phase1["max_new_tokens"] == budget and phase2["max_new_tokens"] == 8
    assert phase2["prompts"][0].endswith(STOP_THINKING)            # the sentence and </think>, then the answer
    assert STOP_THINKING not in phase2["prompts"][1]                # b closed its own block: no insertion
    a, b = results["think"].samples
    assert a["budget_forced"] and not b["budget_forced"]
    assert a["thinking_tokens"] == budget                           # the model's own thinking, not the sentence
    assert a["answer_tokens"] == n_tokens(tokenizer, "5")                # the inserted ".\n\n" is not the model's
    assert a["predicted"] == "5" and a["correct"]
    assert b["predicted"] == "16" and b["correct"]                  # "1" then "6": the reply went on


def test_a_reply_finished_within_the_budget_is_left_alone(tokenizer):
    backend = ScriptedBackend(tokenizer, [("<think>\nx\n</think>\n\n5", True), ("<think>\n</think>\n\n16", True)])
    results = evaluate(backend, PROBLEMS, default_score, modes=["think"], sampling=lambda m: None,
                       max_new_tokens=64, budget=32)
    assert len(backend.calls) == 1 and results["think"].accuracy == 1.0


def test_tables_show_modes_side_by_side_with_deltas(tokenizer):
    def run(answers):
        backend = ScriptedBackend(tokenizer, [(f"<think>\n</think>\n\n{a}", True) for a in answers])
        return evaluate(backend, PROBLEMS, default_score, modes=["think", "no_think"], sampling=lambda m: None,
                        max_new_tokens=16)

    results = {"teacher": run(["5", "16", "5", "0"]), "student": run(["5", "0", "0", "0"])}
    table = side_by_side(results)
    assert "| teacher | 100.0% | 50.0% | +50.0 | – | – |" in table
    assert "| student | 50.0% | 0.0% | +50.0 | -50.0 | -50.0 |" in table
    assert "| student | no_think | 0.0% |" in markdown_table(results)
