"""The size table: every released preset has the released parameter counts (built on meta)."""

import pytest

from distill.students.build import build_random, count_parameters, hf_config
from distill.students.presets import PRESETS, get_preset

# ../shared/reference/qwen3.md, "Parameter counts": total, non-embedding, activated (billions).
RELEASED = {
    "0.6b": (0.596, 0.440, None),
    "1.7b": (1.721, 1.409, None),
    "4b": (4.022, 3.634, None),
    "8b": (8.191, 6.946, None),
    "14b": (14.768, 13.212, None),
    "32b": (32.762, 31.206, None),
    "30b-a3b": (30.532, 29.910, 3.353),
    "235b-a22b": (235.094, 233.849, 22.191),
}


def test_table_has_tiny_and_eight_released_sizes():
    assert list(PRESETS) == ["tiny", "tiny-moe", *RELEASED]


@pytest.mark.parametrize("name", list(RELEASED))
def test_parameter_counts_match_the_release(name):
    counts = count_parameters(build_random(get_preset(name), device="meta"))
    total, non_embedding, activated = RELEASED[name]
    assert round(counts.total / 1e9, 3) == total
    assert round(counts.non_embedding / 1e9, 3) == non_embedding
    assert round(counts.activated / 1e9, 3) == (activated if activated is not None else total)


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_carries_every_field(name):
    arch = get_preset(name)
    config = hf_config(arch)
    assert config.head_dim == arch.head_dim  # set explicitly: not hidden/heads for 0.6b, 4b, 32b, 235b
    assert config.rope_parameters["rope_theta"] == arch.rope_theta
    assert config.tie_word_embeddings == arch.tie_word_embeddings
    assert config.num_key_value_heads == arch.num_key_value_heads
    if arch.is_moe:
        assert config.norm_topk_prob is True  # transformers' default (False) differs from the release
        assert (config.num_experts, config.num_experts_per_tok) == (arch.num_experts, arch.num_experts_per_tok)
        assert config.moe_intermediate_size == arch.moe_intermediate_size
        assert config.router_aux_loss_coef == 0.001


def test_released_common_fields():
    for name in RELEASED:
        arch = get_preset(name)
        assert (arch.vocab_size, arch.rope_theta, arch.max_position_embeddings, arch.rms_norm_eps) == \
            (151936, 1e6, 40960, 1e-6)


def test_unknown_preset_and_override_field_name_the_choices():
    with pytest.raises(KeyError, match="valid: tiny, tiny-moe, 0.6b"):
        get_preset("5b")
    with pytest.raises(ValueError, match="hidden_sise"):
        get_preset("tiny").override(hidden_sise=8)
    assert get_preset("4b").override(num_hidden_layers=2).num_hidden_layers == 2
