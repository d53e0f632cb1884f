"""On-policy distillation: rollouts scored on exactly the student's tokens, identical prompts,
truncated rollouts, GKD's lambda, the sampled-token estimator's gradient, and training that
moves the student towards the teacher on its own samples."""

import contextlib
import copy
from pathlib import Path

import pytest
import torch

from conftest import scaled_model
from distill.common.tracking import Tracker
from distill.config import LossConfig, OnPolicyConfig
from distill.losses import SampledTokenTeacher, reverse_kl, sampled_token_reverse_kl
from distill.onpolicy import OnPolicyBatches, PromptMismatch, lambda_at, rollout_batch
from distill.students.chat import Sampling, render_prompt
from distill.teachers.transformers_backend import TransformersTeacher
from distill.train import Schedule, distillation_objective, fit

REAL = 261


def _model(seed, scale=None):
    return scaled_model("tiny", seed, scale)


class RecordingTeacher(TransformersTeacher):
    """The in-process teacher, remembering what it was asked to score."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scored = []

    def top_k_logprobs(self, prompts, responses, k):
        self.scored.append((prompts, responses))
        return super().top_k_logprobs(prompts, responses, k)


PROMPTS = [[{"role": "user", "content": f"{i}+{i * 3 % 10}*2 mod 10"}] for i in range(12)]


def test_the_teacher_scores_exactly_the_students_tokens(tokenizer):
    student, teacher = _model(0, scale=0.3), RecordingTeacher(_model(1, scale=0.5), tokenizer, name="t", progress=False)
    cfg = OnPolicyConfig(batch_size=4, max_new_tokens=12, top_k=5)
    prompts = [render_prompt(tokenizer, m, "think") for m in PROMPTS[:4]]
    student.train()
    batch = rollout_batch(student, teacher, tokenizer, prompts, "think", cfg, sampling=Sampling(1.0, 1.0, 0), seed=3,
                          max_length=256)
    assert student.training  # generation switched to eval mode and back
    scored_prompts, responses = teacher.scored[0]
    assert scored_prompts == prompts
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        # the batch holds prompt + the student's response, and the targets are exactly the response
        assert batch.input_ids[row, :len(prompt) + len(response)].tolist() == prompt + response
        assert batch.targets[row][batch.target_mask[row]].tolist() == response
        # the teacher's log-probabilities are of those tokens at those positions
        with torch.no_grad():
            logits = teacher.model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1, :REAL]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response)[:, None])[:, 0]
        torch.testing.assert_close(batch.token_logprobs[row][batch.target_mask[row]], expected, rtol=0, atol=1e-5)


def test_truncated_rollouts_are_counted_and_never_end_with_eos(tokenizer):
    student, teacher = _model(0, scale=0.3), TransformersTeacher(_model(1), tokenizer, name="t", progress=False)
    prompts = [render_prompt(tokenizer, m, "think") for m in PROMPTS[:6]]
    eos = tokenizer.eos_token_id
    for policy in ("prefix", "drop"):
        cfg = OnPolicyConfig(max_new_tokens=3, top_k=4, truncated=policy)
        batch = rollout_batch(student, teacher, tokenizer, prompts, "think", cfg, sampling=Sampling(1.0, 1.0, 0),
                              seed=0, max_length=256)
        truncated = batch.stats["rollout_truncated"]
        assert 0 < truncated <= 1
        rows = batch.target_mask.any(-1).sum().item()
        if policy == "prefix":
            assert rows == len(prompts)
            # a truncated rollout has no end: its last target is not an eos
            ends = [batch.targets[r][batch.target_mask[r]][-1].item() for r in range(len(prompts))]
            assert sum(e != eos for e in ends) == round(truncated * len(prompts))
        else:
            assert rows == round((1 - truncated) * len(prompts))


def test_teacher_and_student_must_render_the_same_prompt_tokens(tokenizer, foreign_tokenizer):
    student = _model(0)
    teacher = TransformersTeacher(_model(1), foreign_tokenizer, name="t", progress=False)
    foreign_tokenizer.chat_template = tokenizer.chat_template
    with pytest.raises(PromptMismatch, match="render a think prompt differently"):
        OnPolicyBatches(student, teacher, tokenizer, PROMPTS, OnPolicyConfig(), steps=1, max_length=256)


def test_lambda_schedule_and_mixing():
    cfg = OnPolicyConfig(mix=0.0, mix_end=1.0)
    assert [lambda_at(cfg, s, 5) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lambda_at(OnPolicyConfig(mix=0.3), 7, 10) == 0.3


def test_mixing_takes_offpolicy_steps_with_probability_one_minus_lambda(tokenizer):
    class Offpolicy:
        def __init__(self):
            from distill.data import Example, collate
            self.batch = lambda: collate([Example([1, 2], [3, tokenizer.eos_token_id], torch.zeros(2, 2, dtype=torch.long),
                                                  torch.zeros(2, 2))], tokenizer.pad_token_id, 64, "think")

        def __iter__(self):
            return self

        def __next__(self):
            return [self.batch()]

    student, teacher = _model(0), TransformersTeacher(_model(1), tokenizer, name="t", progress=False)
    cfg = OnPolicyConfig(mix=0.25, batch_size=2, max_new_tokens=2, top_k=2)
    batches = OnPolicyBatches(student, teacher, tokenizer, PROMPTS, cfg, steps=200, max_length=64,
                               offpolicy=Offpolicy(), seed=1)
    kinds = [next(batches)[0].stats["onpolicy"] for _ in range(200)]
    assert 0.15 < sum(kinds) / len(kinds) < 0.35


def test_sampled_token_estimator_has_the_reverse_kl_gradient_in_expectation():
    torch.manual_seed(0)
    vocab = 7
    student_logits = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    teacher_logprobs = torch.log_softmax(torch.randn(vocab, dtype=torch.float64) * 2, -1)
    # the exact expectation over y ~ q of the estimator's gradient
    q = torch.softmax(student_logits, -1).detach()
    expected_grad = torch.zeros(vocab, dtype=torch.float64)
    for y in range(vocab):
        logits = student_logits.detach().clone().requires_grad_()
        out = sampled_token_reverse_kl(logits[None], SampledTokenTeacher(teacher_logprobs[[y]]), torch.tensor([y]))
        out["loss"].sum().backward()
        expected_grad += q[y] * logits.grad
    # the gradient of the exact reverse KL(q || p)
    kl = (q.new_tensor(0) + (torch.softmax(student_logits, -1) * (torch.log_softmax(student_logits, -1)
                                                                   - teacher_logprobs)).sum())
    kl.backward()
    # (the estimator works in float32, like training)
    torch.testing.assert_close(expected_grad, student_logits.grad, rtol=1e-6, atol=1e-8)
    # and the estimate itself averages to the KL
    estimates = [float(torch.log_softmax(student_logits.detach(), -1)[y] - teacher_logprobs[y]) for y in range(vocab)]
    assert sum(float(q[y]) * estimates[y] for y in range(vocab)) == pytest.approx(float(kl), rel=1e-6)


def _reverse_kl_on_own_samples(student, teacher, tokenizer, seed):
    """Exact per-token KL(q || p) over the full vocabulary, on fresh rollouts of the student."""
    cfg = OnPolicyConfig(max_new_tokens=10, top_k=REAL)
    prompts = [render_prompt(tokenizer, m, "think") for m in PROMPTS]
    batch = rollout_batch(student, teacher, tokenizer, prompts, "think", cfg, sampling=Sampling(1.0, 1.0, 0),
                          seed=seed, max_length=256)
    with torch.no_grad():
        logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.target_mask]
    from distill.losses import TopKTeacher

    teacher_rows = TopKTeacher(batch.topk_ids[batch.target_mask], batch.topk_logprobs[batch.target_mask])
    return float(reverse_kl(logits[:, :REAL], teacher_rows, vocab=REAL).mean())


@pytest.mark.parametrize("estimator, lr, bound", [("full", 1e-2, 0.5), ("sampled_token", 3e-3, 0.85)])
def test_onpolicy_training_moves_the_student_towards_the_teacher_on_its_own_samples(tokenizer, estimator, lr, bound):
    # As in the recipe, the student starts near the teacher (the off-policy stage's job): here a
    # noisy copy of it, about 3.5 nats of reverse KL away on its own samples.
    teacher_model = _model(1, scale=0.4).eval()
    student = copy.deepcopy(teacher_model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in student.parameters():
            if p.ndim >= 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    teacher = TransformersTeacher(teacher_model, tokenizer, name="t", progress=False)
    before = _reverse_kl_on_own_samples(student, teacher, tokenizer, seed=100)
    cfg = OnPolicyConfig(batch_size=8, max_new_tokens=10, top_k=REAL, estimator=estimator, lr=lr)
    batches = OnPolicyBatches(student, teacher, tokenizer, PROMPTS, cfg, steps=40, max_length=256, seed=0)
    objective = distillation_objective(LossConfig(divergence="reverse_kl"), REAL, estimator=estimator)
    fit(student, batches, objective, Schedule(steps=40, lr=lr, warmup_steps=2), tracker=Tracker(Path("."), metrics_file=None),
        prefix="train/s/onpolicy", desc="test", progress=False)
    after = _reverse_kl_on_own_samples(student, teacher, tokenizer, seed=100)
    assert after < bound * before, (before, after)


# --- rollouts from an engine whose weights follow the trainer's --------------------------------

def test_the_importance_weight_corrects_samples_from_older_weights():
    """Samples from mu, not q: each token's estimator term is weighted by min(q/mu, cap); with
    mu = q the loss is the plain estimator's."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 30, generator=g, requires_grad=True)
    targets = torch.randint(0, 30, (6,), generator=g)
    teacher_chosen = torch.randn(6, generator=g) - 3
    logq = torch.log_softmax(logits.detach(), -1).gather(-1, targets[:, None])[:, 0]

    plain = sampled_token_reverse_kl(logits, SampledTokenTeacher(teacher_chosen), targets)
    same = sampled_token_reverse_kl(logits, SampledTokenTeacher(teacher_chosen, behavior=logq), targets)
    torch.testing.assert_close(same["loss"], plain["loss"])
    assert torch.allclose(same["is_weight"], torch.ones(6)) and same["is_clipped"].sum() == 0

    # The sampler gave some tokens less probability than q does (ratio > 1), some more.
    behavior = logq + torch.tensor([-2.0, -0.3, 0.0, 0.2, 1.0, -5.0])
    out = sampled_token_reverse_kl(logits, SampledTokenTeacher(teacher_chosen, behavior=behavior, cap=2.0), targets)
    ratio = torch.exp(logq - behavior)
    expected_weight = ratio.clamp(max=2.0)
    torch.testing.assert_close(out["is_weight"], expected_weight)
    assert out["is_clipped"].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    # The gradient is the weighted score-function gradient: w * (log q - log p) * grad log q.
    (grad,) = torch.autograd.grad(out["loss"].sum(), logits)
    (grad_plain_rows,) = torch.autograd.grad((expected_weight * plain["loss"]).sum(), logits)
    torch.testing.assert_close(grad, grad_plain_rows)
    torch.testing.assert_close(out["kd"], plain["kd"])   # the logged estimate stays unweighted


