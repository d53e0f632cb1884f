"""The whole default pipeline on a shrunken config: teacher bootstrap (cached), off-policy
distillation of a dense and a MoE student, eval in both modes, release folders, logs."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.__main__ import load_config, main
from distill.common.tracking import read_metrics
from distill.eval.__main__ import main as eval_main
from distill.pipeline import run
from distill.stages.release import verify_checksums


def test_default_pipeline_end_to_end(tiny_run_overrides, tmp_path, capsys):
    config = load_config(tiny_run_overrides)
    summary = run(config, progress=False)
    run_dir = summary.run_dir
    assert not summary.teacher_reused

    # eval: teacher and both students, in both modes, with the table's columns
    assert set(summary.results) == {"teacher", "dense", "moe"}
    for per_mode in summary.results.values():
        assert set(per_mode) == {"think", "no_think"}
        for result in per_mode.values():
            assert 0.0 <= result.accuracy <= 1.0 and len(result.samples) == 24
    assert summary.results["teacher"]["no_think"].metrics["mean_thinking_tokens"] == 0
    eval_json = json.loads((run_dir / "eval.json").read_text())
    assert len(eval_json["moe"]["think"]["samples"]) == 24
    assert "| teacher | think |" in (run_dir / "eval.md").read_text()

    # `python -m eval` on the run directory (its models.json) runs the same harness: greedy on
    # the same problems, it reproduces the pipeline's numbers exactly
    test_split = next((tmp_path / "cache" / "data").glob("arithmetic-*")) / "test.jsonl"
    assert eval_main([f"models=[{run_dir}]", f"task.source.path={test_split}", "task.source.limit=24",
                      "task.max_new_tokens=48", "greedy=true", f"out_dir={tmp_path / 'eval'}", "logger=none",
                      "progress=false"]) == 0
    again = json.loads((tmp_path / "eval" / "eval.json").read_text())["models"]
    assert set(again) == {"teacher", "dense", "moe"}
    for model, per_mode in summary.results.items():
        for mode, result in per_mode.items():
            assert again[model][mode]["pass@1"] == result.accuracy
            assert [s["response"] for s in again[model][mode]["samples"]] == [s["response"] for s in result.samples]

    # each student as a speculative-decoding draft for the teacher, both modes; `python -m eval
    # draft_for=` on the run directory (all 40 test problems, as the pipeline) reproduces its acceptance exactly
    assert set(summary.drafts) == {"dense", "moe"}
    for per_mode in summary.drafts.values():
        assert set(per_mode) == {"think", "no_think"}
        for result in per_mode.values():
            assert 0.0 < result.alpha <= 1.0 and 0.0 <= result.greedy_agreement <= 1.0
            assert 1.0 <= result.tokens_per_forward[4] <= 5.0 and result.measured.prompts == 8
    assert "As drafts for `teacher`" in (run_dir / "draft.md").read_text()
    assert eval_main([f"draft_for={run_dir}", f"models=[{run_dir}]", f"task.source.path={test_split}",
                      "draft.problems=40", "task.max_new_tokens=48", "draft.measure_prompts=0",
                      f"out_dir={tmp_path / 'draft'}", "logger=none", "progress=false"]) == 0
    drafts = json.loads((tmp_path / "draft" / "draft.json").read_text())["drafts"]
    assert set(drafts) == {"dense", "moe"}
    for model, per_mode in summary.drafts.items():
        for mode, result in per_mode.items():
            assert drafts[model][mode]["alpha"] == pytest.approx(result.alpha, abs=1e-6)

    # the project's own metrics, grouped by prefix; the MoE student's balancing loss is logged
    records = read_metrics(run_dir)
    keys = {k for r in records for k in r}
    for expected in ("teacher/bootstrap/ce", "train/dense/kd_loss", "train/moe/kd_loss", "moe/", "perf/dense/tokens_per_s",
                     "eval/think/teacher/pass@1", "eval/no_think/moe/mean_answer_tokens", "teacher/think/truncated",
                     "draft/dense/think/alpha", "draft/moe/no_think/measured/speedup",
                     "draft/moe/think/tokens_per_forward/gamma4"):
        assert any(k.startswith(expected) or k == expected for k in keys), expected
    assert "moe/moe/aux_loss" in keys and "moe/teacher/aux_loss" in keys
    assert "moe/dense/aux_loss" not in keys
    # the recipe: off-policy, a loadable checkpoint, then on-policy on the student's own rollouts
    for name in ("dense", "moe"):
        checkpoint = run_dir / "checkpoints" / "offpolicy" / name
        assert verify_checksums(checkpoint) == [] and AutoModelForCausalLM.from_pretrained(checkpoint) is not None
        steps = [r[f"train/{name}/onpolicy/step"] for r in records if f"train/{name}/onpolicy/kd_loss" in r]
        assert steps and steps[-1] == 4
    onpolicy = next(r for r in records if "train/dense/onpolicy/kd_loss" in r)
    assert onpolicy["train/dense/onpolicy/onpolicy"] == 1.0 and 0 <= onpolicy["train/dense/onpolicy/rollout_truncated"] <= 1
    assert onpolicy["train/dense/onpolicy/rollout_tokens"] > 0
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
        assert "off-policy distillation" in card and "on-policy distillation" in card and "reverse_kl" in card
        assert "## As a speculative-decoding draft" in card and f"| {name} | no_think |" in card
        assert f"alpha {summary.drafts[name]['think'].alpha:.3f} / {summary.drafts[name]['no_think'].alpha:.3f}" in card
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert model.config.model_type == ("qwen3_moe" if name == "moe" else "qwen3")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "3+4*2 mod 10"}], add_generation_prompt=True,
                                            enable_thinking=False, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
        assert out.shape[1] > ids["input_ids"].shape[1]
    assert not list((run_dir / "release").glob(".*"))  # no staging leftovers

    # a second run reuses the cached teacher
    again = load_config(tiny_run_overrides[:-2] + [f"run_dir={tmp_path / 'run2'}", f"cache_dir={tmp_path / 'cache'}",
                                                      "pipeline.stages=[teacher]"])
    assert run(again, progress=False).teacher_reused


def test_command_line_prints_the_table(tiny_run_overrides, tmp_path, capsys):
    overrides = [o for o in tiny_run_overrides if not o.startswith(("pipeline.offpolicy.steps", "students.dense.steps"))]
    assert main(overrides + ["pipeline.offpolicy.steps=4", "students.dense.steps=4", "~students.moe",
                             "pipeline.eval.every=2", "pipeline.eval.periodic_problems=5"]) == 0
    out = capsys.readouterr().out
    # periodic eval: the harness on validation problems every 2 steps, logged against the step
    records = read_metrics(tmp_path / "run")
    periodic = [r for r in records if "periodic_eval/dense/think/pass@1" in r]
    assert [r["train/dense/step"] for r in periodic] == [2, 4]
    assert all(0 <= r["periodic_eval/dense/no_think/pass@1"] <= 1 for r in periodic)
    assert "| model | think | no_think | think − no_think |" in out
    assert "| model | mode | pass@1 | thinking tokens | answer tokens |" in out
    assert "| dense | no_think |" in out and "moe" not in out.split("run directory")[0].replace("| model", "")


def test_wandb_offline_run_and_metrics_file(tiny_run_overrides, tmp_path):
    overrides = [o for o in tiny_run_overrides if o != "logger=none"] + ["logger=wandb", "pipeline.stages=[teacher]"]
    config = load_config(overrides)
    summary = run(config, progress=False)
    assert list((summary.run_dir / "wandb").glob("offline-run-*"))
    assert any("teacher/bootstrap/ce" in r for r in read_metrics(summary.run_dir))


def test_transformers_teacher_from_a_local_folder_and_students_from_checkpoints(tiny_run_overrides, tmp_path):
    """The hub-name code path, exercised with folders written by save_pretrained: a teacher
    checkpoint (with its own tokenizer), a pretrained student, and a student seeded with the
    teacher's blocks."""
    from distill.students.build import build_random
    from distill.students.presets import get_preset
    from distill.students.tokenizer import build_tokenizer

    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    small = dict(hidden_size=64, head_dim=16, moe_intermediate_size=64)
    build_random(get_preset("tiny-moe").override(num_hidden_layers=3, **small), seed=0).save_pretrained(teacher_dir)
    build_tokenizer().save_pretrained(teacher_dir)
    build_random(get_preset("tiny").override(num_hidden_layers=2), seed=1).save_pretrained(student_dir)
    overrides = [o for o in tiny_run_overrides if not o.startswith(("teacher.", "+teacher.", "students."))] + [
        "teacher=transformers", f"teacher.model={teacher_dir}", "teacher.dtype=float32",
        "students.dense.init=pretrained", f"students.dense.pretrained={student_dir}", "students.dense.steps=2",
        "students.moe.init=teacher", "students.moe.teacher_layers=[0,2,2,1]",
        "students.moe.architecture.hidden_size=64", "students.moe.architecture.head_dim=16",
        "students.moe.architecture.moe_intermediate_size=64",
        "students.moe.steps=2", "pipeline.stages=[teacher,offpolicy,eval]", "pipeline.offpolicy.steps=2",
        "pipeline.eval.problems=4",
    ]
    config = load_config(overrides)
    summary = run(config, progress=False)
    assert set(summary.results) == {"teacher", "dense", "moe"}
    assert not (summary.run_dir / "release").exists()  # the release stage was not selected


