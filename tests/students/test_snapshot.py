"""A student's weights in checkpoint layout (students/snapshot.py): a copy for the engine that
later training steps do not change, in the engine's dtype; the served copy is untied."""

import pytest
import torch

from distill.config import default_students
from distill.students.build import build_random
from distill.students.snapshot import checkpoint_tensors


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_copy_does_not_follow_the_trainers_weights_and_a_view_does(dtype):
    model = build_random(default_students()["dense"].architecture, seed=0)
    copied = checkpoint_tensors(model, dtype, copy=True)
    viewed = checkpoint_tensors(model, dtype)
    before = {name: tensor.clone() for name, tensor in copied.items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(copied[name], before[name]) for name in before)
    assert "lm_head.weight" in copied and copied["lm_head.weight"].dtype == (dtype or torch.float32)
    # Without copy, float32 tensors are the trainer's own storage (no copy made); another dtype
    # is a conversion, a copy either way.
    moved = sum(not torch.equal(viewed[name], before[name]) for name in before)
    assert moved == (0 if dtype is not None else len(before) - 1)   # all but the untied lm_head