class InProcessEngine:
    """A stand-in for the vLLM rollout engine with the same interface: its own copy of the
    student, loaded from the checkpoint tensors the trainer sends; it records which weights each
    rollout was sampled from."""

    def __init__(self, student, tokenizer):
        self.model, self.tokenizer = copy.deepcopy(student).eval(), tokenizer
        self.version, self.loads, self.sampled = 0, [], []
        self.working, self.working_while_sampling = 0, []

    @contextlib.contextmanager
    def busy(self):
        self.working += 1
        try:
            yield
        finally:
            self.working -= 1

    def load(self, tensors, version):
        self.model.load_state_dict(tensors, strict=False)
        self.version = version
        self.loads.append(version)
        return 0.01

    def wait_for(self, version):
        raise AssertionError("one process: nothing waits")

    def sample(self, prompts, *, max_new_tokens, sampling, seed):
        from distill.students.generation import generate

        self.sampled.append((self.version, float(self.model.model.norm.weight[0]), prompts, seed))
        self.working_while_sampling.append(self.working > 0)
        out = generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                       progress=False)
        for g in out:
            g.logprobs = [-1.0] * len(g.ids)
        return out


@pytest.mark.parametrize("sync_every,async_,staleness", [(1, False, 0), (1, True, 1), (1, True, 2), (2, False, None)])
def test_engine_rollouts_come_from_weights_at_most_the_allowed_versions_behind(tokenizer, sync_every, async_,
                                                                               staleness):
    from distill.config import RolloutConfig

    student, teacher = _model(0, scale=0.3), TransformersTeacher(_model(1, scale=0.5), tokenizer, name="t",
                                                                  progress=False)
    engine = InProcessEngine(student, tokenizer)
    rollout = RolloutConfig(engine="vllm", sync_every=sync_every, async_=async_, max_staleness=staleness or 1)
    cfg = OnPolicyConfig(batch_size=3, max_new_tokens=6, top_k=4)
    batches = OnPolicyBatches(student, teacher, tokenizer, PROMPTS, cfg, steps=8, max_length=256, engine=engine,
                              rollout=rollout)
    marks = []   # the trainer's weights at each version, told apart by one norm weight
    for step in range(6):
        marks.append(float(student.model.norm.weight[0].detach()))
        micro = next(batches)
        version = int(micro[0].stats["rollout_policy_version"])
        lag = micro[0].stats["rollout_staleness"]
        assert lag == step - version
        if staleness is None:   # synchronous, synced every second step: 0 or 1 behind
            assert version == step - step % 2
        else:
            assert lag == min(step, staleness)
        assert micro[0].sample_logprobs is not None    # the sampler's log-probabilities travel with the batch
        with torch.no_grad():
            student.model.norm.weight[0] += 1.0   # an optimizer step: a new version
    # Each rollout was sampled by exactly the weights of the version it records.
    for version, mark, _, _ in engine.sampled[:6]:
        assert mark == marks[version]
    # The engine counts as working while it samples (a trainer lent its cores gives them back).
    assert engine.working_while_sampling and all(engine.working_while_sampling)
    if not async_:   # in step, nothing samples between steps
        assert engine.working == 0
    batches.close()


