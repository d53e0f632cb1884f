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

import itertools
import random
from collections.abc import Iterator

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.chat import MODES, Sampling, render_prompt
from distill.config import OnPolicyConfig
from distill.data import Example, TokenBatch, collate
from distill.generation import generate


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


def onpolicy_batches(student: PreTrainedModel, teacher, tokenizer: PreTrainedTokenizerBase,
                     prompts: list[list[dict]], cfg: OnPolicyConfig, *, steps: int, max_length: int,
                     offpolicy: Iterator[list[TokenBatch]] | None = None, seed: int = 0,
                     generation_batch_size: int = 256, modes: tuple[str, ...] = MODES) -> Iterator[list[TokenBatch]]:
    """Endless optimizer steps for `fit`: each a list of `cfg.grad_accum` micro-batches.

    Rollouts are drawn from the student as it is when the step begins, so every on-policy batch
    is from the current policy. `offpolicy` supplies the steps that lambda leaves off-policy.
    """
    check_same_prompts(tokenizer, teacher.tokenizer, {mode: prompts for mode in modes})
    rendered = {mode: [render_prompt(tokenizer, messages, mode) for messages in prompts] for mode in modes}
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.sample_top_k)
    rng = random.Random(seed)
    order: list[int] = []
    turn = 0
    for step in itertools.count():
        lam = lambda_at(cfg, min(step, steps - 1), steps)
        if offpolicy is not None and rng.random() >= lam:
            batches = next(offpolicy)
            for batch in batches:
                batch.stats.update({"onpolicy": 0.0, "lambda": lam})
            yield batches
            continue
        micro = []
        for _ in range(cfg.grad_accum):
            mode = modes[turn % len(modes)]
            turn += 1
            while len(order) < cfg.batch_size:
                epoch = list(range(len(prompts)))
                rng.shuffle(epoch)
                order.extend(epoch)
            chosen, order = order[:cfg.batch_size], order[cfg.batch_size:]
            micro.append(rollout_batch(student, teacher, tokenizer, [rendered[mode][i] for i in chosen], mode, cfg,
                                       sampling=sampling, seed=seed * 1_000_003 + step * 7919 + turn,
                                       max_length=max_length, generation_batch_size=generation_batch_size))
        for batch in micro:
            batch.stats["lambda"] = lam
        yield micro


def rollout_batch(student: PreTrainedModel, teacher, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                  mode: str, cfg: OnPolicyConfig, *, sampling: Sampling, seed: int, max_length: int,
                  generation_batch_size: int = 256) -> TokenBatch:
    """The student answers `prompts`, the teacher scores the answers: one training batch."""
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
    batch = collate(examples, tokenizer.pad_token_id, max_length, mode, stats)
    if stats.get("rollouts_dropped_all"):
        batch.target_mask[:] = False
    return batch
