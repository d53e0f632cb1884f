"""`python -m eval` with the vLLM backend: a running server (backend.url), or one started for the
model and stopped after it; n samples, seeds and the thinking budget go through the server."""

import json
import shutil

import psutil

from conftest import needs_vllm
from distill.eval.__main__ import main

pytestmark = needs_vllm


def _eval(tmp_path, name, *args):
    out = tmp_path / name
    assert main([*args, "task.source.limit=4", "task.max_new_tokens=10", f"cache_dir={tmp_path / 'cache'}",
                 f"out_dir={out}", "logger=none", "progress=false"]) == 0
    return json.loads((out / "eval.json").read_text())["models"]


def test_eval_through_a_running_server(vllm_server, vllm_model_dir, tmp_path):
    args = [f"models=[teacher:{vllm_model_dir}]", "backend.kind=vllm", f"backend.url={vllm_server.url}",
            "task.samples=2", "pass_k=[1,2]", "budgets=[3]", "budget_answer_tokens=4"]
    first = _eval(tmp_path, "a", *args)["teacher"]
    assert len(first["think"]["samples"]) == 8 and len(first["no_think"]["samples"]) == 8 and "pass@2" in first["think"]
    assert all(s["thinking_tokens"] + s["answer_tokens"] <= 10 for s in first["think"]["samples"])
    budget = first["budget"]["3"]["samples"]
    assert all(s["thinking_tokens"] <= 3 for s in budget)
    forced = [s for s in budget if s["budget_forced"]]
    assert forced and all("Considering the limited time by the user" in s["response"] for s in forced)
    assert all(s["answer_tokens"] <= 4 for s in forced)
    # seeded per request: the same command gives the same samples
    again = _eval(tmp_path, "b", *args)["teacher"]
    assert [s["response"] for s in again["think"]["samples"]] == [s["response"] for s in first["think"]["samples"]]


def test_eval_starts_and_stops_a_server_for_the_model(vllm_model_dir, tmp_path):
    model = tmp_path / "model"   # its own path, so that its server is told apart from the session's
    shutil.copytree(vllm_model_dir, model)
    results = _eval(tmp_path, "own", f"models=[{model}]", "backend.kind=vllm", "greedy=true", "modes=[no_think]")
    samples = results["model"]["no_think"]["samples"]
    assert len(samples) == 4 and all(s["response"].startswith("<think>\n\n</think>\n\n") for s in samples)
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(model) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers


def test_lm_eval_through_the_server_matches_our_harness(vllm_server, vllm_model_dir, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    cache = str(tmp_path / "cache")
    manager = TaskManager(include_path="eval/lm_eval_tasks", include_defaults=False,
                          metadata={"cache_dir": cache, "limit": 4})
    out = simple_evaluate(model="local-completions", model_args={
        "base_url": vllm_server.url + "/v1/completions", "model": "teacher", "tokenizer": str(vllm_model_dir),
        "tokenizer_backend": "huggingface", "tokenized_requests": True, "think_end_token": "</think>"},
        tasks=["distill_arithmetic"], task_manager=manager, apply_chat_template=True, log_samples=True,
        gen_kwargs={"max_gen_toks": 10})
    theirs = {s["doc"]["id"]: s for s in out["samples"]["distill_arithmetic"]}
    ours = _eval(tmp_path, "ours", f"models=[m:{vllm_model_dir}]", "backend.kind=vllm",
                 f"backend.url={vllm_server.url}", "greedy=true", "modes=[think]")["m"]["think"]["samples"]
    assert len(theirs) == len(ours) == 4
    for sample in ours:
        their = theirs[sample["problem"]]
        assert their["doc"]["reference"] == sample["reference"]
        assert their["filtered_resps"][0].strip() == sample["response"].split("</think>")[-1].strip()
        assert their["pass@1"] == float(sample["correct"])
