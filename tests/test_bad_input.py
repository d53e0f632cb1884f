"""Bad input: one line naming the problem and the fix, exit status 2, nothing half-written.

(Also covered elsewhere: unknown preset, misspelt key, wrong type and sizes that do not fit in
tests/distill/test_config.py; tokenizer and vocabulary mismatches in tests/distill/test_vocab.py;
k above the server's max_logprobs and a server that is down in tests/teachers/test_vllm_backend.py;
an unwritable or full run_dir in tests/test_security.py.)"""

import json

import pytest

from distill.__main__ import main


def _fails(args, tmp_path, capsys, *expected):
    code = main([*args, f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "logger=none"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "release").exists()
    assert not (tmp_path / "run" / "release").exists()
    return lines[0]


def _chat_rows(count, bad=0):
    rows = [{"messages": [{"role": "user", "content": f"{i}+1"}, {"role": "assistant", "content": f"{i + 1}"}],
             "answer": str(i + 1)} for i in range(count)]
    for i in range(bad):
        rows[i] = {"messages": [{"speaker": "user", "text": "broken"}], "answer": "0"}
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_teacher_path(tmp_path, capsys):
    _fails(["teacher=transformers", f"teacher.model={tmp_path / 'no-such-teacher'}"], tmp_path, capsys,
           "no-such-teacher", "save_pretrained")


def test_hub_name_while_offline(tmp_path, capsys):
    _fails(["teacher=transformers", "teacher.model=SomeOrg/not-downloaded"], tmp_path, capsys,
           "SomeOrg/not-downloaded", "network access")


def test_a_folder_that_holds_no_model(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.json").write_text("{}")
    _fails(["teacher=transformers", f"teacher.model={tmp_path / 'notes'}"], tmp_path, capsys,
           "cannot load tokenizer", "notes", "save_pretrained")


def _own_data(tmp_path, tokenizer, tiny_model, source):
    teacher = tiny_model(tmp_path / "teacher", tokenizer)
    return ["data=messages", f"data.source={source}", "data.tokenizer=builtin", "teacher=transformers",
            f"teacher.model={teacher}", "students.dense.init=random", "students.moe.init=random"]


def test_dataset_without_the_messages_column(tmp_path, capsys, tokenizer, tiny_model):
    source = _write(tmp_path / "d.jsonl", [{"prompt": "1+1", "answer": "2"}] * 4)
    _fails(_own_data(tmp_path, tokenizer, tiny_model, source), tmp_path, capsys, "no 'messages' column",
           "data.messages_column")


def test_empty_dataset(tmp_path, capsys, tokenizer, tiny_model):
    source = tmp_path / "empty.jsonl"
    source.write_text("")
    _fails(_own_data(tmp_path, tokenizer, tiny_model, source), tmp_path, capsys, "empty")


def test_malformed_rows_above_the_threshold_stop_the_run(tmp_path, capsys, tokenizer, tiny_model):
    source = _write(tmp_path / "d.jsonl", _chat_rows(50, bad=5))
    _fails(_own_data(tmp_path, tokenizer, tiny_model, source), tmp_path, capsys, "rows are unusable", "role",
           "data.max_malformed")


def test_malformed_rows_below_the_threshold_are_counted_and_skipped(tmp_path, capsys):
    from distill.config import DataConfig
    from distill.data import load_chat_dataset

    source = _write(tmp_path / "d.jsonl", _chat_rows(200, bad=1))
    loaded = load_chat_dataset(DataConfig(source=str(source), tokenizer="builtin"), tmp_path)
    assert sum(len(split) for split in loaded.values()) == 199
    assert "skipped 1 of" in capsys.readouterr().out


def test_a_prompt_longer_than_the_maximum_length(tmp_path, capsys):
    from distill.common.errors import ConfigError
    from distill.config import DataConfig
    from distill.data import drop_long_prompts, load_chat_dataset
    from distill.students.tokenizer import build_tokenizer

    rows = _chat_rows(20)
    rows[3]["messages"][0]["content"] = "9" * 400
    source = _write(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(source=str(source), tokenizer="builtin", max_length=64)
    loaded = load_chat_dataset(cfg, tmp_path)
    with pytest.raises(ConfigError, match="its prompt is .* tokens, data.max_length is 64; raise data.max_length"):
        drop_long_prompts(loaded, build_tokenizer(), cfg)


def test_wandb_unreachable_training_goes_on_offline(tiny_run_overrides, tmp_path, monkeypatch, capsys):
    from distill.__main__ import load_config
    from distill.pipeline import run

    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")   # nothing listens there
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "20")
    overrides = [o for o in tiny_run_overrides if o != "logger=none"] + ["logger=wandb", "wandb.mode=online",
                                                                        "pipeline.stages=[teacher]"]
    config = load_config(overrides)
    summary = run(config, progress=False)
    assert "logging offline instead" in capsys.readouterr().out
    assert list((summary.run_dir / "wandb").glob("offline-run-*"))


def test_a_student_the_cpu_rollout_engine_cannot_serve(tiny_run_overrides, tmp_path, capsys):
    """vLLM's CPU attention has no head_dim 16 (the test run's dense student): refused before
    anything is trained or written."""
    line = _fails([o for o in tiny_run_overrides if not o.startswith(("run_dir", "cache_dir"))] +
                  ["rollout.engine=vllm", "device=cpu"], tmp_path, capsys, "student 'dense'", "head_dim 16",
                  "rollout.engine=in_process")
    assert not (tmp_path / "run").exists(), line
