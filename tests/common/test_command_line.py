"""The command line both commands share: sweeps (`-m`), `--cfg job`, one-line errors."""

import json

import pytest
import yaml

from distill.__main__ import main
from distill.common.cli import parse, sweep
from distill.common.errors import ConfigError
from distill.eval.__main__ import main as eval_main


def test_a_sweep_is_every_combination_in_hydras_order():
    assert sweep(["loss=forward_kl,reverse_kl", "seed=range(0,2)", "+student=tiny"]) == [
        ["loss=forward_kl", "seed=0", "+student=tiny"], ["loss=forward_kl", "seed=1", "+student=tiny"],
        ["loss=reverse_kl", "seed=0", "+student=tiny"], ["loss=reverse_kl", "seed=1", "+student=tiny"]]
    assert sweep(["pipeline.stages=[teacher,eval]"]) == [["pipeline.stages=[teacher,eval]"]]  # a list is one value
    with pytest.raises(ConfigError):
        sweep(["seed=="])


def test_the_command_line_flags():
    line = parse(["-m", "loss=jsd", "--cfg", "job"])
    assert (line.multirun, line.show, line.overrides) == (True, True, ["loss=jsd"])
    assert parse(["--multirun", "--help"]).help
    with pytest.raises(ConfigError, match="only --cfg job"):
        parse(["--cfg", "hydra"])


def test_cfg_job_needs_no_other_arguments(capsys):
    assert main(["--cfg", "job"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["loss"]["divergence"] == "forward_kl"
    assert eval_main(["--cfg", "job"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["models"] == []


def test_cfg_job_of_a_sweep_shows_each_job(capsys):
    assert main(["-m", "loss=forward_kl,tvd", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert out.count("# job ") == 2 and "divergence: tvd" in out and "divergence: forward_kl" in out


def test_a_bad_value_in_any_job_stops_the_sweep_before_the_first_one_runs(tmp_path, capsys):
    assert main(["-m", "pipeline.offpolicy.steps=3,-1", f"run_dir={tmp_path / 'sweep'}"]) == 2
    assert "pipeline.offpolicy.steps must be positive" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_a_two_value_sweep_runs_one_job_per_value_each_in_its_own_folder_and_wandb_run(tiny_run_overrides, tmp_path,
                                                                                      capsys):
    overrides = [o for o in tiny_run_overrides if not o.startswith(("run_dir=", "logger=", "pipeline.offpolicy.steps",
                                                                      "students.dense.steps"))]
    sweep_dir = tmp_path / "sweep"
    code = main(["-m", "loss=forward_kl,reverse_kl", *overrides, "~students.moe", "students.dense.steps=3",
                 "pipeline.stages=[teacher,offpolicy]", "logger=wandb", "wandb.mode=offline",
                 f"run_dir={sweep_dir}"])
    out = capsys.readouterr().out
    assert code == 0, out
    jobs = json.loads((sweep_dir / "sweep.json").read_text())
    assert [j["overrides"][0] for j in jobs] == ["loss=forward_kl", "loss=reverse_kl"]
    configs = [json.loads((sweep_dir / str(i) / "config.json").read_text()) for i in range(2)]
    assert [c["loss"]["divergence"] for c in configs] == ["forward_kl", "reverse_kl"]
    assert [c["run_dir"] for c in configs] == [str(sweep_dir / "0"), str(sweep_dir / "1")]
    assert {c["wandb"]["group"] for c in configs} == {"sweep"}       # one W&B group for the sweep
    for i in range(2):
        assert len(list((sweep_dir / str(i) / "wandb").glob("offline-run-*"))) == 1   # one W&B run per job
        metrics = [json.loads(line) for line in (sweep_dir / str(i) / "metrics.jsonl").read_text().splitlines()]
        assert any("train/dense/kd_loss" in m for m in metrics)
    assert out.count("[sweep] job ") == 2
