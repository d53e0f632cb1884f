"""Test set-up: offline, one torch thread, and small composed configs.

Tests never reach a hub (HF_HUB_OFFLINE) and use one thread: on a 2-core box, oversubscribed
small ops are 10-40x slower and erratic.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Overrides that shrink the default pipeline to seconds: a smaller teacher trained briefly,
# few prompts and steps, a short eval.
TINY_RUN = [
    "logger=none",
    "threads=1",
    "teacher.bootstrap.steps=40",
    "+teacher.overrides.hidden_size=64",
    "+teacher.overrides.head_dim=16",
    "+teacher.overrides.moe_intermediate_size=64",
    "+teacher.overrides.num_hidden_layers=2",
    # the dense student takes the (shrunken) teacher's attention blocks
    "students.dense.architecture.hidden_size=64",
    "students.dense.architecture.head_dim=16",
    "students.dense.architecture.num_hidden_layers=2",
    "students.dense.teacher_layers=[1,0]",
    "students.dense.steps=12",
    "data.arithmetic.train_size=600",
    "data.arithmetic.validation_size=20",
    "data.arithmetic.test_size=40",
    "data.arithmetic.min_steps=2",
    "data.arithmetic.max_steps=3",
    "pipeline.offpolicy.prompts=48",
    "pipeline.offpolicy.steps=12",
    "pipeline.offpolicy.batch_size=8",
    "pipeline.offpolicy.max_new_tokens=48",
    "pipeline.eval.problems=24",
    "pipeline.eval.max_new_tokens=48",
]


@pytest.fixture
def tiny_run_overrides(tmp_path):
    return TINY_RUN + [f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"]


@pytest.fixture(scope="session")
def tokenizer():
    from distill.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def foreign_tokenizer():
    """A word-level tokenizer with nothing in common with the built-in byte-level one."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "hello": 1, "world": 2, "<|endoftext|>": 3}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   unk_token="<unk>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
