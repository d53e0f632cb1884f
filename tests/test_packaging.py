"""`pip install .` installs the whole package under the one name `distill`: the wheel is built,
installed into a fresh folder and run from a folder that has `eval/` and `conf/` folders of its
own (a user's), which must not shadow anything."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import importlib, pkgutil, sys
from pathlib import Path
import distill
assert Path(distill.__file__).parent == Path(sys.argv[1]) / "distill", distill.__file__
modules = [m.name for m in pkgutil.walk_packages(distill.__path__, "distill.")]
for name in modules:
    importlib.import_module(name)
from distill.conf import CONF_DIR
from distill.eval.tasks import available
yaml = sorted(str(p.relative_to(CONF_DIR)) for p in CONF_DIR.rglob("*.yaml"))
lm_eval = sorted(p.name for p in (Path(distill.__file__).parent / "eval" / "lm_eval_tasks").iterdir())
print(len(modules), ",".join(available()), ";".join(yaml), ";".join(lm_eval))
"""


def test_the_wheel_installs_whole_and_runs_from_anywhere(tmp_path):
    # Built from a clean copy: pip builds in the source folder, whose build/ may hold stale files.
    source = shutil.copytree(ROOT, tmp_path / "source", ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", "runs", "evals", "outputs", "wandb", ".pytest_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "wheel"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("distill-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"distill", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops
    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                                str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-2000:]

    elsewhere = tmp_path / "user_project"
    for decoy in ("eval", "conf", "students", "teachers", "common"):   # a user's folders, importable from cwd
        (elsewhere / decoy).mkdir(parents=True)
        (elsewhere / decoy / "__init__.py").write_text("raise ImportError('the user project was imported')\n")
    env = {"PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True)

    check = run("-c", CHECK, str(target))
    assert check.returncode == 0, check.stderr[-3000:]
    count, tasks, yaml, lm_eval = check.stdout.strip().split(" ")
    assert int(count) > 60
    assert tasks.split(",") == ["aime", "arithmetic", "chat", "gsm8k", "math500"]
    assert {"config.yaml", "eval.yaml", "loss/jsd.yaml", "parallel/zero3.yaml", "accelerate/multi_gpu.yaml"} <= \
        set(yaml.split(";"))
    assert {"distill_arithmetic.yaml", "distill_gsm8k.yaml", "utils.py"} <= set(lm_eval.split(";"))
    # Every package the source tree has made it into the wheel (distill.losses was once missing).
    assert all(f"distill/{p}/__init__.py" in zipfile.ZipFile(wheel).namelist()
               for p in ("losses", "stages", "common", "students", "teachers", "eval", "eval/tasks", "conf"))

    training = run("-m", "distill", "--cfg", "job")
    assert training.returncode == 0, training.stderr[-2000:]
    assert "students:" in training.stdout and "divergence: forward_kl" in training.stdout
    evaluation = run("-m", "distill.eval", "--cfg", "job")
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    assert "models: []" in evaluation.stdout and "temperature: 0.6" in evaluation.stdout
