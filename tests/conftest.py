"""Shared fixtures: offline environment, tiny real models, running the CLI.

Everything here is real: models are saved folders loaded by transformers,
the CLI runs as a subprocess exactly as a user's shell would run it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tiny models gain nothing from intra-op threads, and on a small shared CPU (CI has
# 2 cores, and tests run a server, the CLI and the test process at once) threads
# oversubscribe: the trained_teacher fixture took 29 s with one thread and 4-7 min
# with two under load. Set before torch is imported; subprocesses inherit it.
# Export OMP_NUM_THREADS yourself to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
# No hub at test time, from the first import on: huggingface_hub reads HF_HUB_OFFLINE once, when it is
# imported (test modules import transformers while they are collected, before any fixture runs), and
# online it retries an unreachable hub for tens of seconds per model name.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Real servers on 127.0.0.1 (transformers serve, a scripted fault server) as fixtures: see tests/servers.py.
pytest_plugins = ["tests.servers"]


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    """No hub at test time; an HF_HOME of our own (transformers serve needs $HF_HOME/hub)."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    (hf_home / "hub").mkdir()
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM",
                                            "XDG_CACHE_HOME")}
    # XDG_CACHE_HOME: the teacher cache of module-scoped runs (each test gets its own, teacher_cache_home).
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(hf_home), TOKENIZERS_PARALLELISM="false",
                      XDG_CACHE_HOME=str(tmp_path_factory.mktemp("xdg_cache_session")))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def teacher_cache_home(tmp_path_factory, monkeypatch):
    """Each test its own teacher cache (undo_cli/economy): a cached answer from another test would hide
    the requests a test means to send, and nothing may land in the real ~/.cache. UNDO_CACHE_DIR would take
    precedence (and hold converted GGUF models): unset, a test that wants one sets its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
    monkeypatch.delenv("UNDO_CACHE_DIR", raising=False)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from undo_cli.tiny import train_tokenizer

    return train_tokenizer([])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_tokenizer) -> Path:
    """A ~0.4M-parameter Llama with a chat template, saved to a folder (the 'student')."""
    from undo_cli.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "student", tokenizer=tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_tokenizer) -> Path:
    """A slightly larger model with the same tokenizer as `tiny_model` (the 'teacher')."""
    from undo_cli.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "teacher", tokenizer=tiny_tokenizer,
                            num_layers=3, seed=1)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """`rows` as a JSONL file at `path` (its folder created): the one helper tests write input files with."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file, blank lines skipped: the one helper tests read outputs with."""
    return parse_jsonl(Path(path).read_text(encoding="utf-8"))


def parse_jsonl(text: str) -> list[dict]:
    """The records of JSONL text (a command's stdout), blank lines skipped."""
    import json

    return [json.loads(line) for line in text.splitlines() if line.strip()]


def sigint_default() -> None:
    """`preexec_fn` for a child a test interrupts (Ctrl-C, SIGINT): SIGINT back to its default disposition.

    A suite started as a background job of a non-interactive shell (`bash .ci/run &`) inherits SIGINT ignored, an
    ignored signal stays ignored across exec, and a Python started with SIGINT ignored installs no
    KeyboardInterrupt handler: the child would never see the Ctrl-C. Popen's `restore_signals` resets only
    SIGPIPE, SIGXFZ and SIGXFSZ, so this does it for SIGINT.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_undo(*args: str, input: str | None = None, cwd: Path | None = None, env: dict | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `undo ARGS...` as a user would; returns the finished process (text mode)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "undo_cli", *map(str, args)], input=input, text=True,
                          capture_output=True, cwd=cwd, env=full_env, timeout=timeout)


def paste(command: str, *, cwd: Path | None = None, env: dict | None = None,
          timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command line undo printed (a `next:` or `continue with:` hint) exactly as a person pastes it into bash."""
    bin_dir = str(Path(sys.executable).parent)  # where `undo` is installed, first on PATH
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = bin_dir + os.pathsep + full_env.get("PATH", "")
    return subprocess.run(["bash", "-c", command], text=True, capture_output=True, cwd=cwd, env=full_env,
                          timeout=timeout)


def kill_after_first_line(args: list[str], output: Path, env: dict | None = None, timeout: float = 300) -> None:
    """Start `undo ARGS`, wait for its first durable line in `output`, then SIGKILL it (no warning): how resume
    tests find a stage mid-run."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "undo_cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while not (output.exists() and output.read_text().count("\n") >= 1):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no batch written"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def read_terminal(master: int):
    """Drain a pseudo-terminal's master side in a thread (a full buffer would block the child): (thread, bytes so far)."""
    import threading

    screen = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the slave side has exited
                return
            if not chunk:
                return
            screen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    return reader, screen


@pytest.fixture
def undo():
    return run_undo


@pytest.fixture
def undo_inproc(capfd):
    """`undo ARGS...` in this process, answered like `run_undo`: (returncode, stdout, stderr) at the file descriptors.

    For commands that fail before any model loads or work starts (bad input, refusals), where a
    subprocess adds only an interpreter start and imports (~1.5 s each). An exception that escapes
    the CLI is not caught here: the test fails with it, as a traceback would fail `run_undo`'s checks.
    """
    from undo_cli.cli.app import main
    from undo_cli.console import console

    def run(*args: object, env: dict | None = None, **_: object) -> subprocess.CompletedProcess:
        saved_env = {k: os.environ.get(k) for k in (env or {})}
        saved_width = console._width
        os.environ.update(env or {})
        console.width = int((env or {}).get("COLUMNS", 2000))  # no folding of long paths mid-word
        capfd.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            console._width = saved_width
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess([sys.executable, "-m", "undo_cli", *map(str, args)], code, out, err)
    return run


