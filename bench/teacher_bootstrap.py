"""How fast the embedded teacher learns the built-in task, per bootstrap setting.

Reads run folders of `python -m distill 'pipeline.stages=[teacher,eval]' teacher.bootstrap...`
and prints one JSON line per run: its bootstrap settings, the thinking-mode cross-entropy on the
way (the task is learned abruptly: a plateau near 0.15 nats per token, then a drop to ~0), the
first logged step where it is below `--learned` (0.05), and the teacher's eval pass@1 per mode.

    for a in "lr=1e-3 steps=700" "lr=4e-3 steps=2400"; do set -- $a
      python -m distill logger=none threads=1 cache_dir=/tmp/boot/$1$2/cache run_dir=/tmp/boot/$1$2/run \\
          'pipeline.stages=[teacher,eval]' teacher.bootstrap.$1 teacher.bootstrap.$2; done
    python bench/teacher_bootstrap.py /tmp/boot/*/run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PREFIX = "teacher/bootstrap/"


def summarize(run: Path, learned: float, every: int) -> dict:
    config = json.loads((run / "config.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [(r[PREFIX + "step"], r[PREFIX + "ce_think"]) for r in records if PREFIX + "ce_think" in r]
    passed = {key.split("/")[1]: value for r in records for key, value in r.items()
              if key.startswith("eval/") and key.endswith("/teacher/pass@1")}
    return {
        "run": str(run),
        "bootstrap": config["teacher"]["bootstrap"],
        "learned_at_step": next((step for step, ce in curve if ce < learned), None),
        "ce_think": {step: round(ce, 3) for step, ce in curve if step % every == 0},
        "teacher_pass@1": passed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of teacher-only runs")
    parser.add_argument("--learned", type=float, default=0.05, help="thinking-mode cross-entropy that counts as learned")
    parser.add_argument("--every", type=int, default=100, help="print the curve every this many steps")
    args = parser.parse_args()
    for run in args.runs:
        print(json.dumps(summarize(run, args.learned, args.every)))


if __name__ == "__main__":
    main()
