"""A distillation step at the cost of an SFT step? Time and memory, side by side, in one run.

Two parts, each configuration reported as one JSON line (`--out` collects them):

- `loss`: the loss alone at Qwen3's vocabulary, from final hidden states [N, H] and lm_head
  [V, H] (both trainable) against the teacher's top-20: ours chunked (the training default) and
  naive, TRL's `generalized_jsd_loss` (full teacher logits, as it needs) and, on a GPU, Liger's
  `LigerFusedLinearJSD` (which computes the teacher's logits from its hidden states itself). All
  forward KL.
- `step`: one whole training step of a Qwen3 student (fp32 master weights; `--dtype bf16` is
  bf16 autocast, as `parallel.mixed_precision=bf16`): the distillation objective (chunked, naive)
  through the training engine against a plain transformers SFT step (`labels=`) on the same
  model, tokens and optimizer.

Timings are the median of `--repeats` after a warm-up (CUDA synchronised). Memory: the peak the
call adds over what its inputs hold (CUDA: the allocator's peak; CPU: peak resident set, each CPU
configuration in a fresh process with one torch thread). Ratios against the naive loss and the
SFT step are printed at the end (`--render FILE` prints the table of an earlier run).

    python bench/step_speed.py --device cpu --part loss --tokens 4096 --hidden 1024 --dtype bf16 float32
    python bench/step_speed.py --device cpu --part step --preset 0.6b --layers 2 --hidden 256 --batch 1 --seq 512
    python bench/step_speed.py --device cuda --part loss step --tokens 8192 32768 --hidden 2048 --preset 0.6b 1.7b
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

from loss_memory import peak_memory_mb, run_script_in_child, settle_and_reset_peak   # bench/: run as a script, this folder is on the path

# bf16 dense peak of the H200 (and H100) SXM, for MFU.
PEAK_FLOPS = {"cuda": 989e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--part", nargs="+", default=["loss", "step"], choices=["loss", "step"])
    # loss: bf16 = bf16 hidden states and lm_head; autocast = float32 ones under bf16 autocast (as
    # training with parallel.mixed_precision=bf16 holds them); step: bf16 = bf16 autocast.
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "autocast", "float32"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096], help="loss: tokens")
    parser.add_argument("--hidden", type=int, default=1024, help="loss: hidden size; step: overrides the preset's")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--impls", nargs="+", default=["chunked", "naive", "trl", "liger"])
    parser.add_argument("--chunk-bytes", type=int, nargs="+", default=[0],
                        help="loss: chunk budgets of the chunked loss to try (0: the device's default)")
    parser.add_argument("--preset", nargs="+", default=["0.6b"], help="step: student presets")
    parser.add_argument("--layers", type=int, default=0, help="step: decoder layers (0: the preset's)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    parser.add_argument("--render", metavar="JSONL", help="print the tables of an earlier run")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration (JSON)
    args = parser.parse_args()
    if args.render:
        print(render([json.loads(line) for line in open(args.render) if line.strip()]))
        return
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    configs = []
    if "loss" in args.part:
        for dtype, tokens, impl in itertools.product(args.dtype, args.tokens, args.impls):
            if impl == "liger" and args.device != "cuda":
                continue  # Liger's kernels are Triton: GPU only
            for budget in args.chunk_bytes if impl == "chunked" else [0]:
                configs.append({"part": "loss", "device": args.device, "dtype": dtype, "tokens": tokens, "impl": impl,
                                "hidden": args.hidden, "vocab": args.vocab, "repeats": args.repeats,
                                "chunk_bytes": budget})
    if "step" in args.part:
        for dtype, preset, impl in itertools.product(args.dtype, args.preset, ["kd_chunked", "kd_naive", "sft"]):
            configs.append({"part": "step", "device": args.device, "dtype": dtype, "preset": preset, "impl": impl,
                            "layers": args.layers, "hidden": args.hidden if args.device == "cpu" else 0,
                            "vocab": args.vocab, "batch": args.batch, "seq": args.seq, "repeats": args.repeats})
    rows = []
    for config in configs:
        row = run_isolated(config) if args.device == "cpu" else run_guarded(config)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    print(render(rows))


def run_isolated(config: dict) -> dict:
    """A CPU configuration in a fresh process: its peak resident set is its own."""
    return run_script_in_child(__file__, config)


def run_guarded(config: dict) -> dict:
    """A GPU configuration in this process; a failure (out of memory) is reported, not raised."""
    import torch

    try:
        return run_one(config)
    except Exception as error:  # noqa: BLE001 - a benchmark row records any failure and goes on
        return {**config, "failed": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    finally:
        torch.cuda.empty_cache()


def run_one(config: dict) -> dict:
    import torch

    torch.manual_seed(0)
    if config["device"] == "cpu":
        torch.set_num_threads(1)
    return (loss_case if config["part"] == "loss" else step_case)(config)


# --- the loss alone ---------------------------------------------------------------------------

def loss_case(config: dict) -> dict:
    import torch

    from distill import losses

    device, n, h, v, k = torch.device(config["device"]), config["tokens"], config["hidden"], config["vocab"], 20
    dtype = torch.bfloat16 if config["dtype"] == "bf16" else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config["dtype"] == "autocast")
    hidden = torch.randn(n, h, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device) * (3 / h ** 0.5)).to(dtype).requires_grad_()   # logits of std ~3
    targets = torch.randint(0, v, (n,), device=device)
    impl = config["impl"]
    if impl in ("chunked", "naive"):
        teacher = top_k_teacher(n, v, k, device)
        token_loss = losses.TokenLoss(divergence="forward_kl")
        budget = {"chunk_bytes": config["chunk_bytes"] or None} if impl == "chunked" else {}
        function = losses.chunked_loss if impl == "chunked" else losses.naive_loss

        def call():
            with autocast:
                loss, _ = function(hidden, weight, teacher, targets, token_loss, 1.0 / n, **budget)
            loss.backward()
    elif impl == "trl":
        from trl.experimental.gkd import GKDTrainer

        teacher_logits = (torch.randn(n, v, device=device) * 3).to(dtype)

        def call():
            with autocast:
                student_logits = (hidden @ weight.T).unsqueeze(0)
                loss = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits.unsqueeze(0), beta=0.0)
            loss.backward()
    else:
        from liger_kernel.transformers import LigerFusedLinearJSD

        teacher_hidden = torch.randn(n, h, device=device, dtype=dtype)
        teacher_weight = (torch.randn(v, h, device=device) * (3 / h ** 0.5)).to(dtype)
        try:
            fused = LigerFusedLinearJSD(jsd_beta=0.0)   # beta 0: forward KL, where the version allows it
        except (AssertionError, ValueError):
            fused, config = LigerFusedLinearJSD(jsd_beta=0.5), {**config, "liger_beta": 0.5}

        def call():
            with autocast:
                loss = fused(hidden, weight, teacher_hidden, teacher_weight)
            loss.backward()

    seconds, peak, baseline = measure(call, device, config["repeats"], reset=lambda: _clear_grads(hidden, weight))
    return {**config, "seconds": round(seconds, 4), "added_gb": round((peak - baseline) / 2 ** 30, 3)}


def top_k_teacher(n: int, v: int, k: int, device):
    import torch

    from distill import losses

    ids, logprobs = [], []
    for start in range(0, n, 1024):  # chunk by chunk: the full logits never exist here
        values, index = torch.log_softmax(torch.randn(min(1024, n - start), v, device=device) * 3, -1).topk(k, -1)
        ids.append(index.int())
        logprobs.append(values)
    return losses.TopKTeacher(torch.cat(ids), torch.cat(logprobs))


def _clear_grads(*tensors) -> None:
    for tensor in tensors:
        tensor.grad = None


# --- a whole step -----------------------------------------------------------------------------

def step_case(config: dict) -> dict:
    import torch

    from distill.config import LossConfig
    from distill.data import TokenBatch
    from distill.parallel import Replicated, _adamw, _param_groups
    from distill.students.build import build_random, count_parameters
    from distill.students.presets import get_preset
    from distill.train import distillation_objective

    device, bf16 = torch.device(config["device"]), config["dtype"] == "bf16"
    arch = get_preset(config["preset"]).override(vocab_size=config["vocab"])
    if config["layers"]:
        arch = arch.override(num_hidden_layers=config["layers"])
    if config["hidden"]:
        heads = max(1, config["hidden"] // 64)
        arch = arch.override(hidden_size=config["hidden"], intermediate_size=3 * config["hidden"], head_dim=64,
                             num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                             moe_intermediate_size=config["hidden"] // 2 if arch.is_moe else 0)
    model = build_random(arch, device=device, seed=0)   # transformers' default attention: sdpa
    b, s, v, k = config["batch"], config["seq"], arch.vocab_size, 20
    prompt = s // 8   # the first eighth of every row is prompt: not a target
    input_ids = torch.randint(0, v, (b, s), device=device)
    target_mask = torch.zeros(b, s, dtype=torch.bool, device=device)
    target_mask[:, prompt - 1:s - 1] = True
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    top = top_k_teacher(b * s, v, k, device)
    batch = TokenBatch(input_ids, torch.ones_like(input_ids), target_mask, targets, top.ids.view(b, s, k).long(),
                       top.logprobs.view(b, s, k))
    tokens = int(target_mask.sum())
    if config["impl"] == "sft":
        optimizer = _adamw(_param_groups(model, 0.0), 1e-4)
        labels = input_ids.masked_fill(~torch.cat([target_mask[:, -1:], target_mask[:, :-1]], dim=1), -100)

        def call():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=input_ids, attention_mask=batch.attention_mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    else:
        implementation = "chunked" if config["impl"] == "kd_chunked" else "naive"
        engine = Replicated(model, distillation_objective(LossConfig(implementation=implementation), v), lr=1e-4,
                            weight_decay=0.0, bf16=bf16)

        def call():
            engine.zero_grad()
            loss, _ = engine.module(batch, tokens)
            engine.backward(loss)
            engine.step(1.0)

    seconds, peak, _ = measure(call, device, config["repeats"])
    params = count_parameters(model).total
    flops = 6 * params * b * s + 12 * arch.num_hidden_layers * arch.num_attention_heads * arch.head_dim * s * b * s
    # The whole step's peak (weights, AdamW state, gradients, activations): allocator or resident set.
    row = {**config, "seconds": round(seconds, 4), "tokens_per_s": round(b * s / seconds), "peak_gb":
           round(peak / 2 ** 30, 2), "params": params}
    if device.type in PEAK_FLOPS:
        row["mfu"] = round(flops / seconds / PEAK_FLOPS[device.type], 3)
    return row


# --- measuring --------------------------------------------------------------------------------

def measure(call, device, repeats: int, reset=lambda: None) -> tuple[float, float, float]:
    """(median seconds of `repeats` calls after a warm-up, peak bytes held during them, bytes held
    before them)."""
    reset()
    call()   # warm-up: kernels chosen, optimizer state allocated
    reset()
    baseline = settle_and_reset_peak(device)
    times = []
    for _ in range(repeats):
        reset()
        _sync(device)
        started = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - started)
    peak_mb, _ = peak_memory_mb(device, baseline)
    return statistics.median(times), peak_mb * 2 ** 20, baseline


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# --- the tables -------------------------------------------------------------------------------

def render(rows: list[dict]) -> str:
    """Markdown: each loss against naive (time, added memory), each KD step against SFT."""
    out = []
    losses_ = [r for r in rows if r.get("part") == "loss"]
    for (device, dtype, tokens), group in itertools.groupby(
            sorted(losses_, key=lambda r: (r["device"], r["dtype"], r["tokens"])),
            key=lambda r: (r["device"], r["dtype"], r["tokens"])):
        group = list(group)
        naive = next((r for r in group if r["impl"] == "naive" and "failed" not in r), None)
        out += [f"\nloss, {device}, {dtype}, {tokens:,} tokens",
                "| implementation | ms | added GB | time / naive | memory / naive |", "|---|---|---|---|---|"]
        for r in group:
            if "failed" in r:
                out.append(f"| {r['impl']} | – | – | {r['failed']} | |")
                continue
            ratio = (f"{r['seconds'] / naive['seconds']:.2f}x | {r['added_gb'] / naive['added_gb']:.1%}"
                     if naive else "– | –")
            name = r["impl"] + (f" ({r['chunk_bytes'] / 2 ** 20:.0f} MiB chunks)" if r.get("chunk_bytes") else "")
            out.append(f"| {name} | {1000 * r['seconds']:.0f} | {r['added_gb']:.2f} | {ratio} |")
    steps = [r for r in rows if r.get("part") == "step"]
    for (device, dtype, preset), group in itertools.groupby(
            sorted(steps, key=lambda r: (r["device"], r["dtype"], r["preset"])),
            key=lambda r: (r["device"], r["dtype"], r["preset"])):
        group = list(group)
        sft = next((r for r in group if r["impl"] == "sft" and "failed" not in r), None)
        out += [f"\nstep, {device}, {dtype}, {preset}",
                "| step | s | tokens/s | peak GB | MFU | time / SFT | memory / SFT |", "|---|---|---|---|---|---|---|"]
        for r in group:
            if "failed" in r:
                out.append(f"| {r['impl']} | – | – | – | – | {r['failed']} | |")
                continue
            ratio = (f"{r['seconds'] / sft['seconds']:.2f}x | {r['peak_gb'] / sft['peak_gb']:.2f}x" if sft else "– | –")
            out.append(f"| {r['impl']} | {r['seconds']:.3f} | {r['tokens_per_s']:,} | {r['peak_gb']:.2f} | "
                       f"{r.get('mfu', '–')} | {ratio} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
