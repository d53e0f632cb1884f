"""Peak memory and time of distillation loss + backward at Qwen3's vocabulary: naive vs chunked.

Each configuration runs in a fresh process (one torch thread), so peaks do not leak between
them. Inputs are the student's final hidden states [N, H] and lm_head [V, H] (both trainable),
and the teacher as full logits [N, V] or top-k (ids, log-probabilities) [N, K]. A child:

1. builds its inputs, then resets the kernel's peak-RSS counter (/proc/self/clear_refs);
2. runs loss + backward once, timed;
3. reports peak RSS (VmHWM) and the memory the loss added (peak minus RSS with the inputs),
   and the largest error of the per-token values against a float64 reference on 64 tokens.

The peer is TRL's `GKDTrainer.generalized_jsd_loss` (trl.experimental.gkd; `pip install -e
'.[bench]'`), fed the same hidden @ lm_head logits and full teacher logits. TRL's beta=0/1 are
forward/reverse KL and its JSD is unscaled (ours divided by beta(1-beta)), so TRL's JSD value is
a quarter of ours at beta 0.5.

    python bench/loss_memory.py                      # the whole table, one JSON line a configuration
    python bench/loss_memory.py --tokens 2048 --losses forward_kl --impls naive chunked
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

# What a configuration is expected to add, in copies of the [N, V] float32 logits; used only to
# skip configurations that cannot fit (the child would be killed for memory). From measurements
# on this machine (bench/README.md), rounded up.
NAIVE_COPIES = {("topk", "forward_kl"): 2.5, ("topk", "reverse_kl"): 2.5, ("topk", "jsd"): 2.5,
                ("full", "forward_kl"): 5.5, ("full", "reverse_kl"): 5.5, ("full", "jsd"): 6.5}
TRL_COPIES = {"forward_kl": 8.5, "reverse_kl": 8.5, "jsd": 16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--losses", nargs="+", default=["forward_kl", "reverse_kl", "jsd"])
    parser.add_argument("--teachers", nargs="+", default=["full", "topk"])
    parser.add_argument("--impls", nargs="+", default=["naive", "chunked", "trl"])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32, help="teacher top-k")
    parser.add_argument("--chunk-tokens", type=int, default=0, help="0: the library's default")
    parser.add_argument("--memory-gb", type=float, default=21.0, help="skip configurations expected above this")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--render", metavar="JSONL", help="print the markdown table of earlier results")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration (JSON)
    args = parser.parse_args()
    if args.render:
        print(render(args.render))
        return
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    for tokens, loss, teacher, impl in itertools.product(args.tokens, args.losses, args.teachers, args.impls):
        if impl == "trl" and teacher != "full":
            continue  # TRL's loss takes full teacher logits only
        config = dict(loss=loss, teacher=teacher, impl=impl, tokens=tokens, vocab=args.vocab, hidden=args.hidden,
                      k=args.k, chunk_tokens=args.chunk_tokens, device=args.device)
        print(json.dumps(run_in_child(config, args.memory_gb)), flush=True)


def render(path: str) -> str:
    """Markdown: one row per configuration, chunked and TRL as ratios of naive on the same row key."""
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    measured = {(r["loss"], r["teacher"], r["tokens"], r["impl"]): r for r in rows if "seconds" in r}
    lines = ["| loss | teacher | tokens | implementation | peak MB | added MB | seconds | added / naive | time / naive "
             "| peak / TRL | time / TRL | max abs error vs float64 |", "|" + "---|" * 12]
    for r in rows:
        key = (r["loss"], r["teacher"], r["tokens"])
        if "seconds" not in r:
            why = r.get("skipped") or f"failed: {r.get('failed')}"
            lines.append(f"| {r['loss']} | {r['teacher']} | {r['tokens']} | {r['impl']} | {why} ||||||||")
            continue
        naive, trl = measured.get(key + ("naive",)), measured.get(key + ("trl",))
        ratio = lambda a, b: f"{a / b:.2f}" if b else "–"  # noqa: E731
        lines.append(" | ".join([
            f"| {r['loss']}", r["teacher"] + (f" (k={r['k']})" if r.get("k") else ""), str(r["tokens"]), r["impl"],
            f"{r['peak_mb']:,}", f"{r['added_mb']:,}", f"{r['seconds']:.1f}",
            ratio(r["added_mb"], naive["added_mb"]) if naive and r["impl"] != "naive" else "–",
            ratio(r["seconds"], naive["seconds"]) if naive and r["impl"] != "naive" else "–",
            ratio(r["peak_mb"], trl["peak_mb"]) if trl and r["impl"] != "trl" else "–",
            ratio(r["seconds"], trl["seconds"]) if trl and r["impl"] != "trl" else "–",
            f"{r['max_abs_error_vs_float64']:.1e} |"]))
    return "\n".join(lines)


def run_in_child(config: dict, memory_gb: float) -> dict:
    if config["impl"] == "trl":
        try:
            import trl  # noqa: F401
        except ImportError:
            return {**config, "skipped": "trl not installed (pip install -e '.[bench]')"}
    expected = expected_gb(config)
    if expected > memory_gb:
        return {**config, "skipped": f"does not fit: about {expected:.0f} GB expected, limit {memory_gb:.0f} GB"}
    return run_script_in_child(__file__, config)


def run_script_in_child(script: str, config: dict) -> dict:
    """`script --one CONFIG` in a fresh process with one torch thread (so its peak resident set is
    its own): the JSON line it prints, or the config with why it failed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run([sys.executable, script, "--one", json.dumps(config)], capture_output=True, text=True,
                          env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        reason = "killed (out of memory)" if done.returncode in (-9, 137) else done.stderr.strip().splitlines()[-1:]
        return {**config, "failed": reason, "returncode": done.returncode}
    return json.loads(lines[-1])


def expected_gb(config: dict) -> float:
    logits_gb = config["tokens"] * config["vocab"] * 4 / 1e9
    inputs = (config["vocab"] * config["hidden"] * 4 * 2) / 1e9 + (logits_gb if config["teacher"] == "full" else 0)
    copies = {"naive": NAIVE_COPIES[config["teacher"], config["loss"]], "trl": TRL_COPIES[config["loss"]]}.get(config["impl"], 0)
    return inputs + copies * logits_gb + 1.5


def run_one(config: dict) -> dict:
    import torch

    from distill import losses

    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = torch.device(config["device"])
    n, v, h, k = config["tokens"], config["vocab"], config["hidden"], config["k"]
    hidden = torch.randn(n, h, device=device).requires_grad_()
    weight = (torch.randn(v, h, device=device) * (3 / h ** 0.5)).requires_grad_()  # logits with std ~3
    targets = torch.randint(0, v, (n,), device=device)
    teacher = make_teacher(config["teacher"], n, v, k, device)
    token_loss = losses.TokenLoss(divergence=config["loss"], beta=0.5)

    rss_inputs = settle_and_reset_peak(device)
    started = time.perf_counter()
    if config["impl"] == "chunked":
        loss, values = losses.chunked_loss(hidden, weight, teacher, targets, token_loss, 1.0 / n,
                                           chunk_tokens=config["chunk_tokens"] or None)
        per_token = values["kd"]
    elif config["impl"] == "naive":
        loss, values = losses.naive_loss(hidden, weight, teacher, targets, token_loss, 1.0 / n)
        per_token = values["kd"]
    else:
        loss, per_token = trl_loss(config["loss"], hidden, weight, teacher)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak_mb, added_mb = peak_memory_mb(device, rss_inputs)

    error = reference_error(config, hidden.detach()[:64], weight.detach(), teacher.rows(slice(0, 64)), per_token[:64])
    return {"loss": config["loss"], "teacher": config["teacher"], "impl": config["impl"], "vocab": v, "tokens": n,
            "hidden": h, "k": k if config["teacher"] == "topk" else None, "device": device.type,
            "peak_mb": round(peak_mb), "added_mb": round(added_mb), "seconds": round(seconds, 2),
            "value": float(loss), "max_abs_error_vs_float64": error}


def make_teacher(form: str, n: int, v: int, k: int, device):
    import torch

    from distill import losses

    if form == "full":
        return losses.FullTeacher(torch.randn(n, v, device=device).mul_(3))
    ids, logprobs = [], []
    for start in range(0, n, 256):  # chunk by chunk: the full logits never exist here
        logits = torch.randn(min(256, n - start), v, device=device).mul_(3)
        values, index = torch.log_softmax(logits, -1).topk(k, -1)
        ids.append(index.int())
        logprobs.append(values)
    return losses.TopKTeacher(torch.cat(ids), torch.cat(logprobs))


def trl_loss(name: str, hidden, weight, teacher):
    from trl.experimental.gkd import GKDTrainer

    beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}[name]
    student_logits = (hidden @ weight.T).unsqueeze(0)
    per_token = GKDTrainer.generalized_jsd_loss(student_logits, teacher.logits.unsqueeze(0), beta=beta,
                                                reduction="none").sum(-1)[0]
    loss = per_token.sum() / per_token.shape[0]
    # TRL's JSD is the unscaled form; scale it so its values compare with ours.
    scale = beta * (1 - beta) if 0 < beta < 1 else 1.0
    return loss, per_token.detach() / scale


