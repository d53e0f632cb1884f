"""Every conf option composes, validates and builds on meta; bad input fails with one line."""


import pytest
import yaml

from distill.__main__ import load_config, main
from distill.common.errors import ConfigError
from distill.conf import CONF_DIR
from distill.config import Config, DataConfig, LossConfig, ParallelConfig, PipelineConfig, TeacherConfig
from distill.eval.__main__ import load_config as load_eval_config
from distill.eval.config import EvalRunConfig
from distill.stages.teacher import teacher_architecture
from distill.students.build import build_random, count_parameters
from distill.students.presets import PRESETS

GROUP_OPTIONS = {group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
                 for group in ("teacher", "data", "loss", "pipeline", "parallel")}
REQUIRED = {"teacher=transformers": ["teacher.model=some/model"], "data=messages": ["data.source=x.jsonl"],
            "teacher=vllm": ["teacher.model=some/model", "students.dense.init=random", "students.moe.init=random"]}


@pytest.mark.parametrize("override", [f"{g}={o}" for g, options in GROUP_OPTIONS.items() for o in options])
def test_every_conf_file_composes_and_validates(override):
    config = load_config([override, *REQUIRED.get(override, [])])
    assert config.students


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_student_preset_composes_and_builds_on_meta(preset):
    config = load_config([f"+student={preset}"])
    assert list(config.students) == [preset]
    arch = config.students[preset].architecture
    assert arch == PRESETS[preset]
    model = build_random(arch, device="meta")
    assert count_parameters(model).total > 0


def test_default_run_has_a_dense_and_a_moe_student_and_a_moe_teacher():
    config = load_config([])
    assert {n: s.architecture.is_moe for n, s in config.students.items()} == {"dense": False, "moe": True}
    teacher = teacher_architecture(config.teacher)
    assert teacher.is_moe
    sizes = {n: count_parameters(build_random(s.architecture, device="meta")).total for n, s in config.students.items()}
    assert count_parameters(build_random(teacher, device="meta")).total > 2 * max(sizes.values())


def test_the_default_recipe_is_offpolicy_then_onpolicy():
    config = load_config([])
    stages = config.pipeline.stages
    assert stages.index("offpolicy") < stages.index("onpolicy") < stages.index("eval")
    assert config.pipeline.onpolicy.loss.divergence == "reverse_kl" and config.loss.divergence == "forward_kl"


