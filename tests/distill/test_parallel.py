"""The pieces of distill/parallel.py that need no second process (the two-process runs are in
tests/test_distributed.py)."""

import pytest
import torch
from accelerate.utils import DistributedType

from distill import distributed
from distill.common.errors import ConfigError
from distill.config import LossConfig, ParallelConfig
from distill.distributed import Processes
from distill.parallel import Replicated, _drop_parameters, _materialize_parameters, check_available, make_engine
from distill.train import distillation_objective

from conftest import scaled_model


def test_emptied_and_refilled_student_keeps_its_tied_embedding_and_rotary_buffers():
    model = scaled_model()
    assert model.config.tie_word_embeddings
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inv_freq = model.model.rotary_emb.inv_freq.clone()  # a buffer outside the state dict

    _drop_parameters(model)
    assert all(p.is_meta for p in model.parameters())
    _materialize_parameters(model, torch.device("cpu"))
    model.load_state_dict(state)

    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_one_process_trains_whole_replicas_whatever_strategy_was_asked():
    model = scaled_model()
    for strategy in ("ddp", "fsdp2", "zero3"):
        engine = make_engine(model, distillation_objective(LossConfig(), 100), lr=1e-3, weight_decay=0.0,
                             max_grad_norm=1.0, micro_batches=1, proc=Processes(), cfg=ParallelConfig(strategy=strategy))
        assert type(engine) is Replicated and engine.model is model and engine.held_fraction() == 1.0


@pytest.mark.parametrize("plugin, strategy", [(DistributedType.FSDP, "fsdp2"), (DistributedType.DEEPSPEED, "zero3")])
def test_accelerate_sharding_plugins_are_refused_with_the_parallel_option_to_use(monkeypatch, plugin, strategy):
    """accelerate's own FSDP / DeepSpeed plugins (GPU launches) would be ignored: say so."""

    class Launched:
        def __init__(self, cpu):
            self.distributed_type, self.process_index, self.num_processes = plugin, 0, 2

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("accelerate.Accelerator", Launched)
    with pytest.raises(ConfigError, match=f"conf/accelerate/multi_gpu.yaml .* set parallel={strategy}"):
        distributed.processes(torch.device("cpu"))


def test_zero3_without_deepspeed_is_refused_before_the_run_starts(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "deepspeed" else object())
    with pytest.raises(ConfigError, match=r"parallel=zero3 needs DeepSpeed, which is not installed: pip install"):
        check_available(ParallelConfig(strategy="zero3"), Processes(rank=0, world=2))
    check_available(ParallelConfig(strategy="fsdp2"), Processes(rank=0, world=2))
    check_available(ParallelConfig(strategy="zero3"), Processes())  # one process: trains as ddp
