"""A lean token-by-token decoder for Qwen3 models (dense and MoE), on the model's own weights.

For the small models of on-policy rollouts, decoding is dispatch-bound: a transformers forward
for one new token runs ~30 small ops per layer plus mask, cache and RoPE bookkeeping, which
costs several times the arithmetic. This decoder does the same math for one token with fewer,
larger ops: q/k/v and gate/up projections fused into one matmul each, a preallocated KV cache
written in place, RoPE from the position directly, and one additive padding mask built once.
The prompt itself (compute-bound) goes through the transformers forward, whose KV cache is then
copied in, so only the per-token steps differ. Logits equal the transformers forward to float32
rounding (a test checks them step by step).

A MoE layer routes as transformers' Qwen3-MoE router does (softmax in float32, top-k, the
top-k renormalised when the config says so) and runs the model's own experts module on the
batch's tokens, so its experts implementation (students/experts.py on the CPU) is the one the
model trains and scores with.

`qwen3` and `qwen3_moe` with full attention, default RoPE, SiLU and plain (unquantized,
single-device) weights only; `QwenDecoder.supports(model)` says whether a model qualifies, and
callers fall back to the transformers forward otherwise.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel


class QwenDecoder:
    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        config = model.config
        layer_types = getattr(config, "layer_types", None) or ["full_attention"]
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        return (config.model_type in ("qwen3", "qwen3_moe") and set(layer_types) == {"full_attention"}
                and not getattr(config, "use_sliding_window", False) and rope == "default"
                and config.hidden_act == "silu" and getattr(model, "hf_device_map", None) is None
                and getattr(model, "quantization_method", None) is None
                and all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear)))

    def __init__(self, model: PreTrainedModel):
        self.model = model
        config, inner = model.config, model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.inv_freq = inner.rotary_emb.inv_freq.float()
        self.rope_scaling = inner.rotary_emb.attention_scaling
        self.embed = inner.embed_tokens.weight
        self.final_norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.lm_head = model.lm_head.weight
        self.layers = []
        with torch.no_grad():
            for layer in inner.layers:
                attention, mlp = layer.self_attn, layer.mlp
                blocks = dict(
                    norm1=(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                    qkv=torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]),
                    q_norm=(attention.q_norm.weight, attention.q_norm.variance_epsilon),
                    k_norm=(attention.k_norm.weight, attention.k_norm.variance_epsilon),
                    o=attention.o_proj.weight,
                    norm2=(layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon))
                if hasattr(mlp, "experts"):   # a sparse MoE block: its router and its experts module
                    router = mlp.gate
                    blocks.update(router=router.weight, top_k=router.top_k, renormalise=router.norm_topk_prob,
                                  experts=mlp.experts)
                else:
                    blocks.update(gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                                  down=mlp.down_proj.weight, intermediate=mlp.gate_proj.weight.shape[0])
                self.layers.append(blocks)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Run the (left-padded) prompts; returns the last position's logits [B, V] and keeps the
        KV cache, with room for `max_new_tokens` more."""
        batch, width = input_ids.shape
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True, logits_to_keep=1, **{cache_argument(self.model): cache}).logits[:, -1]
        total = width + max_new_tokens
        self.keys, self.values = [], []
        for layer in cache.layers:
            k = layer.keys.new_empty((batch, self.kv_heads, total, self.head_dim))
            v = layer.values.new_empty((batch, self.kv_heads, total, self.head_dim))
            k[:, :, :width], v[:, :, :width] = layer.keys, layer.values
            self.keys.append(k)
            self.values.append(v)
        # Padding columns never receive attention; generated columns always do.
        # In the weights' dtype, like every tensor of the steps below (a bf16 teacher stays bf16).
        self.mask = torch.zeros((batch, 1, 1, total), dtype=self.embed.dtype, device=logits.device)
        self.mask[:, 0, 0, :width].masked_fill_(attention_mask == 0, float("-inf"))
        self.positions = position_ids[:, -1]
        self.length = width
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B]; returns the next logits [B, V]."""
        batch = tokens.shape[0]
        self.positions = self.positions + 1
        freqs = self.positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        # Computed in float32, applied in the weights' dtype, as transformers' rotary embedding does.
        cos = (emb.cos() * self.rope_scaling)[:, None].to(self.embed.dtype)
        sin = (emb.sin() * self.rope_scaling)[:, None].to(self.embed.dtype)
        t = self.length
        self.length += 1
        groups = self.heads // self.kv_heads
        x = F.embedding(tokens, self.embed)
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            h = _rms(x, *layer["norm1"])
            qkv = F.linear(h, layer["qkv"])
            q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                 self.kv_heads * self.head_dim], dim=-1)
            q = _rms(q.view(batch, self.heads, self.head_dim), *layer["q_norm"])
            k = _rms(k.view(batch, self.kv_heads, self.head_dim), *layer["k_norm"])
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            keys[:, :, t] = k
            values[:, :, t] = v.view(batch, self.kv_heads, self.head_dim)
            q = q.view(batch, self.kv_heads, groups, self.head_dim)
            scores = torch.matmul(q, keys[:, :, :t + 1].transpose(-1, -2)) * self.scale + self.mask[..., :t + 1]
            attended = torch.matmul(scores.softmax(-1), values[:, :, :t + 1]).reshape(batch, -1)
            x = x + F.linear(attended, layer["o"])
            h = _rms(x, *layer["norm2"])
            if "experts" in layer:
                x = x + _routed_experts(h, layer)
            else:
                gate, up = F.linear(h, layer["gate_up"]).split(layer["intermediate"], dim=-1)
                x = x + F.linear(F.silu(gate) * up, layer["down"])
        return F.linear(_rms(x, *self.final_norm), self.lm_head)


def _routed_experts(h: torch.Tensor, layer: dict) -> torch.Tensor:
    """A Qwen3-MoE block on one token per row [B, H]: route, then the model's experts module."""
    probabilities = F.linear(h, layer["router"]).softmax(-1, dtype=torch.float)
    weights, chosen = probabilities.topk(layer["top_k"], dim=-1)
    if layer["renormalise"]:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return layer["experts"](h, chosen, weights.to(h.dtype))


def cache_argument(model: PreTrainedModel) -> str:
    """The forward's name for the KV cache: `cache` in recent transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
