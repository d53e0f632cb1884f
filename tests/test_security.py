"""Release folders and run outputs carry no pickle and no secret; remote code stays off."""

from pathlib import Path

from distill.__main__ import load_config, main
from distill.pipeline import run


def test_no_secret_reaches_any_output(tiny_run_overrides, tmp_path, monkeypatch):
    secrets = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef0123456789abcdef01234567",
               "HF_TOKEN": "hf_SecretTokenPlantedByTheTest0123456789"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    overrides = [o for o in tiny_run_overrides if o != "logger=none"] + ["logger=wandb", "wandb.mode=offline",
                                                                        "pipeline.eval.problems=4"]
    config = load_config(overrides)
    summary = run(config, progress=False)
    files = [p for p in Path(summary.run_dir).rglob("*") if p.is_file()]
    assert len(files) > 20 and any("wandb" in str(p) for p in files)
    for path in files:
        data = path.read_bytes()
        for value in secrets.values():
            assert value.encode() not in data, f"{value[:8]}... written into {path}"
    # weights only as safetensors, never pickle
    for folder in summary.releases.values():
        assert {p.suffix for p in folder.iterdir()} <= {".json", ".safetensors", ".jinja", ".md", ""}


def test_remote_code_is_off_unless_asked(tmp_path):
    config = load_config([])
    assert config.teacher.trust_remote_code is False


def test_loading_code_never_unpickles():
    """Every torch.load in the project reads tensors only."""
    import re

    root = Path(__file__).resolve().parents[1]
    sources = [p for package in ("distill", "eval", "teachers", "students", "conf", "bench")
               for p in (root / package).glob("**/*.py")]
    assert len(sources) > 30
    for path in sources:
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_an_unwritable_run_dir_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"   # a folder cannot be made inside a file, whoever runs the test
    blocker.write_text("")
    assert main([f"run_dir={blocker / 'run'}", "logger=none"]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and err.count("\n") == 1


def test_a_full_disk_fails_before_training(tiny_run_overrides, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    assert main(tiny_run_overrides) == 2
    err = capsys.readouterr().err
    assert "GiB free but the run writes about" in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
