"""`python -m eval` end to end on tiny models saved by save_pretrained, and its refusals."""

import json

import pytest

from distill.eval.__main__ import load_config, main


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer, tiny_model):
    """Two tiny random models (dense and MoE) with the built-in tokenizer."""
    folders, root = {}, tmp_path_factory.mktemp("models")
    for name, preset in (("dense", "tiny"), ("moe", "tiny-moe")):
        folders[name] = tiny_model(root / name, tokenizer, preset)
    return folders


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    rows = [{"question": f"{a}+{b}", "answer": f"Add them.\n#### {a + b}"} for a, b in [(1, 2), (3, 4), (5, 6)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_two_models_side_by_side_with_samples_and_budgets(model_dirs, problems_file, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main([f"models=[teacher:{model_dirs['moe']},{model_dirs['dense']}]", "task=gsm8k",
                 f"task.source.path={problems_file}", "task.samples=3", "task.max_new_tokens=12", "pass_k=[1,2,3]",
                 "budgets=[0,4]", "budget_answer_tokens=3", f"out_dir={out}", "logger=none", "progress=false"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| model | think | no_think | think − no_think |" in printed and "| dense |" in printed
    report = json.loads((out / "eval.json").read_text())
    assert report["meta"]["task"] == "gsm8k" and report["meta"]["samples"] == 3
    teacher = report["models"]["teacher"]
    assert set(teacher) == {"think", "no_think", "budget"}
    think = teacher["think"]
    assert len(think["samples"]) == 9 and {"pass@2", "pass@3"} <= set(think)
    sample = think["samples"][0]
    for key in ("problem", "sample", "prompt", "response", "reference", "predicted", "correct", "format_error",
                "finished", "thinking_tokens", "answer_tokens"):
        assert key in sample
    assert sample["prompt"].endswith("within \\boxed{}.") and sample["reference"] == "3"
    assert all(s["thinking_tokens"] + s["answer_tokens"] <= 12 for s in think["samples"])
    for budget, result in teacher["budget"].items():
        assert len(result["samples"]) == 9
        assert all(s["thinking_tokens"] <= int(budget) for s in result["samples"])
    zero = teacher["budget"]["0"]["samples"]
    assert all(s["budget_forced"] and "Considering the limited time" in s["response"] for s in zero)
    markdown = (out / "eval.md").read_text()
    assert "## Thinking budget" in markdown and "| teacher | think |" in markdown
    assert (out / "think_vs_no_think.png").stat().st_size > 1000
    assert (out / "thinking_budget.png").stat().st_size > 1000
    assert not list(out.glob(".*"))   # no temporaries left


def test_sampling_is_seeded(model_dirs, problems_file, tmp_path):
    def responses(seed, name):
        out = tmp_path / name
        assert main([f"models=[{model_dirs['dense']}]", "task=math500", f"task.source.path={problems_file}",
                     "task.source.question_column=question", "task.source.answer_column=answer", "modes=[think]",
                     "task.samples=2", "task.max_new_tokens=8", f"seed={seed}", f"out_dir={out}", "logger=none",
                     "progress=false"]) == 0
        return [s["response"] for s in json.loads((out / "eval.json").read_text())["models"]["dense"]["think"]["samples"]]

    assert responses(1, "a") == responses(1, "b")
    assert responses(1, "a") != responses(2, "c")


def test_a_run_directory_expands_to_its_models(model_dirs, problems_file, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "models.json").write_text(json.dumps({"teacher": str(model_dirs["moe"]), "dense": str(model_dirs["dense"])}))
    config = load_config([f"models=[{run_dir}]"])
    from distill.eval.models import resolve_models

    assert [(s.name, s.path) for s in resolve_models(config.models)] == [
        ("teacher", str(model_dirs["moe"])), ("dense", str(model_dirs["dense"]))]
    assert [s.name for s in resolve_models(["Qwen/Qwen3-0.6B", f"x:{model_dirs['dense']}"])] == ["Qwen3-0.6B", "x"]


def test_wandb_table_and_metrics_in_the_eval_log(model_dirs, problems_file, tmp_path):
    out = tmp_path / "logged"
    assert main([f"models=[{model_dirs['dense']}]", "task=gsm8k", f"task.source.path={problems_file}",
                 "task.max_new_tokens=6", "greedy=true", f"out_dir={out}", "progress=false"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    table = next(r for r in records if r.get("table") == "eval/table")
    assert table["columns"][:4] == ["model", "mode", "budget", "pass@1"] and len(table["rows"]) == 2
    assert any("eval/think/" + model_dirs["dense"].name + "/pass@1" in r for r in records)
    assert list((out / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("args, message", [
    ([], "no models to evaluate"),
    (["models=[x]", "task=nope"], "unknown task 'nope'; valid: aime, arithmetic, chat, gsm8k, math500"),
    (["models=[x]", "modez=[think]"], "unknown config key 'modez'"),
    (["models=[x]", "task.samples=two"], "task.samples: expected an integer"),
    (["models=[x]", "budgets=[-1]"], "budgets[0] must be >= 0"),
    (["models=[x]", "modes=[no_think]", "budgets=[8]"], "budgets need think mode"),
    (["models=[/no/such/folder]"], "no folder '/no/such/folder'"),
    (["models=[Org/not-downloaded-model]"], "cannot load the tokenizer of model 'Org/not-downloaded-model'"),
])
def test_bad_input_is_one_line_and_writes_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(args + [f"out_dir={out}", "logger=none", f"cache_dir={tmp_path / 'cache'}", "progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_data_without_the_columns_is_refused(model_dirs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1", "solution": "2"}) + "\n")
    assert main([f"models=[{model_dirs['dense']}]", "task=gsm8k", f"task.source.path={bad}", "logger=none",
                 f"out_dir={tmp_path / 'never'}"]) == 2
    err = capsys.readouterr().err
    assert "has no column 'question'" in err and "task.source.question_column" in err
    assert not (tmp_path / "never").exists()


def test_cfg_job_prints_the_task_defaults_that_will_run(capsys):
    assert main(["models=[x]", "task=aime", "task.source.limit=5", "--cfg", "job"]) == 0
    printed = capsys.readouterr().out
    assert "path: HuggingFaceH4/aime_2024" in printed and "samples: 16" in printed and "limit: 5" in printed