def reference_error(config, hidden, weight, teacher, per_token) -> float:
    """Largest |ours - float64| over the given tokens, the float64 side written from definitions."""
    import torch

    from distill import losses

    logits = hidden.double() @ weight.double().T
    logq = torch.log_softmax(logits, -1)
    if isinstance(teacher, losses.FullTeacher):
        logp = torch.log_softmax(teacher.logits.double(), -1)
    else:
        top_q = logq.gather(-1, teacher.ids.long())
        p_top = teacher.logprobs.double().exp()
        logp = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1).log()
        logq = torch.cat([top_q, torch.log1p(-top_q.exp().sum(-1, keepdim=True))], -1)
    p, q = logp.exp(), logq.exp()
    if config["loss"] == "forward_kl":
        reference = (p * (logp - logq)).sum(-1)
    elif config["loss"] == "reverse_kl":
        reference = (q * (logq - logp)).sum(-1)
    else:
        logm = torch.log(0.5 * p + 0.5 * q)
        reference = (0.5 * (p * (logp - logm)).sum(-1) + 0.5 * (q * (logq - logm)).sum(-1)) / 0.25
    return float((per_token.double() - reference).abs().max())


def settle_and_reset_peak(device) -> float:
    """Resident bytes now, after resetting the peak counter (CUDA: the allocator's)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set size
    return _status_kb("VmRSS") * 1024


def peak_memory_mb(device, baseline: float) -> tuple[float, float]:
    import torch

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kb("VmHWM") * 1024
    return peak / 2 ** 20, (peak - baseline) / 2 ** 20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


if __name__ == "__main__":
    main()
