"""`undo evaluate`: scored predictions, <stem>.metrics.json, the training-time prompt, resume, bad input.

The "student" here is `trained_teacher` (tests/conftest.py): a tiny model
overfit on TAUGHT_PROBLEMS through `prompts.encode_example(student_messages(...))`,
i.e. exactly the formatting `undo train` uses. It answers those questions
correctly only if evaluate shows them in that same formatting, so a correct
answer here is also the check that training and evaluation format alike.
On questions it was not taught it writes a wrong `#### N`. `tiny_model`
(random weights) never answers: that covers no_answer and truncation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TAUGHT_PROBLEMS, read_jsonl, write_jsonl
from undo_cli.backends.stopping import CUT_SHORT

WIDE = {"COLUMNS": "400"}

UNTAUGHT = {"id": "u1", "question": "Sam has 3 apples and buys 9 more. How many apples does Sam have?",
            "answer": "12", "task": "math"}
CHOICE = {"id": "c1", "question": "Which number is even?", "answer": "B", "task": "choice", "choices": ["3", "4"]}


def problems():
    taught = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS[:2]]
    return taught + [UNTAUGHT, CHOICE]


def test_predictions_and_metrics(tmp_path, trained_teacher, capsys):
    from undo_cli.stages.evaluate import EvaluateConfig, run

    val = write_jsonl(tmp_path / "val.jsonl", problems())
    out = tmp_path / "eval" / "predictions.jsonl"
    summary = run(EvaluateConfig(model=str(trained_teacher), input=str(val), output=str(out), max_tokens=40))
    captured = capsys.readouterr()
    assert captured.out == ""  # records went to the file; stdout stays clean
    preds = {r["id"]: r for r in read_jsonl(out)}
    assert sorted(preds) == ["c1", "p00", "p01", "u1"]
    for p in problems():
        r = preds[p["id"]]
        assert {"id", "question", "answer", "task", "output", "predicted", "correct", "finish_reason", "model",
                "usage"} <= set(r)
        assert r["question"] == p["question"] and r["answer"] == p["answer"] and r["task"] == p["task"]
        assert r["model"] == str(trained_teacher) and r["usage"]["completion_tokens"] > 0
    # The taught questions come back verbatim: same prompt as in training, greedy decoding.
    for p in TAUGHT_PROBLEMS[:2]:
        assert preds[p["id"]]["output"] == p["rationale"]
        assert preds[p["id"]]["correct"] is True and preds[p["id"]]["finish_reason"] == "stop"
    assert preds["u1"]["correct"] is False and preds["u1"]["predicted"] not in (None, "12")
    assert preds["c1"]["choices"] == ["3", "4"]  # whatever it says about the choice question, it is scored as one

    metrics = json.loads((tmp_path / "eval" / "predictions.metrics.json").read_text())  # beside the output
    assert summary["metrics"] == metrics
    correct = sum(r["correct"] for r in preds.values())
    assert correct == 2 + preds["c1"]["correct"]
    assert metrics["count"] == 4 and metrics["correct"] == correct and metrics["accuracy"] == correct / 4
    # no_answer and truncated are collect-errors' classes: a cut-off output counts as truncated only.
    assert metrics["no_answer"] == sum(r["predicted"] is None and r["finish_reason"] not in CUT_SHORT
                                       for r in preds.values())
    assert metrics["truncated"] == sum(r["finish_reason"] in CUT_SHORT for r in preds.values())
    math_ids = ("p00", "p01", "u1")
    assert metrics["by_task"]["math"].items() >= {
        "count": 3, "correct": 2, "accuracy": 2 / 3,
        "no_answer": sum(preds[i]["predicted"] is None and preds[i]["finish_reason"] not in CUT_SHORT for i in math_ids),
        "truncated": sum(preds[i]["finish_reason"] in CUT_SHORT for i in math_ids)}.items()
    # Both extractions are reported; the taught rationales end in '#### N', so both read the same answers.
    assert metrics["verify"] == "strict" and metrics["accuracy"] == metrics["accuracy_strict"]
    assert metrics["accuracy_flexible"] >= metrics["accuracy_strict"]
    assert all(set(r["scores"]) == {"strict", "flexible"} for r in preds.values())
    assert metrics["by_task"]["choice"]["count"] == 1
    assert metrics["by_task"]["choice"]["correct"] == int(preds["c1"]["correct"])
    assert metrics["model"] == str(trained_teacher) and metrics["template"] == "student"
    # The tables on stderr.
    assert "accuracy" in captured.err and f"{correct} / 4" in captured.err and "truncated" in captured.err
    assert "strict" in captured.err and "flexible" in captured.err


def test_truncation_and_no_answer_are_counted(tmp_path, tiny_model):
    from undo_cli.stages.evaluate import EvaluateConfig, run

    val = write_jsonl(tmp_path / "val.jsonl", problems()[:2])
    out = tmp_path / "preds.jsonl"
    summary = run(EvaluateConfig(model=str(tiny_model), input=str(val), output=str(out), max_tokens=4))
    preds = read_jsonl(out)
    assert all(r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 4 for r in preds)
    m = json.loads((tmp_path / "preds.metrics.json").read_text())
    assert m["truncated"] == 2 and m["correct"] == 0 and m["no_answer"] == 0  # truncated, as collect-errors says
    assert summary["metrics"] == m


def test_resume_skips_done_ids_and_scores_the_whole_file(tmp_path, tiny_model):
    from undo_cli.stages.evaluate import EvaluateConfig, run

    val = write_jsonl(tmp_path / "val.jsonl", problems())
    out = tmp_path / "preds.jsonl"
    cfg = EvaluateConfig(model=str(tiny_model), input=str(val), output=str(out), max_tokens=8, batch_size=2)
    run(cfg)
    complete = read_jsonl(out)
    first_metrics = json.loads((tmp_path / "preds.metrics.json").read_text())

    # A killed run: two finished lines and a torn third one.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    summary = run(cfg)
    assert summary["already_done"] == 2 and summary["generated_for"] == 2
    resumed = read_jsonl(out)
    assert resumed[:2] == complete[:2]
    assert sorted(r["id"] for r in resumed) == sorted(r["id"] for r in complete)  # each id exactly once
    assert {r["id"]: r["output"] for r in resumed} == {r["id"]: r["output"] for r in complete}
    assert json.loads((tmp_path / "preds.metrics.json").read_text()) == first_metrics

    # Nothing left: the model is not even loaded, metrics are rewritten from the file.
    summary = run(cfg)
    assert summary["already_done"] == 4 and summary["generated_for"] == 0 and summary["backend"] is None


def test_stdout_output_writes_no_metrics_unless_asked(tmp_path, tiny_model, capsys, monkeypatch):
    from undo_cli.stages.evaluate import EvaluateConfig, run

    monkeypatch.chdir(tmp_path)
    val = write_jsonl(tmp_path / "val.jsonl", problems()[:2])
    run(EvaluateConfig(model=str(tiny_model), input=str(val), output="-", max_tokens=2))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["id"] for r in lines) == ["p00", "p01"]
    assert not list(tmp_path.glob("*.json"))
    run(EvaluateConfig(model=str(tiny_model), input=str(val), output="-", max_tokens=2,
                       metrics=str(tmp_path / "m" / "metrics.json")))
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["count"] == 2


def test_bad_inputs_exit_2_with_a_pointer(tmp_path, undo):
    bad = write_jsonl(tmp_path / "val.jsonl", [problems()[0], {"id": "x", "question": "q"}])
    proc = undo("evaluate", "--model", "unused", "--input", bad, "--output", tmp_path / "p.jsonl", env=WIDE)
    assert proc.returncode == 2 and "val.jsonl:2: field 'answer': missing" in proc.stderr
    assert not (tmp_path / "p.jsonl").exists() or (tmp_path / "p.jsonl").read_text() == ""

    good = write_jsonl(tmp_path / "good.jsonl", problems())
    proc = undo("evaluate", "--model", "m", "--input", good, "--backend", "openai", "--adapter", tmp_path, env=WIDE)
    assert proc.returncode == 2 and "--adapter" in proc.stderr and "--backend hf" in proc.stderr
    proc = undo("evaluate", "--model", "m", "--input", good, "--output", good, env=WIDE)
    assert proc.returncode == 2 and "is the input file" in proc.stderr


def test_a_log_file_gets_progress_lines_and_no_library_noise(tmp_path, tiny_model, capsys):
    from undo_cli.stages.evaluate import EvaluateConfig, run

    val = write_jsonl(tmp_path / "val.jsonl", problems()[:2])
    run(EvaluateConfig(model=str(tiny_model), input=str(val), output=str(tmp_path / "p.jsonl"), max_tokens=2,
                       batch_size=1))
    err = capsys.readouterr().err  # not a terminal: no live bar, plain lines at each 10% (and every 30 s)
    assert "evaluate: 1/2 (50%)" in err and "evaluate: 2/2 (100%)" in err
    assert "Loading weights" not in err and "top_k" not in err


def test_the_prompt_format_a_training_file_teaches():
    """undo_training.json's `prompt`: the student template, the question alone (messages data), or prompts of
    their own, which no template rebuilds."""
    from undo_cli.prompts import prompt_format

    q = {"question": "2+2?", "rationale": "4\n#### 4"}
    assert prompt_format([q, q], "student") == {"kind": "template", "template": "student"}
    plain = [{**q, "prompt_messages": [{"role": "user", "content": "2+2?"}]}]
    assert prompt_format(plain, "student") == {"kind": "question", "system": None}
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert prompt_format([{**q, "prompt_messages": system}] * 2, "student") == {"kind": "question", "system": "Be brief."}
    other = [{"role": "system", "content": "Be long."}, {"role": "user", "content": "2+2?"}]
    assert prompt_format([{**q, "prompt_messages": system}, {**q, "prompt_messages": other}], "student")["kind"] == "own"
    refine_like = [{**q, "prompt_messages": [{"role": "user", "content": "Re-teach: 2+2?"}]}]
    assert prompt_format(refine_like, "student")["kind"] == "own"
    assert prompt_format([q, plain[0]], "student")["kind"] == "mixed"


@pytest.mark.slow
def test_a_model_trained_on_messages_is_asked_the_way_it_learnt(tmp_path, tiny_teacher, undo_here):
    """`{"messages"}` data (the question alone as the prompt) -> undo train records it -> undo evaluate asks the
    question alone, and the model answers what it learnt; through the student template (the old behaviour,
    now --no-training-format with a warning) it does not."""
    import pytest

    pytest.importorskip("torch")
    chat = [{"id": p["id"], "answer": p["answer"],
             "messages": [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["rationale"]}]}
            for p in TAUGHT_PROBLEMS]
    data, model = write_jsonl(tmp_path / "chat.jsonl", chat), tmp_path / "student"
    code, err = undo_here("train", "--student", tiny_teacher, "--data", data, "--output", model, "--max-steps", "200",
                          "--batch-size", "12", "--lr", "3e-3", "--lr-scheduler", "constant", "--warmup-ratio", "0",
                          "--logging-steps", "200")
    assert code == 0, err
    assert json.loads((model / "undo_training.json").read_text())["prompt"] == {"kind": "question", "system": None}
    val = write_jsonl(tmp_path / "val.jsonl", problems()[:2])

    code, err = undo_here("evaluate", "--model", model, "--input", val, "--output", tmp_path / "asked.jsonl",
                          "--max-tokens", "40")
    assert code == 0, err
    assert 'trained on {"messages"}-style data whose prompt is the question alone' in err
    metrics = json.loads((tmp_path / "asked.metrics.json").read_text())
    assert metrics["template"] == "question" and metrics["correct"] == 2, read_jsonl(tmp_path / "asked.jsonl")

    code, err = undo_here("evaluate", "--model", model, "--input", val, "--output", tmp_path / "template.jsonl",
                          "--max-tokens", "40", "--no-training-format")
    assert code == 0, err
    assert "warning:" in err and "a prompt it never saw" in err
    assert json.loads((tmp_path / "template.metrics.json").read_text())["template"] == "student"
    # The same model and question, another prompt: the model was not taught to answer it.
    first = {r["id"]: r for r in read_jsonl(tmp_path / "template.jsonl")}
    assert any(r["output"] != a["output"] for a in read_jsonl(tmp_path / "asked.jsonl") for r in [first[a["id"]]])


def test_a_model_trained_on_prompts_of_its_own_gets_a_warning(tmp_path, tiny_model, undo_here):
    import shutil

    model = Path(shutil.copytree(tiny_model, tmp_path / "own"))
    (model / "undo_training.json").write_text(json.dumps({"prompt": {"kind": "own", "example": [
        {"role": "user", "content": "Re-teach this: ..."}]}}))
    val = write_jsonl(tmp_path / "val.jsonl", problems()[:1])
    code, err = undo_here("evaluate", "--model", model, "--input", val, "--output", tmp_path / "p.jsonl",
                          "--max-tokens", "4")
    assert code == 0, err
    assert "warning:" in err and "trained on prompts of its own" in err and "--rationale-field" in err
    (model / "undo_training.json").write_text(json.dumps({"prompt": {"kind": "template", "template": "student"}}))
    code, err = undo_here("evaluate", "--model", model, "--input", val, "--output", tmp_path / "q.jsonl",
                          "--max-tokens", "4")
    assert code == 0 and "was trained" not in err and "never saw" not in err  # the usual case says nothing
