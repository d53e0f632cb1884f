"""The lean Qwen3 decoder (dense and MoE) against the transformers forward: same logits at every
step, same greedy tokens as model.generate, and a fall-back for models it does not cover."""

import pytest
import torch
from transformers import GenerationConfig

from conftest import scaled_model
from distill.students.build import build_random
from distill.students.chat import render_prompt
from distill.students.decode import QwenDecoder
from distill.students.generation import generate
from distill.students.presets import get_preset


def _dense(seed=0, **overrides):
    return scaled_model("tiny", seed, 0.3, num_hidden_layers=2, hidden_size=128, head_dim=32, intermediate_size=256,
                        **overrides).eval()


def _moe(seed=0, **overrides):
    """A Qwen3-MoE whose first layer has a dense MLP (`mlp_only_layers`), so both blocks are covered."""
    return scaled_model("tiny-moe", seed, 0.3, num_hidden_layers=2, hidden_size=128, head_dim=32,
                        moe_intermediate_size=64, intermediate_size=256, mlp_only_layers=[0], **overrides).eval()


MODELS = {"dense": _dense, "moe": _moe}


def _prompts(tokenizer, count=5):
    return [render_prompt(tokenizer, [{"role": "user", "content": "7*" * (i + 1) + f"{i} mod 10"}], "think")
            for i in range(count)]


@pytest.mark.parametrize("kind", MODELS)
def test_step_logits_equal_the_transformers_forward(tokenizer, kind):
    model = MODELS[kind]()
    assert QwenDecoder.supports(model)
    prompts = _prompts(tokenizer)
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):   # left padding, prompts of different lengths
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    decoder = QwenDecoder(model)
    logits = decoder.prefill(ids, mask, max_new_tokens=6)
    sequence, full_mask = ids, mask
    for _ in range(6):
        token = logits.argmax(-1)
        sequence = torch.cat([sequence, token[:, None]], 1)
        full_mask = torch.cat([full_mask, torch.ones_like(token)[:, None]], 1)
        logits = decoder.step(token)
        with torch.no_grad():
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            reference = model(input_ids=sequence, attention_mask=full_mask, position_ids=positions).logits[:, -1]
        torch.testing.assert_close(logits, reference, rtol=0, atol=2e-5)


def test_a_bf16_model_decodes_in_bf16_close_to_the_transformers_forward(tokenizer):
    # teacher=transformers loads bf16 weights: every step stays in that dtype (a float32 mask
    # or rotary table would stop the matmuls with a dtype error).
    model = _dense().to(torch.bfloat16)
    prompts = _prompts(tokenizer, 3)
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    decoder = QwenDecoder(model)
    token = decoder.prefill(ids, mask, max_new_tokens=2).argmax(-1)
    logits = decoder.step(token)
    with torch.no_grad():
        sequence, full_mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(token)[:, None]], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        reference = model(input_ids=sequence, attention_mask=full_mask, position_ids=positions).logits[:, -1]
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference.float(), rtol=0.05, atol=0.1)   # bf16 rounding
    assert len(generate(model, tokenizer, prompts, max_new_tokens=8, sampling=None, progress=False)) == 3


@pytest.mark.parametrize("kind", MODELS)
def test_greedy_generation_equals_model_generate(tokenizer, kind):
    model = MODELS[kind](seed=1, num_key_value_heads=2)   # grouped-query attention
    assert QwenDecoder.supports(model)
    prompts = _prompts(tokenizer, 6)
    ours = generate(model, tokenizer, prompts, max_new_tokens=16, sampling=None, progress=False)
    for prompt, generation in zip(prompts, ours):
        out = model.generate(input_ids=torch.tensor([prompt]), generation_config=GenerationConfig(
            max_new_tokens=16, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            suppress_tokens=list(range(len(tokenizer), model.config.vocab_size))))
        expected = out[0, len(prompt):].tolist()
        if tokenizer.eos_token_id in expected:
            expected = expected[:expected.index(tokenizer.eos_token_id) + 1]
        assert generation.ids == expected


def test_routing_follows_the_model(tokenizer):
    """Both router settings (top-k renormalised or not) and a second expert count decode as the
    transformers forward does."""
    for overrides in ({"norm_topk_prob": False}, {"num_experts": 4, "num_experts_per_tok": 1}):
        model = _moe(seed=2, **overrides)
        prompts = _prompts(tokenizer, 3)
        ours = generate(model, tokenizer, prompts, max_new_tokens=10, sampling=None, progress=False)
        reference = generate(model, tokenizer, prompts, max_new_tokens=10, sampling=None, progress=False, lean=False)
        assert [g.ids for g in ours] == [g.ids for g in reference], overrides


def test_other_models_use_the_transformers_forward(tokenizer):
    model = _dense()
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert not QwenDecoder.supports(model)
    out = generate(model, tokenizer, _prompts(tokenizer, 2), max_new_tokens=4, sampling=None, progress=False)
    assert all(len(g.ids) <= 4 for g in out)
