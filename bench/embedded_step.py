"""Training steps per second of the embedded default's models on this CPU, one variant at a time.

`--model teacher`: the teacher bootstrap's step (tiny-moe, cross-entropy on the built-in task's
reference replies, batch 24, both modes alternating); `--model moe`: the MoE student's
off-policy step (forward KL to the cached teacher outputs, batch 32). Variants: packed rows,
bf16 autocast, the experts implementation (distill's default `index_select`, transformers'
gathers as `index_select`, students/experts.py; transformers' own `grouped_mm` or `eager`; or
every expert on every token, written here for the comparison),
the attention implementation, `torch.compile` of the decoder. Prints one JSON line: steps/s over
`--steps` steps after 5 warm-up steps, and the mean padding share.

    python bench/embedded_step.py --model teacher --threads 2 --data DIR/train.jsonl
    python bench/embedded_step.py --model moe --threads 1 --data DIR/train.jsonl --teacher-outputs RUN/teacher_outputs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import datasets
import torch
from transformers.integrations.moe import ExpertsInterface

from distill.common.tracking import Tracker
from distill.config import Config
from distill.data import Example, ModeAlternatingBatches
from distill.parallel import Replicated
from distill.stages.teacher import teacher_architecture
from distill.stages.teacher_outputs import offpolicy_examples
from distill.students import experts
from distill.students.build import build_random
from distill.students.chat import MODES, prompt_messages, reference_reply, render_prompt, render_response
from distill.students.tokenizer import load_tokenizer
from distill.train import cross_entropy_objective, distillation_objective


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["teacher", "moe"], default="teacher")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", required=True, help="the built-in task's train.jsonl (under the cache's data/)")
    parser.add_argument("--teacher-outputs", help="--model moe: a run's teacher_outputs folder")
    parser.add_argument("--pack", action="store_true")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast")
    parser.add_argument("--experts", default="index_select", choices=["index_select", "grouped_mm", "eager", "all_experts"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--loss", choices=["chunked", "naive"], default="chunked", help="--model moe: the KD loss path")
    parser.add_argument("--batch-size", type=int, help="default: the default run's (teacher 24, MoE student 32)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ExpertsInterface.register("all_experts", _all_experts)

    cfg, tokenizer = Config(), load_tokenizer("builtin")
    if args.model == "teacher":
        rows = datasets.load_dataset("json", data_files=args.data)["train"].select(range(3000))
        examples = {mode: [] for mode in MODES}
        for row in rows:
            prompt, reply = prompt_messages(row["messages"]), reference_reply(row["messages"])
            for mode in MODES:
                examples[mode].append(Example(render_prompt(tokenizer, prompt, mode),
                                              render_response(tokenizer, reply, mode)))
        model, batch_size = build_random(teacher_architecture(cfg.teacher), seed=0), 24
        objective = cross_entropy_objective(len(tokenizer))
    else:
        tracker = Tracker(Path(args.teacher_outputs), metrics_file=None)
        examples = offpolicy_examples(cfg, tokenizer, Path(args.teacher_outputs), tracker)
        model, batch_size = build_random(cfg.students["moe"].architecture, seed=0), 32
        cfg.loss.implementation = args.loss
        objective = distillation_objective(cfg.loss, len(tokenizer))
    model.set_experts_implementation(experts.NAME if args.experts == "index_select" else args.experts)
    model.set_attn_implementation(args.attn)
    if args.compile:
        model.model = torch.compile(model.model, dynamic=True)
    batch_size = args.batch_size or batch_size
    batches = ModeAlternatingBatches(examples, batch_size, tokenizer.pad_token_id, cfg.data.max_length, seed=0,
                                     pack=args.pack)
    engine = Replicated(model, objective, lr=1e-3, weight_decay=0.0)
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.autocast else contextlib.nullcontext()
    padding = []

    def step():
        batch = next(batches)[0]
        padding.append(batch.stats["padding"])
        engine.zero_grad()
        with autocast:
            loss, _ = engine.module(batch, batch.num_targets)
        engine.backward(loss)
        engine.step(1.0)

    for _ in range(5):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    rate = args.steps / (time.perf_counter() - started)
    print(json.dumps({**{k: v for k, v in vars(args).items() if k not in ("data", "teacher_outputs")},
                      "steps_per_s": round(rate, 2), "padding": round(sum(padding) / len(padding), 3)}))


def _all_experts(self, hidden_states, top_k_index, top_k_weights):
    """Every expert on every token, weighted by routing weights that are zero off the top-k:
    no gathers, 4x the products at 8 experts, top-2."""
    weights = torch.zeros(hidden_states.shape[0], self.num_experts, dtype=top_k_weights.dtype,
                          device=hidden_states.device).scatter(1, top_k_index, top_k_weights)
    gate, up = torch.matmul(hidden_states, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
    out = torch.matmul(self.act_fn(gate) * up, self.down_proj.transpose(1, 2))
    return torch.einsum("eth,te->th", out, weights.to(out.dtype)).to(hidden_states.dtype)


if __name__ == "__main__":
    main()
