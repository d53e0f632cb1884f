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

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from distill.config import ConfigError, ParallelConfig
from distill.distributed import Processes
from distill.errors import UserError

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
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip(self, max_norm: float) -> torch.Tensor:
        """Average the gradients over the processes, clip them; returns the global norm."""
        self.proc.average_gradients(self.model)
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def update(self) -> None:
        self.optimizer.step()

    def nonfinite_gradients(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]

    # Checkpoints: the weights as safetensors, the optimizer state as tensors and numbers.
    def write_weights(self, path: Path, write: bool) -> None:
        if write:
            save_model(self.model, str(path))

    def read_weights(self, path: Path) -> None:
        load_model(self.model, str(path))

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def write_shard(self, folder: Path) -> None:
        """This process's own part of a checkpoint (only ZeRO-3 has one)."""

    def read_shard(self, folder: Path) -> None:
        pass

    @contextlib.contextmanager
    def full_weights_in(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        yield self.model

    def finish(self) -> torch.nn.Module:
        return self.model

    def held_fraction(self) -> float:
        """The share of the student's parameter elements this process holds while training."""
        return 1.0


class _Sharded(Replicated):
    """What FSDP2 and ZeRO-3 share: the student's weights move into a working copy that the
    engine shards, and come back into the student object when asked."""

    sharded = True

    def _take_weights(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of `model` that owns its parameters, with `model` left holding none (they are
        on the meta device), so only the shards hold memory once the copy is sharded. The copy
        shares the parameter tensors instead of duplicating them, so no second full copy exists."""
        self.home, self.device = model, next(model.parameters()).device
        shared = {id(p): p for p in model.parameters()}
        working = copy.deepcopy(model, memo=dict(shared))
        _drop_parameters(model)
        return working

    def _full_state(self, rank0_only: bool) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _restore_into(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        _materialize_parameters(model, self.device)
        missing = {k for k, _ in model.named_parameters() if k not in state}
        if missing:
            raise RuntimeError(f"gathered weights lack {sorted(missing)[:3]}")
        model.load_state_dict(state, strict=False)

    @contextlib.contextmanager
    def full_weights_in(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The student object with the current weights for the duration (every process gathers
        them all: on-policy rollouts are sampled by each process on its own, with no collective
        per token); emptied again afterwards."""
        with torch.no_grad():
            self._restore_into(model, self._full_state(rank0_only=False))
        try:
            yield model
        finally:
            _drop_parameters(model)

    def finish(self) -> torch.nn.Module:
        with torch.no_grad():
            self._restore_into(self.home, self._full_state(rank0_only=False))
        self.home.train(False)
        return self.home

    def write_weights(self, path: Path, write: bool) -> None:
        state = self._full_state(rank0_only=True)  # a collective: every process takes part
        if write:
            save_file(_without_tied(self.home, state), str(path), metadata={"format": "pt"})

    def nonfinite_gradients(self) -> list[str]:
        return []  # the gradients are sharded; the global norm already says they are not finite


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


class FSDP2(_Sharded):
    """`fsdp2`: torch `fully_shard` on every decoder layer and on the whole (the embedding, final
    norm and lm_head form the outer unit). Gradients are reduce-scattered and averaged by FSDP."""

    def __init__(self, model: torch.nn.Module, objective: Callable, *, lr: float, weight_decay: float,
                 proc: Processes, cfg: ParallelConfig):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.proc = proc
        working = self._take_weights(model)
        mesh = init_device_mesh(self.device.type, (proc.world,))
        # bf16: layers gathered and computed in bf16; gradients reduced and kept in fp32.
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if cfg.mixed_precision == "bf16" else MixedPrecisionPolicy()
        shard = dict(mesh=mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=precision)
        for layer in _decoder_layers(working):
            fully_shard(layer, **shard)
        self.module = ObjectiveModule(working, objective)
        fully_shard(self.module, **shard)
        self.model = working
        self.optimizer = _adamw(_param_groups(working, weight_decay), lr)

    def held_fraction(self) -> float:
        params = list(self.model.parameters())
        return sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params)

    def clip(self, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _options(self, rank0_only: bool):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)

    def _full_state(self, rank0_only: bool) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=self._options(rank0_only))

    def read_weights(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = load_file(str(path))
        for alias, name in _tied_aliases(self.home).items():
            state.setdefault(alias, state[name])
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))

    def optimizer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer, options=self._options(rank0_only=True))

    def load_optimizer_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))


