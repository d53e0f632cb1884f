"""Model building: tiny models round-trip through save/load, and students start from a teacher."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.students.build import TeacherInitError, build_random, init_from_teacher
from distill.students.presets import get_preset


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_tiny_models_equal_after_save_and_load(tmp_path, name):
    model = build_random(get_preset(name), seed=0).eval()
    ids = torch.randint(0, 261, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == ("Qwen3MoeForCausalLM" if name == "tiny-moe" else "Qwen3ForCausalLM")
    with torch.no_grad():
        after = loaded(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_moe_student_from_teacher_layers_and_experts():
    teacher_arch = get_preset("tiny-moe").override(num_hidden_layers=4)
    teacher = build_random(teacher_arch, seed=1)
    student = build_random(get_preset("tiny-moe").override(num_hidden_layers=2, num_experts=4), seed=2)
    init_from_teacher(student, teacher, layers=[0, 3], experts=[1, 2, 5, 7])
    t, s = teacher.state_dict(), student.state_dict()
    torch.testing.assert_close(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    torch.testing.assert_close(s["model.layers.1.self_attn.q_proj.weight"], t["model.layers.3.self_attn.q_proj.weight"])
    torch.testing.assert_close(s["model.layers.0.mlp.experts.gate_up_proj"],
                               t["model.layers.0.mlp.experts.gate_up_proj"][[1, 2, 5, 7]])
    torch.testing.assert_close(s["model.layers.1.mlp.gate.weight"], t["model.layers.3.mlp.gate.weight"][[1, 2, 5, 7]])


def test_student_with_all_teacher_layers_computes_what_the_teacher_computes():
    teacher = build_random(get_preset("tiny"), seed=3).eval()
    student = build_random(get_preset("tiny"), seed=4).eval()
    init_from_teacher(student, teacher, layers=[0, 1, 2, 3])
    ids = torch.randint(0, 261, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_dense_student_of_a_moe_teacher_takes_attention_and_keeps_its_mlp():
    teacher = build_random(get_preset("tiny-moe"), seed=5)
    student = build_random(get_preset("tiny").override(num_hidden_layers=2), seed=6)
    mlp_before = student.state_dict()["model.layers.0.mlp.up_proj.weight"].clone()
    init_from_teacher(student, teacher, layers=[1, 3])
    s, t = student.state_dict(), teacher.state_dict()
    torch.testing.assert_close(s["model.layers.0.self_attn.k_proj.weight"], t["model.layers.1.self_attn.k_proj.weight"])
    torch.testing.assert_close(s["model.layers.1.self_attn.q_norm.weight"], t["model.layers.3.self_attn.q_norm.weight"])
    torch.testing.assert_close(s["model.layers.0.mlp.up_proj.weight"], mlp_before)


def test_moe_student_given_no_teacher_experts_takes_attention_and_keeps_its_own_experts():
    # The embedded default's MoE student: the teacher's width, fewer and narrower experts.
    teacher = build_random(get_preset("tiny-moe"), seed=5)
    student = build_random(get_preset("tiny-moe").override(num_experts=4, moe_intermediate_size=64), seed=6)
    experts_before = student.state_dict()["model.layers.2.mlp.experts.down_proj"].clone()
    router_before = student.state_dict()["model.layers.2.mlp.gate.weight"].clone()
    init_from_teacher(student, teacher, layers=[0, 1, 2, 3], experts=[])
    s, t = student.state_dict(), teacher.state_dict()
    torch.testing.assert_close(s["model.layers.2.self_attn.v_proj.weight"], t["model.layers.2.self_attn.v_proj.weight"])
    torch.testing.assert_close(s["model.layers.2.post_attention_layernorm.weight"],
                               t["model.layers.2.post_attention_layernorm.weight"])
    torch.testing.assert_close(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    torch.testing.assert_close(s["model.layers.2.mlp.experts.down_proj"], experts_before)
    torch.testing.assert_close(s["model.layers.2.mlp.gate.weight"], router_before)
    # Without experts=[] the narrower experts cannot be taken, and the refusal says so.
    with pytest.raises(TeacherInitError, match="moe_intermediate_size"):
        init_from_teacher(student, teacher, layers=[0, 1, 2, 3])


@pytest.mark.parametrize("student_preset, overrides, layers, experts, message", [
    ("tiny", {"hidden_size": 64, "head_dim": 16}, [0, 1, 2, 3], None, "hidden_size"),
    ("tiny", {}, [0, 1, 2, 3], [0, 1], "teacher_experts applies only to a MoE student"),
    ("tiny-moe", {"num_hidden_layers": 2}, [0, 9], None, "out of range"),
    ("tiny-moe", {"num_hidden_layers": 2}, [0], None, "has 1 entries"),
    ("tiny-moe", {"num_hidden_layers": 2, "num_experts": 4}, [0, 1], [0, 1, 2], "must list 4 expert ids"),
])
def test_impossible_teacher_init_names_the_problem(student_preset, overrides, layers, experts, message):
    teacher = build_random(get_preset("tiny-moe"), seed=0)
    student = build_random(get_preset(student_preset).override(**overrides), seed=0)
    with pytest.raises(TeacherInitError, match=message):
        init_from_teacher(student, teacher, layers=layers, experts=experts)


@pytest.mark.parametrize("quantization, layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_a_teacher_loads_quantized_through_bitsandbytes(tmp_path, quantization, layer):
    from distill.students.build import load_pretrained

    arch = get_preset("tiny").override(num_hidden_layers=2)
    reference = build_random(arch, seed=0)
    reference.save_pretrained(tmp_path)
    quantized = load_pretrained(str(tmp_path), quantization=quantization)
    assert any(type(m).__name__ == layer for m in quantized.modules())
    assert quantized.get_memory_footprint() < reference.get_memory_footprint()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        logits = quantized(ids).logits
    assert torch.isfinite(logits).all() and logits.shape == reference(ids).logits.shape
