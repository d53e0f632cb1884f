"""The built-in tokenizer: Qwen3's special tokens and the six chat-template test vectors."""

import pytest
from transformers import AutoTokenizer

from distill.students.chat import render_prompt, render_response
from distill.students.tokenizer import CHAT_TEMPLATE

# ../shared/reference/qwen3.md, "Expected renderings of the official template".
VECTORS = [
    ([{"role": "user", "content": "Hi"}], dict(add_generation_prompt=True),
     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ([{"role": "user", "content": "Hi"}], dict(add_generation_prompt=True, enable_thinking=True),
     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ([{"role": "user", "content": "Hi"}], dict(add_generation_prompt=True, enable_thinking=False),
     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    ([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nreason1\n</think>\n\nA1"},
      {"role": "user", "content": "Q2 /no_think"}], dict(add_generation_prompt=True),
     "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2 /no_think<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], {},
     "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nR\n</think>\n\nA"}], {},
     "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": "R"}], {},
     "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n"),
]


@pytest.mark.parametrize("messages, kwargs, expected", VECTORS)
def test_template_renders_the_qwen3_vectors(tokenizer, messages, kwargs, expected):
    assert tokenizer.apply_chat_template(messages, tokenize=False, **kwargs) == expected


def test_system_message_comes_first(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


def test_special_tokens_mirror_qwen3(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    assert ids == [256, 257, 258, 259, 260]
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert len(tokenizer) == 261
    text = "<think>\n3+4=7\n</think>\n\n7<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 259 in ids and 260 in ids and ids[-1] == 258
    # <think> / </think> are not special: skip_special_tokens keeps them, as in Qwen3.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\n3+4=7\n</think>\n\n7"


def test_any_text_round_trips_through_bytes(tokenizer):
    text = "héllo wörld ✓ 7*3-2 mod 10\n\ttabs"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < 256 and tokenizer.decode(ids) == text


def test_saved_tokenizer_loads_with_plain_transformers(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == CHAT_TEMPLATE
    for messages, kwargs, expected in VECTORS:
        assert loaded.apply_chat_template(messages, tokenize=False, **kwargs) == expected
    assert loaded("<think>7</think>")["input_ids"] == tokenizer("<think>7</think>")["input_ids"]


@pytest.mark.parametrize("mode", ["think", "no_think"])
def test_prompt_plus_response_is_the_rendered_training_sample(tokenizer, mode):
    sample = [{"role": "user", "content": "3+4 mod 10"}, {"role": "assistant", "content": "<think>\n3+4=7\n</think>\n\n7"}]
    ids = render_prompt(tokenizer, sample[:1], mode) + render_response(tokenizer, sample[1]["content"], mode)
    expected = sample if mode == "think" else [sample[0], {"role": "assistant", "content": "7"}]
    rendered = tokenizer.apply_chat_template(expected, tokenize=False).rstrip("\n")
    assert tokenizer.decode(ids) == rendered
