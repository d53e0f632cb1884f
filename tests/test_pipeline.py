"""The whole default pipeline on a shrunken config: teacher bootstrap (cached), off-policy
distillation of a dense and a MoE student, eval in both modes, release folders, logs."""

import json
import shutil

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.__main__ import load_config, main
from distill.pipeline import run
from distill.release import verify_checksums
from distill.tracking import read_metrics


def test_default_pipeline_end_to_end(tiny_run_overrides, tmp_path, capsys):
    config, _ = load_config(tiny_run_overrides)
    summary = run(config, progress=False)
    run_dir = summary.run_dir
    assert not summary.teacher_reused

    # eval: teacher and both students, in both modes, with the table's columns
    assert set(summary.results) == {"teacher", "dense", "moe"}
    for per_mode in summary.results.values():
        assert set(per_mode) == {"think", "no_think"}
        for result in per_mode.values():
            assert 0.0 <= result.accuracy <= 1.0 and len(result.samples) == 24
    assert summary.results["teacher"]["no_think"].mean_thinking_tokens == 0
    eval_json = json.loads((run_dir / "eval.json").read_text())
    assert len(eval_json["moe"]["think"]["samples"]) == 24
    assert "| teacher | think |" in (run_dir / "eval.md").read_text()

    # the project's own metrics, grouped by prefix; the MoE student's balancing loss is logged
    records = read_metrics(run_dir)
    keys = {k for r in records for k in r}
    for expected in ("teacher/bootstrap/ce", "train/dense/kd_loss", "train/moe/kd_loss", "moe/", "perf/dense/tokens_per_s",
                     "eval/think/teacher/accuracy", "eval/no_think/moe/mean_answer_tokens", "teacher/think/truncated"):
        assert any(k.startswith(expected) or k == expected for k in keys), expected
    assert "moe/moe/aux_loss" in keys and "moe/teacher/aux_loss" in keys
    assert "moe/dense/aux_loss" not in keys
    losses = [r["train/dense/kd_loss"] for r in records if "train/dense/kd_loss" in r]
    assert losses[-1] < losses[0]  # distillation moved the student towards the teacher
    assert (run_dir / "loss_curves.png").stat().st_size > 1000
    assert (run_dir / "think_vs_no_think.png").stat().st_size > 1000

    # release folders: complete, checksummed, loadable and usable with plain transformers
    for name in ("dense", "moe"):
        folder = summary.releases[name]
        for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json", "README.md", "SHA256SUMS"):
            assert (folder / file).exists(), file
        assert verify_checksums(folder) == []
        assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in folder.iterdir())
        generation = json.loads((folder / "generation_config.json").read_text())
        assert (generation["temperature"], generation["top_p"], generation["top_k"]) == (0.6, 0.95, 20)
        card = (folder / "README.md").read_text()
        assert f"| {name} | think |" in card and "| teacher | no_think |" in card and "top-p 0.8" in card
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert model.config.model_type == ("qwen3_moe" if name == "moe" else "qwen3")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "3+4*2 mod 10"}], add_generation_prompt=True,
                                            enable_thinking=False, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
        assert out.shape[1] > ids["input_ids"].shape[1]
    assert not list((run_dir / "release").glob(".*"))  # no staging leftovers

    # a second run reuses the cached teacher
    again, _ = load_config(tiny_run_overrides[:-2] + [f"run_dir={tmp_path / 'run2'}", f"cache_dir={tmp_path / 'cache'}",
                                                      "pipeline.stages=[teacher]"])
    assert run(again, progress=False).teacher_reused


def test_command_line_prints_the_table(tiny_run_overrides, capsys):
    overrides = [o for o in tiny_run_overrides if not o.startswith("pipeline.offpolicy.steps")]
    assert main(overrides + ["pipeline.offpolicy.steps=2", "~students.moe"]) == 0
    out = capsys.readouterr().out
    assert "| model | mode | accuracy | thinking tokens | answer tokens |" in out
    assert "| dense | no_think |" in out and "moe" not in out.split("run directory")[0].replace("| model", "")


def test_wandb_offline_run_and_metrics_file(tiny_run_overrides, tmp_path):
    overrides = [o for o in tiny_run_overrides if o != "logger=none"] + ["logger=wandb", "pipeline.stages=[teacher]"]
    config, _ = load_config(overrides)
    summary = run(config, progress=False)
    assert list((summary.run_dir / "wandb").glob("offline-run-*"))
    assert any("teacher/bootstrap/ce" in r for r in read_metrics(summary.run_dir))