def test_an_8bit_teacher_fills_the_teacher_outputs(tiny_run_overrides, tmp_path):
    from distill.students.build import build_random
    from distill.students.presets import get_preset
    from distill.students.tokenizer import build_tokenizer

    teacher_dir = tmp_path / "teacher"
    build_random(get_preset("tiny").override(num_hidden_layers=2), seed=0).save_pretrained(teacher_dir)
    build_tokenizer().save_pretrained(teacher_dir)
    overrides = [o for o in tiny_run_overrides if not o.startswith(("teacher.", "+teacher."))] + [
        "teacher=transformers", f"teacher.model={teacher_dir}", "teacher.dtype=float32", "teacher.quantization=8bit",
        "students.dense.init=random", "students.moe.init=random", "pipeline.stages=[teacher,teacher_outputs]", "pipeline.offpolicy.prompts=8"]
    config = load_config(overrides)
    summary = run(config, progress=False)
    manifest = json.loads((summary.teacher_outputs / "manifest.json").read_text())
    assert manifest["rows"] == 16 and manifest["tokens"] > 0


def test_missing_teacher_folder_fails_with_one_line(tiny_run_overrides, tmp_path, capsys):
    code = main(tiny_run_overrides + ["teacher=transformers", f"teacher.model={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot load" in err and "nowhere" in err


def test_student_with_another_tokenizer_is_refused_before_anything_is_written(tiny_run_overrides, tmp_path, capsys,
                                                                               foreign_tokenizer):
    from distill.students.build import build_random
    from distill.students.presets import get_preset

    student_dir = tmp_path / "student"
    build_random(get_preset("tiny").override(num_hidden_layers=1), seed=1).save_pretrained(student_dir)
    foreign_tokenizer.save_pretrained(student_dir)
    capsys.readouterr()
    code = main(tiny_run_overrides + ["students.dense.init=pretrained", f"students.dense.pretrained={student_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "tokenizers differ at id 0" in err
    assert not (tmp_path / "run").exists()


def test_teacher_outputs_are_produced_once_and_reused_from_the_cache(tiny_run_overrides, tmp_path):
    """`pipeline.stages=[teacher,teacher_outputs]` only fills the cache; a later run with the
    same folder trains from it without regenerating a shard."""
    outputs = tmp_path / "outputs"
    base = [o for o in tiny_run_overrides if not o.startswith("run_dir")] + [
        f"pipeline.offpolicy.teacher_outputs={outputs}", "pipeline.offpolicy.shard_size=16"]
    produce = load_config(base + ["pipeline.stages=[teacher,teacher_outputs]", f"run_dir={tmp_path / 'a'}"])
    summary = run(produce, progress=False)
    manifest = json.loads((outputs / "manifest.json").read_text())
    assert summary.teacher_outputs == outputs and not summary.results
    assert manifest["rows"] == 2 * 48 and len(manifest["shards"]) == 6 and manifest["bytes_per_token"] > 0
    stamps = {p.name: p.stat().st_mtime_ns for p in (outputs / "shards").glob("*.parquet")}

    train = load_config(base + ["pipeline.stages=[teacher,offpolicy]", f"run_dir={tmp_path / 'b'}"])
    run(train, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (outputs / "shards").glob("*.parquet")} == stamps
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/dense/kd_loss" in r for r in records)


def test_students_trained_in_worker_processes_equal_sequential_training(tiny_run_overrides, tmp_path):
    """Parallel training is only a scheduling choice: same seeds, same data, same weights, through
    both stages of the recipe (on-policy rollouts included)."""
    stages = "pipeline.stages=[teacher,offpolicy,onpolicy]"
    base = [o for o in tiny_run_overrides if not o.startswith("run_dir")]
    parallel = load_config(base + [stages, "student_workers=2", f"run_dir={tmp_path / 'parallel'}"])
    sequential = load_config(base + [stages, "student_workers=1", f"run_dir={tmp_path / 'sequential'}"])
    run(parallel, progress=False)
    records = read_metrics(tmp_path / "parallel")
    assert any("train/moe/kd_loss" in r for r in records) and any("train/dense/kd_loss" in r for r in records)
    assert any("moe/moe/aux_loss" in r for r in records)  # the balancing loss survives the trip to a worker
    assert any("train/moe/onpolicy/kd_loss" in r for r in records)
    assert not list((tmp_path / "parallel").glob(".metrics-*"))
    run(sequential, progress=False)
    # Each run leaves every student, after its last stage, in checkpoints/onpolicy/<name>/.
    for name in ("dense", "moe"):
        weights = {mode: load_file(tmp_path / mode / "checkpoints" / "onpolicy" / name / "model.safetensors")
                   for mode in ("parallel", "sequential")}
        assert weights["parallel"].keys() == weights["sequential"].keys()
        for key, value in weights["sequential"].items():
            torch.testing.assert_close(weights["parallel"][key], value, rtol=0, atol=0)
