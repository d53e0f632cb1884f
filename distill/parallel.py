"""How the data-parallel processes hold and update a student while a stage trains it.

Three strategies, chosen with `parallel=ddp|fsdp2|zero3` (conf/parallel/):

- `ddp`: every process holds the whole student and optimizer; gradients are averaged over the
  processes before each update (what DistributedDataParallel does). The default, and the only
  one that makes sense in one process.
- `fsdp2`: torch's FSDP2 (`fully_shard`): parameters, gradients and AdamW state are split over
  the processes, one shard unit per decoder layer plus the rest; a layer's weights are gathered
  for its forward and backward only.
- `zero3`: DeepSpeed ZeRO stage 3, the same split done by DeepSpeed (optionally with optimizer
  state and parameters offloaded to CPU memory).

All three train the same way: the loss of a micro-batch is computed inside one module's forward
(`ObjectiveModule`), so the sharded engines gather the embedding and lm_head weights the chunked
loss reads directly; a step's loss is divided by the step's target tokens over all processes /
their number, so the averaged gradient is the one of the whole step; the update is AdamW with
global gradient clipping. accelerate starts the processes and the process group; the sharding is
done here by torch or DeepSpeed themselves, because accelerate's FSDP and DeepSpeed plugins do
nothing on a CPU (FSDP silently becomes DDP), and the CI tests run on CPUs.

Each is an `Engine`: one interface, whose methods do what their names say, called by the
training loop (distill/train.py) in this order each step: `set_lr`, `zero_grad`, then per
micro-batch `module(batch, normaliser)` and `backward(loss)`, then `step(max_grad_norm)`; step
checkpoints call `save` and `load`.

While a sharded stage trains, the student object the pipeline holds keeps no weights (they live
in the shards); `full_weights_in(student)` gathers the current weights into it (for on-policy
rollouts, which every process samples on its own), and `finish()` leaves the trained weights
there for good.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from distill.common.errors import ConfigError, UserError
from distill.config import ParallelConfig
from distill.distributed import Processes

WEIGHTS_FILE, OPTIMIZER_FILE = "model.safetensors", "optimizer.pt"


class Engine(Protocol):
    """How the processes of a stage hold and update the student."""

    module: torch.nn.Module   # `module(batch, normaliser)` -> (loss, metrics): the student and its loss
    device: torch.device
    sharded: bool             # each process holds only a part of the parameters

    def held_fraction(self) -> float:
        """The share of the student's parameter elements this process holds while training."""

    def set_lr(self, lr: float) -> None: ...

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro-batch's loss."""

    def step(self, max_grad_norm: float) -> torch.Tensor:
        """The optimizer step: gradients averaged over the processes, clipped to `max_grad_norm`
        (global norm), applied by AdamW. Returns the global norm before clipping; a non-finite
        norm means the gradients were not applied (ZeRO-3 excepted: DeepSpeed measures the norm
        inside its update, so there it reports after applying)."""

    def nonfinite_gradients(self) -> list[str]:
        """Names of the parameters whose gradients this process holds and are not finite."""

    def full_weights_in(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """`model` holding the current weights, whole, for the block (rollouts, periodic eval)."""

    def finish(self) -> torch.nn.Module:
        """End of the stage: the student object holds the trained weights for good; returns it."""

    def save(self, folder: Path, write: bool) -> None:
        """Write the training state into a checkpoint folder. Every process calls it (gathering
        sharded weights is a collective); `write` is false on the processes that take part
        without writing the shared files."""

    def load(self, folder: Path) -> None:
        """Restore the training state `save` wrote (every process)."""



class ObjectiveModule(torch.nn.Module):
    """The model plus its loss: `forward(batch, normaliser)` returns `objective(model, batch,
    normaliser)`, i.e. (loss, metrics). The sharding engines wrap this module, so every weight the
    loss touches is gathered for its forward."""

    def __init__(self, model: torch.nn.Module, objective: Callable, autocast: torch.dtype | None = None):
        super().__init__()
        self.model, self.objective, self.autocast = model, objective, autocast

    def forward(self, batch, normaliser):
        if self.autocast is None:
            return self.objective(self.model, batch, normaliser)
        with torch.autocast(batch.input_ids.device.type, dtype=self.autocast):
            return self.objective(self.model, batch, normaliser)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on norms and biases."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim < 2 or "norm" in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class Replicated:
    """`ddp`: the whole model on every process; gradients all-reduced before the update."""

    sharded = False

    def __init__(self, model: torch.nn.Module, objective: Callable, *, lr: float, weight_decay: float,
                 proc: Processes | None = None, bf16: bool = False):
        self.model, self.proc = model, proc or Processes()
        self.device = next(model.parameters()).device
        self.module = ObjectiveModule(model, objective, autocast=torch.bfloat16 if bf16 else None)
        self.optimizer = _adamw(_param_groups(model, weight_decay), lr)

    def set_lr(self, lr: float) -> None:
        _set_lr(self.optimizer, lr)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float) -> torch.Tensor:
        self.proc.average_gradients(self.model)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_grad_norm)
        if torch.isfinite(norm):
            self.optimizer.step()
        return norm

    def nonfinite_gradients(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]

    @contextlib.contextmanager
    def full_weights_in(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        yield self.model  # the student object itself: it always holds the current weights

    def finish(self) -> torch.nn.Module:
        return self.model

    def held_fraction(self) -> float:
        return 1.0

    # Checkpoints: the weights as safetensors, the AdamW state as tensors and numbers.
    def save(self, folder: Path, write: bool) -> None:
        if write:
            save_model(self.model, str(folder / WEIGHTS_FILE))
            torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load(self, folder: Path) -> None:
        load_model(self.model, str(folder / WEIGHTS_FILE))
        self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=True))


