"""Packed micro-batches (several sequences per row, positions restarting, attention kept inside
each sequence) train exactly like one padded row per sequence; activation checkpointing leaves
the gradients unchanged."""

import pytest
import torch

from distill.config import LossConfig
from distill.data import Example, collate, pack_rows
from distill.train import cross_entropy_objective, distillation_objective
from distill.students.build import checkpoint_activations
from test_train import REAL, _assert_same, _examples, _gradients, _model


def test_rows_hold_every_sequence_once_no_wider_than_the_longest():
    lengths = [7, 3, 12, 5, 5, 9, 1, 16, 4, 8]
    rows = pack_rows(lengths)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    fills = [sum(lengths[i] for i in row) for row in rows]
    assert max(fills) == 16
    assert len(rows) == -(-sum(lengths) // 16)   # 70 tokens: 5 rows of 16 are the fewest possible
    assert sorted(pack_rows([9, 8, 9])) == [[0], [1], [2]]   # nothing fits beside another: one per row


def test_packing_removes_most_padding_and_says_how_much_there_was():
    examples = _with_long_first(_examples(16, seed=5))
    padded, packed = collate(examples, 0, 64), collate(examples, 0, 64, pack=True)
    assert packed.input_ids.numel() < padded.input_ids.numel()
    assert packed.num_targets == padded.num_targets
    real = int(padded.attention_mask.sum())
    assert packed.stats["padding"] == pytest.approx(1 - real / packed.input_ids.numel())
    assert packed.stats["padding_unpacked"] == pytest.approx(padded.stats["padding"])
    assert packed.stats["padding"] < packed.stats["padding_unpacked"]
    # Positions restart at every sequence; a padded batch has none (the model counts them).
    assert packed.position_ids is not None and padded.position_ids is None
    assert int((packed.position_ids == 0).sum()) >= len(examples)


def _with_long_first(examples):
    """The examples with the first made four times longer, which leaves room beside it."""
    first = examples[0]
    return [Example(first.prompt, first.response * 4, first.topk_ids.repeat(4, 1), first.topk_logprobs.repeat(4, 1)),
            *examples[1:]]


def test_a_sequence_in_a_packed_row_does_not_see_its_neighbours():
    # Changing the first sequence of a row changes nothing about the logits of the second.
    model = _model().eval()
    examples = _with_long_first(_examples(3, seed=6))
    batch = collate(examples, 0, 64, pack=True)
    assert batch.input_ids.shape[0] == 2   # the long one alone, the two short ones side by side
    row = 1 if batch.attention_mask[0].all() else 0
    first = len(examples[1].prompt) + len(examples[1].response)
    second = slice(first, first + len(examples[2].prompt) + len(examples[2].response))
    with torch.no_grad():
        before = model(**batch.model_inputs(), use_cache=False).logits[row, second]
        batch.input_ids[row, :first] = (batch.input_ids[row, :first] + 1) % 256
        after = model(**batch.model_inputs(), use_cache=False).logits[row, second]
    torch.testing.assert_close(before, after)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("implementation", ["chunked", "naive"])
def test_packed_step_has_the_padded_steps_loss_and_gradients(preset, implementation):
    examples = _examples(10, seed=7)
    padded, packed = collate(examples, 0, 64), collate(examples, 0, 64, pack=True)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]
    model = _model(preset)
    objective = distillation_objective(LossConfig(divergence="jsd", ce_weight=0.3, implementation=implementation), REAL)
    loss_padded, metrics_padded = objective(model, padded, padded.num_targets)
    loss_packed, metrics_packed = objective(model, packed, packed.num_targets)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-7)
    if preset == "tiny-moe":   # the balancing loss counts real tokens only, either way
        assert metrics_packed["moe_aux_loss"] == pytest.approx(metrics_padded["moe_aux_loss"], rel=1e-5)
    _assert_same(_gradients(model, [packed], objective, packed.num_targets),
                 _gradients(model, [padded], objective, padded.num_targets))


def test_packed_cross_entropy_equals_padded():
    examples = _examples(9, seed=8)
    padded, packed = collate(examples, 0, 64), collate(examples, 0, 64, pack=True)
    objective = cross_entropy_objective(REAL)
    model = _model("tiny-moe")
    _assert_same(_gradients(model, [packed], objective, packed.num_targets),
                 _gradients(model, [padded], objective, padded.num_targets))


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_activation_checkpointing_leaves_the_gradients_unchanged(preset):
    examples = _examples(6, seed=9)
    batch = collate(examples, 0, 64, pack=True)
    objective = distillation_objective(LossConfig(ce_weight=0.2), REAL)
    model = _model(preset).train()
    plain = _gradients(model, [batch], objective, batch.num_targets)
    checkpoint_activations(model)
    recomputed = [layer for layer in model.model.layers if layer.gradient_checkpointing]
    assert len(recomputed) == len(model.model.layers)
    _assert_same(_gradients(model, [batch], objective, batch.num_targets), plain)
