"""`undo generate` end to end, as a user runs it: keep correct/all, n > 1, resume after a kill, every error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TAUGHT_PROBLEMS, write_jsonl

pytestmark = pytest.mark.slow


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def problems(tmp_path) -> Path:
    """The 12 problems the teacher was taught, plus 3 whose gold answer is wrong on purpose (never verified)."""
    rows = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS]
    rows += [{**rows[i], "id": f"bad{i}", "answer": str(int(rows[i]["answer"]) + 100)} for i in range(3)]
    return write_jsonl(tmp_path / "problems.jsonl", rows)


def _generate(undo, teacher, problems, output, *extra, **kw):
    # --prompt student: the tiny teacher was overfit on that template's text.
    return undo("generate", "--teacher", teacher, "--input", problems, "--output", output,
                "--prompt", "student", "--max-tokens", "48", *extra, **kw)


def test_keep_correct_writes_verified_rationales_and_a_rejected_sidecar(undo, trained_teacher, problems, tmp_path):
    out = tmp_path / "rationales.jsonl"
    result = _generate(undo, trained_teacher, problems, out, "--logprobs", "2", "--iteration", "2")
    assert result.returncode == 0, result.stderr
    kept = _lines(out)
    assert sorted(r["problem_id"] for r in kept) == sorted(p["id"] for p in TAUGHT_PROBLEMS)
    by_id = {p["id"]: p for p in TAUGHT_PROBLEMS}
    for r in kept:
        assert r["id"] == f"{r['problem_id']}#0" and r["sample"] == 0
        assert r["correct"] is True and r["predicted"] == r["answer"]
        assert r["rationale"] == by_id[r["problem_id"]]["rationale"]
        assert r["teacher"] == str(trained_teacher) and r["backend"] == "hf" and r["template"] == "student"
        assert r["finish_reason"] == "stop" and r["iteration"] == 2
        assert r["usage"]["completion_tokens"] == len(r["teacher_logprobs"]) > 0
        assert all(len(t[2]) == 2 for t in r["teacher_logprobs"])
    rejected = _lines(tmp_path / "rationales.rejected.jsonl")
    assert sorted(r["problem_id"] for r in rejected) == ["bad0", "bad1", "bad2"]
    assert all(r["correct"] is False for r in rejected)
    assert "3 of 15 questions got no verified rationale" in " ".join(result.stderr.split())
    assert "bad0" in result.stderr and "verified" in result.stderr and "tokens in / out" in result.stderr
    assert result.stdout == ""  # JSONL went to the file; people read stderr

    # Re-running resumes: everything is done (rejected problems included), nothing is rewritten.
    before = out.read_bytes()
    again = _generate(undo, trained_teacher, problems, out, "--logprobs", "2", "--iteration", "2")
    assert again.returncode == 0, again.stderr
    assert "15 of 15 already done" in " ".join(again.stderr.split())
    assert out.read_bytes() == before


def test_keep_all_to_stdout_then_resume_over_a_torn_line(undo, trained_teacher, problems, tmp_path):
    result = _generate(undo, trained_teacher, problems, "-", "--keep", "all")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 15 and sum(r["correct"] for r in records) == 12
    assert not (tmp_path / "-.rejected.jsonl").exists()

    # A run killed mid-write leaves a torn last line: it is dropped, redone, never duplicated.
    # (Only from a file this stage wrote: its all.run.json sidecar says so.)
    out = tmp_path / "all.jsonl"
    assert _generate(undo, trained_teacher, problems, out, "--keep", "all").returncode == 0
    assert (tmp_path / "all.run.json").is_file()
    torn = "".join(json.dumps(r) + "\n" for r in records[:5]) + json.dumps(records[5])[:40]
    out.write_text(torn)
    resumed = _generate(undo, trained_teacher, problems, out, "--keep", "all")
    assert resumed.returncode == 0, resumed.stderr
    err = " ".join(resumed.stderr.split())
    assert "dropping a torn last line" in err and "5 of 15 already done" in err
    final = _lines(out)
    assert sorted(r["id"] for r in final) == sorted(r["id"] for r in records)
    assert {r["id"]: r["rationale"] for r in final} == {r["id"]: r["rationale"] for r in records}


def test_n_samples_per_problem(undo, tiny_model, problems, tmp_path):
    out = tmp_path / "n3.jsonl"
    args = ("--n", "3", "--temperature", "0.9", "--seed", "5", "--keep", "all", "--max-tokens", "8")
    result = undo("generate", "--teacher", tiny_model, "--input", problems, "--output", out, *args)
    assert result.returncode == 0, result.stderr
    rows = _lines(out)
    assert len(rows) == 45
    by_problem: dict[str, list] = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r)
    assert all(sorted(r["sample"] for r in v) == [0, 1, 2] for v in by_problem.values())
    assert all(r["id"] == f"{r['problem_id']}#{r['sample']}" for r in rows)
    assert any(len({r["rationale"] for r in v}) > 1 for v in by_problem.values())  # real samples, not copies


def test_resume_after_sigkill_loses_nothing_and_duplicates_nothing(tiny_model, tmp_path):
    rows = [{"id": f"k{i:03d}", "question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(48)]
    problems = write_jsonl(tmp_path / "many.jsonl", rows)
    out = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "undo_cli", "generate", "--teacher", str(tiny_model), "--input", str(problems),
           "--output", str(out), "--keep", "all", "--batch-size", "2", "--max-tokens", "16"]
    # The untrained tiny model writes whitespace, which even --keep all rejects: the rejected sidecar is
    # part of what resume trusts, so every problem is counted across both files.
    files = [out, tmp_path / "killed.rejected.jsonl"]

    def complete(path: Path) -> str:
        text = path.read_text() if path.exists() else ""
        return text[: text.rfind("\n") + 1]  # complete lines only: a torn tail is dropped and redone

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 300
        while sum(complete(p).count("\n") for p in files) < 4 and proc.poll() is None:
            assert time.monotonic() < deadline, "no records appeared"
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed; make it longer"
        proc.send_signal(signal.SIGKILL)  # no cleanup handlers run: the worst case
    finally:
        proc.wait(timeout=60)
    partials = [complete(p) for p in files]
    done_before = len({json.loads(line)["problem_id"] for part in partials for line in part.splitlines()})
    assert 0 < done_before < 48
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done_before} of 48 already done" in " ".join(resumed.stderr.split())
    ids = [r["problem_id"] for p in files for r in _lines(p)]
    assert len(ids) == len(set(ids)) == 48  # every problem exactly once
    for path, part in zip(files, partials):
        assert path.read_text().startswith(part)  # what was on disk stayed as it was


def test_fewshot_examples_reach_the_prompt(undo, tiny_model, problems, tmp_path):
    from transformers import AutoTokenizer

    from undo_cli.prompts import encode_prompt, load_template, problem_variables, render_messages

    shots = [{"question": "1+1?", "rationale": "1 + 1 = 2.\n#### 2"}] * 2
    out = tmp_path / "fewshot.jsonl"
    result = undo("generate", "--teacher", tiny_model, "--input", problems, "--keep", "all", "--max-tokens", "2",
                  "--output", out, "--fewshot", write_jsonl(tmp_path / "shots.jsonl", shots))
    assert result.returncode == 0, result.stderr
    tok, template = AutoTokenizer.from_pretrained(tiny_model), load_template("generate")
    for r in _lines(out):
        variables = problem_variables(r)
        with_shots = encode_prompt(tok, render_messages(template, **variables, examples=shots))
        without = encode_prompt(tok, render_messages(template, **variables, examples=[]))
        assert r["usage"]["prompt_tokens"] == len(with_shots) > len(without)
        assert r["template"] == "generate"


@pytest.mark.parametrize("case", ["missing_input", "malformed_line", "missing_field", "unknown_backend",
                                  "unknown_model", "greedy_n", "bad_keep", "bad_fewshot", "unknown_template",
                                  "server_down"])
def test_error_paths_exit_2_with_a_message_that_names_the_problem(undo, tiny_model, problems, tmp_path, case):
    from tests.servers import free_port

    bad = tmp_path / "bad.jsonl"
    args = ["--teacher", str(tiny_model), "--input", str(problems), "--output", str(tmp_path / "o.jsonl")]
    if case == "missing_input":
        args[3], expect = str(tmp_path / "nope.jsonl"), ["nope.jsonl: no such file"]
    elif case == "malformed_line":
        bad.write_text('{"id": "a", "question": "q", "answer": "1"}\n{"id": "b", "question": \n')
        args[3], expect = str(bad), ["bad.jsonl:2", "not valid JSON"]
    elif case == "missing_field":
        bad.write_text('{"id": "a", "question": "q"}\n')
        args[3], expect = str(bad), ["bad.jsonl:1", "field 'answer'"]
    elif case == "unknown_backend":
        args += ["--backend", "tgi"]
        expect = ["unknown backend", "hf, openai, vllm"]
    elif case == "unknown_model":
        args[1], expect = str(tmp_path / "no-model"), ["no such model folder", "no-model"]
    elif case == "greedy_n":
        args += ["--n", "4"]
        expect = ["identical", "--temperature"]
    elif case == "bad_keep":
        args += ["--keep", "best"]
        expect = ["--keep best", "--keep all"]
    elif case == "bad_fewshot":
        bad.write_text('{"question": "1+1?"}\n')
        args += ["--fewshot", str(bad)]
        expect = ["bad.jsonl:1", "field 'rationale'"]
    elif case == "unknown_template":
        args += ["--prompt", "nonexistent"]
        expect = ["unknown prompt template 'nonexistent'", "generate"]
    else:
        args += ["--backend", "openai", "--base-url", f"http://127.0.0.1:{free_port()}/v1"]
        expect = ["cannot reach the server", "connection refused"]
    result = undo("generate", *args)
    assert result.returncode == 2, result.stderr
    err = " ".join(result.stderr.split())
    for piece in expect:
        assert piece in err, err
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.rejected.jsonl").exists()  # no empty leftovers


def test_keep_all_never_keeps_whitespace_rationales(undo, tiny_model, tmp_path):
    # The untrained tiny model greedily writes only newlines: nothing a student could learn from.
    rows = [{"id": f"w{i}", "question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(3)]
    problems = write_jsonl(tmp_path / "w.jsonl", rows)
    out = tmp_path / "all.jsonl"
    result = undo("generate", "--teacher", tiny_model, "--input", problems, "--output", out, "--keep", "all",
                  "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    rejected = _lines(tmp_path / "all.rejected.jsonl")
    assert sorted(r["problem_id"] for r in rejected) == ["w0", "w1", "w2"]
    assert all(not r["rationale"].strip() for r in rejected)
    assert out.read_text() == ""  # kept: none (train would have had to skip them all)
