"""The training objective: step-global normalisation (accumulation and data-parallel ranks),
prompt tokens without influence, chunked and naive paths in agreement, MoE balancing included."""

import pytest
import torch

from distill.config import LossConfig
from distill.data import Example, collate
from distill.students.build import build_random
from distill.students.presets import PRESETS
from distill.train import distillation_objective

VOCAB = 272  # the tiny presets' padded embedding
REAL = 261


def _model(preset="tiny", seed=0):
    arch = PRESETS[preset].override(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=16,
                                    **({"moe_intermediate_size": 32} if preset == "tiny-moe" else {}))
    return build_random(arch, seed=seed)


def _examples(count, seed, k=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        prompt = torch.randint(0, 256, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        length = int(torch.randint(1, 9, (1,), generator=g))
        response = torch.randint(0, 256, (length,), generator=g).tolist()
        ids = torch.stack([torch.randperm(REAL, generator=g)[:k] for _ in range(length)])
        logprobs = torch.log_softmax(torch.randn(length, k + 1, generator=g) * 2, -1)[:, :k]
        out.append(Example(prompt, response, ids, logprobs))
    return out


def _gradients(model, micro_batches, objective, normaliser):
    model.zero_grad(set_to_none=True)
    for batch in micro_batches:
        loss, _ = objective(model, batch, normaliser)
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_accumulated_micro_batches_give_the_gradient_of_one_big_batch(divergence):
    model = _model()
    examples = _examples(6, seed=1)
    objective = distillation_objective(LossConfig(divergence=divergence, ce_weight=0.2), REAL)
    whole = collate(examples, pad_id=0, max_length=64)
    # Unequal micro-batches: 1 and 5 examples, different target counts.
    micro = [collate(examples[:1], pad_id=0, max_length=64), collate(examples[1:], pad_id=0, max_length=64)]
    assert micro[0].num_targets != micro[1].num_targets
    reference = _gradients(model, [whole], objective, whole.num_targets)
    _assert_same(_gradients(model, micro, objective, whole.num_targets), reference)
    # Per-micro-batch means (the bug) weight the lone example's tokens five times too much.
    wrong = _gradients(model, micro[:1], objective, micro[0].num_targets)
    rest = _gradients(model, micro[1:], objective, micro[1].num_targets)
    name = "model.embed_tokens.weight"
    assert not torch.allclose((wrong[name] + rest[name]) / 2, reference[name], rtol=1e-2)


def test_data_parallel_ranks_averaged_equal_one_process():
    # Two ranks with unequal shares: each divides by (global tokens / world size); DDP averages.
    examples = _examples(5, seed=2)
    objective = distillation_objective(LossConfig(), REAL)
    whole = collate(examples, pad_id=0, max_length=64)
    ranks = [collate(examples[:2], pad_id=0, max_length=64), collate(examples[2:], pad_id=0, max_length=64)]
    normaliser = whole.num_targets / 2
    per_rank = [_gradients(_model(), [batch], objective, normaliser) for batch in ranks]
    averaged = {name: (per_rank[0][name] + per_rank[1][name]) / 2 for name in per_rank[0]}
    _assert_same(averaged, _gradients(_model(), [whole], objective, whole.num_targets))


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_chunked_and_naive_objectives_agree(preset):
    examples = _examples(4, seed=3)
    batch = collate(examples, pad_id=0, max_length=64)
    model = _model(preset)
    chunked = distillation_objective(LossConfig(divergence="reverse_kl", chunk_bytes=7 * 4 * REAL), REAL)
    naive = distillation_objective(LossConfig(divergence="reverse_kl", implementation="naive"), REAL)
    loss_c, metrics_c = chunked(model, batch, batch.num_targets)
    loss_n, metrics_n = naive(model, batch, batch.num_targets)
    torch.testing.assert_close(loss_c, loss_n)
    assert metrics_c.keys() == metrics_n.keys()
    if preset == "tiny-moe":
        assert metrics_c["moe_aux_loss"] == pytest.approx(metrics_n["moe_aux_loss"], rel=1e-5)
    _assert_same(_gradients(model, [batch], chunked, batch.num_targets),
                 _gradients(model, [batch], naive, batch.num_targets))


def test_prompt_tokens_do_not_influence_the_loss_through_their_targets():
    # Changing the teacher rows and targets at prompt positions changes nothing: only response
    # positions are selected by the target mask.
    examples = _examples(3, seed=4)
    batch = collate(examples, pad_id=0, max_length=64)
    objective = distillation_objective(LossConfig(ce_weight=0.5), REAL)
    model = _model()
    loss, _ = objective(model, batch, batch.num_targets)
    batch.topk_ids[~batch.target_mask] = 5
    batch.topk_logprobs[~batch.target_mask] = -0.1
    batch.targets[~batch.target_mask] = 9
    loss_after, _ = objective(model, batch, batch.num_targets)
    assert torch.equal(loss, loss_after)


@pytest.mark.parametrize("implementation", ["chunked", "naive"])
def test_a_micro_batch_without_targets_adds_nothing_and_logs_nothing(implementation):
    # All rollouts of one micro-batch dropped (pipeline.onpolicy.truncated=drop): the step is
    # that of the other micro-batch alone, with no NaN or missing metric.
    examples = _examples(3, seed=11)
    full, empty = collate(examples, pad_id=0, max_length=64), collate(examples[:1], pad_id=0, max_length=64)
    empty.target_mask[:] = False
    model = _model("tiny-moe")
    objective = distillation_objective(LossConfig(implementation=implementation, ce_weight=0.1), REAL)
    loss, metrics = objective(model, empty, full.num_targets)
    assert float(loss.detach()) == 0.0
    assert "kd_loss" not in metrics and "ce" not in metrics
    _assert_same(_gradients(model, [full, empty], objective, full.num_targets),
                 _gradients(model, [full], objective, full.num_targets))
