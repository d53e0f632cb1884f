"""On-policy distillation: the student learns on its own samples, scored token by token by the teacher.

Each on-policy step the current student answers a batch of prompts (one mode per micro-batch,
alternating think / no_think; batched generation with a KV cache), the teacher scores exactly
those tokens (top-k log-probabilities and the log-probability of each sampled token, from any
backend: in process or a vLLM server), and the student minimises the divergence on them (reverse
KL by default). With GKD's mixing, a step is on-policy with probability lambda and otherwise a
batch of the teacher's own cached samples; lambda may move linearly over the stage.

Teacher and student see the same prompt tokens: both render with the one chat template, and the
teacher's rendering is checked against the student's before the first rollout. Rollouts cut at
the token limit are counted; by default they are trained on as what they are (a prefix with no
end: the eos is not a target), or left out with `truncated=drop`.
"""

from __future__ import annotations

import contextlib

import random

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.config import OnPolicyConfig
from distill.data import Example, TokenBatch, collate, rng_from_state, rng_state
from distill.students.chat import MODES, Sampling, render_prompt
from distill.students.generation import generate


class PromptMismatch(RuntimeError):
    """Teacher and student would see different prompt tokens."""


def lambda_at(cfg: OnPolicyConfig, step: int, steps: int) -> float:
    """GKD's lambda at `step`: `mix`, moving linearly to `mix_end` by the last step."""
    if cfg.mix_end is None or steps <= 1:
        return cfg.mix
    return cfg.mix + (cfg.mix_end - cfg.mix) * step / (steps - 1)


def check_same_prompts(student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase,
                       prompts: dict[str, list[list[dict]]]) -> None:
    """The teacher must score the very prompt tokens the student was given, in every mode."""
    for mode, conversations in prompts.items():
        for messages in conversations[:64]:
            ours, theirs = render_prompt(student_tokenizer, messages, mode), render_prompt(teacher_tokenizer, messages,
                                                                                          mode)
            if ours != theirs:
                raise PromptMismatch(f"teacher and student render a {mode} prompt differently ({len(theirs)} vs "
                                     f"{len(ours)} tokens): they must share one tokenizer and chat template")


class OnPolicyBatches:
    """Endless optimizer steps for `fit`: each a list of `cfg.grad_accum` micro-batches.

    Rollouts are drawn from the student as it is when the step begins, so every on-policy batch
    is from the current policy. `offpolicy` supplies the steps that lambda leaves off-policy.
    Resumable like `ModeAlternatingBatches` (`state_dict` / `load_state_dict`): rollout seeds
    derive from the step, so a resumed stage samples what the uninterrupted one would have.
    """

    def __init__(self, student: PreTrainedModel, teacher, tokenizer: PreTrainedTokenizerBase,
                 prompts: list[list[dict]], cfg: OnPolicyConfig, *, steps: int, max_length: int,
                 offpolicy=None, seed: int = 0, generation_batch_size: int = 256, modes: tuple[str, ...] = MODES,
                 rank: int = 0, world: int = 1, policy_weights=None, pack: bool = False):
        self.rank, self.world, self.pack = rank, world, pack
        # A context manager that puts the current weights into the student for the rollouts
        # (a sharded engine's gather; by default the student already holds them).
        self.policy_weights = policy_weights or contextlib.nullcontext
        check_same_prompts(tokenizer, teacher.tokenizer, {mode: prompts for mode in modes})
        self.student, self.teacher, self.tokenizer, self.cfg = student, teacher, tokenizer, cfg
        self.steps, self.max_length, self.offpolicy, self.seed = steps, max_length, offpolicy, seed
        self.generation_batch_size, self.modes, self.size = generation_batch_size, modes, len(prompts)
        self.rendered = {mode: [render_prompt(tokenizer, messages, mode) for messages in prompts] for mode in modes}
        self.sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.sample_top_k)
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.turn = self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> list[TokenBatch]:
        step, cfg = self.step, self.cfg
        self.step += 1
        lam = lambda_at(cfg, min(step, self.steps - 1), self.steps)
        if self.offpolicy is not None and self.rng.random() >= lam:
            batches = next(self.offpolicy)
            for batch in batches:
                batch.stats.update({"onpolicy": 0.0, "lambda": lam})
            return batches
        with self.policy_weights(self.student) as student:
            micro = self._rollouts(step, student)
        for batch in micro:
            batch.stats["lambda"] = lam
        return micro

    def _rollouts(self, step: int, student: PreTrainedModel) -> list[TokenBatch]:
        cfg, micro = self.cfg, []
        for _ in range(cfg.grad_accum):
            mode = self.modes[self.turn % len(self.modes)]
            self.turn += 1
            while len(self.order) < cfg.batch_size:
                epoch = list(range(self.size))
                self.rng.shuffle(epoch)
                self.order.extend(epoch)
            chosen, self.order = self.order[:cfg.batch_size], self.order[cfg.batch_size:]
            # Data-parallel: this rank's share of the prompts, sampled with its own seed.
            seed = self.seed * 1_000_003 + step * 7919 + self.turn + self.rank * 104_729
            micro.append(rollout_batch(student, self.teacher, self.tokenizer,
                                       [self.rendered[mode][i] for i in chosen[self.rank::self.world]], mode, cfg,
                                       sampling=self.sampling, seed=seed, max_length=self.max_length,
                                       generation_batch_size=self.generation_batch_size, pack=self.pack))
        return micro

    def state_dict(self) -> dict:
        return {"rng": rng_state(self.rng), "order": self.order, "turn": self.turn, "step": self.step,
                "offpolicy": self.offpolicy.state_dict() if self.offpolicy is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(rng_from_state(state["rng"]))
        self.order, self.turn, self.step = list(state["order"]), state["turn"], state["step"]
        if self.offpolicy is not None:
            self.offpolicy.load_state_dict(state["offpolicy"])


def rollout_batch(student: PreTrainedModel, teacher, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                  mode: str, cfg: OnPolicyConfig, *, sampling: Sampling, seed: int, max_length: int,
                  generation_batch_size: int = 256, pack: bool = False) -> TokenBatch:
    """The student answers `prompts`, the teacher scores the answers: one training batch (its
    sequences packed several to a row with `pack`)."""
    was_training = student.training
    generations = generate(student, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, sampling=sampling,
                           batch_size=generation_batch_size, seed=seed, progress=False)
    student.train(was_training)  # generate() puts the model in eval mode
    truncated = sum(not g.finished for g in generations)
    kept = [(p, g) for p, g in zip(prompts, generations)
            if g.ids and (g.finished or cfg.truncated == "prefix")]
    stats = {"onpolicy": 1.0, "rollout_truncated": truncated / max(1, len(generations)),
             "rollout_tokens": sum(len(g.ids) for g in generations) / max(1, len(generations)),
             f"rollout_tokens_{mode}": sum(len(g.ids) for g in generations) / max(1, len(generations))}
    if not kept:
        # Every rollout was dropped: a batch with no targets adds nothing to the step.
        kept = [(prompts[0], generations[0])]
        stats["rollouts_dropped_all"] = 1.0
    scored = teacher.top_k_logprobs([p for p, _ in kept], [g.ids for _, g in kept], cfg.top_k)
    examples = [Example(p, g.ids, top.ids, top.logprobs, top.chosen) for (p, g), top in zip(kept, scored)]
    batch = collate(examples, tokenizer.pad_token_id, max_length, mode, stats, pack=pack)
    if stats.get("rollouts_dropped_all"):
        batch.target_mask[:] = False
    return batch
