"""Losses against a float64 naive reference; never negative; zero when the student is the teacher."""

import pytest
import torch

from distill import losses


def _naive_forward_kl(student_logits, teacher_full_logits, k, missing_mass):
    """Float64 reference: the teacher's top-k (+ tail) buckets written out with Python sums."""
    out = []
    p_full = torch.softmax(teacher_full_logits.double(), -1)
    q_full = torch.softmax(student_logits.double(), -1)
    for p_row, q_row in zip(p_full, q_full):
        top = torch.topk(p_row, k).indices
        p = [p_row[i].item() for i in top]
        q = [q_row[i].item() for i in top]
        if missing_mass == "tail":
            p.append(1 - sum(p))
            q.append(1 - sum(q))
        else:
            sp, sq = sum(p), sum(q)
            p, q = [x / sp for x in p], [x / sq for x in q]
        out.append(sum(pi * (torch.log(torch.tensor(pi, dtype=torch.float64)) - torch.log(torch.tensor(qi, dtype=torch.float64))).item()
                       for pi, qi in zip(p, q) if pi > 0))
    return torch.tensor(out, dtype=torch.float64)


def _teacher_topk(teacher_logits, k):
    values, ids = torch.log_softmax(teacher_logits.float(), -1).topk(k, -1)
    return ids, values


@pytest.mark.parametrize("missing_mass", ["tail", "renormalize"])
def test_forward_kl_matches_float64_reference(missing_mass):
    torch.manual_seed(0)
    student = torch.randn(16, 50) * 2
    teacher = torch.randn(16, 50) * 3
    ids, values = _teacher_topk(teacher, 8)
    ours = losses.forward_kl(student, ids, values, missing_mass=missing_mass)
    reference = _naive_forward_kl(student, teacher, 8, missing_mass)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("missing_mass", ["tail", "renormalize"])
def test_forward_kl_gradient_matches_float64_autograd(missing_mass):
    torch.manual_seed(1)
    student = (torch.randn(6, 30) * 2).requires_grad_()
    teacher = torch.randn(6, 30) * 2
    ids, values = _teacher_topk(teacher, 5)
    losses.forward_kl(student, ids, values, missing_mass=missing_mass).sum().backward()
    student64 = student.detach().double().requires_grad_()
    logq = torch.log_softmax(student64, -1)
    logp = values.double()
    top_q = logq.gather(-1, ids.long())
    if missing_mass == "tail":
        p = torch.cat([logp.exp(), 1 - logp.exp().sum(-1, keepdim=True)], -1)
        q = torch.cat([top_q.exp(), 1 - top_q.exp().sum(-1, keepdim=True)], -1)
    else:
        p = torch.softmax(logp, -1)
        q = torch.softmax(top_q, -1)
    (p * (p.log() - q.log())).sum().backward()
    torch.testing.assert_close(student.grad.double(), student64.grad, rtol=1e-4, atol=1e-6)


def test_zero_when_student_is_teacher_and_never_negative():
    torch.manual_seed(2)
    logits = torch.randn(32, 40) * 4
    ids, values = _teacher_topk(logits, 10)
    for missing_mass in ("tail", "renormalize"):
        same = losses.forward_kl(logits, ids, values, missing_mass=missing_mass)
        assert same.abs().max() < 1e-5
        other = losses.forward_kl(torch.randn(32, 40) * 4, ids, values, missing_mass=missing_mass)
        assert (other >= 0).all() and other.mean() > 0.1


def test_teacher_distribution_sums_to_one_with_tail():
    torch.manual_seed(3)
    ids, values = _teacher_topk(torch.randn(4, 100), 5)
    buckets = losses.teacher_topk_distribution(values, "tail")
    torch.testing.assert_close(buckets.exp().sum(-1), torch.ones(4))
    torch.testing.assert_close(buckets[:, :5], values)  # temperature 1 keeps the top-k as they are


def test_cross_entropy_is_negative_log_likelihood():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(losses.cross_entropy(logits, torch.tensor([2])), torch.log(torch.tensor([4.0])))
