"""Does the rollout engine change what on-policy distillation learns? The default run's
on-policy stage, rerun from its off-policy checkpoints with the rollouts in process and on a vLLM
engine, for several on-policy seeds; the eval table of each.

Engines (`--engines`): `in_process`; `vllm` (weights synced every step, in step with training);
`vllm_async` (rollout.async=true: sampled one weight version behind); a `_bf16` suffix serves the
engine's weights in bfloat16 (rollout.dtype=bfloat16), e.g. `vllm_async_bf16`.

Each run is a copy of a finished default run (its teacher, teacher outputs and off-policy
students, everything before the on-policy stage) resumed with `resume=true`: the on-policy
stage, eval and release run again. The copy's stored config is given the run's engine and seed,
so that the resume check, which refuses a resume that would train differently, accepts it.

    python -m distill run_dir=/tmp/default_run                       # once: the base run
    python bench/engine_parity.py --base /tmp/default_run --seeds 0 1 2

One JSON line per run (engine, seed, stage seconds, eval accuracy per student and mode) on
stdout and in --out; a table of means and spreads at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from distill.common.typed_config import as_dict
from distill.config import RolloutConfig

KEPT = ("teacher_outputs", "checkpoints/offpolicy")


# The `rollout.*` settings each engine name stands for.
ENGINES = {
    "in_process": {"engine": "in_process"},
    "vllm": {"engine": "vllm"},
    "vllm_bf16": {"engine": "vllm", "dtype": "bfloat16"},
    "vllm_async": {"engine": "vllm", "async": True},
    "vllm_async_bf16": {"engine": "vllm", "async": True, "dtype": "bfloat16"},
}


def rollout_settings(engine: str) -> dict:
    """The `rollout.*` settings an engine name stands for."""
    if engine not in ENGINES:
        sys.exit(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    return ENGINES[engine]


def prepare(base: Path, copy: Path, engine: str, seed: int) -> None:
    """`copy`: the base run up to its off-policy stage, with the engine and seed in its config."""
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for part in KEPT:
        shutil.copytree(base / part, copy / part)
    config = json.loads((base / "config.json").read_text())
    # rollout settings the base run predates take their defaults
    config["rollout"] = {**as_dict(RolloutConfig()), **config.get("rollout", {}), **rollout_settings(engine)}
    config["pipeline"]["onpolicy"]["seed"] = seed
    config["run_dir"] = str(copy)
    (copy / "config.json").write_text(json.dumps(config, indent=2))


def accuracies(run: Path) -> dict[str, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            # eval/<mode>/<model>/pass@1
            if key.startswith("eval/") and key.endswith("/pass@1"):
                _, mode, model, _ = key.split("/")
                out[f"{model}/{mode}"] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="a finished default run (python -m distill run_dir=...)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--engines", nargs="+", default=["in_process", "vllm"])
    parser.add_argument("--work", default="/tmp/engine_parity")
    parser.add_argument("--out", default="bench/results/engine_parity.jsonl")
    parser.add_argument("--collect", action="store_true", help="only read the finished runs in --work again")
    parser.add_argument("overrides", nargs="*", help="more overrides for every run (e.g. cache_dir=...)")
    args = parser.parse_args()
    base, rows = Path(args.base), []
    for seed in args.seeds:
        for engine in args.engines:
            run = Path(args.work) / f"{engine}-seed{seed}"
            if args.collect:
                rows.append({"engine": engine, "seed": seed, **accuracies(run)})
                print(json.dumps(rows[-1]))
                continue
            prepare(base, run, engine, seed)
            started = time.perf_counter()
            settings = [f"rollout.{key}={str(value).lower()}" for key, value in rollout_settings(engine).items()]
            command = [sys.executable, "-m", "distill", f"run_dir={run}", "resume=true", "logger=none", *settings,
                       f"pipeline.onpolicy.seed={seed}", *args.overrides]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{engine} seed {seed} failed: {done.stderr[-2000:]}")
            row = {"engine": engine, "seed": seed, "seconds": round(time.perf_counter() - started, 1),
                   **accuracies(run)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as out:
                out.write(json.dumps(row) + "\n")
    keys = sorted(k for k in rows[0] if "/" in k)
    print("| engine | " + " | ".join(keys) + " |")
    for engine in args.engines:
        mine = [r for r in rows if r["engine"] == engine]
        cells = [f"{100 * statistics.mean(r[k] for r in mine):.1f} ± {100 * statistics.pstdev([r[k] for r in mine]):.1f}"
                 for k in keys]
        print(f"| {engine} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
