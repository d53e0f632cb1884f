"""A model as a speculative-decoding draft: alpha against an independent float64 1 - TVD, the
renewal estimate against a simulated decoder, a draft equal to its target (every token kept),
greedy speculative decoding reproducing the target's own greedy output, and the CLI's refusals."""

import copy
import json
import math
import random

import numpy as np
import pytest
import torch

from distill.eval.__main__ import main
from distill.eval.acceptance import acceptance_rates, expected_forwards, iid_tokens_per_forward, tokens_per_forward
from distill.eval.speculative import draft_eval, measure_speculative, score_positions
from distill.eval.tasks import Problem
from distill.students.chat import MODE_SAMPLING, Sampling, render_prompt
from distill.students.generation import generate
from tests.conftest import needs_vllm, scaled_model

SETTINGS = [MODE_SAMPLING["think"], MODE_SAMPLING["no_think"], Sampling(temperature=1.3, top_p=1.0, top_k=0)]
PROBLEMS = [Problem(id=str(i), messages=[{"role": "user", "content": q}], reference="")
            for i, q in enumerate(["1+2", "3*4 mod 10", "7-5", "9+9"])]


def sampled_distribution_f64(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """The sampler's distribution written out again in float64 with numpy: temperature, keep the
    k largest, then the smallest prefix (by descending probability) whose mass reaches top_p."""
    z = logits.astype(np.float64) / s.temperature
    keep = np.ones_like(z, dtype=bool)
    order = np.argsort(-z, kind="stable")
    if s.top_k and s.top_k < z.size:
        keep[order[s.top_k:]] = False
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if s.top_p < 1.0:
        mass, kept = 0.0, np.zeros_like(keep)
        for index in order:
            if not keep[index] or mass >= s.top_p:
                break
            kept[index], mass = True, mass + p[index]
        p = np.where(kept, p, 0.0)
        p /= p.sum()
    return p


def one_minus_tvd_f64(target_logits, draft_logits, s: Sampling) -> np.ndarray:
    return np.array([1.0 - 0.5 * np.abs(sampled_distribution_f64(a, s) - sampled_distribution_f64(b, s)).sum()
                     for a, b in zip(target_logits, draft_logits)])


@pytest.mark.parametrize("sampling", SETTINGS, ids=["think", "no_think", "untruncated"])
def test_alpha_is_one_minus_the_total_variation_distance(sampling):
    generator = torch.Generator().manual_seed(0)
    p_logits = torch.randn(64, 300, generator=generator) * 3
    q_logits = p_logits + torch.randn(64, 300, generator=generator)   # a close but different draft
    alpha = acceptance_rates(p_logits, q_logits, sampling)
    expected = one_minus_tvd_f64(p_logits.double().numpy(), q_logits.double().numpy(), sampling)
    np.testing.assert_allclose(alpha.numpy(), expected, atol=1e-5)
    assert 0.05 < expected.mean() < 0.95   # neither trivially equal nor disjoint
    assert torch.allclose(acceptance_rates(p_logits, p_logits, sampling), torch.ones(64))
    # greedy: both one-hot, alpha is argmax agreement
    greedy = acceptance_rates(p_logits, q_logits, None)
    assert torch.equal(greedy, (p_logits.argmax(-1) == q_logits.argmax(-1)).float())


def simulate_forwards(alphas: list[float], gamma: int, runs: int, rng: random.Random) -> float:
    """A speculative decoder where the draft at position t is kept with probability alphas[t]."""
    total = 0
    for _ in range(runs):
        t = 0
        while t < len(alphas):
            total += 1
            accepted = 0
            while accepted < gamma and t + accepted < len(alphas) and rng.random() < alphas[t + accepted]:
                accepted += 1
            t += accepted + 1
    return total / runs


def test_the_renewal_estimate_equals_a_simulated_decoder_and_its_limits():
    rng = random.Random(0)
    alphas = [rng.choice([0.2, 0.6, 0.95, 1.0]) for _ in range(40)]
    for gamma in (1, 3, 8):
        assert expected_forwards(alphas, gamma) == pytest.approx(simulate_forwards(alphas, gamma, 40_000, rng), rel=0.01)
    length = 37
    for gamma in (1, 4, 8):
        assert expected_forwards([1.0] * length, gamma) == pytest.approx(math.ceil(length / (gamma + 1)))
        assert expected_forwards([0.0] * length, gamma) == pytest.approx(length)
    # one long response at constant alpha: the renewal estimate tends to the i.i.d. closed form
    for alpha in (0.3, 0.8, 0.97):
        assert tokens_per_forward([[alpha] * 20_000], 4) == pytest.approx(iid_tokens_per_forward(alpha, 4), rel=1e-3)
    assert iid_tokens_per_forward(1.0, 4) == 5.0 and iid_tokens_per_forward(0.0, 4) == 1.0


@pytest.fixture(scope="module")
def models():
    """A MoE target (as the embedded teacher) and a dense draft that differs from it."""
    target = scaled_model("tiny-moe", seed=3, scale=0.3).eval()
    draft = scaled_model("tiny", seed=4, scale=0.3).eval()
    return target, draft


def test_a_draft_equal_to_its_target_has_every_token_accepted(models, tokenizer):
    target, _ = models
    target, same = copy.deepcopy(target), copy.deepcopy(target)
    for model in (target, same):   # generation configs as release folders ship them: the eval's settings win
        model.generation_config.update(do_sample=True, temperature=1.7, top_p=0.5, top_k=3)
    results = draft_eval(target, {"self": same}, tokenizer, PROBLEMS, modes=["think", "no_think"],
                         sampling=lambda mode: MODE_SAMPLING[mode], max_new_tokens=14, gammas=[1, 4], gamma=4,
                         measure_prompts=3, progress=False)
    for mode, result in results["self"].items():
        assert result.alpha == pytest.approx(1.0, abs=1e-6) and result.greedy_agreement == 1.0, mode
        assert result.responses == 4 and result.tokens > 4
        m = result.measured
        # every drafted token kept: each target forward yields gamma + 1 tokens until the response ends
        assert m.target_forwards == sum(math.ceil(n / 5) for n in m.lengths), mode
        assert m.tokens == sum(m.lengths) and m.speedup > 0


def perturbed(model, std, seed=0):
    """A copy of `model` with noise on every matrix: a draft that is close to it, not equal."""
    copied = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in copied.parameters():
            if parameter.ndim >= 2:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    return copied


def test_alpha_of_a_different_draft_matches_float64_one_minus_tvd(models, tokenizer):
    target, _ = models
    draft = perturbed(target, 0.1)
    sampling = MODE_SAMPLING["think"]
    prompts = [render_prompt(tokenizer, p.messages, "think") for p in PROBLEMS]
    replies = generate(target, tokenizer, prompts, max_new_tokens=14, sampling=sampling, seed=0, progress=False)
    pairs = [(p, r.ids) for p, r in zip(prompts, replies)]
    alphas, agreement = score_positions(target, draft, pairs, sampling, vocab=len(tokenizer), progress=False)

    # independently: both models in float64, full forward over prompt + response, numpy distributions
    target64, draft64 = copy.deepcopy(target).double(), copy.deepcopy(draft).double()
    for model in (target64, draft64):
        model.set_experts_implementation("eager")   # grouped_mm has no float64
    expected, agree = [], []
    for prompt, response in pairs:
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            p = target64(ids).logits[0, len(prompt) - 1:-1, :len(tokenizer)].numpy()
            q = draft64(ids).logits[0, len(prompt) - 1:-1, :len(tokenizer)].numpy()
        expected.append(one_minus_tvd_f64(p, q, sampling))
        agree.append((p.argmax(-1) == q.argmax(-1)).astype(float))
    for got, want in zip(alphas, expected):
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert [list(a) for a in agree] == agreement
    mean = np.concatenate(expected).mean()
    assert 0.05 < mean < 0.95

    result = draft_eval(target, {"draft": draft}, tokenizer, PROBLEMS, modes=["think"], sampling=lambda _: sampling,
                        max_new_tokens=14, gammas=[4], gamma=4, measure_prompts=0, progress=False)["draft"]["think"]
    assert result.alpha == pytest.approx(mean, abs=1e-4) and result.measured is None
    assert 1.0 < result.tokens_per_forward[4] < 5.0


def test_greedy_speculative_decoding_reproduces_the_targets_own_greedy_output(models, tokenizer):
    target, _ = models
    draft = perturbed(target, 0.1)   # accepts some drafts and rejects others
    prompts = [render_prompt(tokenizer, p.messages, mode) for p in PROBLEMS for mode in ("think", "no_think")]
    # two drafts measured together: the target alone decodes once, timed beside both
    both = measure_speculative(target, {"perturbed": draft, "itself": copy.deepcopy(target)}, tokenizer, prompts, sampling=None,
                               gamma=3, max_new_tokens=16, progress=False)
    measured, itself = both["perturbed"], both["itself"]
    assert measured.greedy_equal is True and itself.greedy_equal is True
    # and the target's own greedy output is the project's decoding loop's too
    own = generate(target, tokenizer, prompts, max_new_tokens=16, sampling=None, progress=False)
    assert sum(len(g.ids) for g in own) == measured.baseline_tokens == measured.tokens == itself.tokens
    assert measured.tokens / 4 < measured.target_forwards < measured.tokens
    # a draft that is a copy of the target has every proposal accepted: gamma + 1 tokens a forward
    # (the last round of each prompt may be shorter)
    assert itself.target_forwards < measured.target_forwards
    assert itself.baseline_seconds == measured.baseline_seconds


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer, tiny_model):
    root = tmp_path_factory.mktemp("drafts")
    return {"target": tiny_model(root / "target", tokenizer, "tiny-moe", seed=3),
            "draft": tiny_model(root / "draft", tokenizer, "tiny", seed=4)}