def test_cfg_job_prints_the_student_architecture(capsys):
    assert main(["+student=4b", "--cfg", "job"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["student"]["preset"] == "4b"
    assert printed["student"]["architecture"]["hidden_size"] == 2560 and printed["student"]["architecture"]["head_dim"] == 128
    assert "students" not in printed  # +student replaces the default pair


def test_a_chosen_students_fields_are_set_at_the_path_cfg_job_shows(capsys):
    """After +student=NAME, `student.FIELD=...` sets any field (steps, lr, init, architecture), and
    `--cfg job` prints it at that same path."""
    overrides = ["+student=0.6b", "student.steps=30", "student.lr=1e-4", "student.init=pretrained",
                 "student.pretrained=some/model", "student.architecture.num_hidden_layers=2"]
    config = load_config(overrides)
    assert list(config.students) == ["0.6b"]
    student = config.students["0.6b"]
    assert (student.steps, student.lr, student.init, student.pretrained) == (30, 1e-4, "pretrained", "some/model")
    assert student.architecture == PRESETS["0.6b"].override(num_hidden_layers=2)
    assert main([*overrides, "--cfg", "job"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["student"]
    assert (printed["steps"], printed["lr"], printed["init"], printed["architecture"]["num_hidden_layers"]) == \
        (30, 1e-4, "pretrained", 2)


def test_the_default_pairs_fields_are_set_at_the_path_cfg_job_shows(capsys):
    config = load_config(["students.moe.steps=30", "students.dense.architecture.num_hidden_layers=2",
                          "students.dense.teacher_layers=[3,1]"])
    assert config.students["moe"].steps == 30 and config.students["dense"].architecture.num_hidden_layers == 2
    assert list(load_config(["~students.moe"]).students) == ["dense"]
    assert main(["students.moe.steps=30", "--cfg", "job"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["students"]["moe"]["steps"] == 30


def test_composing_the_default_yaml_gives_exactly_the_dataclass_defaults():
    """Every default lives in the dataclasses: conf/ only picks options, so it cannot drift."""
    assert load_config([]) == Config()
    assert load_eval_config([]) == EvalRunConfig()


def test_every_default_is_defined_once():
    """No YAML file sets a value the dataclass already has as its default, except the value that
    names the option itself (loss=forward_kl sets divergence: forward_kl)."""
    defining = {"divergence", "strategy", "kind", "source", "stages"}
    defaults = {"teacher": TeacherConfig(), "data": DataConfig(), "loss": LossConfig(), "parallel": ParallelConfig(),
                "pipeline": PipelineConfig()}
    for group, default in defaults.items():
        for path in (CONF_DIR / group).glob("*.yaml"):
            for key, value in (yaml.safe_load(path.read_text()) or {}).items():
                if key not in defining:
                    assert value != getattr(default, key), f"{path} restates the default {key}: {value}"
    for path in (CONF_DIR / "config.yaml", CONF_DIR / "eval.yaml"):
        assert set(yaml.safe_load(path.read_text())) == {"defaults"}, f"{path} holds values; they belong in Python"


def test_a_students_field_without_plus_student_says_how():
    with pytest.raises(ConfigError, match=r"add \+student=NAME"):
        load_config(["+student.steps=3"])


@pytest.mark.parametrize("args, message", [
    (["+student=5b"], "unknown student '5b'; valid: tiny, tiny-moe, 0.6b"),
    (["students.dense.lrr=1"], "unknown config key 'students.dense.lrr'; valid keys in students.dense: preset"),
    (["+pipeline.offpolicy.stepz=3"], "unknown config key 'pipeline.offpolicy.stepz'"),
    (["pipeline.offpolicy.steps=abc"], "pipeline.offpolicy.steps: expected an integer, got 'abc'"),
    (["loss.missing_mass=drop"], "'drop' is not a valid choice; valid: tail, renormalize"),
    (["loss=jsd", "loss.beta=1.5"], "loss.beta must lie in [0, 1], got 1.5"),
    (["loss=kl"], "unknown loss 'kl'; valid: forward_kl, jsd, reverse_kl"),
    (["loss.implementation=fused"], "'fused' is not a valid choice; valid: chunked, naive"),
    (["teacher=nope"], "unknown teacher 'nope'; valid: embedded, transformers, vllm"),
    (["teacher=vllm", "teacher.model=x"], "students.dense.init=teacher needs the teacher in process"),
    (["teacher=transformers"], "teacher.model is required"),
    (["pipeline.stages=[teacher,dance]"], "unknown stage 'dance'"),
    (["pipeline.onpolicy.mix=1.5"], "pipeline.onpolicy.mix must lie in [0, 1], got 1.5"),
    (["pipeline.stages=[teacher,onpolicy]", "pipeline.onpolicy.mix=0.5"], "mixes in off-policy batches"),
    (["pipeline.onpolicy.estimator=sampled_token", "pipeline.onpolicy.temperature=0.6"], "set pipeline.onpolicy.temperature=1"),
    (["pipeline.onpolicy.truncated=keep"], "'keep' is not a valid choice; valid: prefix, drop"),
    (["pipeline.onpolicy.loss.divergence=kl"], "'kl' is not a valid choice"),
    (["+student=4b", "logger=none"], "student '4b' needs about"),
    (["students.dense.teacher_layers=[0,1,2,7]"], "students.dense cannot start from the teacher's blocks: teacher_layers"),
    (["students.dense.architecture.hidden_size=64"], "student hidden_size=64 but teacher hidden_size=128"),
    (["parallel=zero4"], "unknown parallel 'zero4'; valid: ddp, fsdp2, zero3"),
])
def test_bad_input_fails_with_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = main([*args, f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    # Nothing half-written: failing before training leaves no metrics, checkpoints or releases.
    assert not (tmp_path / "run" / "release").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_memory_refusal_names_the_parts_and_the_ways_out(tmp_path, capsys):
    main(["+student=32b", f"run_dir={tmp_path}", "logger=none"])
    err = capsys.readouterr().err
    for part in ("weights", "gradients", "AdamW state", "smaller preset", "parallel=fsdp2", "parallel=zero3"):
        assert part in err


def test_sharding_splits_gradients_and_optimizer_state_but_counts_the_weights_whole():
    from distill.memory import estimate

    whole, halves = estimate(1000, 0, "float32"), estimate(1000, 0, "float32", shards=2)
    assert (halves.weights, halves.gradients, halves.optimizer) == (whole.weights, whole.gradients // 2,
                                                                    whole.optimizer // 2)


def test_activations_grow_with_the_micro_batch_and_shrink_with_checkpointing():
    from distill.memory import activation_bytes

    arch = PRESETS["0.6b"]
    plain = activation_bytes(arch, 8192, checkpointing=False, element_bytes=2, loss_bytes=0)
    assert activation_bytes(arch, 16384, checkpointing=False, element_bytes=2, loss_bytes=0) == 2 * plain
    # 28 layers each keeping only its input, plus one layer being recomputed.
    assert activation_bytes(arch, 8192, checkpointing=True, element_bytes=2, loss_bytes=0) < plain / 5


def test_memory_check_counts_activations_and_the_checkpointing_switch(tokenizer, monkeypatch):
    # Weights and AdamW state of the tiny students fit easily; a micro-batch of 64 x 2,048
    # tokens does not, unless each layer keeps only its input.
    import torch

    from distill import memory
    from distill.preflight import check_models

    monkeypatch.setattr(memory, "available_bytes", lambda device: 3 * memory.GIB)
    big = ["~students.moe", "data.max_length=2048", "pipeline.offpolicy.batch_size=64",
           "pipeline.onpolicy.batch_size=64"]
    with pytest.raises(MemoryError, match="activations .*students.dense.activation_checkpointing=true"):
        check_models(load_config(big), tokenizer, torch.device("cpu"))
    check_models(load_config(big + ["students.dense.activation_checkpointing=true"]), tokenizer,
                 torch.device("cpu"))
    check_models(load_config(["~students.moe"]), tokenizer, torch.device("cpu"))


def test_load_config_rejects_bad_override_syntax():
    with pytest.raises(ConfigError):
        load_config(["seed=="])


def test_rollout_settings_are_checked_and_async_is_the_config_key():
    """`rollout.async` (a Python keyword, held as `async_`) is set, shown and saved under its key."""
    from distill.common.typed_config import as_dict

    config = load_config(["rollout.engine=vllm", "rollout.async=true", "rollout.max_staleness=2"])
    assert config.rollout.async_ is True and config.rollout.max_staleness == 2
    assert as_dict(config)["rollout"]["async"] is True and "async_" not in as_dict(config)["rollout"]
    for args, message in ((["rollout.async=true"], "rollout.engine=vllm"),
                          (["rollout.engine_cores=[1]"], "rollout.engine=vllm"),
                          (["rollout.engine=vllm", "rollout.is_cap=0.5"], "is_cap must be at least 1"),
                          (["rollout.engine=vllm", "rollout.sync_every=0"], "rollout.sync_every must be positive"),
                          (["rollout.async_=true"], "unknown config key 'rollout.async_'")):
        with pytest.raises(ConfigError, match=message):
            load_config(args)


def test_draft_eval_settings_are_checked():
    """The eval stage's draft settings: 0 problems turns it off, the rest must be positive."""
    config = load_config(["pipeline.eval.draft.problems=0", "pipeline.eval.draft.measure_prompts=0"])
    assert config.pipeline.eval.draft.problems == 0 and config.pipeline.eval.draft.gamma == 4
    for args, message in ((["pipeline.eval.draft.gamma=0"], "pipeline.eval.draft.gamma must be positive"),
                          (["pipeline.eval.draft.problems=-1"], "pipeline.eval.draft.problems must be positive"),
                          (["pipeline.eval.draft.gammas=[1,x]"], "pipeline.eval.draft.gammas")):
        with pytest.raises(ConfigError, match=message):
            load_config(args)
