"""`--verify steps` end to end: generate, refine, score and iterate with a teacher that writes false steps.

Models: `step_teacher` (tests/conftest.py) was overfit on two TAUGHT_PROBLEMS (true steps) and two
FALSE_STEP_PROBLEMS whose rationales end on the right answer after a false step (issue 20's
`6 * 4 = 24 ... 24 - 21 = 12 ... #### 28`). Shown the student template it reproduces them greedily, so
the same real model, real generation and real scoring run with `--verify strict` and `--verify steps`
and the difference is exactly those rationales.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import FALSE_STEP_PROBLEMS, TAUGHT_PROBLEMS, read_jsonl, write_jsonl
from undo_cli.scoring import score

TRUE_STEPS = TAUGHT_PROBLEMS[:2]
FIELDS = ("id", "question", "answer", "task")
STUDENT_TEMPLATE = (Path(__file__).resolve().parent.parent / "prompts" / "student.jinja").read_text()


@pytest.fixture
def problems(tmp_path) -> Path:
    """Two problems with true steps, two with false steps (right gold answers), one with a wrong gold answer."""
    rows = [{k: p[k] for k in FIELDS} for p in TRUE_STEPS + FALSE_STEP_PROBLEMS]
    rows.append({**rows[0], "id": "bad0", "answer": str(int(rows[0]["answer"]) + 100)})
    return write_jsonl(tmp_path / "problems.jsonl", rows)


def reasons_in(err: str) -> dict[str, int]:
    """The summary table's "not verified: <reason> | <count>" rows."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"not verified: ([a-z ]+?) │ +(\d+)", err)}


def generate(undo_here, teacher, problems, output, *extra):
    return undo_here("generate", "--teacher", teacher, "--input", problems, "--output", output,
                     "--prompt", "student", "--max-tokens", "64", *extra)


@pytest.mark.slow
def test_generate_verify_steps_rejects_false_steps_with_reasons(undo_here, step_teacher, problems, tmp_path):
    out = tmp_path / "steps.jsonl"
    code, err = generate(undo_here, step_teacher, problems, out, "--verify", "steps")
    assert code == 0, err
    kept = read_jsonl(out)
    assert [r["id"] for r in kept] == [f"{p['id']}#0" for p in TRUE_STEPS]
    assert all(r["verify"] == "steps" and r["reject_reason"] is None and "step_error" not in r for r in kept)
    rejected = {r["id"]: r for r in read_jsonl(tmp_path / "steps.rejected.jsonl")}
    assert {k: (r["reject_reason"], r.get("step_error")) for k, r in rejected.items()} == {
        "fs0#0": ("false_step", "24 - 21 = 12"), "fs1#0": ("false_step", "3 * 5 = 16"),
        "bad0#0": ("wrong_answer", None)}
    for p in FALSE_STEP_PROBLEMS:  # the final answer was right: only the steps rejected it
        r = rejected[f"{p['id']}#0"]
        assert r["predicted"] == p["answer"] and r["correct"] is False and r["rationale"] == p["rationale"]
    assert reasons_in(err) == {"no answer": 0, "wrong answer": 1, "false step": 2}
    assert json.loads((tmp_path / "steps.run.json").read_text())["identity"]["verify"] == "steps"

    # The same teacher, strictly verified: the false-step rationales are kept (what issue 20 saw).
    code, err = generate(undo_here, step_teacher, problems, tmp_path / "strict.jsonl", "--verify", "strict")
    assert code == 0, err
    assert {r["problem_id"] for r in read_jsonl(tmp_path / "strict.jsonl")} == {"p00", "p01", "fs0", "fs1"}
    assert reasons_in(err) == {"no answer": 0, "wrong answer": 1, "false step": 0}

    # Cut before any answer: every sample has none.
    code, err = generate(undo_here, step_teacher, problems, tmp_path / "cut.jsonl", "--verify", "steps",
                         "--max-tokens", "3")
    assert code == 0, err
    assert {r["reject_reason"] for r in read_jsonl(tmp_path / "cut.rejected.jsonl")} == {"no_answer"}
    assert reasons_in(err) == {"no answer": 5, "wrong answer": 0, "false step": 0}


@pytest.mark.slow
def test_generate_summary_counts_the_whole_file_after_a_resume(step_teacher, problems, tmp_path):
    """A resumed run reports the reasons of every sample in the output and its sidecar, not only its own."""
    from undo_cli.stages.generate import GenerateConfig, run

    out = tmp_path / "r.jsonl"
    config = dict(teacher=str(step_teacher), input=str(problems), output=str(out), prompt="student",
                  max_tokens=64, verify="steps", batch_size=1)
    whole = run(GenerateConfig(**config))
    assert whole["rejected_by_reason"] == {"no_answer": 0, "wrong_answer": 1, "false_step": 2}
    # What a kill after the third problem (p00, p01 kept; fs0 rejected) leaves behind:
    side = tmp_path / "r.rejected.jsonl"
    side.write_text(side.read_text().splitlines(keepends=True)[0])
    resumed = run(GenerateConfig(**config))
    assert resumed["already_done"] == 3 and resumed["rejected"] == 2  # this run: fs1 and bad0
    assert resumed["rejected_by_reason"] == {"no_answer": 0, "wrong_answer": 1, "false_step": 2}


