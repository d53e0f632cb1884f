"""The training loop shared by every stage: setup, step, loop. No Trainer class, no callbacks.

A stage supplies an `Objective`: a function from (model, micro-batch, target tokens in the whole
optimizer step, divided by the data-parallel world size) to (loss, metrics). Dividing by the step's token count, not the micro-batch's,
makes gradient accumulation exact: the step's gradient is that of one big batch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from distill import losses
from distill.checkpoint import StepCheckpoints
from distill.common.errors import UserError
from distill.common.tracking import Tracker
from distill.config import LossConfig
from distill.data import TokenBatch
from distill.parallel import Engine, Replicated
from distill.students.build import is_moe
from distill.workers import share_cores

Objective = Callable[[PreTrainedModel, TokenBatch, int], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Schedule:
    steps: int
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    final_lr_fraction: float = 0.1

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to `final_lr_fraction` of the peak."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.final_lr_fraction + (1 - self.final_lr_fraction) * cosine)


@dataclass(frozen=True)
class DataParallel:
    """How this process counts a step's target tokens when data-parallel ranks share the step.

    `total(local)` returns the sum over all ranks (an all-reduce). The loss is divided by
    total / world_size, so that after the gradient averaging of DDP/FSDP the step's gradient is
    sum over every rank's tokens / tokens of the whole step: exact, whatever each rank holds.
    """

    world_size: int = 1
    total: Callable[[int], int] = int


SINGLE_PROCESS = DataParallel()


def fit(model: PreTrainedModel, batches: Iterator[list[TokenBatch]], objective: Objective, schedule: Schedule, *,
        tracker: Tracker, prefix: str, desc: str, progress: bool = True, log_every: int = 10,
        position: int = 0, data_parallel: DataParallel = SINGLE_PROCESS,
        periodic: tuple[int, Callable[[PreTrainedModel], dict]] | None = None,
        checkpoints: StepCheckpoints | None = None, resume: bool = False, engine: Engine | None = None) -> list[dict]:
    """Train `model` for `schedule.steps` optimizer steps; each item of `batches` is the list of
    micro-batches of one step (this rank's share of it). Returns the logged records.

    `periodic=(every, evaluate)` calls `evaluate(model)` every `every` steps (and after the last)
    and logs the metrics it returns against this stage's step. `checkpoints` saves the training
    state every `checkpoints.every` steps (`batches` must then have `state_dict`); with `resume`,
    training continues from the newest one, ending bitwise where an uninterrupted run would.

    `engine` (distill/parallel.py) holds the model and optimizer across processes (made with
    `objective`); by default a single process's replica.
    When it returns, `model` holds the trained weights, whatever the engine."""
    device = engine.device if engine is not None else next(model.parameters()).device
    if engine is None:
        engine = Replicated(model, objective, lr=schedule.lr, weight_decay=schedule.weight_decay)
    tracker.define_axis(prefix)
    if engine.sharded:
        tracker.log({f"{prefix}/params_held_fraction": engine.held_fraction()})
    engine.module.train()
    records, started = [], time.perf_counter()
    # Metric sums and how many micro-batches reported each (a per-mode metric appears only in
    # that mode's micro-batches).
    tokens_seen, sums, counts, skipped, start = 0, {}, {}, 0, 0
    if checkpoints is not None and resume:
        state = checkpoints.restore(engine)
        if state is not None:
            start, tokens_seen, skipped = state["step"], state["tokens_seen"], state["skipped"]
            sums, counts, records = state["sums"], state["counts"], state["records"]
            batches.load_state_dict(state["batches"])
            engine.module.train()
    # What an earlier attempt logged past this point is logged again below: keep each step once.
    tracker.forget(prefix, after=start)
    tokens_before = tokens_seen   # throughput counts this process's own tokens and time
    bar = tqdm(range(start, schedule.steps), desc=desc, disable=not progress, position=position, initial=start,
               total=schedule.steps)
    for step in bar:
        share_cores()   # a worker process takes the cores of students that have finished
        micro_batches = next(batches)
        step_tokens = data_parallel.total(sum(b.num_targets for b in micro_batches))
        normaliser = step_tokens / data_parallel.world_size
        engine.set_lr(schedule.lr_at(step))
        engine.zero_grad()
        for micro in micro_batches:
            metrics = dict(micro.stats)
            if step_tokens:  # a step with no target token at all (every rollout dropped) changes nothing
                loss, computed = engine.module(_to(micro, device), normaliser)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"{desc}: the loss is {float(loss.detach())} at step {step + 1} ({micro.mode or 'mixed'}"
                                           f" micro-batch); {_last_good(checkpoints)}")
                engine.backward(loss)
                metrics.update(computed)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
        if step_tokens:
            grad_norm = engine.step(schedule.max_grad_norm)
            if not torch.isfinite(grad_norm):
                bad = engine.nonfinite_gradients()
                where = f" (in {', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''})" if bad else ""
                raise TrainingDiverged(f"{desc}: non-finite gradients at step {step + 1}{where}; "
                                       f"{_last_good(checkpoints)}")
            tokens_seen += step_tokens
        else:
            grad_norm = torch.zeros(())
            skipped += 1
        if (step + 1) % log_every == 0 or step + 1 == schedule.steps:
            elapsed = time.perf_counter() - started
            means = {k: v / counts[k] for k, v in sums.items()}
            record = {_metric_name(prefix, k): v for k, v in means.items()}
            record.update({f"{prefix}/lr": schedule.lr_at(step), f"{prefix}/grad_norm": float(grad_norm),
                           f"{prefix}/step": step + 1, f"{prefix}/target_tokens": tokens_seen,
                           f"{prefix}/skipped_steps": skipped,
                           f"perf/{_model_name(prefix)}/tokens_per_s": (tokens_seen - tokens_before) / elapsed})
            tracker.log(record)
            records.append(record)
            bar.set_postfix({k: f"{v:.3f}" for k, v in means.items() if not k.endswith("think") and k not in OFF_BAR})
            sums, counts = {}, {}
        if periodic is not None and ((step + 1) % periodic[0] == 0 or step + 1 == schedule.steps):
            with engine.full_weights_in(model) as current:
                record = {**periodic[1](current), f"{prefix}/step": step + 1}
            engine.module.train()
            tracker.log(record)
            records.append(record)
        if checkpoints is not None and checkpoints.due(step + 1, schedule.steps):
            checkpoints.save(step + 1, engine, {
                "batches": batches.state_dict(), "tokens_seen": tokens_seen, "skipped": skipped, "sums": sums,
                "counts": counts, "records": records})
    model = engine.finish()
    model.eval()
    return records


class TrainingDiverged(UserError, FloatingPointError):
    """The loss or a gradient stopped being finite; the message names the step and the way back."""


# How batches were made (layout, rollout timing and weight versions): logged, but kept off the
# progress bar.
OFF_BAR = ("padding", "padding_unpacked", "rollout_policy_version", "rollout_staleness", "rollout_sample_s",
           "rollout_sync_s", "rollout_wait_s", "rollout_truncated", "is_clipped")


def _last_good(checkpoints: StepCheckpoints | None) -> str:
    latest = checkpoints.latest() if checkpoints is not None else None
    where = f"the last good checkpoint is {latest}" if latest else "no step checkpoint was written yet"
    return f"stopped there, nothing after it was saved; {where}: lower the learning rate and resume (resume=true)"


def _model_name(prefix: str) -> str:
    """"train/dense" -> "dense", "teacher/bootstrap" -> "teacher"."""
    return prefix.removeprefix("train/").removesuffix("/bootstrap")


def _metric_name(prefix: str, key: str) -> str:
    # Router statistics go to the moe/ group (with the step counter of their stage).
    if key.startswith("moe_"):
        return f"moe/{_model_name(prefix)}/{key.removeprefix('moe_')}"
    return f"{prefix}/{key}"


def _to(batch: TokenBatch, device: torch.device) -> TokenBatch:
    if device.type == "cpu":
        return batch
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
                                         if torch.is_tensor(getattr(batch, f.name))})


def _forward(model: PreTrainedModel, batch: TokenBatch, real_vocab: int):
    """Student logits at the target positions [N, real_vocab] (the naive path) and the MoE aux loss."""
    moe = is_moe(model.config)
    out = model(**batch.model_inputs(), output_router_logits=moe, use_cache=False)
    # Only the tokenizer's real tokens: embedding rows past it are padding, never predicted.
    logits = out.logits[batch.target_mask][:, :real_vocab]
    return logits, _balancing_loss(model, out.router_logits, batch) if moe else None


def _hidden_states(model: PreTrainedModel, batch: TokenBatch):
    """Final hidden states at the target positions [N, H] (after the final norm, before lm_head)
    and the MoE aux loss: the chunked loss applies lm_head itself, chunk by chunk."""
    moe = is_moe(model.config)
    out = model.get_decoder()(**batch.model_inputs(), output_router_logits=moe, use_cache=False)
    aux = _balancing_loss(model, out.router_logits, batch) if moe else None
    return out.last_hidden_state[batch.target_mask], aux


def _balancing_loss(model: PreTrainedModel, router_logits, batch: TokenBatch):
    """The router load-balancing loss over the batch's real tokens (never its padding, whether
    rows are padded or packed)."""
    if not router_logits:
        return 0
    return load_balancing_loss_func(router_logits, model.config.num_experts, model.config.num_experts_per_tok,
                                    batch.attention_mask)


def _lm_head_weight(model: PreTrainedModel) -> torch.Tensor:
    head = model.get_output_embeddings()
    if head.bias is not None:
        raise ValueError("the chunked loss supports an lm_head without bias (as in Qwen3); set loss.implementation=naive")
    return head.weight


def _moe_term(model: PreTrainedModel, aux: torch.Tensor | None, micro_share: float, metrics: dict) -> torch.Tensor:
    """The student's router load-balancing loss (Switch style), weighted by its config's coef.

    It is a per-micro-batch mean, so it is weighted by the micro-batch's share of the step.
    """
    if aux is None:
        return torch.zeros(())
    if not torch.is_tensor(aux):
        # transformers returns a plain 0 when no router logits were recorded: the balancing loss
        # would silently vanish, so stop instead.
        raise RuntimeError("the MoE model returned no router logits; its load-balancing loss cannot be computed")
    metrics["moe_aux_loss"] = float(aux.detach())
    return model.config.router_aux_loss_coef * aux * micro_share


def cross_entropy_objective(real_vocab: int) -> Objective:
    """Plain next-token cross-entropy on response tokens (the teacher bootstrap, and SFT)."""

    def objective(model, batch, step_tokens):
        logits, aux = _forward(model, batch, real_vocab)
        ce = losses.cross_entropy(logits, batch.targets[batch.target_mask])
        metrics = {"ce": float(ce.detach().mean())}
        if batch.mode:
            metrics[f"ce_{batch.mode}"] = metrics["ce"]
        loss = ce.sum() / step_tokens + _moe_term(model, aux, batch.num_targets / step_tokens, metrics)
        return loss, metrics

    return objective


def distillation_objective(loss_cfg: LossConfig, real_vocab: int, estimator: str = "full",
                           is_cap: float = 2.0) -> Objective:
    """Divergence from the teacher's top-k distribution, plus an optional cross-entropy mix;
    or, with `estimator="sampled_token"`, the reverse-KL estimator that uses the teacher's
    log-probability of each sampled token alone, on the student's own samples (batches that carry
    those log-probabilities); the teacher's cached samples mixed into the on-policy stage are
    still scored with the divergence, since the estimator holds only for the student's samples.
    Rollouts that carry their sampling policy's log-probabilities (an inference engine's) are
    weighted by the truncated importance ratio, capped at `is_cap`.

    `loss.implementation=chunked` (the default) never builds the [tokens, vocab] logits;
    `naive` does, for comparison."""
    divergence = losses.TokenLoss(divergence=loss_cfg.divergence, beta=loss_cfg.beta, alpha=loss_cfg.alpha,
                                  temperature=loss_cfg.temperature,
                                  scale_by_temperature_squared=loss_cfg.scale_by_temperature_squared,
                                  missing_mass=loss_cfg.missing_mass, ce_weight=loss_cfg.ce_weight, vocab=real_vocab)
    sampled = partial(losses.sampled_token_reverse_kl, vocab=real_vocab)

    def objective(model, batch, step_tokens):
        mask = batch.target_mask
        if estimator == "sampled_token" and batch.token_logprobs is not None:
            behavior = batch.sample_logprobs[mask] if batch.sample_logprobs is not None else None
            teacher, token_loss = losses.SampledTokenTeacher(batch.token_logprobs[mask], behavior, is_cap), sampled
        else:
            teacher, token_loss = losses.TopKTeacher(batch.topk_ids[mask], batch.topk_logprobs[mask]), divergence
        targets = batch.targets[mask]
        if loss_cfg.implementation == "chunked":
            hidden, aux = _hidden_states(model, batch)
            loss, values = losses.chunked_loss(hidden, _lm_head_weight(model), teacher, targets, token_loss,
                                               1.0 / step_tokens, vocab=real_vocab,
                                               chunk_bytes=loss_cfg.chunk_bytes or None)
        else:
            logits, aux = _forward(model, batch, real_vocab)
            values = token_loss(logits, teacher, targets)
            loss = values["loss"].sum() / step_tokens
        metrics = {}
        if batch.num_targets:   # an empty micro-batch adds nothing to the step, and no metric
            metrics["kd_loss"] = float(values["kd"].detach().mean())
            if batch.mode:
                metrics[f"kd_loss_{batch.mode}"] = metrics["kd_loss"]
            for key in ("ce", "is_weight", "is_clipped"):
                if key in values:
                    metrics[key] = float(values[key].detach().mean())
        loss = loss + _moe_term(model, aux, batch.num_targets / step_tokens, metrics)
        return loss, metrics

    return objective