def test_draft_for_on_the_command_line(saved, tmp_path, capsys):
    out = tmp_path / "draft"
    assert main([f"draft_for={saved['target']}", f"models=[{saved['draft']},{saved['target']}]", "draft.problems=3",
                 "draft.measure_prompts=2", "draft.gammas=[1,2,4]", "task.max_new_tokens=8", f"out_dir={out}",
                 "logger=none", f"cache_dir={tmp_path / 'cache'}", "progress=false"]) == 0
    printed = capsys.readouterr().out
    assert "| draft | think |" in printed and "| draft | no_think |" in printed and "| target |" not in printed
    report = json.loads((out / "draft.json").read_text())
    assert set(report["drafts"]) == {"draft"} and set(report["drafts"]["draft"]) == {"think", "no_think"}
    assert report["drafts"]["draft"]["think"]["responses"] == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("draft/draft/no_think/measured/speedup" in r for r in records)
    table = next(r for r in records if r.get("table") == "draft/table")
    assert [row[:2] for row in table["rows"]] == [["draft", "think"], ["draft", "no_think"]]
    assert "γ=4" in (out / "draft.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["models=[]"], "draft_for needs drafts"),
    (["draft.gamma=0"], "draft.gamma must be positive"),
    (["backend.kind=vllm", "backend.url=http://127.0.0.1:9"], "draft_for starts its own vLLM servers"),
    (["backend.kind=vllm"], "vLLM's CPU attention has no head_dim 16 ('target'"),
    (["FOREIGN"], "does not share the tokenizer of the target"),
])
def test_draft_for_refusals_are_one_line(saved, extra, message, tmp_path, capsys, foreign_tokenizer, tiny_model):
    if extra == ["FOREIGN"]:
        foreign = tmp_path / "foreign"
        scaled_model("tiny", seed=1).save_pretrained(foreign)
        foreign_tokenizer.save_pretrained(foreign)
        extra = [f"models=[{foreign}]"]
    capsys.readouterr()
    out = tmp_path / "never"
    args = [f"draft_for={saved['target']}", f"models=[{saved['draft']}]", *extra, f"out_dir={out}", "logger=none",
            f"cache_dir={tmp_path / 'cache'}", "progress=false"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@needs_vllm
def test_vllm_draft_model_speculator_keeps_greedy_output(tmp_path, tokenizer, capsys):
    """`backend.kind=vllm`: the target served alone and with the draft as vLLM's draft-model
    speculator, greedy; vLLM's own counters give the tokens per target forward."""
    target = scaled_model("tiny-moe", seed=3, scale=0.3, head_dim=32)
    perturbed(target, 0.03).save_pretrained(tmp_path / "draft")
    target.save_pretrained(tmp_path / "target")
    for folder in ("draft", "target"):
        tokenizer.save_pretrained(tmp_path / folder)
    out = tmp_path / "out"
    assert main([f"draft_for={tmp_path / 'target'}", f"models=[{tmp_path / 'draft'}]", "backend.kind=vllm",
                 "backend.max_model_len=256", "greedy=true", "draft.problems=4", "draft.measure_prompts=4",
                 "draft.gamma=3", "task.max_new_tokens=24", f"out_dir={out}", "logger=none",
                 f"cache_dir={tmp_path / 'cache'}", "progress=false"]) == 0
    assert "vLLM greedy: measured" in capsys.readouterr().out
    report = json.loads((out / "draft.json").read_text())["drafts"]["draft"]
    for mode, result in report.items():
        vllm, ours = result["measured_vllm"], result["measured"]
        assert vllm["greedy_equal"] is True and ours["greedy_equal"] is True, mode
        assert 1.0 <= vllm["tokens_per_forward"] <= 4.0 and vllm["target_forwards"] > vllm["prompts"], mode
        assert vllm["acceptance_length"] >= 1.0, mode
        assert vllm["baseline_tokens"] == ours["baseline_tokens"], mode   # the same greedy responses