def test_async_batches_resume_where_training_stopped(tokenizer):
    """The state saved after a step is that of the next step to train, whatever was sampled
    ahead: a resumed stage plans the same prompts and seeds."""
    from distill.config import RolloutConfig

    def fresh():
        student = _model(0, scale=0.3)
        teacher = TransformersTeacher(_model(1, scale=0.5), tokenizer, name="t", progress=False)
        engine = InProcessEngine(student, tokenizer)
        rollout = RolloutConfig(engine="vllm", async_=True, max_staleness=2)
        cfg = OnPolicyConfig(batch_size=3, max_new_tokens=4, top_k=4, grad_accum=2)
        return OnPolicyBatches(student, teacher, tokenizer, PROMPTS, cfg, steps=8, max_length=256, engine=engine,
                               rollout=rollout), engine

    whole, whole_engine = fresh()
    for _ in range(6):
        next(whole)
    stopped, _ = fresh()
    for _ in range(3):
        next(stopped)
    state = stopped.state_dict()
    resumed, resumed_engine = fresh()
    resumed.load_state_dict(state)
    for _ in range(3):
        next(resumed)
    planned = lambda engine, start: [(prompts, seed) for _, _, prompts, seed in engine.sampled[start:start + 6]]
    assert planned(resumed_engine, 0) == planned(whole_engine, 6)   # steps 3..5: two micro-batches each
    assert resumed_engine.loads[0] == 3    # the restored weights went to the engine first
    for b in (whole, stopped, resumed):
        b.close()


