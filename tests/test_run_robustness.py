"""A run that survives its user: custom data from one file, run folders that belong to one run,
resumes that check what they resume, logs with each step once, durable and shared-safe files.

Each test names the numbered item of the issue it covers (issue 17)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_RUN
from distill.__main__ import main
from distill.common.tracking import read_metrics
from test_bad_input import _chat_rows, _fails, _own_data, _write


def _run(args, tmp_path, run="run", *extra):
    return main([*TINY_RUN, *args, f"run_dir={tmp_path / run}", f"cache_dir={tmp_path / 'cache'}", *extra])


# 1. One-file custom data -----------------------------------------------------------------------

def test_the_readme_custom_data_command_trains_from_one_jsonl_file(tmp_path, tokenizer, tiny_model, capsys):
    # The README's command (own data: one JSONL file, a teacher checkpoint folder), shrunk: the
    # file has no validation or test split, periodic eval is on.
    source = _write(tmp_path / "data.jsonl", _chat_rows(300))
    teacher = tiny_model(tmp_path / "teacher", tokenizer)
    code = _run(["data=messages", f"data.source={source}", "data.tokenizer=builtin", "teacher=transformers",
                 f"teacher.model={teacher}", "students.dense.init=random", "students.moe.init=random", "pipeline.offpolicy.prompts=120",
                 "pipeline.onpolicy.prompts=60", "pipeline.eval.every=6", "pipeline.eval.periodic_problems=4"],
                tmp_path)
    assert code == 0, capsys.readouterr().err
    records = read_metrics(tmp_path / "run")
    assert any("periodic_eval/dense/think/pass@1" in r for r in records)   # from the carved validation split
    assert (tmp_path / "run" / "release" / "dense" / "model.safetensors").exists()


def test_too_few_prompts_stop_before_any_teacher_work(tmp_path, tokenizer, tiny_model, capsys):
    source = _write(tmp_path / "data.jsonl", _chat_rows(100))
    _fails([*_own_data(tmp_path, tokenizer, tiny_model, source), "pipeline.offpolicy.prompts=3000"], tmp_path, capsys,
           "no training prompts left for the on-policy stage", "pipeline.offpolicy.prompts")
    assert not (tmp_path / "run").exists()   # nothing written, no teacher output started


# 2. A run folder belongs to one run ------------------------------------------------------------

SHORT = ["pipeline.stages=[teacher,offpolicy]", "pipeline.offpolicy.steps=2", "students.dense.steps=2",
         "~students.moe", "pipeline.offpolicy.prompts=16"]


def test_a_used_run_dir_is_refused_without_resume_and_cleared_with_overwrite(tmp_path, capsys):
    def steps():
        return [r["train/dense/step"] for r in read_metrics(tmp_path / "run") if "train/dense/step" in r]

    assert _run(SHORT, tmp_path) == 0
    records = len(read_metrics(tmp_path / "run"))
    assert _run(SHORT, tmp_path) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "resume=true" in err and "overwrite=true" in err
    assert len(read_metrics(tmp_path / "run")) == records   # untouched
    assert _run(SHORT, tmp_path, "run", "overwrite=true") == 0
    assert steps() == [2]   # a fresh log, not two runs in one


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    from distill.common.files import new_folder

    folders = {new_folder(tmp_path) for _ in range(3)}
    assert len(folders) == 3 and all(f.is_dir() for f in folders)


# 6. Resume checks what it resumes --------------------------------------------------------------

def test_resume_refuses_a_config_that_trains_differently_naming_the_fields(tmp_path, capsys):
    assert _run(SHORT, tmp_path) == 0
    capsys.readouterr()
    assert _run(SHORT, tmp_path, "run", "resume=true", "pipeline.offpolicy.lr=0.5", "seed=3") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "pipeline.offpolicy.lr" in err and "seed" in err and "0.5" in err
    # What does not change training may change: threads, logging, eval.
    assert _run(SHORT, tmp_path, "run", "resume=true", "threads=2", "pipeline.eval.problems=7") == 0


def test_the_teacher_output_cache_names_the_teachers_precision_and_weights(tmp_path):
    from distill.config import Config
    from distill.stages.teacher_outputs import cache_spec

    cfg = Config()
    base = cache_spec(cfg, "t", prompts_hash="p", num_prompts=4, weights="w1")
    assert cache_spec(cfg, "t", prompts_hash="p", num_prompts=4, weights="w2") != base
    cfg.teacher.dtype = "bfloat16"
    assert cache_spec(cfg, "t", prompts_hash="p", num_prompts=4, weights="w1") != base


# 7. Logs across a resume -----------------------------------------------------------------------

def test_a_resumed_stage_logs_each_step_once_and_keeps_its_wandb_run(tmp_path):
    from distill.common.tracking import Tracker

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = Tracker(run_dir)
    for step in (10, 20, 30):   # killed after logging step 30, last checkpoint at 20
        first.log({"train/s/step": step, "train/s/kd_loss": 1.0 / step})
    first.log({"eval/think/pass@1": 0.5})
    second = Tracker(run_dir)
    second.forget_run_records()
    second.forget("train/s", after=20)
    second.log({"train/s/step": 30, "train/s/kd_loss": 0.03})
    steps = [r["train/s/step"] for r in read_metrics(run_dir) if "train/s/step" in r]
    assert steps == [10, 20, 30]
    assert not any("eval/think/pass@1" in r for r in read_metrics(run_dir))
    # One W&B run id per run folder, made once and read back by later trackers.
    assert second._wandb_id() == first._wandb_id() == (run_dir / "wandb_id").read_text()


# 8. Durability ---------------------------------------------------------------------------------

def test_atomic_writes_and_checkpoints_reach_the_disk_before_they_are_named(tmp_path, monkeypatch):
    from distill.common import files

    synced = []
    real = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    files.atomic_write_text(tmp_path / "latest", "step-000010")
    assert len(synced) >= 2   # the file, then its folder
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"x")
    synced.clear()
    files.fsync_tree(tmp_path / "ckpt")
    assert len(synced) == 2


def test_a_corrupt_cache_manifest_is_one_line(tmp_path):
    from distill.common.errors import UserError
    from distill.teachers.cache import read_json

    bad = tmp_path / "manifest.json"
    bad.write_text('{"shards": [')
    with pytest.raises(UserError) as error:
        read_json(bad)
    assert str(bad) in str(error.value) and "\n" not in str(error.value) and "delete" in str(error.value)


# 9. Two runs, one empty cache ------------------------------------------------------------------

def test_two_runs_on_one_empty_cache_bootstrap_the_teacher_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    args = [*TINY_RUN, f"cache_dir={tmp_path / 'cache'}", "pipeline.stages=[teacher]"]
    runs = [subprocess.Popen([sys.executable, "-m", "distill", *args, f"run_dir={tmp_path / name}"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    errors = [run.communicate(timeout=600)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    reused = [json.loads(line)["teacher/reused_cache"] for name in ("a", "b")
              for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if "teacher/reused_cache" in line]
    assert sorted(reused) == [0, 1]   # one trained it, the other waited for it and loaded it
    entries = [p for p in (tmp_path / "cache" / "teachers").iterdir() if not p.name.startswith(".")]
    assert len([p for p in entries if p.is_dir()]) == 1


# 3. Processes end with the run -----------------------------------------------------------------

def test_a_worker_exits_when_its_parent_is_killed(tmp_path):
    # A parent that starts a worker pool and is then SIGKILLed: the worker notices and exits.
    script = tmp_path / "parent.py"
    script.write_text(
        "from distill.workers import run_in_processes\n"
        "from test_run_robustness import _sleep_and_report\n"
        "if __name__ == '__main__':\n"
        f"    run_in_processes(_sleep_and_report, {{'w': ({str(tmp_path / 'pid')!r},)}}, processes=1)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), str(Path(__file__).parent)])}
    parent = subprocess.Popen([sys.executable, str(script)], env=env)
    pid_file = tmp_path / "pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 15
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(worker)


def _sleep_and_report(pid_file):
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(300)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigterm_stops_the_run_and_its_workers_with_one_line(tmp_path):
    import psutil

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    args = [*TINY_RUN, f"cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}", "threads=2",
            "pipeline.offpolicy.steps=400", "students.dense.steps=400", "students.moe.steps=400", "checkpoint_every=5"]
    run = subprocess.Popen([sys.executable, "-m", "distill", *args], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    workers = []
    while time.monotonic() < deadline and len(workers) < 2:
        time.sleep(0.5)
        workers = [p for p in psutil.Process(run.pid).children(recursive=True) if "python" in p.name()]
    assert len(workers) >= 2, "the students' workers never started"
    time.sleep(3)
    run.terminate()
    err = run.communicate(timeout=60)[1]
    assert run.returncode == 130
    last = [line for line in err.splitlines() if line.startswith("error:") or line.startswith("interrupted")]
    assert len(last) == 1 and "resume=true" in last[0], err[-2000:]
    time.sleep(1)
    assert not any(_alive(p.pid) for p in workers)


# 5. Bad input: one line, nothing written -------------------------------------------------------

@pytest.mark.parametrize("case", ["not_utf8", "not_json", "tool_turn", "missing", "cache_dir"])
def test_bad_input_is_one_line_and_writes_no_run_folder(case, tmp_path, capsys, tokenizer, tiny_model):
    source = tmp_path / "data.jsonl"
    rows = _chat_rows(60)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    extra, expected = [], []
    if case == "not_utf8":
        source.write_bytes(text.encode() + b'{"messages": "\xff\xfe"}\n')
        expected = ["line 61", "UTF-8"]
    elif case == "not_json":
        source.write_text(text + "{not json\n")
        expected = ["line 61", "not JSON"]
    elif case == "tool_turn":
        rows[6] = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}], "answer": "1"}
        _write(source, rows)
        extra, expected = ["data.max_malformed=0"], ["line 7", "tool"]
    elif case == "missing":
        source = tmp_path / "nonexistent.jsonl"
        expected = ["nonexistent.jsonl", "does not exist"]
    else:
        _write(source, rows)
        expected = ["cache_dir", "/proc/nope"]
    args = [*_own_data(tmp_path, tokenizer, tiny_model, source), *extra]
    if case == "cache_dir":
        code = main([*args, f"run_dir={tmp_path / 'run'}", "cache_dir=/proc/nope", "logger=none"])
        err = capsys.readouterr().err
        assert code == 2 and all(text in err for text in expected), err
    else:
        _fails(args, tmp_path, capsys, *expected)
    assert not (tmp_path / "run").exists()


def test_steps_must_be_positive(tmp_path, capsys):
    for bad in ("students.dense.steps=0", "students.dense.steps=-1"):
        assert main([bad, f"run_dir={tmp_path / 'run'}", "logger=none"]) == 2
        assert "students.dense.steps must be positive" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# 10. The smaller items -------------------------------------------------------------------------

def test_models_json_holds_absolute_paths(tmp_path, monkeypatch):
    from distill.common.tracking import Tracker
    from distill.pipeline import write_run_files

    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    write_run_files(Path("run"), "teacher", {"dense": Path("run/release/dense")}, Tracker(Path("run")))
    folders = json.loads((tmp_path / "run" / "models.json").read_text())
    assert all(Path(p).is_absolute() for p in folders.values())


def test_long_prompts_are_measured_in_both_modes(tokenizer):
    import datasets

    from distill.config import DataConfig
    from distill.data import drop_long_prompts
    from distill.students.chat import prompt_messages, render_prompt

    row = {"messages": [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y"}]}
    lengths = {mode: len(render_prompt(tokenizer, prompt_messages(row["messages"]), mode))
               for mode in ("think", "no_think")}
    assert lengths["no_think"] > lengths["think"]
    cfg = DataConfig(max_length=lengths["think"] + 2, max_malformed=1.0)   # room in think mode only
    kept = drop_long_prompts(datasets.DatasetDict(train=datasets.Dataset.from_list([row])), tokenizer, cfg)
    assert len(kept["train"]) == 0


def test_a_vllm_request_that_times_out_is_not_retried(tmp_path):
    import socket
    import threading

    import httpx

    from distill.students.vllm_client import VLLMClient
    from distill.students.vllm_server import ServerError

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    threading.Thread(target=lambda: [accepted.append(listener.accept()) for _ in range(8)], daemon=True).start()
    client = VLLMClient.__new__(VLLMClient)   # no model lookup: the server never answers
    client.url, client.retries, client.timeout = f"http://127.0.0.1:{listener.getsockname()[1]}", 5, 0.5
    client.http = httpx.Client(timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ServerError, match="teacher.vllm_timeout"):
        client.post("/v1/completions", {})
    assert time.monotonic() - started < 3 and len(accepted) == 1
    listener.close()
