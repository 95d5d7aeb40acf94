"""Every `next:` line a command prints runs as printed (issue 32): pasted into bash, it exits 0.

A walk through the stages one by one, as the README's "The stages, one by one" runs them, on tiny models
in a folder of its own, with relative paths as a person types them: each command's `next:` line is
collected and pasted, as printed, into a copy of the folder as it stood when the line was printed (so the
paste sees what its reader saw, and the walk goes on unchanged). Commands that cannot know their next
step whole (which teacher, which student, which problems) must print none. The bash loop
(examples/undo_loop.sh) runs its stages with UNDO_NEXT=0 and ends with `undo report`, whose line is
pasted too; the demo's own lines are pasted in tests/test_demo.py, iterate's in tests/test_iterate.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, TAUGHT_PROBLEMS, paste, run_undo, write_jsonl

pytestmark = pytest.mark.slow

WIDE = {"COLUMNS": "400"}  # one hint per line, however long its paths


def _next(stderr: str) -> list[str]:
    return [line[len("next: "):] for line in stderr.splitlines() if line.startswith("next: ")]


@pytest.fixture(scope="module")
def walk(tmp_path_factory, tiny_model, trained_teacher) -> dict:
    """Each command of the walk, run in one folder: {name: (its `next:` lines, the folder copied at that moment)}."""
    here = tmp_path_factory.mktemp("walk")
    work = here / "work"
    problems = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS[:8]]
    write_jsonl(work / "problems.jsonl", problems)
    teacher, student = str(trained_teacher), str(tiny_model)
    cache = str(here / "cache")
    steps = [
        ("import", ["data", "import", "problems.jsonl", "-o", "data", "--split", "train=0.5,val=0.25,test=0.25"]),
        ("check problems", ["check", "--teacher", teacher, "--student", student, "--data", "data/train.jsonl"]),
        ("generate", ["generate", "--teacher", teacher, "--input", "data/train.jsonl", "--output", "rationales.jsonl",
                      "--prompt", "student", "--max-tokens", "48", "--cache-dir", cache]),
        ("check rationales", ["check", "--teacher", teacher, "--student", student, "--data", "rationales.jsonl"]),
        ("train", ["train", "--student", student, "--data", "rationales.jsonl", "--output", "student",
                   "--max-steps", "2", "--batch-size", "4"]),
        ("evaluate", ["evaluate", "--model", "student", "--input", "data/val.jsonl", "--output",
                      "val/predictions.jsonl", "--max-tokens", "8"]),
        ("collect-errors", ["collect-errors", "val/predictions.jsonl", "--output", "errors.jsonl"]),
        ("refine", ["refine", "--teacher", teacher, "--errors", "errors.jsonl", "--targets", "rationales.jsonl",
                    "--output", "refined.jsonl", "--prompt", "student", "--max-tokens", "48", "--cache-dir", cache]),
        ("mix", ["mix", "--base", "rationales.jsonl", "--refined", "refined.jsonl", "--output", "train_data.jsonl"]),
        ("score to a file", ["score", "val/predictions.jsonl", "--output", "scored.jsonl"]),
        ("score to stdout", ["score", "val/predictions.jsonl"]),
        ("cache stats", ["cache", "stats", "--cache-dir", cache]),
    ]
    seen: dict = {}
    for i, (name, args) in enumerate(steps):
        proc = run_undo(*args, cwd=work, env=WIDE)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        copy = here / f"at-{i:02d}"
        shutil.copytree(work, copy, symlinks=True)
        seen[name] = (_next(proc.stderr), copy)
    return seen


# (command, what its `next:` line starts with; None: it must print none)
EXPECTED = [
    ("import", None),  # the teacher is not known yet
    ("check problems", "undo generate --teacher "),
    ("generate", None),  # the student is not known
    ("check rationales", "undo train --student "),
    ("train", None),  # the problems to evaluate on are not known
    ("evaluate", "undo collect-errors val/predictions.jsonl --output val/errors.jsonl"),
    ("collect-errors", "undo refine --teacher "),  # teacher and targets read from the files
    ("refine", "undo mix --base rationales.jsonl --refined refined.jsonl --output train_data.jsonl"),
    ("mix", None),  # the student is not known
    ("score to a file", "undo collect-errors scored.jsonl --output errors.jsonl"),
    ("score to stdout", "undo score val/predictions.jsonl --output scored.jsonl"),
    ("cache stats", "undo cache prune --older-than 30 --cache-dir "),
]


@pytest.mark.parametrize("name, expected", EXPECTED, ids=[name for name, _ in EXPECTED])
def test_each_next_line_runs_as_printed(walk, name, expected):
    lines, folder = walk[name]
    if expected is None:
        assert lines == [], lines
        return
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert "TEACHER" not in lines[0] and "STUDENT" not in lines[0]
    pasted = paste(lines[0], cwd=folder, env=WIDE)
    assert pasted.returncode == 0, (lines[0], pasted.stderr[-3000:])


def test_refine_is_told_the_teacher_and_the_data_the_student_was_trained_on(walk, trained_teacher):
    (line,), _ = walk["collect-errors"]
    assert line == (f"undo refine --teacher {trained_teacher} --max-tokens 48 --errors errors.jsonl "
                    "--targets rationales.jsonl --output refined.jsonl")  # the budget the rationales were written with


def test_the_bash_loop_prints_only_the_reports_line_and_it_runs(tmp_path, tiny_model, trained_teacher):
    """examples/undo_loop.sh runs each next step itself: its stages print no `next:`; its report does."""
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", [{k: p[k] for k in ("id", "question", "answer", "task")}
                                                      for p in TAUGHT_PROBLEMS[:4]]) for s in ("train", "val", "test")}
    args = ["--teacher", trained_teacher, "--student", tiny_model, "--train-file", files["train"],
            "--val-file", files["val"], "--test-file", files["test"], "--runs-dir", tmp_path / "runs",
            "--name", "bash", "--max-iterations", "0", "--no-cache", "--generate.prompt", "student",
            "--generate.max-tokens", "48", "--train.max-steps", "2", "--train.batch-size", "4",
            "--evaluate.max-tokens", "8"]
    import os
    import subprocess
    import sys

    proc = subprocess.run(["bash", str(REPO / "examples" / "undo_loop.sh"), *map(str, args)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, **WIDE, "UNDO": f"{sys.executable} -m undo_cli"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _next(proc.stderr)
    assert lines and all(line.startswith("undo report ") for line in lines), lines
    for line in lines:
        pasted = paste(line, cwd=tmp_path, env=WIDE)
        assert pasted.returncode == 0, (line, pasted.stderr[-3000:])
        assert (Path(tmp_path) / "runs" / "bash" / "report.html").is_file()
