"""On-policy distillation: the student learns on its own samples, scored token by token by the teacher.

Each on-policy step the current student answers a batch of prompts (one mode per micro-batch,
alternating think / no_think; batched generation with a KV cache), the teacher scores exactly
those tokens (top-k log-probabilities and the log-probability of each sampled token, from any
backend: in process or a vLLM server), and the student minimises the divergence on them (reverse
KL by default). With GKD's mixing, a step is on-policy with probability lambda and otherwise a
batch of the teacher's own cached samples; lambda may move linearly over the stage.

The student samples in this process with the trainer's own weights (the default), or on a rollout
engine (students/rollout_engine.py: a vLLM server) that the trainer's weights are synced into
every `rollout.sync_every` steps. With `rollout.async`, the engine samples the next steps'
batches in a background thread while the trainer trains on this one: at most
`rollout.max_staleness` weight versions behind. Every on-policy batch records the version it was
sampled with (`rollout_policy_version`) and how many optimizer steps the trainer was ahead when
it trained on it (`rollout_staleness`). What staleness means for each estimator:
- sampled_token: the score-function estimator needs samples from the current policy; tokens
  from older weights are reweighted by the truncated importance ratio (distill/losses);
- full: the divergence at each visited prefix is exact whatever sampled it; staleness only
  shifts which prefixes are visited, towards the older policy's: no correction, the staleness
  is logged.

Teacher and student see the same prompt tokens: both render with the one chat template, and the
teacher's rendering is checked against the student's before the first rollout. Rollouts cut at
the token limit are counted; by default they are trained on as what they are (a prefix with no
end: the eos is not a target), or left out with `truncated=drop`.
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.config import OnPolicyConfig, RolloutConfig
from distill.data import Example, TokenBatch, collate, rng_from_state, rng_state
from distill.students.chat import MODES, Sampling, render_prompt
from distill.students.generation import Generation, generate
from distill.students.rollout_engine import DTYPES
from distill.students.snapshot import checkpoint_tensors


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


@dataclass(frozen=True)
class MicroPlan:
    """One on-policy micro-batch, decided in step order: its prompts, mode and sampling seed."""

    prompts: list[list[int]]
    mode: str
    seed: int


@dataclass(frozen=True)
class AheadRollouts:
    """Rollouts being sampled ahead on the engine (`future` gives the generations per
    micro-batch and the sampling stats), and what scoring them needs."""

    future: Future
    plans: list[MicroPlan]
    lam: float
    version: int


class OnPolicyBatches:
    """Endless optimizer steps for `fit`: each a list of `cfg.grad_accum` micro-batches.

    Steps are planned in order (GKD's coin, prompts, mode, seed: everything random is drawn
    here, on the calling thread) and then made: the student samples, the teacher scores. In
    process, and on an engine without `async`, a step is made when it is asked for, from the
    trainer's current weights. With an async engine, the next `max_staleness` steps are sampled
    in a background thread while the trainer trains, and scored by the teacher when their turn
    comes (the background thread only waits on the engine). Data-parallel ranks share one
    engine, one version ahead at most: the ranks meet (`barrier`) once each has this step's
    rollouts, before the main rank loads newer weights, so no rank's rollout is sampled across
    a weight load.

    Resumable like `ModeAlternatingBatches` (`state_dict` / `load_state_dict`: the state before
    the next step to be trained was planned): rollout seeds derive from the step, so a resumed
    in-process stage samples what the uninterrupted one would have.
    """

    def __init__(self, student: PreTrainedModel, teacher, tokenizer: PreTrainedTokenizerBase,
                 prompts: list[list[dict]], cfg: OnPolicyConfig, *, steps: int, max_length: int,
                 offpolicy=None, seed: int = 0, generation_batch_size: int = 256, modes: tuple[str, ...] = MODES,
                 rank: int = 0, world: int = 1, policy_weights=None, pack: bool = False, engine=None,
                 rollout: RolloutConfig | None = None, barrier=None):
        self.rank, self.world, self.pack = rank, world, pack
        self.barrier = barrier     # all ranks meet (data-parallel async: Processes.barrier)
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
        # The rollout engine (None: in process) and how its weights follow the trainer's.
        self.engine, self.rollout = engine, rollout or RolloutConfig()
        self.ahead = self.rollout.max_staleness if engine is not None and self.rollout.async_ else 0
        self.loaded_version: int | None = 0     # the weights the engine holds (or will, once queued loads run)
        self.planned = 0
        self.queue: deque = deque()
        self.states: dict[int, dict] = {}
        self.background = _Background() if self.ahead else None
        if self.ahead and world > 1 and (barrier is None or self.ahead > 1):
            raise ValueError("data-parallel async rollouts need a barrier and max_staleness=1")

    def __iter__(self):
        return self

    def __next__(self) -> list[TokenBatch]:
        self._plan_until(self.step)   # this step (planned already, but for the first)
        made = self.queue.popleft()
        started = time.perf_counter()
        if isinstance(made, AheadRollouts):
            generations, stats = made.future.result()
        waited = time.perf_counter() - started
        if isinstance(made, AheadRollouts) and self.world > 1:
            # Every rank has its rollouts of this step: none samples on the shared engine now,
            # so the main rank may put newer weights in (max_staleness is 1 with ranks).
            self.barrier()
        self._plan_until(self.step + self.ahead)   # the engine samples these while this step trains
        if isinstance(made, AheadRollouts):
            # The teacher scores here, while the engine samples the next step (scoring in the
            # background thread would take the trainer's cores and GIL).
            micro = self._score(made.plans, generations, made.lam, made.version, stats)
        else:
            micro = made
        self.states.pop(self.step, None)
        for batch in micro:
            if "rollout_policy_version" in batch.stats:
                batch.stats["rollout_staleness"] = self.step - batch.stats["rollout_policy_version"]
                if self.background is not None:
                    batch.stats["rollout_wait_s"] = waited
        self.step += 1
        return micro

    def _plan_until(self, last: int) -> None:
        while self.planned <= last:
            if self.ahead:   # planned ahead of training: keep the state a resume restarts from
                self.states[self.planned] = self._state()
            self.queue.append(self._plan(self.planned))
            self.planned += 1

    def _plan(self, step: int):
        """Step `step`: off-policy batches (lambda's coin), or on-policy batches made now (in
        process, synchronous engine) or queued on the engine (async) from the weights the
        trainer holds now: version `self.step`, the optimizer steps it has taken."""
        cfg = self.cfg
        lam = lambda_at(cfg, min(step, self.steps - 1), self.steps)
        if self.offpolicy is not None and self.rng.random() >= lam:
            batches = next(self.offpolicy)
            for batch in batches:
                batch.stats.update({"onpolicy": 0.0, "lambda": lam})
            return batches
        plans = [self._micro_plan(step) for _ in range(cfg.grad_accum)]
        current = self.step
        if self.engine is None:
            with self.policy_weights(self.student) as student:
                return self._make(plans, lam, current, student)
        # The trainer's weights go to the engine when they are `sync_every` versions ahead of
        # it (and after a resume, whose engine was started from the stage's first weights).
        weights, synced = None, False
        if self.loaded_version is None or current - self.loaded_version >= self.rollout.sync_every:
            with self.policy_weights(self.student) as student:   # every rank: a sharded engine gathers
                if self.rank == 0:
                    # A copy when the trainer moves on before the engine has read them.
                    weights = checkpoint_tensors(student, DTYPES[self.rollout.dtype], copy=bool(self.ahead))
            self.loaded_version, synced = current, True
        version = self.loaded_version

        def sample() -> tuple[list[list[Generation]], dict]:
            with self.engine.busy():   # a trainer lent the engine's cores gives them back
                return sample_on_engine()

        def sample_on_engine() -> tuple[list[list[Generation]], dict]:
            stats = {}
            if weights is not None:
                stats["rollout_sync_s"] = self.engine.load(weights, version)
            elif synced:   # another rank loads them: sample once the engine holds them
                self.engine.wait_for(version)
            started = time.perf_counter()
            generations = [self.engine.sample(plan.prompts, max_new_tokens=cfg.max_new_tokens, sampling=self.sampling,
                                              seed=plan.seed) for plan in plans]
            stats["rollout_sample_s"] = (time.perf_counter() - started) / len(plans)
            return generations, stats

        if self.background is not None:
            return AheadRollouts(self.background.submit(sample), plans, lam, version)
        generations, stats = sample()
        return self._score(plans, generations, lam, version, stats)

    def _micro_plan(self, step: int) -> MicroPlan:
        cfg = self.cfg
        mode = self.modes[self.turn % len(self.modes)]
        self.turn += 1
        while len(self.order) < cfg.batch_size:
            epoch = list(range(self.size))
            self.rng.shuffle(epoch)
            self.order.extend(epoch)
        chosen, self.order = self.order[:cfg.batch_size], self.order[cfg.batch_size:]
        # Data-parallel: this rank's share of the prompts, sampled with its own seed.
        seed = self.seed * 1_000_003 + step * 7919 + self.turn + self.rank * 104_729
        return MicroPlan([self.rendered[mode][i] for i in chosen[self.rank::self.world]], mode, seed)

    def _make(self, plans: list[MicroPlan], lam: float, version: int, student: PreTrainedModel) -> list[TokenBatch]:
        """In process: the student samples each micro-batch, the teacher scores it."""
        generations, started = [], time.perf_counter()
        for plan in plans:
            generations.append(sample_in_process(student, self.tokenizer, plan.prompts, self.cfg, self.sampling,
                                                 plan.seed, self.generation_batch_size))
        stats = {"rollout_sample_s": (time.perf_counter() - started) / len(plans)}
        return self._score(plans, generations, lam, version, stats)

    def _score(self, plans: list[MicroPlan], generations: list[list[Generation]], lam: float, version: int,
               stats: dict) -> list[TokenBatch]:
        micro = []
        for plan, answers in zip(plans, generations):
            batch = score_rollouts(self.teacher, self.tokenizer, plan.prompts, answers, plan.mode, self.cfg,
                                   max_length=self.max_length, pack=self.pack)
            batch.stats.update({"lambda": lam, "rollout_policy_version": float(version), **stats})
            micro.append(batch)
        return micro

    def _state(self) -> dict:
        return {"rng": rng_state(self.rng), "order": list(self.order), "turn": self.turn, "step": self.planned,
                "offpolicy": self.offpolicy.state_dict() if self.offpolicy is not None else None}

    def state_dict(self) -> dict:
        return self.states.get(self.step) or self._state()

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(rng_from_state(state["rng"]))
        self.order, self.turn, self.step = list(state["order"]), state["turn"], state["step"]
        self.planned, self.states = self.step, {}
        self.queue.clear()
        # The engine holds the stage's first weights; the restored ones go in before sampling.
        self.loaded_version = None if self.step else 0
        if self.offpolicy is not None:
            self.offpolicy.load_state_dict(state["offpolicy"])

    def close(self) -> None:
        """Stop making batches ahead (what is being made is abandoned)."""
        if self.background is not None:
            self.background.stop()


class _Background:
    """One daemon thread that runs submitted functions in order: never keeps the process alive
    (a rollout waiting on a server that was stopped must not block the exit)."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="rollouts", daemon=True)
        self.thread.start()

    def submit(self, function) -> Future:
        future: Future = Future()
        self.jobs.put((function, future))
        return future

    def stop(self, timeout: float = 120.0) -> None:
        """Cancel what has not started and wait for what has (torch must not be running in a
        thread when the interpreter exits)."""
        while True:
            try:
                _, future = self.jobs.get_nowait()
            except queue.Empty:
                break
            if future is not None:
                future.cancel()
        self.jobs.put((None, None))
        self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            function, future = self.jobs.get()
            if function is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function())
            except BaseException as error:   # re-raised where the result is taken
                future.set_exception(error)


