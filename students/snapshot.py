"""A student's weights as an inference engine loads them: the checkpoint layout, one
safetensors file, written atomically.

What a trainer holds is not what a released checkpoint holds: transformers v5 keeps a Qwen3-MoE
layer's experts as fused tensors (`experts.gate_up_proj` [E, 2I, H]) while checkpoints, and the
loaders of vLLM, name one tensor per expert (`experts.3.gate_proj.weight`). `checkpoint_tensors`
converts with transformers' own reverse mapping (what `save_pretrained` writes).

A served copy is also *untied*: `lm_head.weight` is written out even when the student ties it to
the embedding. vLLM 0.32 reloads weights in place layer by layer, and a tied lm_head receives no
tensor of its own in that pass: it is put back as it was, silently keeping the old weights (seen:
log-probabilities off by ~1 nat after a reload). An untied copy has its own tensor, so every
layer is reloaded; the model computes the same function.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.core_model_loading import revert_weight_conversion

WEIGHTS = "model.safetensors"


def checkpoint_tensors(model: PreTrainedModel, dtype: torch.dtype | None = None, *, copy: bool = False
                       ) -> dict[str, torch.Tensor]:
    """The model's weights under the names and shapes of its released checkpoint, with an untied
    lm_head, in `dtype` (None: as held), on the CPU. `copy=True` returns tensors that later
    training steps do not change (for a snapshot written while the trainer moves on)."""
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    state = revert_weight_conversion(model, state)
    state["lm_head.weight"] = model.get_output_embeddings().weight.detach()
    out = {}
    for name, tensor in state.items():
        converted = tensor.to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
        # A conversion (another dtype or device) is a copy already; only a view needs one.
        shares = converted.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
        out[name] = converted.clone() if copy and shares else converted
    if not copy:
        # safetensors refuses tensors that share storage (the tied lm_head and its embedding).
        seen: set[int] = set()
        for name, tensor in out.items():
            if tensor.untyped_storage().data_ptr() in seen:
                out[name] = tensor.clone()
            seen.add(out[name].untyped_storage().data_ptr())
    return out


def write_weights(tensors: dict[str, torch.Tensor], folder: Path | str) -> Path:
    """`tensors` as `<folder>/model.safetensors`; the folder appears whole or not at all (written
    beside it, then renamed). Returns the folder."""
    folder = Path(folder)
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(tensors, str(partial / WEIGHTS), metadata={"format": "pt"})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


def write_served_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path | str,
                       dtype: torch.dtype | None = None) -> Path:
    """A model folder an engine can start from: the untied config, the tokenizer, the weights."""
    folder = Path(folder)
    write_weights(checkpoint_tensors(model, dtype), folder)
    config = model.config.to_dict()
    config.update(tie_word_embeddings=False, architectures=[type(model).__name__])
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)
    return folder
