"""Rollout decoding speed: `model.generate`, our loop on the transformers forward, and our loop on
the lean Qwen3 decoder (students/decode.py), side by side in one process, one thread.

Dense Qwen3 students of a few sizes and the embedded default's MoE student and teacher shapes
(random init, the built-in tokenizer), batch 8 prompts of the built-in task, 32 new tokens
sampled at temperature 1 (no early eos: every step is timed).

    python bench/decode_speed.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import GenerationConfig

    import distill.students.generation as generation
    from distill.eval.tasks.arithmetic import generate_splits
    from distill.students.build import build_random
    from distill.students.chat import Sampling, render_prompt
    from distill.students.presets import get_preset
    from distill.students.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    problems = generate_splits({"x": args.batch}, min_steps=3, max_steps=5, seed=0)["x"]
    prompts = [render_prompt(tokenizer, p.messages()[:1], "think") for p in problems]
    sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0)
    # eos = -1 never ends a row early: every configuration decodes exactly new_tokens steps
    sizes = {"tiny (0.6M, width 128, 4 layers)": ("tiny", {}),
             "width 256, 4 layers (2.4M)": ("tiny", dict(hidden_size=256, intermediate_size=768, head_dim=64)),
             "width 512, 8 layers (19M)": ("tiny", dict(hidden_size=512, intermediate_size=1536, head_dim=64,
                                                        num_hidden_layers=8, num_attention_heads=8,
                                                        num_key_value_heads=4)),
             "MoE student (0.63M, 8 experts of width 32, top-2)": ("tiny-moe", dict(moe_intermediate_size=32)),
             "MoE teacher (1.8M, 8 experts of width 64, top-2)": ("tiny-moe", {})}
    rows = []
    for label, (preset, overrides) in sizes.items():
        model = build_random(get_preset(preset).override(**overrides), seed=0).eval()
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1

        def hf_generate():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
                max_new_tokens=args.new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                eos_token_id=None, pad_token_id=tokenizer.pad_token_id))

        def ours(lean: bool):
            def run():
                generation._decode(model, prompts, eos=-1, pad=tokenizer.pad_token_id, vocab=len(tokenizer),
                                   max_new_tokens=args.new_tokens, sampling=sampling,
                                   generator=torch.Generator().manual_seed(0), device="cpu", lean=lean)
            return run

        timings = {}
        for name, function in (("model.generate", hf_generate), ("loop, transformers forward", ours(False)),
                               ("loop, lean decoder", ours(True))):
            with torch.inference_mode():
                function()
                started = time.perf_counter()
                for _ in range(args.repeats):
                    function()
            timings[name] = (time.perf_counter() - started) / args.repeats * 1000
        row = {"model": label, **{f"{k} ms": round(v, 1) for k, v in timings.items()},
               "lean vs generate": round(timings["model.generate"] / timings["loop, lean decoder"], 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| model | model.generate | our loop, transformers forward | our loop, lean decoder | speed-up vs generate |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['model.generate ms']} ms | {r['loop, transformers forward ms']} ms | "
              f"{r['loop, lean decoder ms']} ms | {r['lean vs generate']}x |")


if __name__ == "__main__":
    main()