def _target(p: dict, rationale: str) -> dict:
    return {"id": f"{p['id']}#0", "problem_id": p["id"], "question": p["question"], "answer": p["answer"],
            "task": "math", "rationale": rationale, "predicted": p["answer"], "correct": True,
            "teacher": "old-teacher", "backend": "hf", "sample": 0, "template": "generate", "iteration": 0}


def _error(p: dict) -> dict:
    return {"id": p["id"], "question": p["question"], "answer": p["answer"], "task": "math",
            "output": "so 2 + 2 = 5\n#### 5", "predicted": "5", "correct": False, "finish_reason": "stop",
            "model": "student", "error_type": "wrong_answer"}


@pytest.mark.slow
def test_refine_verify_steps_keeps_the_previous_rationale_and_says_why(undo_here, step_teacher, tmp_path):
    """Each target has a correct earlier rationale; the teacher's refinement of a false-step problem has the
    right answer and a false step: strict replaces the correct rationale with it, steps keeps the correct one."""
    everything = TRUE_STEPS + FALSE_STEP_PROBLEMS
    targets = write_jsonl(tmp_path / "targets.jsonl",
                          [_target(p, f"Worked out: the answer is {p['answer']}.\n#### {p['answer']}")
                           for p in everything])
    errors = write_jsonl(tmp_path / "errors.jsonl", [_error(p) for p in everything])
    template = tmp_path / "taught.jinja"
    template.write_text(STUDENT_TEMPLATE)  # the format the teacher was taught: it answers from memory
    common = ["--teacher", step_teacher, "--errors", errors, "--targets", targets, "--select", "errors",
              "--k", "0", "--prompt", template, "--max-tokens", "64", "--budget", "none"]

    code, err = undo_here("refine", *common, "--output", tmp_path / "steps.jsonl", "--verify", "steps")
    assert code == 0, err
    refined = {r["problem_id"]: r for r in read_jsonl(tmp_path / "steps.jsonl")}
    for p in TRUE_STEPS:
        assert refined[p["id"]]["refinement"]["verified"] is True
        assert refined[p["id"]]["rationale"] == p["rationale"]
    for p in FALSE_STEP_PROBLEMS:
        r = refined[p["id"]]
        assert r["refinement"]["kept_previous"] is True and r["rationale"].startswith("Worked out")
        assert r["refinement"]["reject_reason"] == "false_step"
        assert r["refinement"]["step_error"] == p["step_error"]
        assert r["refinement"]["rejected_rationale"] == p["rationale"]
        assert r["refinement"]["rejected_predicted"] == p["answer"]
    assert reasons_in(err) == {"no answer": 0, "wrong answer": 0, "false step": 2}
    assert re.search(r"refined and verified │ +2 │", err)

    code, err = undo_here("refine", *common, "--output", tmp_path / "strict.jsonl", "--verify", "strict")
    assert code == 0, err
    strict = {r["problem_id"]: r for r in read_jsonl(tmp_path / "strict.jsonl")}
    assert all(strict[p["id"]]["rationale"] == p["rationale"] for p in FALSE_STEP_PROBLEMS)  # false steps in
    assert reasons_in(err) == {"no answer": 0, "wrong answer": 0, "false step": 0}


def test_score_verify_steps_on_a_rationale_file(undo_here, tmp_path):
    """`undo score --verify steps` reads `undo generate`'s files (rationale = output) and names each reason."""
    rows = [{**_target(p, p["rationale"])} for p in TRUE_STEPS + FALSE_STEP_PROBLEMS]
    rows.append({**_target(TRUE_STEPS[0], "I am not sure."), "id": "x#0"})
    rows.append({**_target(TRUE_STEPS[1], "So 3 + 4 = 7.\n#### 7"), "id": "y#0"})
    src = write_jsonl(tmp_path / "rationales.jsonl", rows)
    code, err = undo_here("score", src, "--verify", "steps", "--output", tmp_path / "scored.jsonl")
    assert code == 0, err
    scored = {r["id"]: r for r in read_jsonl(tmp_path / "scored.jsonl")}
    assert {k: (r["correct"], r["reject_reason"], r.get("step_error")) for k, r in scored.items()} == {
        "p00#0": (True, None, None), "p01#0": (True, None, None),
        "fs0#0": (False, "false_step", "24 - 21 = 12"), "fs1#0": (False, "false_step", "3 * 5 = 16"),
        "x#0": (False, "no_answer", None), "y#0": (False, "wrong_answer", None)}
    assert "not verified: no answer 1, wrong answer 1, false step 2 (--verify steps)" in err
    code, err = undo_here("score", src, "--verify", "strict", "--output", tmp_path / "strict.jsonl")
    assert code == 0 and "no answer 1, wrong answer 1, false step 0 (--verify strict)" in err
    code, err = undo_here("score", src, "--verify", "step", "--output", tmp_path / "x.jsonl")
    assert code == 2 and "steps: strict, and every arithmetic statement" in err


