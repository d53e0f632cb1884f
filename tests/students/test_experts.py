"""The experts' forward distill's MoE models train with (students/experts.py) against
transformers' own grouped_mm: the same outputs, the same gradients to float rounding, and
nothing of it in a saved config."""

import json

import torch

from distill.students import experts
from distill.students.build import build_random
from distill.students.presets import get_preset


def _model(implementation: str):
    model = build_random(get_preset("tiny-moe").override(hidden_size=64, head_dim=16, num_hidden_layers=2), seed=0)
    model.set_experts_implementation(implementation)
    return model


def _loss_and_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_built_moe_models_use_it():
    assert _model(experts.NAME).config._experts_implementation == experts.NAME
    assert build_random(get_preset("tiny-moe"), seed=0).config._experts_implementation == experts.NAME


def test_same_outputs_and_gradients_as_transformers_grouped_mm():
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (3, 17))
    ours, theirs = _model(experts.NAME), _model("grouped_mm")
    logits, grads = _loss_and_grads(ours, ids)
    logits_ref, grads_ref = _loss_and_grads(theirs, ids)
    # The gathers copy: the forward is the same arithmetic in the same order.
    assert torch.equal(logits, logits_ref)
    assert grads.keys() == grads_ref.keys()
    expert_grads = [n for n in grads if "experts" in n]
    assert expert_grads   # the routed experts did get gradients
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_not_saved_in_the_config(tmp_path):
    _model(experts.NAME).save_pretrained(tmp_path)
    assert experts.NAME not in (tmp_path / "config.json").read_text()
    assert "experts_implementation" not in json.loads((tmp_path / "config.json").read_text())


def test_other_devices_take_transformers_path(monkeypatch):
    """On the meta device (standing in for any non-CPU device) the call is transformers' own."""
    model = _model(experts.NAME).to("meta", dtype=torch.bfloat16)
    block = model.model.layers[0].mlp.experts
    hidden = torch.empty(5, 64, device="meta", dtype=torch.bfloat16)
    index = torch.zeros(5, 2, dtype=torch.long, device="meta")
    weights = torch.empty(5, 2, device="meta", dtype=torch.bfloat16)
    called = []
    original = experts.grouped_mm_experts_forward
    monkeypatch.setattr(experts, "grouped_mm_experts_forward", lambda *a: called.append(True) or original(*a))
    out = experts.grouped_mm_index_select(block, hidden, index, weights)
    assert called and out.shape == (5, 64)


def test_loaded_models_take_it_unless_told_otherwise(tmp_path):
    _model(experts.NAME).save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    from distill.students.build import load_pretrained

    assert load_pretrained(str(tmp_path)).config._experts_implementation == experts.NAME
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    assert experts.use_in(eager).config._experts_implementation == "eager"
