"""`undo collect-errors`: every failure kept with the student's output, classified exactly.

The prediction files are written by hand so each class is covered on purpose:
a truncated output (finish_reason "length"), one with no extractable answer,
one with a wrong answer, and correct ones that must not appear.
"""

from __future__ import annotations

import json

import pytest
from tests.conftest import parse_jsonl, write_jsonl

WIDE = {"COLUMNS": "400"}  # rich wraps stderr at the terminal width; keep each message on one line

PREDICTIONS = [
    {"id": "v1", "question": "2 + 2?", "answer": "4", "task": "math", "output": "2 + 2 = 4\n#### 4",
     "predicted": "4", "correct": True, "finish_reason": "stop", "model": "m"},
    {"id": "v2", "question": "3 + 4?", "answer": "7", "task": "math", "output": "3 + 4 = 8\n#### 8",
     "predicted": "8", "correct": False, "finish_reason": "stop", "model": "m"},
    {"id": "v3", "question": "5 + 1?", "answer": "6", "task": "math", "output": "I am not sure.",
     "predicted": None, "correct": False, "finish_reason": "stop", "model": "m"},
    # Cut off mid-thought: also no answer, but the cause is the token budget.
    {"id": "v4", "question": "9 + 9?", "answer": "18", "task": "math", "output": "First we add 9 and",
     "predicted": None, "correct": False, "finish_reason": "length", "model": "m"},
    {"id": "v5", "question": "Pick the even one.", "answer": "B", "task": "choice", "choices": ["3", "4"],
     "output": "#### A", "predicted": "A", "correct": False, "finish_reason": "stop", "model": "m"},
    {"id": "v6", "question": "1 + 1?", "answer": "2", "task": "math", "output": "#### 2",
     "predicted": "2", "correct": True, "finish_reason": "stop", "model": "m"},
]
EXPECTED = {"v2": "wrong_answer", "v3": "no_answer", "v4": "truncated", "v5": "wrong_answer"}


def test_classes_and_fields_through_the_cli(tmp_path, undo):
    preds = write_jsonl(tmp_path / "predictions.jsonl", PREDICTIONS)
    out = tmp_path / "errors.jsonl"
    proc = undo("collect-errors", preds, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # the file got the records; stdout stays clean
    errors = parse_jsonl(out.read_text())
    assert {e["id"]: e["error_type"] for e in errors} == EXPECTED
    assert [e["id"] for e in errors] == ["v2", "v3", "v4", "v5"]  # input order
    by_id = {p["id"]: p for p in PREDICTIONS}
    for e in errors:  # the prediction unchanged, plus error_type: the student's own output survives
        assert {k: v for k, v in e.items() if k != "error_type"} == by_id[e["id"]]
    # Counts per class on stderr.
    assert "truncated" in proc.stderr and "no_answer" in proc.stderr and "wrong_answer" in proc.stderr
    assert "all errors of 6" in proc.stderr


def test_pipe_from_stdin_to_stdout(undo):
    stdin = "".join(json.dumps(p) + "\n" for p in PREDICTIONS)
    proc = undo("collect-errors", "-", input=stdin)
    assert proc.returncode == 0, proc.stderr
    assert {e["id"]: e["error_type"] for e in parse_jsonl(proc.stdout)} == EXPECTED


def test_unscored_predictions_are_scored_with_the_scorer(tmp_path):
    from undo_cli.stages.collect_errors import CollectErrorsConfig, run

    rows = [{"id": "a", "question": "q", "answer": "1,250", "output": "so the total is 1250.00\n#### 1250.00"},
            {"id": "b", "question": "q", "answer": "3", "output": "#### 5"},
            {"id": "c", "question": "q", "answer": "3", "output": "no idea"}]
    out = tmp_path / "errors.jsonl"
    summary = run(CollectErrorsConfig(predictions=str(write_jsonl(tmp_path / "p.jsonl", rows)), output=str(out)))
    errors = parse_jsonl(out.read_text())
    assert [(e["id"], e["error_type"], e["predicted"]) for e in errors] == [("b", "wrong_answer", "5"),
                                                                            ("c", "no_answer", None)]
    assert summary["correct"] == 1 and summary["by_type"] == {"no_answer": 1, "wrong_answer": 1, "truncated": 0}


def test_max_is_a_seeded_sample_independent_of_input_order(tmp_path):
    from undo_cli.stages.collect_errors import CollectErrorsConfig, run

    rows = [{"id": f"v{i:02d}", "question": "q", "answer": "1", "output": "#### 2", "predicted": "2",
             "correct": False, "finish_reason": "stop"} for i in range(20)]
    forward = write_jsonl(tmp_path / "forward.jsonl", rows)
    backward = write_jsonl(tmp_path / "backward.jsonl", rows[::-1])

    def sample(path, seed, name):
        out = tmp_path / name
        summary = run(CollectErrorsConfig(predictions=str(path), output=str(out), max=5, seed=seed))
        assert summary["errors"] == 20 and summary["kept"] == 5
        return [e["id"] for e in parse_jsonl(out.read_text())]

    a = sample(forward, 1, "a.jsonl")
    assert len(a) == 5 and a == sorted(a)  # input order kept
    assert sample(forward, 1, "again.jsonl") == a  # same seed, same sample
    assert sorted(sample(backward, 1, "b.jsonl")) == a  # the file's order does not change the sample
    seeds = {tuple(sample(forward, s, f"s{s}.jsonl")) for s in range(2, 6)}
    assert len(seeds) > 1  # the seed matters


def test_all_correct_gives_an_empty_file_and_success(tmp_path, undo):
    preds = write_jsonl(tmp_path / "p.jsonl", [p for p in PREDICTIONS if p["correct"]])
    out = tmp_path / "errors.jsonl"
    proc = undo("collect-errors", preds, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and out.read_text() == ""
    assert "nothing to refine" in proc.stderr


@pytest.mark.parametrize("bad_line, field", [
    ({"id": "x", "question": "q", "answer": "1"}, "output"),          # not a prediction
    ({"id": "x", "question": "q", "answer": "1", "output": 3}, "output"),
])
def test_bad_input_names_file_line_and_field(tmp_path, undo, bad_line, field):
    preds = write_jsonl(tmp_path / "p.jsonl", [PREDICTIONS[0], bad_line])
    proc = undo("collect-errors", preds, env=WIDE)
    assert proc.returncode == 2
    assert f"p.jsonl:2: field '{field}'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_max_must_be_positive(tmp_path, undo):
    preds = write_jsonl(tmp_path / "p.jsonl", PREDICTIONS)
    proc = undo("collect-errors", preds, "--max", "0", env=WIDE)
    assert proc.returncode == 2 and "--max 0" in proc.stderr


def test_evaluate_and_collect_errors_count_no_answer_alike():
    """The same predictions: evaluate's metrics and collect-errors' classes agree, for either extraction."""
    from undo_cli.stages.collect_errors import collect
    from undo_cli.stages.evaluate import compute_metrics

    # v4 is truncated *and* has no answer: both commands count it as truncated, not as no_answer.
    metrics = compute_metrics([dict(p) for p in PREDICTIONS], "flexible")
    errors = collect([dict(p) for p in PREDICTIONS])
    by_type = {t: sum(e["error_type"] == t for e in errors) for t in ("no_answer", "truncated", "wrong_answer")}
    assert metrics["no_answer"] == by_type["no_answer"] == 1
    assert metrics["truncated"] == by_type["truncated"] == 1
    assert metrics["count"] - metrics["correct"] == len(errors)
