"""evaluate -> collect-errors -> refine, as a user runs them: separate commands, a bash pipe, a server.

The student is `trained_teacher` evaluated on two questions it was taught
(answered correctly) and two it was not (answered wrongly, `#### N`); the
refinement targets are worked solutions of the other taught questions, shaped
as `undo generate` writes them. See tests/test_refine.py for why the verified
refinements use a template that shows the question in the taught format.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from tests.conftest import TAUGHT_PROBLEMS, read_jsonl, write_jsonl
from tests.test_refine import TAUGHT_FORMAT_TEMPLATE, older, target

WIDE = {"COLUMNS": "400"}

VAL = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS[:2]] + [
    {"id": "u1", "question": "Sam has 3 apples and buys 9 more. How many apples does Sam have?", "answer": "12",
     "task": "math"},
    {"id": "u2", "question": "Sam has 8 apples and buys 8 more. How many apples does Sam have?", "answer": "16",
     "task": "math"},
]


def setup_files(tmp_path):
    write_jsonl(tmp_path / "val.jsonl", VAL)
    # Earlier, terser rationales of the other taught problems: what refine may replace.
    write_jsonl(tmp_path / "rationales.jsonl", [target(p, rationale=older(p)) for p in TAUGHT_PROBLEMS[2:]])
    (tmp_path / "taught_format.jinja").write_text(TAUGHT_FORMAT_TEMPLATE)


def check_errors(errors):
    assert sorted(e["id"] for e in errors) == ["u1", "u2"]
    for e in errors:
        assert e["error_type"] == "wrong_answer" and e["correct"] is False
        assert e["output"].strip().splitlines()[-1].startswith("####")  # the student's own words


def check_refined(refined, rationales_path):
    old = {r["id"]: r for r in read_jsonl(rationales_path)}
    taught = {p["id"]: p for p in TAUGHT_PROBLEMS}
    assert refined and all(r["id"] in old for r in refined)  # replaces targets by id
    for r in refined:
        ref = r["refinement"]
        assert ref["verified"] is True and ref["kept_previous"] is False
        assert r["rationale"] == taught[r["problem_id"]]["rationale"] and r["correct"] is True
        assert ref["previous_rationale"] == old[r["id"]]["rationale"]
        assert set(ref["informed_by"]) <= {"u1", "u2"} and ref["informed_by"]
        assert ref["iteration"] == 1 and ref["template"] == "taught_format"


@pytest.mark.slow
def test_separate_commands(tmp_path, trained_teacher, undo):
    setup_files(tmp_path)
    ev = undo("evaluate", "--model", trained_teacher, "--input", tmp_path / "val.jsonl",
              "--output", tmp_path / "predictions.jsonl", "--max-tokens", "40", env=WIDE)
    assert ev.returncode == 0, ev.stderr
    assert json.loads((tmp_path / "predictions.metrics.json").read_text())["accuracy"] == 0.5

    ce = undo("collect-errors", tmp_path / "predictions.jsonl", "--output", tmp_path / "errors.jsonl", env=WIDE)
    assert ce.returncode == 0, ce.stderr
    check_errors(read_jsonl(tmp_path / "errors.jsonl"))

    rf = undo("refine", "--teacher", trained_teacher, "--errors", tmp_path / "errors.jsonl",
              "--targets", tmp_path / "rationales.jsonl", "--output", tmp_path / "refined.jsonl",
              "--prompt", tmp_path / "taught_format.jinja", "--per-error", "2", "--max-tokens", "40", env=WIDE)
    assert rf.returncode == 0, rf.stderr
    refined = read_jsonl(tmp_path / "refined.jsonl")
    check_refined(refined, tmp_path / "rationales.jsonl")
    assert "refined and verified" in rf.stderr


@pytest.mark.slow
def test_bash_pipeline_with_dashes(tmp_path, trained_teacher):
    setup_files(tmp_path)
    undo = f"{shlex.quote(sys.executable)} -m undo_cli"
    script = (f"set -o pipefail; {undo} evaluate --model {shlex.quote(str(trained_teacher))} --input val.jsonl "
              f"--output - --max-tokens 40 | {undo} collect-errors - > errors.jsonl")
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    check_errors(read_jsonl(tmp_path / "errors.jsonl"))
    assert not list(tmp_path.glob("*metrics.json"))  # --output - writes no metrics file unless asked
    assert "accuracy" in proc.stderr and "wrong_answer" in proc.stderr  # both tables on stderr


@pytest.mark.slow
def test_through_a_real_openai_compatible_server(tmp_path, transformers_server, undo):
    """The same three steps with `--backend openai` against `transformers serve` on 127.0.0.1."""
    setup_files(tmp_path)
    server = ["--backend", "openai", "--base-url", transformers_server.base_url, "--concurrency", "4"]
    env = {**WIDE, "UNDO_TEST_KEY": "sk-test-not-a-real-key"}
    ev = undo("evaluate", "--model", transformers_server.model, "--input", tmp_path / "val.jsonl",
              "--output", tmp_path / "predictions.jsonl", "--max-tokens", "40", *server,
              "--api-key-env", "UNDO_TEST_KEY", env=env)
    assert ev.returncode == 0, ev.stderr
    preds = {r["id"]: r for r in read_jsonl(tmp_path / "predictions.jsonl")}
    assert preds["p00"]["correct"] and preds["p01"]["correct"]  # the server formats prompts the same way
    ce = undo("collect-errors", tmp_path / "predictions.jsonl", "-o", tmp_path / "errors.jsonl", env=WIDE)
    assert ce.returncode == 0, ce.stderr
    check_errors(read_jsonl(tmp_path / "errors.jsonl"))
    # refine reads the errors from stdin here ('-'), as in `... | undo refine --errors - ...`.
    rf = undo("refine", "--teacher", transformers_server.model, "--errors", "-",
              "--targets", tmp_path / "rationales.jsonl", "--output", tmp_path / "refined.jsonl",
              "--prompt", tmp_path / "taught_format.jinja", "--max-tokens", "40", *server,
              "--api-key-env", "UNDO_TEST_KEY", env=env, input=(tmp_path / "errors.jsonl").read_text())
    assert rf.returncode == 0, rf.stderr
    refined = read_jsonl(tmp_path / "refined.jsonl")
    check_refined(refined, tmp_path / "rationales.jsonl")
    assert all(r["backend"] == "openai" for r in refined)
    for path in ("predictions.jsonl", "predictions.metrics.json", "errors.jsonl", "refined.jsonl"):
        assert "sk-test-not-a-real-key" not in (tmp_path / path).read_text()  # the key never lands in artifacts
    assert "sk-test-not-a-real-key" not in ev.stderr + rf.stderr
