"""Memory and time per process of the three ways to hold a student: ddp, fsdp2, zero3.

Each strategy trains the same Qwen3 dense student (the 0.6B block shape, fewer layers and a
smaller vocabulary so a CPU steps it in seconds) for a few distillation steps on the same random
data, in two processes started by torchrun, one torch thread each, through the engines the
pipeline uses (distill/parallel.py). Each process reports:

- `state_mb`: the training state it holds, counted tensor by tensor (its parameters, gradients
  and AdamW moments; for zero3 also DeepSpeed's flat partitions), shared storage counted once;
- `peak_mb`: its peak RSS while training (from the moment the engine was ready: the whole
  student each process builds before sharding it is not in it), above its RSS before the
  student was built: the state plus activations, gathered layers and communication buffers;
- `step_s`: seconds per optimizer step after the first;
- `loss`: the last step's loss (the strategies must agree).

    python bench/parallel_memory.py                  # ddp, fsdp2, zero3; one JSON line each
    python bench/parallel_memory.py --layers 8 --vocab 151936
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp2", "zero3"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32_768)
    parser.add_argument("--tokens", type=int, default=256, help="sequence length; 2 sequences per process")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "parallel_memory.jsonl"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one strategy, inside torchrun
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows, scratch = [], Path(tempfile.mkdtemp(prefix="parallel_memory-"))
    for strategy in args.strategies:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
                   "--master_port", str(29_600 + len(rows)), __file__, "--worker", strategy, "--layers", str(args.layers),
                   "--vocab", str(args.vocab), "--tokens", str(args.tokens), "--steps", str(args.steps),
                   "--out", str(scratch / strategy)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            sys.exit(f"{strategy} failed:\n{done.stderr[-3000:]}")
        ranks = [json.loads(path.read_text()) for path in sorted(scratch.glob(f"{strategy}.rank*"))]
        row = {"strategy": strategy, "processes": args.processes, **{k: ranks[0][k] for k in ("params", "loss")},
               "state_mb": max(r["state_mb"] for r in ranks), "peak_mb": max(r["peak_mb"] for r in ranks),
               "step_s": max(r["step_s"] for r in ranks)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["strategy"] == "ddp"), rows[0])
    for row in rows:
        row.update({f"{key}_vs_base": round(row[key] / base[key], 3) for key in ("state_mb", "peak_mb", "step_s")})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"| strategy | params | state / process (MB) | peak / process (MB) | s / step | vs {base['strategy']}: state, peak, time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['params'] / 1e6:.1f}M | {r['state_mb']:.0f} | {r['peak_mb']:.0f} | {r['step_s']:.2f} | "
              f"{r['state_mb_vs_base']:.2f}, {r['peak_mb_vs_base']:.2f}, {r['step_s_vs_base']:.2f} |")


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _state_mb(engine) -> float:
    """Unique storages of the parameters, gradients and optimizer state this process holds."""
    import torch

    tensors = []
    for p in engine.model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        tensors += [getattr(p, "ds_tensor", local), grad]
    optimizer = engine.optimizer
    for state in getattr(optimizer, "optimizer", optimizer).state.values():
        tensors += [v.to_local() if hasattr(v, "to_local") else v for v in state.values() if torch.is_tensor(v)]
    for flat in getattr(optimizer, "fp32_partitioned_groups_flat", []):
        tensors += [flat, flat.grad]
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and storage.nbytes():
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total / 2 ** 20


def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    from dataclasses import replace

    from distill.config import LossConfig, ParallelConfig
    from distill.distributed import processes
    from distill.parallel import make_engine
    from distill.students.build import build_random
    from distill.students.presets import PRESETS
    from distill.train import distillation_objective

    proc = processes(torch.device("cpu"))
    if args.worker == "zero3":
        import deepspeed  # noqa: F401  (its import is not the student's memory)
    before = _rss_mb("VmRSS")
    arch = replace(PRESETS["0.6b"], num_hidden_layers=args.layers, vocab_size=args.vocab)
    model = build_random(arch, seed=0)
    params = sum(p.numel() for p in model.parameters())
    objective = distillation_objective(LossConfig(), args.vocab)
    cfg = ParallelConfig(strategy=args.worker)
    engine = make_engine(model, objective, lr=1e-4, weight_decay=0.0, max_grad_norm=1.0, micro_batches=1, proc=proc,
                         cfg=cfg)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here
    times = []
    for step in range(args.steps):
        batch = _batch(step, proc.rank, args.tokens, args.vocab)
        started = time.perf_counter()
        engine.set_lr(1e-4)
        engine.zero_grad()
        loss, _ = engine.module(batch, proc.total(batch.num_targets) / proc.world)
        engine.backward(loss)
        engine.step(1.0)
        times.append(time.perf_counter() - started)
        if step == args.steps - 1:  # the state at its largest: gradients and moments both held
            state = _state_mb(engine)
    # Each process's loss is its share of the step's: their sum is the step's loss.
    summed = torch.tensor([float(loss.detach())])
    torch.distributed.all_reduce(summed)
    Path(f"{args.out}.rank{proc.rank}").write_text(json.dumps({"rank": proc.rank, "params": params, "state_mb": state,
                      "peak_mb": _rss_mb("VmHWM") - before, "step_s": sum(times[1:]) / max(1, len(times) - 1),
                      "loss": float(summed)}))
    engine.finish()


def _batch(step: int, rank: int, length: int, vocab: int, k: int = 16, rows: int = 2):
    """Random prompt + response rows, a different share per rank and step, with a teacher's top-k."""
    import torch

    from distill.data import TokenBatch

    generator = torch.Generator().manual_seed(step * 1000 + rank)
    ids = torch.randint(0, vocab, (rows, length), generator=generator)
    target_mask = torch.zeros(rows, length, dtype=torch.bool)
    target_mask[:, length // 8:-1] = True
    targets = torch.roll(ids, -1, dims=1)
    teacher = torch.randn(rows, length, vocab, generator=generator).log_softmax(-1).topk(k, dim=-1)
    return TokenBatch(ids, torch.ones_like(ids), target_mask, targets, teacher.indices, teacher.values)


if __name__ == "__main__":
    main()