def test_evaluate_refuses_verify_steps_with_the_command_that_checks_predictions(undo_here, tmp_path, problems):
    code, err = undo_here("evaluate", "--model", tmp_path, "--input", problems, "--verify", "steps")
    assert code == 2 and "undo score PREDICTIONS.jsonl --verify steps" in err


def test_iterate_verify_steps_reaches_the_teacher_stages_and_reads_the_student_strictly(tmp_path):
    from undo_cli.loop.config import IterateConfig
    from undo_cli.loop.plan import Unopened
    from undo_cli.loop.rounds import Loop
    from undo_cli.loop.settings import resolve
    from undo_cli.model_refs import to_be_written

    files = {s: str(write_jsonl(tmp_path / f"{s}.jsonl", [{k: p[k] for k in FIELDS} for p in TRUE_STEPS]))
             for s in ("train", "val", "test")}
    base = {"teacher": "org/teacher", "student": "org/student", "train_file": files["train"],
            "val_file": files["val"], "test_file": files["test"], "runs_dir": str(tmp_path / "runs"), "name": "r"}

    def configs(dotted=(), **flags):
        config = resolve(IterateConfig, None, {**base, **flags}, list(dotted))
        with to_be_written(config.run_dir):
            loop = Loop(config, Unopened(config.run_dir))
            return loop.generate_config().verify, loop.refine_config(1).verify, loop.evaluate_config(0, "val").verify

    # The teacher's rationales are step-checked by default (TEACHER_VERIFY); the loop's verify reads the student.
    assert configs() == ("steps", "steps", "strict")
    assert configs(verify="flexible") == ("steps", "steps", "flexible")
    assert configs(verify="steps") == ("steps", "steps", "strict")
    assert configs(["--generate.verify", "strict"], verify="steps") == ("strict", "steps", "strict")
    assert configs(["--refine.verify", "strict"]) == ("steps", "strict", "strict")