class ZeRO3(_Sharded):
    """`zero3`: DeepSpeed ZeRO stage 3 over the client AdamW. DeepSpeed gathers a module's
    weights for its forward; the lm_head weight, which the chunked loss reads without calling
    lm_head, is registered as an external parameter of the loss module so it is gathered too.
    A step's micro-batches are DeepSpeed's gradient-accumulation steps (its own 1/n scaling is
    off: the loss is already normalised by the step's tokens).

    Step checkpoints hold the whole weights (gathered) like the others, plus one file per process
    with its partition of the fp32 weights and AdamW state, tensors and numbers only (read back
    with weights_only=True), so resuming needs the same number of processes."""

    def __init__(self, model: torch.nn.Module, objective: Callable, *, lr: float, weight_decay: float,
                 proc: Processes, cfg: ParallelConfig, micro_batches: int, max_grad_norm: float):
        import deepspeed

        self.proc, self.micro_batches, self.bf16 = proc, micro_batches, cfg.mixed_precision == "bf16"
        working = self._take_weights(model)
        module = ObjectiveModule(working, objective)
        hidden = working.config.hidden_size
        bucket = cfg.bucket_size or hidden * hidden
        persistence = 10 * hidden if cfg.param_persistence_threshold is None else cfg.param_persistence_threshold
        config = {
            "train_micro_batch_size_per_gpu": 1,  # nominal: batches are counted in tokens here
            "gradient_accumulation_steps": micro_batches,
            "train_batch_size": micro_batches * proc.world,
            "gradient_clipping": max_grad_norm,
            "zero_allow_untested_optimizer": True,
            # bf16: DeepSpeed computes with bf16 weights and keeps fp32 masters in the optimizer.
            "bf16": {"enabled": cfg.mixed_precision == "bf16"},
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
        optimizer = _adamw(_param_groups(working, weight_decay), lr)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        head = working.get_output_embeddings()
        if head is not None:
            deepspeed.zero.register_external_parameter(module, head.weight)
        self.module, self.model = self.engine, working
        self._micro = 0

    def held_fraction(self) -> float:
        params = list(self.model.parameters())
        return sum(p.ds_tensor.numel() for p in params) / sum(p.ds_numel for p in params)

    def zero_grad(self) -> None:
        pass  # DeepSpeed clears the gradients after each update

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self._micro += 1
        if self._micro < self.micro_batches:
            self.engine.step()  # a micro step: accumulates, no update

    def clip(self, max_norm: float) -> torch.Tensor:
        # DeepSpeed clips inside its update; the norm is known only then, and is checked after it
        # (before any checkpoint is written, so the last good one stays the newest).
        self._micro = 0
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float(norm) if norm is not None else 0.0)

    def update(self) -> None:
        pass  # done in clip()

    def _full_state(self, rank0_only: bool) -> dict[str, torch.Tensor]:
        import deepspeed

        params = dict(self.model.named_parameters())
        keep = not rank0_only or self.proc.main
        copy_ = (lambda t: t.detach().to("cpu", copy=True)) if rank0_only else (lambda t: t.detach().clone())
        if self.bf16:
            # The fp32 masters the optimizer keeps, not the bf16 weights it computes with.
            from deepspeed.utils import safe_get_full_fp32_param

            state = {name: safe_get_full_fp32_param(p) for name, p in params.items()}
            return {name: copy_(t) for name, t in state.items()} if keep else {}
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            # (always a copy: the gathered buffers are freed on leaving the context)
            state = {name: copy_(tensor) for name, tensor in self.model.state_dict().items()} if keep else {}
        return state

    # The optimizer's partitions are the truth (the model's partitions are views of them or are
    # copied from them), so they alone are restored.
    def read_weights(self, path: Path) -> None:
        pass

    def optimizer_state(self) -> dict:
        return {}

    def load_optimizer_state(self, state: dict) -> None:
        pass

    def _shard_name(self) -> str:
        return f"zero3-rank{self.proc.rank:05d}-of-{self.proc.world:05d}.pt"

    def write_shard(self, folder: Path) -> None:
        from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

        state = self.optimizer.state_dict()
        torch.save({key: state[key] for key in (OPTIMIZER_STATE_DICT, FP32_FLAT_GROUPS, "dynamic_loss_scale",
                                                "overflow")}, folder / self._shard_name())

    def read_shard(self, folder: Path) -> None:
        from deepspeed.checkpoint.constants import LOSS_SCALER

        path = folder / self._shard_name()
        if not path.exists():
            written = sorted(p.name for p in folder.glob("zero3-rank*.pt"))
            raise UserError(f"{folder} holds no ZeRO-3 partition for process {self.proc.rank} of {self.proc.world} "
                            f"({len(written)} partition files): resume with the number of processes that wrote it")
        state = torch.load(path, weights_only=True)
        state[LOSS_SCALER] = self.optimizer.loss_scaler  # fp32 / bf16 training: a static scale of 1
        # DeepSpeed's own loader reads its pickled files; this is the step after the unpickling
        # (a private method, hence deepspeed pinned to 0.19 in pyproject.toml).
        self.optimizer._rigid_load_state_dict(state)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers at model.layers to shard")
    return list(layers)


def check_available(cfg: ParallelConfig, proc: Processes) -> None:
    """Before a run starts: can this strategy run here? (DeepSpeed is an optional dependency.)"""
    if cfg.strategy == "zero3" and proc.world > 1 and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("parallel=zero3 needs DeepSpeed, which is not installed: pip install 'distill[deepspeed]', "
                          "or use parallel=fsdp2")


def make_engine(model: torch.nn.Module, objective: Callable, *, lr: float, weight_decay: float, max_grad_norm: float,
                micro_batches: int, proc: Processes, cfg: ParallelConfig | None = None) -> Replicated:
    """The engine for `cfg.strategy` (ddp in one process, whatever was asked)."""
    strategy = cfg.strategy if cfg is not None and proc.world > 1 else "ddp"
    bf16 = cfg is not None and cfg.mixed_precision == "bf16"
    if strategy == "fsdp2":
        return FSDP2(model, objective, lr=lr, weight_decay=weight_decay, proc=proc, cfg=cfg)
    if strategy == "zero3":
        return ZeRO3(model, objective, lr=lr, weight_decay=weight_decay, proc=proc, cfg=cfg,
                     micro_batches=micro_batches, max_grad_norm=max_grad_norm)
    return Replicated(model, objective, lr=lr, weight_decay=weight_decay, proc=proc, bf16=bf16)
