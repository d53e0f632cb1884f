"""Tokenizers: a real model's own, or the built-in task's byte-level one with Qwen3's special
tokens and chat template; and the token ids a model config carries.

Real models bring their own tokenizer and template; the built-in one exists so the embedded
default needs nothing from a hub. It mirrors Qwen3's layout on a small scale: 256 byte tokens
(so any text round-trips, as with Qwen's byte-level BPE), then the special tokens, then padding
rows in the embedding (Qwen3: 151,669 real tokens in a 151,936 embedding).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from distill.common.errors import ConfigError, first_line


@dataclass(frozen=True)
class TokenIds:
    """The ids a model config carries."""

    bos: int | None
    eos: int
    pad: int


# Qwen3's released configs: bos 151643, eos 151645 (<|im_end|>), pad 151643 (<|endoftext|>).
QWEN3_TOKEN_IDS = TokenIds(bos=151643, eos=151645, pad=151643)

# Same names and order as Qwen3; <think> and </think> are added tokens but NOT special, so
# decode(skip_special_tokens=True) keeps them, as Qwen3's tokenizer does.
ENDOFTEXT, IM_START, IM_END, THINK, END_THINK = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
)
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
REASONING_TOKENS = (THINK, END_THINK)
BYTE_TOKENS = 256
# The built-in tokenizer's ids as a model config carries them: no bos (as Qwen3's chat models),
# eos = <|im_end|>, pad = <|endoftext|>. (Its 261 real tokens sit in a 272-row embedding, padded
# to a multiple of 16 as Qwen3 pads 151,669 to 151,936: the tiny presets' vocab_size.)
BUILTIN_TOKEN_IDS = TokenIds(bos=None, eos=BYTE_TOKENS + 2, pad=BYTE_TOKENS)

# Qwen3's chat template behaviour, written for this project (no tool calls):
# - a system message first is rendered first;
# - an assistant turn's reasoning (reasoning_content, or the text inside <think>...</think>)
#   is kept only for turns after the last user query; earlier reasoning is dropped;
# - the final assistant turn after the last query always gets a think block, empty if it had
#   no reasoning (a non-thinking training sample keeps an empty block);
# - the generation prompt pre-fills an empty think block when enable_thinking is false.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = m.content if m.content is string else '' -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- if m.reasoning_content is string -%}{%- set reasoning = m.reasoning_content -%}"
    "{%- elif '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- else -%}{%- set reasoning = '' -%}{%- endif -%}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The built-in byte-level tokenizer ("builtin"), or a real model's own (path or hub name)."""
    if name == "builtin":
        return build_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load tokenizer '{name}' ({first_line(error)}); give a local folder "
                          "saved by save_pretrained, or a hub name with network access") from None


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (ids 0-255 are bytes) with Qwen3's specials at 256-260."""
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_unicode = sorted(byte_alphabet, key=_byte_order())
    vocab = {symbol: i for i, symbol in enumerate(byte_to_unicode)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=4096,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _byte_order():
    """Sort key placing ByteLevel's unicode symbol for byte b at id b."""
    table = _bytes_to_unicode()
    position = {symbol: b for b, symbol in table.items()}
    return lambda symbol: position[symbol]


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2 byte-to-printable-unicode map that ByteLevel uses: printable bytes map to
    # themselves, the rest to 256 + n in order.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table