@pytest.mark.slow
def test_iterate_verify_steps_counts_rejections_per_iteration(undo, tiny_model, step_teacher, tmp_path):
    """A real loop: generate (table: strict, so the false-step rationales are trained on), then refine under
    the run's `verify = steps`, which rejects the teacher's false-step refinements; manifest and report count them."""
    train = [{k: p[k] for k in FIELDS} for p in TRUE_STEPS + FALSE_STEP_PROBLEMS]
    val = [{"id": "v0", "question": "Mia has 5 bags with 6 cookies in each bag. She gives away 10 cookies. "
                                    "How many cookies are left?", "answer": "20", "task": "math"},
           {"id": "v1", "question": "Ben has 2 boxes with 4 pens in each box. He buys 3 more pens. "
                                    "How many pens does Ben have?", "answer": "11", "task": "math"},
           {"id": "v2", "question": "Sam has 4 apples and buys 2 more. How many apples does Sam have?",
            "answer": "6", "task": "math"}]
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", rows)
             for name, rows in (("train", train), ("val", val), ("test", val[:1]))}
    proc = undo("iterate", "--teacher", step_teacher, "--student", tiny_model, "--train-file", files["train"],
                "--val-file", files["val"], "--test-file", files["test"], "--runs-dir", tmp_path / "runs",
                "--name", "steps", "--max-iterations", "1", "--verify", "steps", "--generate.verify", "strict",
                "--generate.prompt", "student", "--generate.max-tokens", "64", "--refine.prompt", "student",
                "--refine.max-tokens", "64", "--refine.per-error", "4", "--refine.budget", "none", "--train.max-steps", "2",
                "--train.batch-size", "4", "--evaluate.max-tokens", "8", env={"COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "runs" / "steps" / "manifest.json").read_text())
    generate = manifest["stages"]["iter_00/generate"]["summary"]
    refine = manifest["stages"]["iter_01/refine"]["summary"]
    assert generate["rejected_by_reason"] == {"no_answer": 0, "wrong_answer": 0, "false_step": 0}
    assert refine["rejected_by_reason"]["false_step"] == 2 and refine["refined_verified"] == 2
    refined = read_jsonl(tmp_path / "runs" / "steps" / "iter_01" / "refined.jsonl")
    assert sorted(r["refinement"].get("step_error") or "" for r in refined) == ["", "", "24 - 21 = 12", "3 * 5 = 16"]
    report = undo("report", tmp_path / "runs" / "steps", env={"COLUMNS": "400"})
    assert report.returncode == 0, report.stderr
    assert "teacher not verified (no answer/wrong answer/false step): iter 0 0/0/0; iter 1 0/0/2" in report.stderr


def test_the_reasons_in_docs_artifacts_are_what_the_scorer_says():
    """Every example line of docs/artifacts.md that states a reject_reason states the scorer's own verdict."""
    from undo_cli.records import check_record
    from undo_cli.scoring import score
    from undo_cli.stages.refine import refusal

    doc = (Path(__file__).resolve().parent.parent / "docs" / "artifacts.md").read_text(encoding="utf-8")
    lines = [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", doc, flags=re.S)]
    rationales = [r for r in lines if "reject_reason" in r]
    refinements = [r for r in lines if "reject_reason" in (r.get("refinement") or {})]
    assert {r["reject_reason"] for r in rationales} == {None, "false_step"} and refinements
    for r in rationales:
        assert check_record(dict(r), "rationale") is None
        verdict = score(r["rationale"], r["answer"], r["task"], None, r["verify"])
        assert (verdict.correct, verdict.reason, verdict.step_error) == (
            r["correct"], r["reject_reason"], r.get("step_error")), r["id"]
    for r in refinements:
        ref = r["refinement"]
        verdict = score(ref["rejected_rationale"], r["answer"], r["task"], None, "steps")
        assert refusal(ref["rejected_rationale"], ref["rejected_finish_reason"], verdict) == ref["reject_reason"]
        assert verdict.step_error == ref["step_error"] and verdict.predicted == ref["rejected_predicted"]
        assert score(r["rationale"], r["answer"], r["task"], None, "steps").correct  # the kept one is sound


def test_a_refused_target_shows_the_attempt_closest_to_verifying():
    """With n samples and none verified, the false step (right answer) is shown and counted, not a first sample's
    wrong answer, so `--verify steps` refusals among later samples are not hidden (issue 20's bench found some)."""
    from undo_cli.backends.base import Completion
    from undo_cli.scoring import score
    from undo_cli.stages.refine import closest_refusal

    def attempt(text: str, finish: str = "stop"):
        return Completion(text, finish, 10, 10), score(text, "28", "math", None, "steps")

    wrong = attempt("6 * 7 = 42 and 42 - 14 = 27\n#### 27")
    false_step = attempt("6 * 4 = 24 ... 24 - 21 = 12\n#### 28")
    cut = attempt("6 * 7 = 42 and then", "length")
    assert closest_refusal([wrong, false_step, cut]) == (1, "false_step")
    assert closest_refusal([cut, wrong]) == (1, "wrong_answer")
    assert closest_refusal([wrong, attempt("#### 30")]) == (0, "wrong_answer")  # a tie: the first
    assert closest_refusal([attempt("   "), cut]) == (1, "truncated")
    assert closest_refusal([]) == (0, "no_answer")


# --- LaTeX and markdown as real teachers write them (issue 33) ---------------------------------------------

@pytest.mark.parametrize("text, gold, correct, reason, step_error", [
    # The example: 18 / 3 is 6, so its first step is false, and the right final answer does not save it.
    ("$\\frac{18}{3} = 9$, and $9 + 3 = 12$. **Answer: 12**", "12", False, "false_step", "\\frac{18}{3} = 9"),
    ("$\\frac{18}{3} = 6$, and $6 + 3 = 9$. **Answer: 9**", "9", True, None, None),
    ("\\[ 6 \\times 7 = 42 \\]\nSo the answer is \\(\\boxed{42}\\).", "42", True, None, None),
    ("\\[ 6 \\times 7 = 48 \\]\n\\[ 48 - 6 = 42 \\]\n#### 42", "42", False, "false_step", "6 \\times 7 = 48"),
    ("\\( 84 \\div 2 = 42 \\)\nSo, the answer is **42**.", "42", True, None, None),
    ("\\( 84 \\div 2 = 41 \\)\nSo, the answer is **41**.", "42", False, "wrong_answer", None),
    ("Total: $1{,}000 + 250 = 1{,}250$ dollars.\n#### \\$1{,}250", "1250", True, None, None),
    ("$3 \\cdot 4 = 12$ and $\\dfrac{12}{4} = 4$.\n#### 4", "4", False, "false_step", "\\dfrac{12}{4} = 4"),
])
def test_latex_and_markdown_steps_are_checked(text, gold, correct, reason, step_error):
    verdict = score(text, gold, "math", mode="steps")
    assert (verdict.correct, verdict.reason, verdict.step_error) == (correct, reason, step_error)
