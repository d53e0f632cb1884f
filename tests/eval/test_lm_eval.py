"""The distill tasks under lm-evaluation-harness (eval/lm_eval_tasks/): same problems, same
prompt rendering and the same scoring as `python -m eval`, checked reply by reply."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the test extra: pip install -e '.[test]'")

from distill.eval.__main__ import main  # noqa: E402
from distill.eval.extract import final_text  # noqa: E402

TASKS_DIR = "eval/lm_eval_tasks"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer, tiny_model):
    # No embedding padding: we never produce padding rows and lm-eval's generate would, so with
    # an embedding exactly the tokenizer's size both sides choose among the same tokens.
    return tiny_model(tmp_path_factory.mktemp("lm_eval_model"), tokenizer, seed=3, vocab_size=len(tokenizer))


@pytest.mark.parametrize("mode", ["think", "no_think"])
def test_lm_eval_and_our_harness_agree_reply_by_reply(model_dir, tmp_path, mode):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    limit, max_tokens = 6, 24
    cache = str(tmp_path / "cache")
    manager = TaskManager(include_path=TASKS_DIR, include_defaults=False, metadata={"cache_dir": cache, "limit": limit})
    out = simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "enable_thinking": mode == "think",
                                                  "think_end_token": "</think>", "dtype": "float32", "device": "cpu"},
                          tasks=["distill_arithmetic"], task_manager=manager, apply_chat_template=True, batch_size=4,
                          log_samples=True, gen_kwargs={"max_gen_toks": max_tokens})
    theirs = {s["doc"]["id"]: s for s in out["samples"]["distill_arithmetic"]}
    assert len(theirs) == limit

    assert main([f"models=[{model_dir}]", f"modes=[{mode}]", "greedy=true", f"task.source.limit={limit}",
                 f"task.max_new_tokens={max_tokens}", f"cache_dir={cache}", f"out_dir={tmp_path / 'ours'}",
                 "logger=none", "progress=false"]) == 0
    ours = json.loads((tmp_path / "ours" / "eval.json").read_text())["models"][model_dir.name][mode]
    for sample in ours["samples"]:
        their = theirs[sample["problem"]]
        assert their["doc"]["reference"] == sample["reference"]
        reply = their["resps"][0][0]
        # lm-eval hands over the text after </think>, or the whole reply when the block never closed
        final = final_text(sample["response"])
        assert reply.strip() == (final if final is not None else sample["response"]).strip()
        assert their["pass@1"] == float(sample["correct"])
        assert their["format_error"] == float(sample["format_error"])
    assert out["results"]["distill_arithmetic"]["pass@1,none"] == ours["pass@1"]
    assert sum(len(s["resps"][0][0]) for s in theirs.values()) > limit   # real replies were compared
