"""Padding-free batches: one distillation step on packed rows against the same sequences padded.

The sequences of one micro-batch have mixed lengths (uniform between --min-len and --max-len,
as chat replies do); the padded layout gives each its own row as wide as the longest, the packed
one puts several short sequences in a row of that width (`data.pack=true`). Same model, same
tokens, same loss: the script checks that the two losses agree, then times a whole training step
(forward, backward, AdamW) of each, median of --repeats after a warm-up, and prints the padding
share of each layout and the packed step's time as a ratio of the padded one.

    python bench/packing.py --preset 0.6b --layers 2 --hidden 512 --sequences 16 --min-len 32 --max-len 1024
    python bench/packing.py --preset 0.6b --layers 8 --hidden 512 --vocab 16384 --sequences 16 --max-len 1024

The loss's vocabulary work grows with the real tokens only, so packing saves the decoder's
share of a step: with 2 layers and the full vocabulary that share is small; `--vocab` shrinks the
embedding so a shrunken model keeps a released model's ratio of decoder to vocabulary work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from distill.config import LossConfig
from distill.data import Example, collate
from distill.parallel import Replicated
from distill.students.build import build_random
from distill.students.presets import PRESETS
from distill.train import distillation_objective


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="0.6b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151_936,
                        help="embedding rows (a smaller one keeps a shrunken model's decoder-to-vocabulary cost ratio)")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    preset = PRESETS[args.preset]
    arch = preset.override(num_hidden_layers=args.layers, hidden_size=args.hidden,
                           intermediate_size=3 * args.hidden, head_dim=64,
                           num_attention_heads=max(2, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 128),
                           vocab_size=args.vocab)
    model = build_random(arch, seed=args.seed)
    real = min(151_669, args.vocab)
    examples = mixed_examples(args, real_vocab=real)
    objective = distillation_objective(LossConfig(), real)
    layouts = {"padded": collate(examples, 0, args.max_len), "packed": collate(examples, 0, args.max_len, pack=True)}
    losses = {name: float(objective(model, batch, batch.num_targets)[0].detach()) for name, batch in layouts.items()}
    assert abs(losses["packed"] - losses["padded"]) <= 1e-4 * abs(losses["padded"]), losses

    engine = Replicated(model, objective, lr=1e-5, weight_decay=0.0)
    model.train()
    rows = {}
    for name, batch in layouts.items():
        def step():
            engine.zero_grad()
            loss, _ = engine.module(batch, batch.num_targets)
            engine.backward(loss)
            engine.step(1.0)
        step()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        rows[name] = {"layout": name, "shape": list(batch.input_ids.shape), "padding": round(batch.stats["padding"], 3),
                      "step_s": round(statistics.median(times), 3), "loss": losses[name]}
    rows["packed"]["time_vs_padded"] = round(rows["packed"]["step_s"] / rows["padded"]["step_s"], 3)
    for row in rows.values():
        print(json.dumps({**vars(args), **row}))


def mixed_examples(args, real_vocab: int) -> list[Example]:
    """Sequences of a 16-token prompt and a reply of mixed length, with a top-k teacher."""
    g = torch.Generator().manual_seed(args.seed)
    examples = []
    for _ in range(args.sequences):
        length = int(torch.randint(args.min_len, args.max_len + 1, (1,), generator=g))
        prompt = torch.randint(0, real_vocab, (16,), generator=g).tolist()
        reply = torch.randint(0, real_vocab, (length - 16,), generator=g).tolist()
        ids = torch.randint(0, real_vocab, (len(reply), args.top_k), generator=g)
        logprobs = torch.log_softmax(torch.randn(len(reply), args.top_k + 1, generator=g), -1)[:, :args.top_k]
        examples.append(Example(prompt, reply, ids, logprobs))
    return examples


if __name__ == "__main__":
    main()