def sample_in_process(student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                      cfg: OnPolicyConfig, sampling: Sampling, seed: int, generation_batch_size: int = 256
                      ) -> list[Generation]:
    """The trainer's own model answers `prompts` (batched, with a KV cache)."""
    was_training = student.training
    generations = generate(student, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, sampling=sampling,
                           batch_size=generation_batch_size, seed=seed, progress=False)
    student.train(was_training)  # generate() puts the model in eval mode
    return generations


def rollout_batch(student: PreTrainedModel, teacher, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                  mode: str, cfg: OnPolicyConfig, *, sampling: Sampling, seed: int, max_length: int,
                  generation_batch_size: int = 256, pack: bool = False) -> TokenBatch:
    """The student answers `prompts` in process, the teacher scores the answers: one training
    batch (its sequences packed several to a row with `pack`)."""
    generations = sample_in_process(student, tokenizer, prompts, cfg, sampling, seed, generation_batch_size)
    return score_rollouts(teacher, tokenizer, prompts, generations, mode, cfg, max_length=max_length, pack=pack)


def score_rollouts(teacher, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                   generations: list[Generation], mode: str, cfg: OnPolicyConfig, *, max_length: int,
                   pack: bool = False) -> TokenBatch:
    """The teacher scores the student's answers to `prompts`: one training batch. Rollouts that
    carry the sampler's log-probabilities (an engine's) keep them, for the importance weight."""
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
    examples = [Example(p, g.ids, top.ids, top.logprobs, top.chosen,
                        torch.tensor(g.logprobs) if g.logprobs is not None else None)
                for (p, g), top in zip(kept, scored)]
    batch = collate(examples, tokenizer.pad_token_id, max_length, mode, stats, pack=pack)
    if stats.get("rollouts_dropped_all"):
        batch.target_mask[:] = False
    return batch
