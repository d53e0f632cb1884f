"""Loading through `datasets` and batching: masks, eos, and a user's JSONL by the same path."""

import json

import pytest
import torch

from distill.common.errors import ConfigError
from distill.config import DataConfig
from distill.data import Example, ModeAlternatingBatches, collate, load_chat_dataset
from distill.students.chat import prompt_messages


def test_prompt_tokens_never_count_and_the_final_eos_always_does():
    eos = pad = 7  # pad == eos, the case where other tools mask the eos away
    batch = collate([Example(prompt=[1, 2, 3], response=[4, 5, eos]), Example(prompt=[1, 2], response=[eos])],
                    pad_id=pad, max_length=64)
    # position t predicts input_ids[t + 1]
    assert batch.target_mask[0].tolist() == [False, False, True, True, True, False]
    assert batch.targets[0][batch.target_mask[0]].tolist() == [4, 5, eos]
    assert batch.target_mask[1].tolist() == [False, True, False, False, False, False]
    assert batch.targets[1][batch.target_mask[1]].tolist() == [eos]
    assert batch.num_targets == 4
    assert batch.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]


def test_teacher_topk_rows_line_up_with_their_target_positions():
    ids = torch.arange(3 * 2).view(3, 2)
    batch = collate([Example([1, 2], [4, 5, 6], ids, -ids.float())], pad_id=0, max_length=64)
    assert batch.topk_ids[0][batch.target_mask[0]].tolist() == ids.tolist()


def test_truncation_keeps_the_prompt_and_cuts_the_response():
    batch = collate([Example(prompt=[1, 2, 3], response=[4, 5, 6, 7])], pad_id=0, max_length=5)
    assert batch.input_ids.shape[1] == 5
    assert batch.targets[0][batch.target_mask[0]].tolist() == [4, 5]


def test_batches_alternate_modes_and_cover_every_example():
    examples = {"think": [Example([1], [2, 3, 4]) for _ in range(6)], "no_think": [Example([1], [9]) for _ in range(6)]}
    stream = ModeAlternatingBatches(examples, batch_size=3, pad_id=0, max_length=16, micro_batches=2)
    steps = [next(stream) for _ in range(3)]
    widths = [[mb.input_ids.shape[1] for mb in step] for step in steps]
    assert widths == [[4, 2], [4, 2], [4, 2]]


def test_user_jsonl_loads_by_the_same_path(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
             "answer": f"a{i}"} for i in range(30)]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    loaded = load_chat_dataset(DataConfig(source=str(path)), tmp_path)
    # One file: test and validation are held out of it (a tenth, a twentieth), disjoint from train.
    assert set(loaded) == {"train", "validation", "test"}
    assert (len(loaded["train"]), len(loaded["validation"]), len(loaded["test"])) == (26, 1, 3)
    splits = {name: {row["answer"] for row in loaded[name]} for name in loaded}
    assert not (splits["train"] & splits["test"] or splits["train"] & splits["validation"])
    assert prompt_messages(loaded["train"][0]["messages"]) == [loaded["train"][0]["messages"][0]]


def test_dataset_without_messages_column_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "hello"}\n')
    with pytest.raises(ConfigError, match="no 'messages' column"):
        load_chat_dataset(DataConfig(source=str(path)), tmp_path)


def test_builtin_task_is_written_once_and_loaded_with_datasets(tmp_path):
    cfg = DataConfig()
    cfg.arithmetic.train_size, cfg.arithmetic.validation_size, cfg.arithmetic.test_size = 50, 10, 10
    first = load_chat_dataset(cfg, tmp_path)
    files = sorted(p.name for p in (tmp_path / "data").rglob("*.jsonl"))
    second = load_chat_dataset(cfg, tmp_path)
    assert files == ["test.jsonl", "train.jsonl", "validation.jsonl"]
    assert [len(first[s]) for s in ("train", "validation", "test")] == [50, 10, 10]
    assert first["test"]["answer"] == second["test"]["answer"]


def test_the_bootstrap_renders_each_reference_reply_when_drawn_as_it_would_up_front(tmp_path, tokenizer):
    from distill.stages.teacher import ReferenceExamples
    from distill.students.chat import MODES, reference_reply, render_prompt, render_response

    cfg = DataConfig()
    cfg.arithmetic.train_size, cfg.arithmetic.validation_size, cfg.arithmetic.test_size = 40, 10, 10
    rows = load_chat_dataset(cfg, tmp_path)["train"]
    for mode in MODES:
        lazy = ReferenceExamples(rows, tokenizer, mode)
        assert len(lazy) == 40
        for index in (0, 17, 39):
            messages = rows[index]["messages"]
            assert lazy[index].prompt == render_prompt(tokenizer, prompt_messages(messages), mode)
            assert lazy[index].response == render_response(tokenizer, reference_reply(messages), mode)
    think, no_think = ReferenceExamples(rows, tokenizer, "think")[3], ReferenceExamples(rows, tokenizer, "no_think")[3]
    assert len(think.response) > len(no_think.response)    # the modes differ: reasoning vs an empty think block
