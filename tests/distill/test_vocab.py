"""Teacher and student share one vocabulary up to padding, or are refused with one clear line."""

import pytest
from transformers import PreTrainedTokenizerFast

from distill.losses.vocab import VocabularyMismatch, check_logit_width, shared_vocabulary


def test_the_same_tokenizer_shares_its_whole_real_vocabulary(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert shared_vocabulary(tokenizer, reloaded) == len(tokenizer) == 261


def test_different_tokenizers_are_refused_naming_the_first_differing_id(tokenizer, foreign_tokenizer):
    with pytest.raises(VocabularyMismatch) as error:
        shared_vocabulary(tokenizer, foreign_tokenizer)
    message = str(error.value)
    assert "differ at id 0" in message and "teacher's tokenizer" in message and "\n" not in message


def test_a_model_narrower_than_the_vocabulary_is_refused():
    check_logit_width("student", 272, 261)
    with pytest.raises(VocabularyMismatch, match="do not belong together"):
        check_logit_width("student", 256, 261)