class HomeModel:
    """What the sharding engines share: the student object whose weights move out into a working
    copy the engine shards while the stage trains, and come back into it when asked."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.device = model, next(model.parameters()).device
        # The copy shares the parameter tensors instead of duplicating them, so no second full
        # copy exists; the student object is then left holding none (on the meta device), so
        # only the shards hold memory once the copy is sharded.
        shared = {id(p): p for p in model.parameters()}
        self.working = copy.deepcopy(model, memo=dict(shared))
        _drop_parameters(model)

    def fill(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Give `model` (the student object, or a like one) the gathered weights `state`."""
        with torch.no_grad():
            _materialize_parameters(model, self.device)
            missing = {k for k, _ in model.named_parameters() if k not in state}
            if missing:
                raise RuntimeError(f"gathered weights lack {sorted(missing)[:3]}")
            model.load_state_dict(state, strict=False)

    @contextlib.contextmanager
    def filled(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
        """`model` holding `state` for the block, emptied again afterwards. (Every process gathers
        the weights whole: on-policy rollouts are sampled by each process on its own, with no
        collective per token.)"""
        self.fill(model, state)
        try:
            yield model
        finally:
            _drop_parameters(model)

    def restore(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """End of the stage: the student object holds `state` (the trained weights) for good."""
        self.fill(self.model, state)
        self.model.train(False)
        return self.model

    def write_weights(self, path: Path, state: dict[str, torch.Tensor]) -> None:
        save_file(_without_tied(self.model, state), str(path), metadata={"format": "pt"})


def _drop_parameters(model: torch.nn.Module) -> None:
    """Replace every parameter by an empty one on the meta device (tied ones stay tied; buffers,
    such as the rotary frequencies, are small and stay)."""
    _swap_parameters(model, lambda p: torch.empty_like(p, device="meta"))


def _materialize_parameters(model: torch.nn.Module, device: torch.device) -> None:
    """Give every meta parameter fresh (uninitialised) memory on `device`, ties kept."""
    _swap_parameters(model, lambda p: torch.empty_like(p, device=device) if p.is_meta else p.data)


def _swap_parameters(model: torch.nn.Module, make: Callable[[torch.Tensor], torch.Tensor]) -> None:
    replaced: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in replaced:
                replaced[id(param)] = torch.nn.Parameter(make(param.detach()), requires_grad=param.requires_grad)
            module._parameters[name] = replaced[id(param)]


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """State-dict names that are aliases of an earlier one (the lm_head tied to the embedding):
    alias -> the name it repeats."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        first.setdefault(id(tensor), name)
    return aliases


def _without_tied(model: torch.nn.Module, state: dict) -> dict:
    tied = _tied_aliases(model)
    return {k: v.contiguous() for k, v in state.items() if k not in tied}


class FSDP2:
    """`fsdp2`: torch `fully_shard` on every decoder layer and on the whole (the embedding, final
    norm and lm_head form the outer unit). Gradients are reduce-scattered and averaged by FSDP.
    Checkpoints hold the whole weights and the whole AdamW state, gathered."""

    sharded = True

    def __init__(self, model: torch.nn.Module, objective: Callable, *, lr: float, weight_decay: float,
                 proc: Processes, cfg: ParallelConfig):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.proc, self.home = proc, HomeModel(model)
        self.model, self.device = self.home.working, self.home.device
        mesh = init_device_mesh(self.device.type, (proc.world,))
        # bf16: layers gathered and computed in bf16; gradients reduced and kept in fp32.
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if cfg.mixed_precision == "bf16" else MixedPrecisionPolicy()
        shard = dict(mesh=mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=precision)
        for layer in _decoder_layers(self.model):
            fully_shard(layer, **shard)
        self.module = ObjectiveModule(self.model, objective)
        fully_shard(self.module, **shard)
        self.optimizer = _adamw(_param_groups(self.model, weight_decay), lr)

    def held_fraction(self) -> float:
        params = list(self.model.parameters())
        return sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params)

    def set_lr(self, lr: float) -> None:
        _set_lr(self.optimizer, lr)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # FSDP reduce-scatters (and averages) each layer's gradients here

    def step(self, max_grad_norm: float) -> torch.Tensor:
        # The parameters are DTensors, so their norm is one: the full tensor is the global norm.
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_grad_norm).full_tensor()
        if torch.isfinite(norm):
            self.optimizer.step()
        return norm

    def nonfinite_gradients(self) -> list[str]:
        return [n for n, p in self.model.named_parameters()
                if p.grad is not None and not torch.isfinite(p.grad.to_local()).all()]

    def full_weights_in(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[torch.nn.Module]:
        return self.home.filled(model, self._full_state(cpu=False))

    def finish(self) -> torch.nn.Module:
        return self.home.restore(self._full_state(cpu=False))

    def save(self, folder: Path, write: bool) -> None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = self._full_state(cpu=True)  # collectives: every process takes part
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=self._options(cpu=True))
        if write:
            self.home.write_weights(folder / WEIGHTS_FILE, state)
            torch.save(optimizer, folder / OPTIMIZER_FILE)

    def load(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        state = load_file(str(folder / WEIGHTS_FILE))
        for alias, name in _tied_aliases(self.home.model).items():
            state.setdefault(alias, state[name])
        whole = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state, options=whole)
        set_optimizer_state_dict(self.model, self.optimizer, torch.load(folder / OPTIMIZER_FILE, weights_only=True),
                                 options=whole)

    def _options(self, cpu: bool):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # cpu: gathered into CPU memory, on the main process only (for writing a checkpoint).
        return StateDictOptions(full_state_dict=True, cpu_offload=cpu)

    @torch.no_grad()
    def _full_state(self, cpu: bool) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=self._options(cpu))


class ZeRO3:
    """`zero3`: DeepSpeed ZeRO stage 3 over the client AdamW. DeepSpeed gathers a module's
    weights for its forward; the lm_head weight, which the chunked loss reads without calling
    lm_head, is registered as an external parameter of the loss module so it is gathered too.
    A step's micro-batches are DeepSpeed's gradient-accumulation steps (its own 1/n scaling is
    off: the loss is already normalised by the step's tokens).

    Step checkpoints hold the whole weights (gathered) like the others, plus one file per process
    with its partition of the fp32 weights and AdamW state, tensors and numbers only (read back
    with weights_only=True), so resuming needs the same number of processes. The optimizer's
    partitions are the truth (the model's partitions are views of them or are copied from them),
    so they alone are restored."""

    sharded = True

    def __init__(self, model: torch.nn.Module, objective: Callable, *, lr: float, weight_decay: float,
                 proc: Processes, cfg: ParallelConfig, micro_batches: int, max_grad_norm: float):
        import deepspeed

        self.proc, self.micro_batches, self.bf16 = proc, micro_batches, cfg.mixed_precision == "bf16"
        self.home = HomeModel(model)
        self.model, self.device = self.home.working, self.home.device
        module = ObjectiveModule(self.model, objective)
        hidden = self.model.config.hidden_size
        bucket = cfg.bucket_size or hidden * hidden
        persistence = 10 * hidden if cfg.param_persistence_threshold is None else cfg.param_persistence_threshold
        config = {
            "train_micro_batch_size_per_gpu": 1,  # nominal: batches are counted in tokens here
            "gradient_accumulation_steps": micro_batches,
            "train_batch_size": micro_batches * proc.world,
            # DeepSpeed clips inside its update, so the norm is given here once, not per step.
            "gradient_clipping": max_grad_norm,
            "zero_allow_untested_optimizer": True,
            # bf16: DeepSpeed computes with bf16 weights and keeps fp32 masters in the optimizer.
            "bf16": {"enabled": self.bf16},
            "steps_per_print": 2 ** 31,
            "zero_optimization": {
                "stage": 3,
                "stage3_param_persistence_threshold": persistence,
                "reduce_bucket_size": bucket,
                "stage3_prefetch_bucket_size": int(0.9 * bucket),
                **({"offload_optimizer": {"device": "cpu"}} if cfg.offload_optimizer else {}),
                **({"offload_param": {"device": "cpu"}} if cfg.offload_params else {}),
            },
        }
        optimizer = _adamw(_param_groups(self.model, weight_decay), lr)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        head = self.model.get_output_embeddings()
        if head is not None:
            deepspeed.zero.register_external_parameter(module, head.weight)
        self.module = self.engine
        self._micro = 0

    def held_fraction(self) -> float:
        params = list(self.model.parameters())
        return sum(p.ds_tensor.numel() for p in params) / sum(p.ds_numel for p in params)

    def set_lr(self, lr: float) -> None:
        _set_lr(self.optimizer, lr)

    def zero_grad(self) -> None:
        pass  # DeepSpeed clears the gradients itself after each update

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self._micro += 1
        if self._micro < self.micro_batches:
            # DeepSpeed counts micro-batches through its step(): before the step's last one it
            # only accumulates (no update).
            self.engine.step()

    def step(self, max_grad_norm: float) -> torch.Tensor:
        # DeepSpeed reduces, clips (to the norm given at start) and applies in one call, and only
        # then knows the norm; the caller stops on a non-finite one before any checkpoint, so
        # the last good checkpoint stays the newest.
        self._micro = 0
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float(norm) if norm is not None else 0.0)

    def nonfinite_gradients(self) -> list[str]:
        return []  # the gradients live in DeepSpeed's flat partitions, already consumed by the update

    def full_weights_in(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[torch.nn.Module]:
        return self.home.filled(model, self._full_state(cpu=False))

    def finish(self) -> torch.nn.Module:
        return self.home.restore(self._full_state(cpu=False))

    def save(self, folder: Path, write: bool) -> None:
        from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

        state = self.optimizer.state_dict()
        torch.save({key: state[key] for key in (OPTIMIZER_STATE_DICT, FP32_FLAT_GROUPS, "dynamic_loss_scale",
                                                "overflow")}, folder / self._partition_name())
        weights = self._full_state(cpu=True)  # a collective: every process takes part
        if write:
            self.home.write_weights(folder / WEIGHTS_FILE, weights)

    def load(self, folder: Path) -> None:
        from deepspeed.checkpoint.constants import LOSS_SCALER

        path = folder / self._partition_name()
        if not path.exists():
            written = sorted(p.name for p in folder.glob("zero3-rank*.pt"))
            raise UserError(f"{folder} holds no ZeRO-3 partition for process {self.proc.rank} of {self.proc.world} "
                            f"({len(written)} partition files): resume with the number of processes that wrote it")
        state = torch.load(path, weights_only=True)
        state[LOSS_SCALER] = self.optimizer.loss_scaler  # fp32 / bf16 training: a static scale of 1
        # DeepSpeed's own loader reads its pickled files; this is the step after the unpickling
        # (a private method, hence deepspeed pinned to 0.19 in pyproject.toml).
        self.optimizer._rigid_load_state_dict(state)

    def _partition_name(self) -> str:
        return f"zero3-rank{self.proc.rank:05d}-of-{self.proc.world:05d}.pt"

    @torch.no_grad()
    def _full_state(self, cpu: bool) -> dict[str, torch.Tensor]:
        """The whole weights: on every process, or (cpu) as CPU copies on the main process only."""
        import deepspeed

        params = dict(self.model.named_parameters())
        keep = not cpu or self.proc.main
        copy_ = (lambda t: t.detach().to("cpu", copy=True)) if cpu else (lambda t: t.detach().clone())
        if self.bf16:
            # The fp32 masters the optimizer keeps, not the bf16 weights it computes with.
            from deepspeed.utils import safe_get_full_fp32_param

            state = {name: safe_get_full_fp32_param(p) for name, p in params.items()}
            return {name: copy_(t) for name, t in state.items()} if keep else {}
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            # (always a copy: the gathered buffers are freed on leaving the context)
            return {name: copy_(tensor) for name, tensor in self.model.state_dict().items()} if keep else {}


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.get_decoder().layers)


def check_available(cfg: ParallelConfig, proc: Processes) -> None:
    """Before a run starts: can this strategy run here? (DeepSpeed is an optional dependency.)"""
    if cfg.strategy == "zero3" and proc.world > 1 and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("parallel=zero3 needs DeepSpeed, which is not installed: pip install 'distill[deepspeed]', "
                          "or use parallel=fsdp2")


def make_engine(model: torch.nn.Module, objective: Callable, *, lr: float, weight_decay: float, max_grad_norm: float,
                micro_batches: int, proc: Processes, cfg: ParallelConfig | None = None) -> Engine:
    """The engine for `cfg.strategy` (ddp in one process, whatever was asked)."""
    strategy = cfg.strategy if cfg is not None and proc.world > 1 else "ddp"
    bf16 = cfg is not None and cfg.mixed_precision == "bf16"
    if strategy == "fsdp2":
        return FSDP2(model, objective, lr=lr, weight_decay=weight_decay, proc=proc, cfg=cfg)
    if strategy == "zero3":
        return ZeRO3(model, objective, lr=lr, weight_decay=weight_decay, proc=proc, cfg=cfg,
                     micro_batches=micro_batches, max_grad_norm=max_grad_norm)
    return Replicated(model, objective, lr=lr, weight_decay=weight_decay, proc=proc, bf16=bf16)
