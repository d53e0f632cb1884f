"""Score a model in thinking and non-thinking modes on problems with checkable answers.

For each mode: accuracy, mean thinking tokens (inside the think block), mean answer tokens
(after it), truncation rate (no eos within the budget) and format errors (no closing </think>
or no answer), counted apart from wrong answers. Greedy decoding by default, so numbers are
reproducible; the same function runs inside training and at the end of the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.chat import MODE_SAMPLING, render_prompt
from distill.generation import generate

Checker = Callable[[str, str], bool]
Extractor = Callable[[str], "str | None"]


@dataclass
class ModeResult:
    accuracy: float
    mean_thinking_tokens: float
    mean_answer_tokens: float
    truncated: float
    format_errors: float
    samples: list[dict] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "mean_thinking_tokens": self.mean_thinking_tokens,
                "mean_answer_tokens": self.mean_answer_tokens, "truncated": self.truncated,
                "format_errors": self.format_errors}


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict]],
             answers: list[str], *, modes: list[str], checker: Checker, extractor: Extractor,
             max_new_tokens: int, batch_size: int = 256, sampled: bool = False, seed: int = 0,
             desc: str = "eval", progress: bool = True) -> dict[str, ModeResult]:
    end_think = tokenizer.convert_tokens_to_ids("</think>")
    results = {}
    for mode in modes:
        rendered = [render_prompt(tokenizer, messages, mode) for messages in prompts]
        generations = generate(model, tokenizer, rendered, max_new_tokens=max_new_tokens,
                               sampling=MODE_SAMPLING[mode] if sampled else None, batch_size=batch_size, seed=seed,
                               desc=f"{desc} ({mode})", progress=progress)
        samples = []
        for messages, answer, generation in zip(prompts, answers, generations):
            ids = generation.ids[:-1] if generation.finished else generation.ids
            if end_think in ids:
                cut = ids.index(end_think)
                thinking, answer_ids = cut, len(ids) - cut - 1
            else:
                thinking, answer_ids = (len(ids), 0) if mode == "think" else (0, len(ids))
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if mode == "no_think":
                text = "<think>\n\n</think>\n\n" + text  # the pre-filled block belongs to the reply
            predicted = extractor(text)
            samples.append({
                "prompt": messages[-1]["content"], "response": text, "reference": answer, "predicted": predicted,
                "correct": bool(predicted is not None and checker(text, answer)), "finished": generation.finished,
                "thinking_tokens": thinking, "answer_tokens": answer_ids,
            })
        n = max(1, len(samples))
        results[mode] = ModeResult(
            accuracy=sum(s["correct"] for s in samples) / n,
            mean_thinking_tokens=sum(s["thinking_tokens"] for s in samples) / n,
            mean_answer_tokens=sum(s["answer_tokens"] for s in samples) / n,
            truncated=sum(not s["finished"] for s in samples) / n,
            format_errors=sum(s["predicted"] is None for s in samples) / n,
            samples=samples,
        )
    return results


def markdown_table(results: dict[str, dict[str, ModeResult]]) -> str:
    """model x mode: accuracy, mean thinking tokens, mean answer tokens, truncation, format errors."""
    lines = ["| model | mode | accuracy | thinking tokens | answer tokens | truncated | format errors |",
             "|---|---|---|---|---|---|---|"]
    for model, per_mode in results.items():
        for mode, r in per_mode.items():
            lines.append(f"| {model} | {mode} | {100 * r.accuracy:.1f}% | {r.mean_thinking_tokens:.1f} | "
                         f"{r.mean_answer_tokens:.1f} | {100 * r.truncated:.1f}% | {100 * r.format_errors:.1f}% |")
    return "\n".join(lines)
