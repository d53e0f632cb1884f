"""The off-policy cache: round trip against the live teacher, resume after SIGKILL with no row
lost or duplicated, disjoint workers that merge, and refusals with one line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from distill.students.build import build_random
from distill.students.chat import MODE_SAMPLING, render_prompt
from distill.students.presets import get_preset
from distill.teachers.cache import CacheError, CacheSpec, finalize, prompts_hash, read_cache, tokenizer_hash, write_cache
from distill.teachers.transformers_backend import TransformersTeacher

K = 6
SHARD = 3


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("cache_teacher")
    arch = get_preset("tiny-moe").override(hidden_size=64, head_dim=16, moe_intermediate_size=64, num_hidden_layers=2)
    build_random(arch, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_teacher(folder, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return TransformersTeacher(model, tokenizer, name="tiny", progress=False)


def make_inputs(tokenizer, count=8):
    conversations = [[{"role": "user", "content": f"{i}*{i + 1}+3 mod 10"}] for i in range(count)]
    prompts = {mode: [render_prompt(tokenizer, c, mode) for c in conversations] for mode in ("think", "no_think")}
    spec = CacheSpec(teacher="tiny", tokenizer_hash=tokenizer_hash(tokenizer), k=K, modes=("think", "no_think"),
                     sampling={m: vars(s) for m, s in MODE_SAMPLING.items()}, seed=5, max_new_tokens=10,
                     prompts_hash=prompts_hash(prompts), num_prompts=count, shard_size=SHARD)
    return prompts, spec


def test_round_trip_keeps_every_row_and_the_teachers_distribution(teacher_dir, tokenizer, tmp_path):
    teacher = make_teacher(teacher_dir, tokenizer)
    prompts, spec = make_inputs(tokenizer)
    manifest = write_cache(teacher, prompts, tmp_path / "cache", spec, progress=False)
    assert manifest is not None and manifest.rows == 16 and len(manifest.shards) == 6
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["tokens"] == manifest.tokens
    examples = read_cache(tmp_path / "cache", tokenizer=tokenizer, keep_truncated=True)
    for mode in ("think", "no_think"):
        assert [e.prompt for e in examples[mode]] == prompts[mode]  # every row, in order, once
        # The stored top-k is the teacher's for the stored response, up to 16-bit rounding.
        live = teacher.top_k_logprobs(prompts[mode], [e.response for e in examples[mode]], K)
        for example, top in zip(examples[mode], live):
            assert torch.equal(example.top.ids, top.ids)
            torch.testing.assert_close(example.top.logprobs, top.logprobs, rtol=0, atol=2e-2)
            # ...and its mass is restored exactly: the top-k hold 1 - tail of the teacher's.
            torch.testing.assert_close(example.top.logprobs.exp().sum(-1), top.logprobs.exp().sum(-1),
                                       rtol=0, atol=1e-5)
    assert manifest.bytes_per_token > 0


WORKER = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from test_cache import make_inputs, make_teacher
from distill.students.tokenizer import build_tokenizer
from distill.teachers.cache import write_cache
tokenizer = build_tokenizer()
prompts, spec = make_inputs(tokenizer)
write_cache(make_teacher({folder!r}, tokenizer), prompts, {out!r}, spec, progress=False)
"""


def test_a_killed_run_resumes_and_ends_equal_to_an_uninterrupted_one(teacher_dir, tokenizer, tmp_path):
    teacher = make_teacher(teacher_dir, tokenizer)
    prompts, spec = make_inputs(tokenizer)
    write_cache(teacher, prompts, tmp_path / "whole", spec, progress=False)

    out = tmp_path / "killed"
    script = WORKER.format(root=os.getcwd(), tests=os.path.dirname(__file__), folder=str(teacher_dir), out=str(out))
    kills = 0
    for attempt in range(3):  # kill it a few times, at a later shard each time
        process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if len(list((out / "shards").glob("*.json"))) >= 2 * (attempt + 1):
                process.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.01)
        process.wait()
    assert kills >= 1, "the worker finished before it could be killed"
    manifest = write_cache(teacher, prompts, out, spec, progress=False)  # resume to the end
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert [s["sha256"] for s in manifest.shards] == [s["sha256"] for s in whole["shards"]]


def test_disjoint_workers_merge_into_the_same_cache(teacher_dir, tokenizer, tmp_path):
    teacher = make_teacher(teacher_dir, tokenizer)
    prompts, spec = make_inputs(tokenizer)
    single = write_cache(teacher, prompts, tmp_path / "single", spec, progress=False)
    assert write_cache(teacher, prompts, tmp_path / "pair", spec, worker=0, workers=2, progress=False) is None
    with pytest.raises(CacheError, match="missing or damaged"):
        finalize(tmp_path / "pair")
    merged = write_cache(teacher, prompts, tmp_path / "pair", spec, worker=1, workers=2, progress=False)
    assert [s["sha256"] for s in merged.shards] == [s["sha256"] for s in single.shards]


def test_damaged_shards_are_caught_and_regenerated(teacher_dir, tokenizer, tmp_path):
    teacher = make_teacher(teacher_dir, tokenizer)
    prompts, spec = make_inputs(tokenizer)
    manifest = write_cache(teacher, prompts, tmp_path / "c", spec, progress=False)
    shard = tmp_path / "c" / "shards" / manifest.shards[1]["name"]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CacheError, match="does not match its checksum"):
        read_cache(tmp_path / "c")
    repaired = write_cache(teacher, prompts, tmp_path / "c", spec, progress=False)
    assert [s['sha256'] for s in repaired.shards] == [s['sha256'] for s in manifest.shards]


def test_refusals_are_one_line(teacher_dir, tokenizer, foreign_tokenizer, tmp_path):
    teacher = make_teacher(teacher_dir, tokenizer)
    prompts, spec = make_inputs(tokenizer)
    write_cache(teacher, prompts, tmp_path / "c", spec, progress=False)
    other = CacheSpec(**{**spec.to_json(), "modes": spec.modes, "k": K + 1})
    with pytest.raises(CacheError, match=r"other settings \(k differ\)"):
        write_cache(teacher, prompts, tmp_path / "c", other, progress=False)
    with pytest.raises(CacheError, match="another tokenizer"):
        read_cache(tmp_path / "c", tokenizer=foreign_tokenizer)
    with pytest.raises(CacheError, match="fewer than the top-7"):
        read_cache(tmp_path / "c", k=K + 1)
    with pytest.raises(CacheError, match="no manifest.json"):
        read_cache(tmp_path)
