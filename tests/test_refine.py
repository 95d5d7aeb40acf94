"""`undo refine`: which targets get refined, what the teacher is shown, verification, provenance, resume.

Models: `trained_teacher` (tests/conftest.py) reproduces the correct worked
solution of each TAUGHT_PROBLEMS question when it sees the question the way it
was trained (the student template). Shown the long refinement prompt it has
never seen, it writes noise: that is the teacher that fails verification, so
the fallback to the previous rationale is exercised with a real model. For the
path where the refinement verifies, the test passes `--prompt` a template that
shows the question in the taught format (a custom template is a supported use
of --prompt); the selection, verification and records are the same code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TAUGHT_PROBLEMS, kill_after_first_line, read_jsonl, write_jsonl

WIDE = {"COLUMNS": "400"}

# The student template's text, as a refinement template: the trained teacher answers it correctly.
TAUGHT_FORMAT_TEMPLATE = (Path(__file__).resolve().parent.parent / "prompts" / "student.jinja").read_text()


def target(problem: dict, rationale: str | None = None, sample: int = 0, iteration: int = 0) -> dict:
    """A rationale record shaped exactly as `undo generate` writes it."""
    text = rationale if rationale is not None else problem["rationale"]
    return {"id": f"{problem['id']}#{sample}", "problem_id": problem["id"], "question": problem["question"],
            "answer": problem["answer"], "task": "math", "rationale": text, "predicted": problem["answer"],
            "correct": True, "teacher": "old-teacher", "backend": "hf", "sample": sample,
            "usage": {"prompt_tokens": 40, "completion_tokens": 30}, "template": "generate",
            "finish_reason": "stop", "iteration": iteration}


def error(eid: str, question: str, output: str = "so 2 + 2 = 5\n#### 5", answer: str = "4",
          error_type: str = "wrong_answer") -> dict:
    """An error record shaped exactly as `undo collect-errors` writes it."""
    return {"id": eid, "question": question, "answer": answer, "task": "math", "output": output,
            "predicted": "5" if error_type == "wrong_answer" else None, "correct": False,
            "finish_reason": "length" if error_type == "truncated" else "stop", "model": "student",
            "error_type": error_type}


def older(problem: dict) -> str:
    """A terser, earlier rationale: correct, but not what the teacher writes now."""
    return f"Add them: {problem['answer']}.\n#### {problem['answer']}"


# --- selection ------------------------------------------------------------------------------

QUESTIONS = {
    "t-train": "A train travels 60 miles per hour for 3 hours. How far does the train travel?",
    "t-cookies": "Ben bakes 30 cookies and eats 6 cookies. How many cookies remain?",
    "t-pencils": "Tom has 14 pencils and loses 11 pencils. How many pencils are left?",
    "t-car": "A car travels 50 miles per hour for 2 hours. How far does the car travel?",
    "t-marbles": "Lia shares 24 marbles equally among 4 friends. How many marbles does each friend get?",
}


def selection_targets():
    rows = []
    for pid, q in QUESTIONS.items():
        p = {"id": pid, "question": q, "answer": "1", "rationale": f"old {pid}"}
        rows.append(target(p))
        if pid == "t-car":  # a problem with two samples: both are refined
            rows.append(target(p, rationale=f"old {pid} second", sample=1))
    return rows


def test_similar_selection_picks_the_nearest_targets(monkeypatch):
    from undo_cli.stages import refine
    from undo_cli.stages.refine import select_similar

    errors = [error("v-bus", "A bus travels 40 miles per hour for 5 hours. How far does the bus travel?"),
              error("v-muffins", "Ann bakes 12 muffins and eats 5 muffins. How many muffins remain?"),
              error("v-cookies", "Joe bakes 20 cookies and gives away 8 cookies. How many cookies remain?"),
              error("v-zebra", "Name a zebra.")]  # shares no word with any target: nominates nothing
    jobs, counts = select_similar(errors, selection_targets(), k=3)
    picked = {j.target["id"]: j for j in jobs}
    # v-bus -> a "travels ... miles per hour" problem (train and car tie on words: the earlier file line wins);
    # v-muffins and v-cookies both nominate the cookies problem, which is refined once.
    assert sorted(picked) == ["t-cookies#0", "t-train#0"]
    assert counts == {"selected": 2, "unmatched_errors": 1}
    cookies = picked["t-cookies#0"]
    assert cookies.failure["id"] == "v-cookies"  # the more similar of the two nominating failures
    assert [e["id"] for e in cookies.similar] == ["v-muffins"]  # other failures with any similarity, best first
    assert picked["t-train#0"].failure["id"] == "v-bus"
    assert jobs[0].similarity >= jobs[1].similarity  # most similar first

    # More nominations per failure; a problem with two samples gives two jobs, each seeing both rationales.
    jobs, counts = select_similar(errors, selection_targets(), k=1, per_error=2)
    ids = [j.target["id"] for j in jobs]
    assert {"t-car#0", "t-car#1", "t-train#0", "t-cookies#0"} <= set(ids)
    car1 = next(j for j in jobs if j.target["id"] == "t-car#1")
    assert car1.previous == ["old t-car second", "old t-car"]  # its own first, then the problem's others
    assert all(len(j.similar) <= 1 for j in jobs)

    # --max-targets counts questions, most similar first; deterministic.
    capped, counts = select_similar(errors, selection_targets(), k=3, per_error=2, max_targets=1)
    assert counts["selected"] == 1 and len(capped) == 1
    assert capped[0].target["id"] == jobs[0].target["id"]

    # Failures are compared with the targets in chunks (memory); the chunk size changes nothing.
    monkeypatch.setattr(refine, "_CHUNK", 1)
    chunked, _ = select_similar(errors, selection_targets(), k=1, per_error=2)
    assert [(j.target["id"], j.failure["id"], [e["id"] for e in j.similar]) for j in chunked] == \
        [(j.target["id"], j.failure["id"], [e["id"] for e in j.similar]) for j in jobs]


def test_errors_selection_matches_by_problem_id():
    from undo_cli.stages.refine import select_errors

    errors = [error("t-pencils", QUESTIONS["t-pencils"]), error("nowhere", "A question with no rationale."),
              error("t-car", QUESTIONS["t-car"]), error("t-train", QUESTIONS["t-train"])]
    jobs, counts = select_errors(errors, selection_targets(), k=2)
    assert [j.target["id"] for j in jobs] == ["t-pencils#0", "t-car#0", "t-car#1", "t-train#0"]
    assert counts == {"selected": 3, "unmatched_errors": 1}
    assert all(j.failure["id"] == j.target["problem_id"] for j in jobs)  # the item's own failure
    car = next(j for j in jobs if j.target["id"] == "t-car#0")
    assert [e["id"] for e in car.similar] == ["t-train"]  # the only other failure sharing words
    jobs, counts = select_errors(errors, selection_targets(), max_targets=1)
    assert [j.target["id"] for j in jobs] == ["t-pencils#0"]


def test_prompt_shows_question_gold_previous_student_output_and_similar_failures():
    from undo_cli.stages.refine import build_items, select_similar

    errors = [error("v-cookies", "Joe bakes 20 cookies and gives away 8 cookies. How many cookies remain?",
                    output="20 + 8 = 28\n#### 28", answer="12"),
              error("v-muffins", "Ann bakes 12 muffins and eats 5 muffins. How many muffins remain?",
                    output="I think 17", answer="7", error_type="no_answer")]
    jobs, _ = select_similar(errors, selection_targets(), k=3)
    [item] = [i for i in build_items(jobs, "refine") if i.key == "t-cookies#0"]
    system, user = item.messages
    assert system["role"] == "system" and "#### <answer>" in system["content"]
    text = user["content"]
    for needle in (QUESTIONS["t-cookies"], "Correct answer: 1", "old t-cookies",  # question, gold, previous
                   "20 + 8 = 28", errors[0]["question"],                          # the student's wrong output
                   errors[1]["question"], "I think 17", "Correct answer: 7"):     # a similar failure
        assert needle in text, needle
    assert "went wrong" in text and "#### <answer>" in text


# --- verification, provenance, fallback (real tiny teacher) -------------------------------------

def run_refine(tmp_path, teacher, errors, targets, **overrides):
    from undo_cli.stages.refine import RefineConfig, run

    cfg = dict(teacher=str(teacher), errors=str(write_jsonl(tmp_path / "errors.jsonl", errors)),
               targets=str(write_jsonl(tmp_path / "targets.jsonl", targets)),
               output=str(tmp_path / "refined.jsonl"), max_tokens=40, batch_size=8, budget=None)
    cfg.update(overrides)
    summary = run(RefineConfig(**cfg))
    return summary, read_jsonl(cfg["output"]) if cfg["output"] != "-" else None


def test_verified_refinement_replaces_with_provenance(tmp_path, trained_teacher):
    template = tmp_path / "taught_format.jinja"
    template.write_text(TAUGHT_FORMAT_TEMPLATE)
    targets = [target(p, rationale=older(p), iteration=2) for p in TAUGHT_PROBLEMS[:4]]
    # --select errors: the failures are the training items themselves (ids = problem ids).
    errors = [error(p["id"], p["question"], answer=p["answer"]) for p in TAUGHT_PROBLEMS[:2]]
    summary, records = run_refine(tmp_path, trained_teacher, errors, targets, select="errors",
                                  prompt=str(template))
    assert [r["id"] for r in records] == ["p00#0", "p01#0"]  # same ids as the targets they replace
    by_id = {p["id"]: p for p in TAUGHT_PROBLEMS}
    for r in records:
        p = by_id[r["problem_id"]]
        assert r["rationale"] == p["rationale"]  # the teacher's new, verified text
        assert r["correct"] is True and r["predicted"] == p["answer"] and r["finish_reason"] == "stop"
        assert r["teacher"] == str(trained_teacher) and r["backend"] == "hf"
        assert r["usage"]["completion_tokens"] > 0 and r["template"] == "taught_format"
        assert r["iteration"] == 3  # the target's iteration + 1
        ref = r["refinement"]
        assert ref["verified"] is True and ref["kept_previous"] is False
        assert ref["previous_rationale"] == older(p)
        assert ref["informed_by"][0] == p["id"] and set(ref["informed_by"]) == {"p00", "p01"}
        assert ref["iteration"] == 3 and ref["template"] == "taught_format" and ref["error_type"] == "wrong_answer"
    assert summary["refined_verified"] == 2 and summary["kept_previous"] == 0


def test_unverified_refinement_keeps_the_previous_rationale(tmp_path, trained_teacher):
    targets = [target(p) for p in TAUGHT_PROBLEMS[:3]]
    errors = [error("v1", "Sam has 3 apples and buys 9 more. How many apples does Sam have?", answer="12")]
    summary, records = run_refine(tmp_path, trained_teacher, errors, targets, iteration=1, k=0)
    [r] = records  # one failure nominates one target question
    assert r["id"] == "p00#0"  # all targets tie on words: the first line wins
    ref = r["refinement"]
    assert ref["verified"] is False and ref["kept_previous"] is True
    assert r["rationale"] == TAUGHT_PROBLEMS[0]["rationale"]  # the previous text, untouched
    assert r["teacher"] == "old-teacher" and r["usage"] == target(TAUGHT_PROBLEMS[0])["usage"]  # its provenance
    assert ref["rejected_rationale"] and ref["rejected_rationale"] != r["rationale"]  # kept for inspection
    assert ref["rejected_finish_reason"] in ("length", "repetition")  # the noise ran on until a limit cut it
    assert ref["informed_by"] == ["v1"] and ref["iteration"] == 1 and ref["template"] == "refine"
    assert ref["teacher"] == str(trained_teacher) and 0 < ref["usage"]["completion_tokens"] <= 40
    assert "previous_rationale" not in ref
    assert summary["refined_verified"] == 0 and summary["kept_previous"] == 1


RESUME_FLAGS = dict(batch_size=1, max_tokens=16, k=1, select="errors")  # the same flags as the killed command


@pytest.mark.slow
def test_killed_run_resumes_without_losing_or_duplicating(tmp_path, trained_teacher):
    targets = [target(p) for p in TAUGHT_PROBLEMS[:6]]
    # --select errors: each failure is a target's own problem, so there are exactly six jobs.
    errors = [error(p["id"], p["question"], answer=p["answer"]) for p in TAUGHT_PROBLEMS[:6]]
    write_jsonl(tmp_path / "errors.jsonl", errors)
    write_jsonl(tmp_path / "targets.jsonl", targets)
    out = tmp_path / "refined.jsonl"
    args = ["--teacher", str(trained_teacher), "--errors", str(tmp_path / "errors.jsonl"),
            "--targets", str(tmp_path / "targets.jsonl"), "--output", str(out), "--batch-size", "1",
            "--max-tokens", "16", "--k", "1", "--select", "errors", "--budget", "none"]
    kill_after_first_line(["refine", *args], out, env=WIDE)  # the first durable batch, then no warning
    written = read_jsonl(out)
    assert 1 <= len(written) < 6  # killed mid-run (each batch is one target)

    # Simulate the worst moment too: a torn half line at the end. Then re-run the same command.
    with out.open("a") as fh:
        fh.write('{"id": "p05#0", "problem_id": "p0')
    summary, final = run_refine(tmp_path, trained_teacher, errors, targets, **RESUME_FLAGS)
    assert summary["already_done"] == len(written) and summary["generated_for"] == 6 - len(written)
    # Finished records untouched (the finished file is rewritten in item order: stages/generation_loop.py).
    assert all(r in final for r in written)
    ids = [r["id"] for r in final]
    assert len(ids) == len(set(ids)) == 6

    # An uninterrupted run gives the same ids and (greedy, same batch size) the same texts.
    (tmp_path / "fresh").mkdir()
    _, fresh = run_refine(tmp_path / "fresh", trained_teacher, errors, targets, **RESUME_FLAGS)
    assert sorted(ids) == sorted(r["id"] for r in fresh)
    by_id = {r["id"]: r for r in final}
    assert all(by_id[r["id"]]["refinement"]["rejected_rationale"] == r["refinement"]["rejected_rationale"]
               for r in fresh)


def test_no_errors_means_nothing_to_refine(tmp_path, undo):
    (tmp_path / "errors.jsonl").write_text("")
    write_jsonl(tmp_path / "targets.jsonl", [target(TAUGHT_PROBLEMS[0])])
    proc = undo("refine", "--teacher", "unused", "--errors", tmp_path / "errors.jsonl",
                "--targets", tmp_path / "targets.jsonl", "--output", tmp_path / "refined.jsonl", env=WIDE)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to refine" in proc.stderr
    assert (tmp_path / "refined.jsonl").read_text() == ""


# --- bad inputs: exit 2, file:line:field, what to do -------------------------------------------

def refine_cli(undo, tmp_path, errors, targets, *extra):
    write_jsonl(tmp_path / "errors.jsonl", errors)
    write_jsonl(tmp_path / "targets.jsonl", targets)
    return undo("refine", "--teacher", "unused-model", "--errors", tmp_path / "errors.jsonl",
                "--targets", tmp_path / "targets.jsonl", "--output", tmp_path / "refined.jsonl", *extra, env=WIDE)


def test_missing_field_in_errors_file_names_file_line_field(tmp_path, undo):
    bad = error("v2", "q")
    del bad["error_type"]  # a prediction passed where errors were expected
    proc = refine_cli(undo, tmp_path, [error("v1", "q"), bad], [target(TAUGHT_PROBLEMS[0])])
    assert proc.returncode == 2
    assert "errors.jsonl:2: field 'error_type': missing" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "refined.jsonl").exists()


def test_missing_field_in_targets_file_names_file_line_field(tmp_path, undo):
    bad = target(TAUGHT_PROBLEMS[1])
    del bad["rationale"]
    proc = refine_cli(undo, tmp_path, [error("v1", "q")], [target(TAUGHT_PROBLEMS[0]), bad])
    assert proc.returncode == 2 and "targets.jsonl:2: field 'rationale': missing" in proc.stderr


def test_unknown_select_names_the_alternatives(tmp_path, undo):
    proc = refine_cli(undo, tmp_path, [error("v1", "q")], [target(TAUGHT_PROBLEMS[0])], "--select", "nearest")
    assert proc.returncode == 2
    assert "--select nearest" in proc.stderr and "--select similar" in proc.stderr and "--select errors" in proc.stderr


def test_select_errors_without_matching_targets_says_what_to_do(tmp_path, undo):
    proc = refine_cli(undo, tmp_path, [error("v1", TAUGHT_PROBLEMS[0]["question"])], [target(TAUGHT_PROBLEMS[0])],
                      "--select", "errors")
    assert proc.returncode == 2
    assert "matched by problem id" in proc.stderr and "--select similar" in proc.stderr


def test_output_must_not_overwrite_targets(tmp_path, undo):
    write_jsonl(tmp_path / "errors.jsonl", [error("v1", "q")])
    write_jsonl(tmp_path / "targets.jsonl", [target(TAUGHT_PROBLEMS[0])])
    proc = undo("refine", "--teacher", "m", "--errors", tmp_path / "errors.jsonl", "--targets",
                tmp_path / "targets.jsonl", "--output", tmp_path / "targets.jsonl", env=WIDE)
    assert proc.returncode == 2 and "is the --targets file" in proc.stderr


def test_prompts_too_long_for_the_teachers_context_show_fewer_failures_or_are_refused(tmp_path, tiny_teacher,
                                                                                      undo_here):
    """The teacher's context (config.json: max_position_embeddings, 1024 for the tiny one) is checked before
    anything is sent: a prompt that would leave no room for --max-tokens shows fewer similar failures (least
    similar dropped, `informed_by` says which were shown); one too long even with none is refused with the
    numbers and the settings to change."""
    from undo_cli.backends import BackendConfig
    from undo_cli.backends.context import context_window, prompt_length

    window = context_window(BackendConfig(model=str(tiny_teacher)))
    assert window.tokens == 1024 and window.source.endswith("config.json: max_position_embeddings")
    long_output = "I add the apples one by one and count again: " * 14 + "\n#### 5"  # the template keeps 600 chars
    targets = write_jsonl(tmp_path / "targets.jsonl", [target(p) for p in TAUGHT_PROBLEMS[:2]])
    errors = write_jsonl(tmp_path / "errors.jsonl", [error(f"v{i}", p["question"], output=long_output)
                                                     for i, p in enumerate(TAUGHT_PROBLEMS[:5])])
    args = ["refine", "--teacher", tiny_teacher, "--errors", errors, "--targets", targets, "--select", "similar",
            "--k", "3", "--max-targets", "1"]
    code, err = undo_here(*args, "--output", tmp_path / "fitted.jsonl", "--max-tokens", "16")
    assert code == 0, err
    [record] = read_jsonl(tmp_path / "fitted.jsonl")
    shown = len(record["refinement"]["informed_by"]) - 1  # the failure that chose the target, then the similar ones
    assert shown < 3 and f"1 of 1 refine prompts were too long for the teacher's context (1,024 tokens" in err
    assert f"fewer similar failures than --k 3 (1 show {shown})" in err
    # What was sent fits: the prompt, rebuilt from the record's provenance, plus --max-tokens.
    length = prompt_length(BackendConfig(model=str(tiny_teacher)))
    assert length is not None and record["refinement"]["usage"]["prompt_tokens"] + 16 <= 1024

    code, err = undo_here(*args, "--output", tmp_path / "refused.jsonl", "--max-tokens", "700")
    assert code == 2 and "Traceback" not in err
    assert "with --max-tokens 700 that is" in err and "more than the teacher's context of 1,024 tokens" in err
    assert "config.json: max_position_embeddings), even with no similar failure shown" in err
    tokens = int(err.split("refine prompt for p")[1].split(" is ")[1].split(" tokens")[0].replace(",", ""))
    assert f"lower --max-tokens to at most {1024 - tokens}" in err
    assert not (tmp_path / "refused.jsonl").exists()  # refused before anything was sent


@pytest.mark.slow
def test_a_cascades_every_teacher_is_checked_against_its_own_context(tmp_path, tiny_teacher, undo_here):
    """With a cascade the same prompt goes to each tier: a later tier with a shorter context than the first
    shortens or refuses it (naming that tier), and a route past that tier lets the prompt through."""
    import json
    import shutil

    big = tmp_path / "big-teacher"  # the first tier: the tiny teacher with a 4,096-token window
    shutil.copytree(tiny_teacher, big)
    config = json.loads((big / "config.json").read_text())
    (big / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    long_output = "I add the apples one by one and count again: " * 14 + "\n#### 5"
    targets = write_jsonl(tmp_path / "targets.jsonl", [target(p) for p in TAUGHT_PROBLEMS[:2]])
    errors = write_jsonl(tmp_path / "errors.jsonl", [error(f"v{i}", p["question"], output=long_output)
                                                     for i, p in enumerate(TAUGHT_PROBLEMS[:5])])
    args = ["refine", "--teacher", big, "--cascade", f"{tiny_teacher},name=small", "--errors", errors,
            "--targets", targets, "--select", "similar", "--k", "3", "--max-targets", "1"]
    code, err = undo_here(*args, "--output", tmp_path / "refused.jsonl", "--max-tokens", "700")
    assert code == 2 and "Traceback" not in err, err
    assert "more than teacher 'small''s context of 1,024 tokens" in err and "route these rows past 'small'" in err
    assert not (tmp_path / "refused.jsonl").exists()  # refused before anything was sent

    code, err = undo_here(*args, "--output", tmp_path / "fitted.jsonl", "--max-tokens", "16")
    assert code == 0, err
    assert "1 of 1 refine prompts were too long for teacher 'small''s context (1,024 tokens" in err
    [record] = read_jsonl(tmp_path / "fitted.jsonl")
    assert len(record["refinement"]["informed_by"]) - 1 < 3  # fewer similar failures shown, for the small tier

    code, err = undo_here(*args, "--route", f"task:math={big}", "--output", tmp_path / "routed.jsonl",
                          "--max-tokens", "700")
    assert code == 0 and "too long" not in err, err  # math rows never go to the small teacher
    [record] = read_jsonl(tmp_path / "routed.jsonl")
    assert len(record["refinement"]["informed_by"]) == 4 and [a["teacher"] for a in record["lineage"]["cascade"]] == [
        str(big)]


def test_a_servers_max_model_len_is_the_window(scripted_server):
    from undo_cli.backends import BackendConfig
    from undo_cli.backends.context import context_window

    config = BackendConfig(backend="openai", model="scripted", base_url=[scripted_server.base_url])
    assert context_window(config) is None  # a server that does not say: nothing is checked
    scripted_server.max_model_len = 2048
    window = context_window(config)
    assert window.tokens == 2048 and window.source.endswith("/v1/models: max_model_len")
