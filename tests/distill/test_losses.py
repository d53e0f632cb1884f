"""Every divergence against a float64 reference written from the definitions; zero at equality,
never negative; JSD continuous at its ends; chunked equal to naive; masks and vocabulary slicing."""

import pytest
import torch

from distill import losses
from distill.losses import divergences

NAMES = list(losses.DIVERGENCES)
FORMS = ["full", "topk-tail", "topk-renormalize"]
VOCAB, PADDED_TEACHER, PADDED_STUDENT, K = 40, 48, 44, 6


def _inputs(seed, rows=8, scale=2.0):
    """Student logits [rows, 44] and teacher logits [rows, 48], sharing a real vocabulary of 40."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, PADDED_STUDENT, generator=g) * scale
    teacher = torch.randn(rows, PADDED_TEACHER, generator=g) * scale * 1.5
    return student, teacher


def _teacher(form, teacher_logits):
    if form == "full":
        return losses.FullTeacher(teacher_logits)
    values, ids = torch.log_softmax(teacher_logits[:, :VOCAB].float(), -1).topk(K, -1)
    return losses.TopKTeacher(ids.int(), values)


def _reference_distributions(form, student, teacher, temperature):
    """(p, q) in float64 probabilities, built the long way from the definitions."""
    s = student[:, :VOCAB].double()
    t = teacher[:, :VOCAB].double()
    q_full = torch.softmax(s / temperature, -1)
    if form == "full":
        return torch.softmax(t / temperature, -1), q_full
    p_true = torch.softmax(t, -1)  # the teacher's top-k is taken at temperature 1
    top = p_true.topk(K, -1).indices
    p_top, q_top = p_true.gather(-1, top), q_full.gather(-1, top)
    if form == "topk-renormalize":
        p = p_top ** (1 / temperature)
        return p / p.sum(-1, keepdim=True), q_top / q_top.sum(-1, keepdim=True)
    p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1) ** (1 / temperature)
    return p / p.sum(-1, keepdim=True), torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)


def _reference(name, p, q, beta=0.5, alpha=0.1):
    def kl(a, b):
        # 0 log 0 = 0, with finite stand-ins so that float64 autograd gives no nan there
        support = a > 0
        a_s, b_s = torch.where(support, a, 1.0), torch.where(support, b, 1.0)
        return torch.where(support, a_s * (a_s / b_s).log(), 0.0).sum(-1)
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return (beta * kl(p, m) + (1 - beta) * kl(q, m)) / (beta * (1 - beta))
    if name == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_reverse_kl":
        return kl(q, (1 - alpha) * p + alpha * q)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(name)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
def test_divergence_values_and_gradients_match_float64(name, form, temperature):
    student, teacher = _inputs(seed=NAMES.index(name) * 10 + FORMS.index(form))
    student = student.requires_grad_()
    ours = losses.token_divergence(name, student, _teacher(form, teacher), temperature=temperature,
                                   missing_mass=form.removeprefix("topk-") if form != "full" else "tail",
                                   vocab=VOCAB, beta=0.3, alpha=0.2)
    ours.sum().backward()

    student64 = student.detach().double().requires_grad_()
    p, q = _reference_distributions(form, student64, teacher, temperature)
    reference = _reference(name, p, q, beta=0.3, alpha=0.2)
    reference.sum().backward()

    assert ours.dtype == torch.float32 and ours.shape == (8,)
    torch.testing.assert_close(ours.double(), reference.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(student.grad.double(), student64.grad, rtol=1e-4, atol=1e-6)
    assert student.grad[:, VOCAB:].abs().max() == 0  # padding rows never receive probability


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
def test_zero_when_student_is_teacher_and_positive_otherwise(name, form):
    student, teacher = _inputs(seed=7, rows=32)
    same = teacher[:, :PADDED_STUDENT]
    kwargs = dict(missing_mass=form.removeprefix("topk-") if form != "full" else "tail", vocab=VOCAB)
    equal = losses.token_divergence(name, same, _teacher(form, teacher), **kwargs)
    assert equal.abs().max() < 1e-5
    other = losses.token_divergence(name, student, _teacher(form, teacher), **kwargs)
    assert (other > 0).all()


@pytest.mark.parametrize("missing_mass", ["tail", "renormalize"])
def test_top_k_divergences_are_never_negative(missing_mass):
    # A student that puts almost all of its mass on the teacher's top-k, and one that puts almost
    # none there: where an unrenormalised top-k sum would go negative.
    torch.manual_seed(0)
    teacher = torch.randn(256, VOCAB) * 3
    values, ids = torch.log_softmax(teacher, -1).topk(K, -1)
    top_heavy = torch.full((256, VOCAB), -20.0).scatter(-1, ids, torch.randn(256, K) * 5)
    for student in (top_heavy, torch.randn(256, VOCAB) * 6, -top_heavy):
        for name in NAMES:
            values_out = losses.token_divergence(name, student, losses.TopKTeacher(ids, values),
                                                 missing_mass=missing_mass)
            assert torch.isfinite(values_out).all() and (values_out >= 0).all(), name


@pytest.mark.parametrize("name", NAMES)
def test_teacher_zeros_count_as_zero_probability(name):
    # Masked teacher logits (-inf): those tokens have p = 0, which every divergence must handle.
    student, teacher = _inputs(seed=11)
    teacher[:, ::3] = float("-inf")
    student = student.requires_grad_()
    ours = losses.token_divergence(name, student, losses.FullTeacher(teacher), vocab=VOCAB, beta=0.7)
    ours.sum().backward()
    student64 = student.detach().double().requires_grad_()
    p, q = _reference_distributions("full", student64, teacher, 1.0)
    reference = _reference(name, p, q, beta=0.7)
    reference.sum().backward()
    if name == "reverse_kl":  # KL(q || p) is infinite where p = 0 < q
        assert torch.isinf(ours).all()
        return
    torch.testing.assert_close(ours.double(), reference.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(student.grad.double(), student64.grad, rtol=1e-4, atol=1e-6)


def test_jsd_equals_forward_and_reverse_kl_at_the_ends_and_is_continuous_there():
    student, teacher = _inputs(seed=3, scale=0.7)
    logq = torch.log_softmax(student[:, :VOCAB], -1)
    logp = torch.log_softmax(teacher[:, :VOCAB], -1)
    forward, reverse = divergences.forward_kl(logp, logq), divergences.reverse_kl(logp, logq)
    assert torch.equal(divergences.jsd(logp, logq, 0.0), forward)
    assert torch.equal(divergences.jsd(logp, logq, 1.0), reverse)
    gaps_forward = [(divergences.jsd(logp, logq, b) - forward).abs().max().item() for b in (1e-2, 1e-4, 1e-6)]
    gaps_reverse = [(divergences.jsd(logp, logq, 1 - b) - reverse).abs().max().item() for b in (1e-2, 1e-4, 1e-6)]
    for gaps in (gaps_forward, gaps_reverse):
        assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-4, gaps
    # And accurate there: the unscaled form's cancellation would be amplified 1e6 times at beta = 1e-6.
    p, q = logp.double().exp(), logq.double().exp()
    for beta in (1e-6, 1 - 1e-6):
        torch.testing.assert_close(divergences.jsd(logp, logq, beta).double(), _reference("jsd", p, q, beta=beta),
                                   rtol=1e-5, atol=1e-5)


def test_skew_divergences_reduce_to_kl_at_alpha_zero():
    student, teacher = _inputs(seed=4)
    logq, logp = torch.log_softmax(student[:, :VOCAB], -1), torch.log_softmax(teacher[:, :VOCAB], -1)
    torch.testing.assert_close(divergences.skew_kl(logp, logq, 0.0), divergences.forward_kl(logp, logq))
    torch.testing.assert_close(divergences.skew_reverse_kl(logp, logq, 0.0), divergences.reverse_kl(logp, logq))
    assert divergences.skew_kl(logp, logq, 1.0).abs().max() == 0


def test_target_mask_selects_positions_and_masked_positions_get_no_gradient():
    torch.manual_seed(5)
    logits = torch.randn(2, 5, VOCAB, requires_grad=True)
    teacher = torch.randn(2, 5, VOCAB)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    values = losses.reverse_kl(logits, losses.FullTeacher(teacher), mask)
    assert values.shape == (5,)
    torch.testing.assert_close(values, losses.reverse_kl(logits[mask], losses.FullTeacher(teacher[mask])))
    values.sum().backward()
    assert logits.grad[~mask].abs().max() == 0 and logits.grad[mask].abs().min() > 0


def test_mismatched_logit_widths_without_a_shared_vocabulary_are_refused():
    student, teacher = _inputs(seed=6)
    with pytest.raises(ValueError, match="pass vocab="):
        losses.forward_kl(student, losses.FullTeacher(teacher))
    with pytest.raises(ValueError, match="fewer than the shared vocabulary"):
        losses.forward_kl(student, losses.FullTeacher(teacher), vocab=PADDED_TEACHER)


def test_bad_parameters_are_refused():
    student, teacher = _inputs(seed=6)
    with pytest.raises(ValueError, match="beta must lie in"):
        losses.jsd(student, losses.FullTeacher(teacher), vocab=VOCAB, beta=1.5)
    with pytest.raises(ValueError, match="unknown missing_mass"):
        losses.forward_kl(student, _teacher("topk-tail", teacher), missing_mass="drop")
    with pytest.raises(ValueError, match="unknown divergence"):
        losses.TokenLoss(divergence="kl")


def test_cross_entropy_is_negative_log_likelihood():
    logits = torch.log(torch.tensor([[1.0, 1.0, 2.0, 0.0]]))
    torch.testing.assert_close(losses.cross_entropy(logits, torch.tensor([2])), torch.log(torch.tensor([2.0])))


@pytest.mark.parametrize("form", ["full", "topk-tail", "topk-renormalize"])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_equals_naive_in_value_and_gradients(name, form):
    torch.manual_seed(8)
    tokens, hidden_size = 23, 16
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = (torch.randn(PADDED_STUDENT, hidden_size) * 0.5).requires_grad_()
    _, teacher_logits = _inputs(seed=9, rows=tokens)
    teacher = _teacher(form, teacher_logits)
    targets = torch.randint(0, VOCAB, (tokens,))
    token_loss = losses.TokenLoss(divergence=name, missing_mass=form.removeprefix("topk-") if form != "full" else "tail",
                                  temperature=1.5, scale_by_temperature_squared=True, ce_weight=0.3, vocab=VOCAB)
    token_weights = torch.rand(tokens)

    chunked, chunked_values = losses.chunked_loss(hidden, weight, teacher, targets, token_loss, token_weights,
                                                  vocab=VOCAB, chunk_tokens=5)
    (3 * chunked).backward()  # an upstream gradient other than one
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    naive, naive_values = losses.naive_loss(hidden, weight, teacher, targets, token_loss, token_weights, vocab=VOCAB)
    (3 * naive).backward()

    torch.testing.assert_close(chunked, naive)
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(chunked_values[key], naive_values[key])
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-6)
    assert grads[1][VOCAB:].abs().max() == 0


def test_chunked_loss_in_bfloat16_is_close_to_float32():
    torch.manual_seed(10)
    hidden, weight = torch.randn(12, 16), torch.randn(VOCAB, 16) * 0.5
    teacher = losses.FullTeacher(torch.randn(12, VOCAB))
    targets, token_loss = torch.randint(0, VOCAB, (12,)), losses.TokenLoss(divergence="forward_kl")
    full, _ = losses.chunked_loss(hidden, weight, teacher, targets, token_loss, 1.0, chunk_tokens=4)
    half, _ = losses.chunked_loss(hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_(), teacher,
                                  targets, token_loss, 1.0, chunk_tokens=4)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=2e-2, atol=1e-2)


# --- precision and devices --------------------------------------------------------------------

# bf16 keeps 8 bits of mantissa: a logit is off by up to 2^-9 relative, a product's rounding
# errors add up over H terms. The chunked loss in bf16 must land this close to the float64 oracle
# (relative error of the loss and of each gradient, as a whole tensor): the same tolerance the
# naive path in bf16 meets.
BF16_TOLERANCE = 2e-2


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).norm() / reference.norm())


@pytest.mark.parametrize("blocks", ["whole", "small"])
@pytest.mark.parametrize("form", ["full", "topk-tail"])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_chunked_loss_in_bf16_against_the_float64_oracle(name, form, blocks, monkeypatch):
    """Under bf16 autocast (float32 master weights, as parallel.mixed_precision=bf16 trains) the
    vocabulary products run in bf16 and the loss stays within the bf16 tolerance of a float64
    oracle, in value and gradients; without autocast the same call is the exact float32 path.
    (small: the bf16 weight gradient taken in two groups of chunks, by blocks of 16 vocabulary rows.)"""
    if blocks == "small":
        monkeypatch.setattr(losses.chunked, "VOCAB_BLOCK", 16)
        monkeypatch.setattr(losses.chunked, "GROUP_TOKENS", 16)
    torch.manual_seed(11)
    tokens, hidden_size = 29, 32
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = (torch.randn(PADDED_STUDENT, hidden_size) * 0.3).requires_grad_()
    _, teacher_logits = _inputs(seed=12, rows=tokens)
    teacher, targets = _teacher(form, teacher_logits), torch.randint(0, VOCAB, (tokens,))
    token_loss = losses.TokenLoss(divergence=name, vocab=VOCAB)
    token_weights = torch.rand(tokens)

    hidden64, weight64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    p, q = _reference_distributions(form, hidden64 @ weight64.T, teacher_logits, 1.0)
    oracle = (_reference(name, p, q) * token_weights.double()).sum()
    oracle.backward()

    def run(bf16: bool):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = losses.chunked_loss(hidden, weight, teacher, targets, token_loss, token_weights, vocab=VOCAB,
                                          chunk_tokens=8)
        loss.backward()
        return loss.detach(), hidden.grad.clone(), weight.grad.clone()

    exact, low = run(bf16=False), run(bf16=True)
    assert all(t.dtype == torch.float32 for t in low)
    for value, reference in zip(low, (oracle.detach(), hidden64.grad, weight64.grad)):
        assert _relative_error(value, reference) < BF16_TOLERANCE
    for value, reference in zip(exact, (oracle.detach(), hidden64.grad, weight64.grad)):
        assert _relative_error(value, reference) < 1e-5
    # The bf16 run really ran in bf16: it differs from the float32 one by more than float32 noise.
    assert _relative_error(low[2], weight64.grad) > 10 * _relative_error(exact[2], weight64.grad)


def test_the_compute_dtype_follows_autocast_and_the_weights():
    hidden, weight = torch.randn(2, 4), torch.randn(3, 4)
    assert losses.chunked.compute_dtype(hidden, weight) == torch.float32
    assert losses.chunked.compute_dtype(hidden, weight.bfloat16()) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert losses.chunked.compute_dtype(hidden, weight) == torch.bfloat16


def test_the_chunk_size_follows_the_memory_budget_of_the_device():
    vocab = 151_936
    assert losses.chunked.chunk_tokens_for(vocab, torch.device("cpu")) == 128 * 2 ** 20 // (4 * vocab)   # 220
    assert losses.chunked.chunk_tokens_for(vocab, torch.device("cuda")) == 2 ** 30 // (4 * vocab)        # 1,766
    assert losses.chunked.chunk_tokens_for(vocab, torch.device("cpu"), chunk_bytes=4 * vocab * 64) == 64


@pytest.mark.parametrize("precision", ["float32", "bf16"])
@pytest.mark.parametrize("implementation", ["chunked", "naive"])
@pytest.mark.parametrize("case", [f"{n}/{f}" for n in NAMES for f in FORMS] + ["sampled_token"])
def test_no_loss_makes_a_tensor_off_its_inputs_device(case, implementation, precision):
    """Inputs on the CPU, the default device set to `meta`: a tensor a loss makes without an
    explicit device (a host tensor, on a GPU run) lands on meta and the call fails. Every
    divergence, both teacher forms, both paths, the on-policy estimator, float32 and bf16."""
    torch.manual_seed(13)
    tokens, hidden_size = 6, 8
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = torch.randn(PADDED_STUDENT, hidden_size, requires_grad=True)
    _, teacher_logits = _inputs(seed=14, rows=tokens)
    targets = torch.randint(0, VOCAB, (tokens,))
    if case == "sampled_token":
        teacher = losses.SampledTokenTeacher(torch.log_softmax(teacher_logits[:, :VOCAB], -1).gather(
            -1, targets[:, None])[:, 0])
        token_loss = lambda logits, t, y: losses.sampled_token_reverse_kl(logits, t, y, vocab=VOCAB)  # noqa: E731
    else:
        name, form = case.split("/")
        teacher = _teacher(form, teacher_logits)
        token_loss = losses.TokenLoss(divergence=name, missing_mass=form.removeprefix("topk-") if form != "full"
                                      else "tail", temperature=1.5, ce_weight=0.2, vocab=VOCAB)
    with torch.device("meta"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        if implementation == "chunked":
            loss, _ = losses.chunked_loss(hidden, weight, teacher, targets, token_loss, 1.0 / tokens, vocab=VOCAB,
                                          chunk_tokens=4)
        else:
            loss, _ = losses.naive_loss(hidden, weight, teacher, targets, token_loss, 1.0 / tokens, vocab=VOCAB)
        loss.backward()
    assert loss.device.type == "cpu" and hidden.grad.device.type == "cpu" and torch.isfinite(weight.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU half of this check runs on GPU "
                    "machines (the meta-device test above covers host tensors here)")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
def test_every_divergence_runs_on_cuda_as_on_the_cpu(name, form):
    """On a GPU, in float32 and under bf16 autocast: the chunked loss equals the CPU's (float32),
    and stays within the bf16 tolerance of it (bf16)."""
    torch.manual_seed(15)
    tokens, hidden_size = 37, 32
    hidden, weight = torch.randn(tokens, hidden_size), torch.randn(PADDED_STUDENT, hidden_size) * 0.3
    _, teacher_logits = _inputs(seed=16, rows=tokens)
    targets = torch.randint(0, VOCAB, (tokens,))
    token_loss = losses.TokenLoss(divergence=name, missing_mass=form.removeprefix("topk-") if form != "full"
                                  else "tail", vocab=VOCAB)

    def run(device, bf16=False):
        h, w = hidden.to(device).requires_grad_(), weight.to(device).requires_grad_()
        teacher = _teacher(form, teacher_logits.to(device))
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = losses.chunked_loss(h, w, teacher, targets.to(device), token_loss, 1.0 / tokens, vocab=VOCAB,
                                          chunk_tokens=8)
        loss.backward()
        return [t.detach().cpu().double() for t in (loss, h.grad, w.grad)]

    cpu, cuda, cuda_bf16 = run("cpu"), run("cuda"), run("cuda", bf16=True)
    for a, b, c in zip(cpu, cuda, cuda_bf16):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        assert float((c - a).norm() / a.norm().clamp(min=1e-12)) < BF16_TOLERANCE
