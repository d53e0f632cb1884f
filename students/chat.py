"""Chat in Qwen3's two modes: prompt rendering, and the one table of per-mode sampling the Qwen3
report recommends (every default that samples in a mode reads `MODE_SAMPLING`).

Teacher, student and eval all render prompts through `render_prompt`, so every model sees the
same prompt tokens for the same conversation and mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the config (which reads MODE_SAMPLING) need not import transformers
    from transformers import PreTrainedTokenizerBase

MODES = ("think", "no_think")


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int   # 0: no top-k truncation

    def describe(self) -> str:
        """"T 0.6 / top-p 0.95 / top-k 20", as model cards write it."""
        return f"T {self.temperature} / top-p {self.top_p} / top-k {self.top_k or 'off'}"


# Qwen3 model cards: thinking T 0.6 / top-p 0.95 / top-k 20; non-thinking T 0.7 / 0.8 / 20.
MODE_SAMPLING = {
    "think": Sampling(temperature=0.6, top_p=0.95, top_k=20),
    "no_think": Sampling(temperature=0.7, top_p=0.8, top_k=20),
}

# Qwen3's thinking-budget sentence, inserted when the reasoning reaches its budget.
STOP_THINKING = (
    "Considering the limited time by the user, I have to give the solution based on the thinking directly now.\n</think>.\n\n"
)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; valid: {', '.join(MODES)}")
    return mode


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], mode: str) -> list[int]:
    """Token ids of the conversation plus the assistant generation prompt in `mode`.

    In no_think mode the template pre-fills an empty think block, as Qwen3's does.
    """
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=check_mode(mode) == "think", tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_response(tokenizer: PreTrainedTokenizerBase, content: str, mode: str) -> list[int]:
    """Token ids of a reference assistant reply, continuing `render_prompt`, ending in eos.

    In think mode the reply carries its own think block; in no_think mode the (empty) block is
    already in the prompt, so the reply is the answer alone. Either way, prompt + reply equals
    the template's rendering of the whole training sample (minus the trailing newline).
    """
    if check_mode(mode) == "no_think" and "</think>" in content:
        content = content.split("</think>")[-1].lstrip("\n")
    ids = tokenizer(content, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation up to (not including) its final assistant turn."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    return [{"role": m["role"], "content": m["content"]} for m in messages[:end]]


def reference_reply(messages: list[dict]) -> str | None:
    """The final assistant turn's text, if the conversation ends with one."""
    return messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else None
