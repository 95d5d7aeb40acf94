"""Re-running into an existing output never mixes two runs' records.

    undo evaluate --model student_0 --input val.jsonl --output preds.jsonl
    undo evaluate --model student_1 --input val.jsonl --output preds.jsonl     # refused: model differs
    undo evaluate --model student_1 --input val.jsonl --output preds.jsonl --overwrite

Every resumable output (generate, evaluate, refine: stages/generation_loop.py) gets
`<stem>.run.json` recording what produced it; an identical re-run resumes, a
different one is refused naming the keys, and `--overwrite` starts over. A file
this stage did not write (no sidecar) is never resumed into, so a torn-looking
last line is only dropped from the stage's own output. Metrics are named after
the predictions, so two evaluations in one folder keep both.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_jsonl



def _problems(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "val.jsonl", [{"id": f"v{i}", "question": f"What is {i} plus 1?", "answer": str(i + 1)}
                                           for i in range(3)])


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.slow
def test_a_different_model_is_refused_and_overwrite_starts_over(tmp_path, undo, tiny_model, tiny_teacher):
    val = _problems(tmp_path)
    preds = tmp_path / "preds.jsonl"
    first = undo("evaluate", "--model", tiny_model, "--input", val, "--output", preds, "--max-tokens", "3")
    assert first.returncode == 0, first.stderr
    before, metrics_before = preds.read_bytes(), (tmp_path / "preds.metrics.json").read_bytes()
    recorded = json.loads((tmp_path / "preds.run.json").read_text())["identity"]
    assert recorded["model"] == str(tiny_model) and recorded["stage"] == "evaluate" and recorded["max_tokens"] == 3

    # The same command resumes (nothing left to do).
    again = undo("evaluate", "--model", tiny_model, "--input", val, "--output", preds, "--max-tokens", "3")
    assert again.returncode == 0, again.stderr
    assert "3 of 3 already done" in _flat(again.stderr)

    # Another model into the same file: refused, naming what changed, nothing touched.
    other = undo("evaluate", "--model", tiny_teacher, "--input", val, "--output", preds, "--max-tokens", "5")
    assert other.returncode == 2
    err = _flat(other.stderr)
    assert "Traceback" not in other.stderr and "different run" in err
    assert "model:" in err and "max_tokens: 3 -> 5" in err and "--overwrite" in err
    assert preds.read_bytes() == before and (tmp_path / "preds.metrics.json").read_bytes() == metrics_before

    # A different input file is a different run too.
    write_jsonl(tmp_path / "val2.jsonl", [{"id": "v0", "question": "What is 7 plus 1?", "answer": "8"}])
    changed = undo("evaluate", "--model", tiny_model, "--input", tmp_path / "val2.jsonl", "--output", preds,
                   "--max-tokens", "3")
    assert changed.returncode == 2 and "the problems of --input differ from those it was made from" in _flat(changed.stderr)

    # --overwrite: the new model's predictions and metrics only.
    over = undo("evaluate", "--model", tiny_teacher, "--input", val, "--output", preds, "--max-tokens", "5",
                "--overwrite")
    assert over.returncode == 0, over.stderr
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 3 and {r["model"] for r in rows} == {str(tiny_teacher)}
    assert json.loads((tmp_path / "preds.metrics.json").read_text())["model"] == str(tiny_teacher)
    assert json.loads((tmp_path / "preds.run.json").read_text())["identity"]["model"] == str(tiny_teacher)


@pytest.mark.slow
def test_two_evaluations_in_one_folder_keep_both_metrics(tmp_path, undo, tiny_model, tiny_teacher):
    val = _problems(tmp_path)
    for name, model in (("s0.jsonl", tiny_model), ("s1.jsonl", tiny_teacher)):
        result = undo("evaluate", "--model", model, "--input", val, "--output", tmp_path / name, "--max-tokens", "2")
        assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "s0.metrics.json").read_text())["model"] == str(tiny_model)
    assert json.loads((tmp_path / "s1.metrics.json").read_text())["model"] == str(tiny_teacher)
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["generate", "evaluate", "refine"])
@pytest.mark.parametrize("content", [b"my notes, not JSON", b'{"id": "x", "question": "q", "answer": "1"}\n'],
                         ids=["one-line-not-json", "someone-elses-jsonl"])
def test_a_file_this_stage_did_not_write_is_never_truncated(tmp_path, undo, stage, content):
    # Refused before any model loads: the model folder only has to exist (it holds no weights).
    val = _problems(tmp_path)
    (tmp_path / "model").mkdir()
    target = tmp_path / "notes.txt"
    target.write_bytes(content)
    if stage == "refine":
        errors = write_jsonl(tmp_path / "errors.jsonl", [{"id": "v0", "question": "What is 0 plus 1?", "answer": "1",
                                                     "output": "2", "error_type": "wrong_answer"}])
        targets = write_jsonl(tmp_path / "r.jsonl", [{"id": "v0#0", "problem_id": "v0", "question": "What is 0 plus 1?",
                                                 "answer": "1", "rationale": "0 + 1 = 1\n#### 1"}])
        args = ["refine", "--teacher", tmp_path / "model", "--errors", errors, "--targets", targets,
                "--select", "errors"]
    else:
        args = [stage, "--teacher" if stage == "generate" else "--model", tmp_path / "model", "--input", val]
    result = undo(*args, "--output", target)
    assert result.returncode == 2, result.stderr
    err = _flat(result.stderr)
    assert "Traceback" not in result.stderr
    assert f"{target}" in err and "was not written by" in err and "--overwrite" in err
    assert target.read_bytes() == content  # never truncated, never appended to
    assert not (tmp_path / "notes.txt.run.json").exists()


def test_overwrite_is_a_config_field_with_help():
    from dataclasses import fields

    from undo_cli.stages.evaluate import EvaluateConfig
    from undo_cli.stages.generate import GenerateConfig
    from undo_cli.stages.refine import RefineConfig

    for cls in (GenerateConfig, EvaluateConfig, RefineConfig):
        field = {f.name: f for f in fields(cls)}["overwrite"]
        assert field.default is False and field.metadata["help"]


def test_a_resumed_run_removes_the_temp_files_a_killed_run_left_and_only_those(tmp_path, tiny_model):
    """A run killed mid-write leaves `.rationales.jsonl.XXXXXXXX.tmp` (and the same for its sidecars) behind; the
    resumed run deletes those of its own output and sidecars, never another output's nor a live writer's."""
    import fcntl

    from undo_cli.stages.generate import GenerateConfig, run

    config = GenerateConfig(teacher=str(tiny_model), input=str(_problems(tmp_path)), output=str(tmp_path / "r.jsonl"),
                            keep="all", max_tokens=2)
    run(config)
    # What SIGKILL in the middle of an atomic write of each file leaves (mkstemp's names).
    stale = [f".r.{suffix}.{tag}.tmp" for suffix, tag in (("jsonl", "k3j2_x9a"), ("run.json", "a8f0q1zz"),
                                                          ("usage.json", "0000abcd"), ("rejected.jsonl", "zz_9y8x7"))]
    for name in stale:
        (tmp_path / name).write_text("{")
    other = tmp_path / ".s.jsonl.k3j2_x9a.tmp"  # another output's (a concurrent shard's) temp
    other.write_text("{")
    live = tmp_path / ".r.usage.json.live_123.tmp"  # being written by a live process right now
    live.write_text("{")
    with live.open() as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        summary = run(config)  # the same command: a resume with nothing left to do
    assert summary["already_done"] == 3
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == sorted([other.name, live.name])
