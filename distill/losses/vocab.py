"""Teacher and student must speak one vocabulary: check it, and find the real part they share.

Checkpoints of one family pad their embeddings differently (Qwen3: 151,669 real tokens in a
151,936-row embedding; some checkpoints pad to 152,064). Padding is harmless once both sides are
sliced to the real vocabulary; a different tokenizer is not, and must be refused, because top-k
ids and logits would then be compared token id by token id between unrelated tokens.
"""

from __future__ import annotations

from distill.common.errors import UserError


class VocabularyMismatch(UserError, ValueError):
    """Teacher and student tokenizers assign different tokens to the same ids."""


def shared_vocabulary(teacher_tokenizer, student_tokenizer) -> int:
    """The number of real tokens (ids 0..n-1) both tokenizers share; raises VocabularyMismatch,
    naming the first id where they differ, if they are not the same vocabulary."""
    teacher_vocab, student_vocab = _id_to_token(teacher_tokenizer), _id_to_token(student_tokenizer)
    if teacher_vocab == student_vocab:
        return len(teacher_vocab)
    for index in range(max(len(teacher_vocab), len(student_vocab))):
        theirs = teacher_vocab[index] if index < len(teacher_vocab) else None
        ours = student_vocab[index] if index < len(student_vocab) else None
        if theirs != ours:
            break
    raise VocabularyMismatch(
        f"teacher and student tokenizers differ at id {index} (teacher {theirs!r}, student {ours!r}; "
        f"{len(teacher_vocab)} vs {len(student_vocab)} tokens): distillation compares token ids, so the student "
        "must use the teacher's tokenizer; start it from the teacher's family or set data.tokenizer to the teacher's")


def check_logit_width(who: str, width: int, real_vocab: int) -> None:
    """A model whose output layer is narrower than the real vocabulary cannot be aligned."""
    if width < real_vocab:
        raise VocabularyMismatch(f"{who} has {width} output logits but the tokenizer has {real_vocab} real tokens: "
                                 "model and tokenizer do not belong together")


def _id_to_token(tokenizer) -> list[str | None]:
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    table: list[str | None] = [None] * (max(vocab.values()) + 1 if vocab else 0)
    for token, index in vocab.items():
        table[index] = token
    return table
