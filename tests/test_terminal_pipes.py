"""The README pipelines run in a real terminal: stderr a TTY, stdout a pipe.

    set -o pipefail
    undo evaluate --model S --input val.jsonl --output - | undo collect-errors - > errors.jsonl

In a terminal rich's progress bar swaps `sys.stdout` for a proxy while it runs.
The writer used to compare its handle with `sys.stdout` to decide whether to
fsync, so under a terminal it fsynced the pipe (EINVAL) after the first batch.
Tests without a pseudo-terminal never saw it; these run each pipeline with
stdin, stdout and stderr on a pty (Python's `pty`), as a person's shell does.
"""

from __future__ import annotations

import json
import os
import pty
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import read_terminal, write_jsonl

UNDO = f"{shlex.quote(sys.executable)} -m undo_cli"


def _problems(path: Path, n: int = 6) -> Path:
    rows = [{"id": f"t{i}", "question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(n)]
    write_jsonl(path, rows)
    return path


def run_in_terminal(script: str, cwd: Path, timeout: float = 600) -> tuple[int, str]:
    """Run `bash -c script` with its stdin/stdout/stderr on a pseudo-terminal; (exit code, what the screen showed)."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(["bash", "-c", script], stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                            start_new_session=True)
    os.close(slave)
    reader, screen = read_terminal(master)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=30)
        os.close(master)
    return code, screen.decode("utf-8", errors="replace")


def test_the_pty_is_a_terminal_for_rich(tmp_path):
    # The premise of every test below: rich sees a terminal (so its progress bar redirects stdout).
    code, screen = run_in_terminal(f"{shlex.quote(sys.executable)} -c "
                                   "'from undo_cli.console import console; print(console.is_terminal)'", tmp_path)
    assert code == 0 and "True" in screen


@pytest.mark.slow
@pytest.mark.parametrize("output_flag", ["--output -", ""], ids=["output-dash", "output-forgotten"])
def test_evaluate_into_collect_errors_in_a_terminal(tmp_path, tiny_model, output_flag):
    _problems(tmp_path / "val.jsonl")
    script = (f"set -o pipefail; {UNDO} evaluate --model {shlex.quote(str(tiny_model))} --input val.jsonl "
              f"{output_flag} --max-tokens 4 --batch-size 2 | {UNDO} collect-errors - > errors.jsonl")
    code, screen = run_in_terminal(script, tmp_path)
    assert code == 0, screen[-3000:]
    assert "Traceback" not in screen and "Invalid argument" not in screen
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    # Every prediction reached the pipe (3 batches of 2), none went to the screen instead.
    assert sorted(e["id"] for e in errors) == [f"t{i}" for i in range(6)]
    assert '"error_type"' not in screen
    assert not list(tmp_path.glob("*metrics.json")) and not list(tmp_path.glob("*.run.json"))


@pytest.mark.slow
def test_generate_into_a_pipe_in_a_terminal(tmp_path, trained_teacher):
    from tests.conftest import TAUGHT_PROBLEMS

    rows = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS[:6]]
    write_jsonl(tmp_path / "train.jsonl", rows)
    # --prompt student: the tiny teacher was overfit on that template's text, so it writes verified rationales.
    script = (f"set -o pipefail; {UNDO} generate --teacher {shlex.quote(str(trained_teacher))} --input train.jsonl "
              f"--output - --prompt student --max-tokens 48 --batch-size 2 | cat > rationales.jsonl")
    code, screen = run_in_terminal(script, tmp_path)
    assert code == 0, screen[-3000:]
    assert "Traceback" not in screen and "Invalid argument" not in screen
    kept = [json.loads(line) for line in (tmp_path / "rationales.jsonl").read_text().splitlines()]
    assert sorted(r["problem_id"] for r in kept) == sorted(r["id"] for r in rows)
    assert '"rationale"' not in screen  # JSONL went down the pipe, not onto the screen