def test_data_parallel_async_ranks_meet_while_no_rank_samples(tokenizer):
    """Ranks share one engine: each step they meet once they hold its rollouts, and only then is
    the next step (and its weight load) queued, so a load never lands in a rank's sampling."""
    from distill.config import RolloutConfig

    student = _model(0, scale=0.3)
    teacher = TransformersTeacher(_model(1, scale=0.5), tokenizer, name="t", progress=False)
    engine = InProcessEngine(student, tokenizer)
    cfg = OnPolicyConfig(batch_size=4, max_new_tokens=4, top_k=4)
    met = []

    def barrier():
        met.append((engine.working, len(engine.sampled), len(engine.loads)))

    batches = OnPolicyBatches(student, teacher, tokenizer, PROMPTS, cfg, steps=8, max_length=256, engine=engine,
                              rollout=RolloutConfig(engine="vllm", async_=True), rank=0, world=2, barrier=barrier)
    for step in range(4):
        micro = next(batches)
        assert micro[0].stats["rollout_staleness"] == min(step, 1)
        with torch.no_grad():
            student.model.norm.weight[0] += 1.0
    batches.close()
    # Step t's barrier: nothing sampling, t + 1 batches sampled (this step's), and the load for
    # step t + 1 not yet made (steps 0 and 1 sample version 0; step s > 1 loads version s - 1).
    assert met == [(0, step + 1, max(0, step - 1)) for step in range(4)]
    with pytest.raises(ValueError, match="barrier and max_staleness=1"):
        OnPolicyBatches(student, teacher, tokenizer, PROMPTS, cfg, steps=8, max_length=256, engine=engine,
                        rollout=RolloutConfig(engine="vllm", async_=True, max_staleness=2), world=2,
                        barrier=barrier)