@pytest.fixture
def undo_here(capsys):
    """`undo ARGS...` in this process: for errors found before any training, where a subprocess only adds seconds.

    Returns (exit code, stderr with rich's line wrapping undone); the real command line is `main()` itself.
    """
    from undo_cli.cli.app import main

    def run(*args: object) -> tuple[int, str]:
        capsys.readouterr()
        with wide_console():
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as exc:
                code = exc.code
        return code, " ".join(capsys.readouterr().err.split())
    return run


@contextlib.contextmanager
def wide_console(width: int = 2000) -> Iterator[None]:
    """The CLI's console this wide while in process: rich folds a word longer than the width (a long tmp path,
    longer still under pytest-xdist) mid-word, which no whitespace joining undoes."""
    from undo_cli.console import console

    saved = console._width
    console.width = width
    try:
        yield
    finally:
        console._width = saved


# --- a tiny teacher that actually knows something ------------------------------------
# Random tiny models write noise, which is useless for testing `--keep correct`,
# verification or refinement. This fixture overfits the tiny teacher on a handful
# of worked solutions (a plain torch loop: test scaffolding, not the product's
# trainer) so that greedy decoding reproduces correct, scorable rationales.

def _arith_problem(i: int) -> dict:
    a, b = 2 + (i * 7) % 9, 1 + (i * 5) % 8
    return {
        "id": f"p{i:02d}",
        "question": f"Sam has {a} apples and buys {b} more. How many apples does Sam have?",
        "answer": str(a + b),
        "task": "math",
        "rationale": f"Sam starts with {a} apples. He buys {b} more, so {a} + {b} = {a + b}.\n#### {a + b}",
    }


TAUGHT_PROBLEMS = [_arith_problem(i) for i in range(12)]


def overfit(model_dir: Path, examples: list[dict], *, steps: int = 200, lr: float = 3e-3, seed: int = 0) -> Path:
    """Train `model_dir` in place until it reproduces `examples` (question -> rationale)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from undo_cli.prompts import encode_example, student_messages

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    encoded = [encode_example(tok, student_messages(ex), ex["rationale"]) for ex in examples]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tok.pad_token_id)
    labels = torch.full((len(encoded), width), -100)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention[row, : len(ids)] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny teacher (same tokenizer as `tiny_model`) that solves TAUGHT_PROBLEMS greedily."""
    from undo_cli.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("models") / "trained_teacher", tokenizer=tiny_tokenizer,
                            num_layers=2, seed=2)
    return overfit(path, TAUGHT_PROBLEMS)


# Rationales with the right final answer and a false step: what issue 20 saw a teacher write after learning
# the answers by heart but not the steps. `--verify strict` keeps them; `--verify steps` must not.
FALSE_STEP_PROBLEMS = [
    {"id": "fs0", "question": "Ann has 6 bags with 7 cookies in each bag. She gives away 14 cookies. "
                              "How many cookies are left?", "answer": "28", "task": "math",
     "rationale": "6 bags with 4 cookies each make 6 * 4 = 24 cookies. After giving away 21, 24 - 21 = 12 cookies "
                  "are left.\n#### 28",
     "step_error": "24 - 21 = 12"},
    {"id": "fs1", "question": "Ben has 3 boxes with 5 pens in each box. He buys 4 more pens. "
                              "How many pens does Ben have?", "answer": "19", "task": "math",
     "rationale": "The boxes hold 3 * 5 = 16 pens. With 4 more, 16 + 4 = 19 pens.\n#### 19",
     "step_error": "3 * 5 = 16"},
]


@pytest.fixture(scope="session")
def step_teacher(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny teacher that reproduces TAUGHT_PROBLEMS[:2] (true steps) and FALSE_STEP_PROBLEMS (false steps,
    right answers) greedily, shown the student template (a few seconds: 4 examples)."""
    from undo_cli.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("models") / "step_teacher", tokenizer=tiny_tokenizer,
                            num_layers=2, seed=3)
    return overfit(path, TAUGHT_PROBLEMS[:2] + FALSE_STEP_PROBLEMS, steps=150)


# --- a teacher with another tokenizer (cross-tokenizer objectives, `undo check`) ----------------

@pytest.fixture(scope="session")
def other_tokenizer():
    """Another byte-level BPE: other merges (trained on the taught rationales too), 400 tokens, ChatML specials."""
    from undo_cli.tiny import train_tokenizer

    return train_tokenizer([p["rationale"] for p in TAUGHT_PROBLEMS] * 3, vocab_size=400, flavor="chatml")


@pytest.fixture(scope="session")
def cross_teacher(tmp_path_factory, other_tokenizer) -> Path:
    """A tiny teacher with `other_tokenizer` that solves TAUGHT_PROBLEMS greedily (head_dim 32: vLLM serves it)."""
    from undo_cli.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("models") / "cross_teacher", tokenizer=other_tokenizer,
                            num_layers=2, seed=1)
    return overfit(path, TAUGHT_PROBLEMS)
