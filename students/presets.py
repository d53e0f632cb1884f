"""The one table of Qwen3 sizes: two tiny presets for CPU runs and the eight released models.

Field names are those of the released `config.json` files so that a preset reads like the file
it copies and maps 1:1 onto transformers' `Qwen3Config` / `Qwen3MoeConfig`. The preset key is
also the Hydra option name and the CLI word (`+student=4b`).

Common to all released sizes (Qwen3 report; config.json): vocab 151,936 (151,669 real tokens),
rope_theta 1e6, rms_norm_eps 1e-6, max_position_embeddings 40,960, no attention bias, SiLU.
MoE sizes: norm_topk_prob true, router_aux_loss_coef 0.001, decoder_sparse_step 1, no shared
experts. head_dim is 128 everywhere and is NOT hidden_size / num_attention_heads for 0.6b, 4b,
32b and 235b-a22b, so it is always set explicitly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace


@dataclass(frozen=True)
class Architecture:
    """A Qwen3 (dense) or Qwen3-MoE architecture; `num_experts > 0` makes it MoE."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    vocab_size: int = 151936
    max_position_embeddings: int = 40960
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    # Mixture of experts (0 experts: a dense model; these fields are then unused).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = field(default_factory=tuple)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def override(self, **changes) -> "Architecture":
        """A copy with some fields changed (how any preset is shrunk or widened)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"unknown architecture field(s) {unknown}; valid: {[f.name for f in fields(self)]}")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mlp_only_layers"] = list(self.mlp_only_layers)
        return data


# Tiny sizes for CPU runs, sharing the blocks of the released models (GQA 2:1, QK-norm, SwiGLU,
# top-2 of 8 experts) at width 128. Their vocabulary is the built-in byte-level tokenizer's,
# padded to 272 rows as Qwen3 pads 151,669 tokens to 151,936; 512 positions cover the built-in
# task. tiny-moe (1.8M parameters) is the embedded teacher; tiny (0.6M) the dense student.
_TINY = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    tie_word_embeddings=True, vocab_size=272, max_position_embeddings=512, rope_theta=10_000.0,
)

PRESETS: dict[str, Architecture] = {
    "tiny": Architecture(intermediate_size=256, **_TINY),
    "tiny-moe": Architecture(
        intermediate_size=512, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, **_TINY
    ),
    # Qwen/Qwen3-0.6B/config.json
    "0.6b": Architecture(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    # Qwen/Qwen3-1.7B/config.json
    "1.7b": Architecture(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    # Qwen/Qwen3-4B/config.json
    "4b": Architecture(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    # Qwen/Qwen3-8B/config.json
    "8b": Architecture(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    # Qwen/Qwen3-14B/config.json
    "14b": Architecture(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    # Qwen/Qwen3-32B/config.json
    "32b": Architecture(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    # Qwen/Qwen3-30B-A3B/config.json
    "30b-a3b": Architecture(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                            num_attention_heads=32, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False,
                            num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
    # Qwen/Qwen3-235B-A22B/config.json
    "235b-a22b": Architecture(hidden_size=4096, intermediate_size=12288, num_hidden_layers=94,
                              num_attention_heads=64, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False,
                              num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536),
}


def get_preset(name: str) -> Architecture:
    if name not in PRESETS:
        raise KeyError(f"unknown size preset '{name}'; valid: {', '.join(PRESETS)}")
    return PRESETS[name]
