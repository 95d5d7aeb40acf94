"""The scorer on realistic model outputs, right and wrong (undo_cli/scoring.py).

Each case is (model output, gold answer, task, choices, expected correct). The
set deliberately includes wrong answers that look right: the gold number in the
middle of a rationale with a different final answer, 1250 vs 125.0, a
distractor letter, a right answer only inside a rambled-on new question.
"""

from __future__ import annotations

import json
import threading

import pytest

from tests.conftest import write_jsonl
from undo_cli.scoring import Score, extract_answer, score, score_record

ABC = ["Paris", "London", "Berlin", "Madrid"]
NUMS = ["12", "13", "3", "31"]
CQA = ["bank", "library", "department store", "mall", "new york"]

# (output, gold, task, choices, correct)
CASES: list[tuple[str, str, str, list[str] | None, bool]] = [
    # --- GSM8K-style rationales ending in '#### <answer>' (our prompt format) ---
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72", "72", "math", None, True),
    ("Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n#### 10", "10", "math", None, True),
    ("Betty has 100/2 = 50 dollars.\nHer grandparents give her 15*2 = 30.\nShe needs 100-50-30-15 = 5 more.\n#### 5", "5", "math", None, True),
    ("Julie read 12 x 2 = 24 pages today.\nSo she has read 12 + 24 = 36 pages.\n#### 42", "36", "math", None, False),
    ("He writes each friend 3*2=6 pages a week.\nSo he writes 6*2=12 pages every week.\nThat means he writes 12*52=624 pages a year.\n#### 624", "624", "math", None, True),
    ("The total cost is 1,250 dollars.\n#### 1,250", "1250", "math", None, True),
    ("#### $1,250.00", "1250", "math", None, True),
    ("So the total is 125.0 dollars.\n#### 125.0", "1250", "math", None, False),
    ("The answer comes to 1250.\n#### 1250", "125", "math", None, False),
    ("#### -7", "-7", "math", None, True),
    ("The temperature drops by 7, so it is 7 degrees below zero.\n#### 7", "-7", "math", None, False),
    ("####18", "18", "math", None, True),
    ("#### 18 apples", "18", "math", None, True),
    ("#### 0.5", "1/2", "math", None, True),
    ("#### 3/4", "0.75", "math", None, True),
    ("First 5 + 3 = 8. Then 8 * 2 = 16.\n#### 16\nQuestion: Tom has 4 pens...\n#### 20", "16", "math", None, True),
    ("First 5 + 3 = 8. Then 8 * 2 = 16.\n#### 16\nQuestion: Tom has 4 pens...\n#### 20", "20", "math", None, False),
    ("Step 1: 6 * 4 = 24 legs.\nStep 2: 24 + 2 = 26.\n#### 26\n#### 28", "26", "math", None, True),
    ("He has 3 + 4 = 7 apples now.\n#### 3 + 4 = 7", "7", "math", None, True),
    ("#### 5,000", "5000", "math", None, True),
    ("#### 5.000", "5000", "math", None, False),
    ("She saves $45 a month, so in a year she saves 45 * 12 = $540.\n#### $540", "540", "math", None, True),
    # --- boxed LaTeX (MATH style) ---
    ("We have $x^2 = 9$, so $x = 3$. Thus the answer is $\\boxed{3}$.", "3", "math", None, True),
    ("Simplifying, $\\frac{6}{8} = \\boxed{\\frac{3}{4}}$.", "0.75", "math", None, True),
    ("The area is $\\boxed{\\frac{3}{4}}$.", "\\frac{3}{5}", "math", None, False),
    ("So the side is $\\boxed{\\sqrt{8}}$.", "2\\sqrt{2}", "math", None, True),
    ("So the side is $\\boxed{2\\sqrt{2}}$.", "\\sqrt{8}", "math", None, True),
    ("So the side is $\\boxed{2\\sqrt{3}}$.", "2\\sqrt{2}", "math", None, False),
    ("Intermediate: $\\boxed{4}$ was wrong; recomputing, the final value is $\\boxed{5}$.", "5", "math", None, True),
    ("The probability is $\\boxed{0.25}$.", "\\frac{1}{4}", "math", None, True),
    ("The probability is $\\boxed{\\dfrac{1}{4}}$.", "0.25", "math", None, True),
    ("The sum is \\boxed{1,250}.", "1250", "math", None, True),
    ("Hence $\\boxed{x = 5}$.", "5", "math", None, True),
    ("The expression equals $\\boxed{2^{10}}$.", "1024", "math", None, True),
    ("The expression equals $\\boxed{2^{9}}$.", "1024", "math", None, False),
    ("Hence $\\boxed{\\pi}$.", "\\pi", "math", None, True),
    ("#### \\boxed{12}", "12", "math", None, True),
    ("We get \\boxed{-\\frac{1}{2}}.", "-0.5", "math", None, True),
    ("We get \\boxed{\\frac{1}{2}}.", "-0.5", "math", None, False),
    # --- "The answer is" / "Answer:" / "Final answer:" ---
    ("Adding them gives 9 + 3 = 12. The answer is 12.", "12", "math", None, True),
    ("Adding them gives 9 + 3 = 12. So the answer is 13.", "12", "math", None, False),
    ("There are 12 eggs, so 12 - 3 = 9 remain.\nAnswer: 9", "9", "math", None, True),
    ("12 eggs minus 3 gives 9, plus 12 more is 21.\nFinal answer: 21", "9", "math", None, False),
    ("**Final Answer:** 48", "48", "math", None, True),
    ("Final answer:\n48", "48", "math", None, True),
    ("Therefore, the final answer is $\\frac{1}{2}$.", "0.5", "math", None, True),
    ("The answer is: 1/2", "\\frac{1}{2}", "math", None, True),
    ("The answer is 25%.", "25", "math", None, True),
    ("The discount is 25%, so the answer is 25%", "25%", "math", None, True),
    ("So the answer is 0.25", "25%", "math", None, True),
    ("So the answer is 25", "0.25", "math", None, False),
    ("The answer is $18.", "18", "math", None, True),
    ("The answer is -3 degrees.", "-3", "math", None, True),
    ("The answer is 3 degrees.", "-3", "math", None, False),
    ("The answer is 7 cm.", "7", "math", None, True),
    ("The answer is 17.", "7", "math", None, False),
    ("The answer is 2.50 dollars.", "2.5", "math", None, True),
    ("The answer is 14. Question: A farmer has 20 cows and sells 6. How many are left? The answer is 14.", "12", "math", None, False),
    ("She has 4 + 8 = 12 pens. The answer is 12.\n\nQuestion: Ben has 3 cats. How many legs?\nAnswer: 12", "12", "math", None, True),
    ("She has 4 + 8 = 12 pens. The answer is 11.\n\nQuestion: Ben has 3 cats. The answer is 12", "12", "math", None, False),
    ("Question: Sam has 3 apples and buys 4 more. How many?\nSam has 3 + 4 = 7 apples.\n#### 7", "7", "math", None, True),
    ("Let me restate the problem: Sam has 3 apples and buys 4, so 3 + 4 = 7.\n#### 7", "7", "math", None, True),
    ("To answer the question: how many are left? 10 - 4 = 6.\nThe answer is 6.", "6", "math", None, True),
    ("He has 2 + 2 = 4.\nQ: What is 5 + 5?\nA: 10", "4", "math", None, True),
    ("He has 2 + 2 = 4 #### 4 Question: What is 5 + 5? #### 10", "4", "math", None, True),
    ("Problem 2: What is 5 + 5?\n#### 10", "10", "math", None, True),
    # --- no explicit answer: the last number ---
    ("Sam has 3 apples and buys 4 more, so he has 3 + 4 = 7 apples.", "7", "math", None, True),
    ("Sam has 3 apples and buys 4 more, so he has 7 apples. He gave 2 to Mia yesterday.", "7", "math", None, False),
    ("12 + 30 = 42, so 42 students in total", "42", "math", None, True),
    ("Each box holds 6, so 4 boxes hold 24 pencils total.", "24", "math", None, True),
    ("The total is 1,250 dollars.", "1250", "math", None, True),
    ("Half of it is $\\frac{1}{2}$", "0.5", "math", None, True),
    ("I think there are 5 apples, and then 3 more, but I don't know how many.", "8", "math", None, False),
    ("I am not sure.", "8", "math", None, False),
    ("", "8", "math", None, False),
    ("Sam has 3 apples. Question: How many apples does Tom have? Tom has 9.", "3", "math", None, True),
    # --- multiple choice: letters ---
    ("The capital of France is Paris.\n#### A", "A", "choice", ABC, True),
    ("The capital of France is Paris.\n#### B", "A", "choice", ABC, False),
    ("The answer is (A).", "A", "choice", ABC, True),
    ("The answer is (c).", "C", "choice", ABC, True),
    ("The correct answer is option B.", "B", "choice", ABC, True),
    ("The correct answer is option B.", "D", "choice", ABC, False),
    ("Answer: D. Madrid", "D", "choice", ABC, True),
    ("Option A says Paris, option B says London. The answer is (B).", "A", "choice", ABC, False),
    ("Option A says Paris, option B says London. Since France's capital is Paris, the answer is (A).", "A", "choice", ABC, True),
    ("B", "B", "choice", ABC, True),
    ("(C)", "C", "choice", ABC, True),
    ("Let me think. London is in England. Paris is in France. So (A)", "A", "choice", ABC, True),
    ("#### A", "Paris", "choice", ABC, True),
    ("#### B", "Paris", "choice", ABC, False),
    # --- multiple choice: the option's text ---
    ("The answer is Paris.", "A", "choice", ABC, True),
    ("The answer is Berlin.", "A", "choice", ABC, False),
    ("#### london", "B", "choice", ABC, True),
    ("The answer is 13.", "B", "choice", NUMS, True),
    ("The answer is 3.", "B", "choice", NUMS, False),
    ("The answer is 31.", "D", "choice", NUMS, True),
    ("You keep money in a bank, so the answer is bank.", "A", "choice", CQA, True),
    ("A department store sells many things. The answer is department store.", "C", "choice", CQA, True),
    ("A department store sells many things. The answer is mall.", "C", "choice", CQA, False),
    ("The answer is E", "E", "choice", CQA, True),
    ("The answer is F", "E", "choice", CQA, False),
    ("The answer is a dog.", "B", "choice", ["cat", "dog", "cow"], True),
    ("A cow says moo, so the answer is a cow.", "B", "choice", ["cat", "dog", "cow"], False),
    ("I think it is London, option B.", "B", "choice", ABC, True),
    ("We need to answer a question about capitals. Paris is in France. (A)", "A", "choice", ABC, True),
    # --- markdown headings that start with '####' are not answers ---
    ("#### Step 1: Add\n3 + 4 = 7\n#### Step 2: Double\n7 * 2 = 14\n#### 14", "14", "math", None, True),
    ("#### Step 1: Add\n3 + 4 = 7 apples in total.", "7", "math", None, True),
    ("#### Step 1: Add\n3 + 4 = 7 apples in total.", "1", "math", None, False),
    ("#### Solution:\nShe has 5 + 6 = 11.\n#### 11", "11", "math", None, True),
    # Qwen2.5-Coder-1.5B-Instruct's refinements on the real bench: an ordinal before "Step" is a heading too
    ("#### First Step: Start with the stickers Ben has\nBen has 7 + 6 = 13.\n#### 13", "13", "math", None, True),
    ("Ben has 7 + 6 = 13.\n#### 13\n#### Final Step: Check the stickers Ben has", "13", "math", None, True),
    # --- exact: yes/no and short strings ---
    ("Aristotle died in 322 BC, before laptops existed. So the answer is no.", "no", "exact", None, True),
    ("Aristotle died in 322 BC, before laptops existed. So the answer is yes.", "no", "exact", None, False),
    ("#### Yes", "yes", "exact", None, True),
    ("#### True", "yes", "exact", None, True),
    ("#### false", "no", "exact", None, True),
    ("#### No.", "True", "exact", None, False),
    ("Yes, because hamsters are small prey animals.", "yes", "exact", None, True),
    ("Penguins cannot fly, so no.", "no", "exact", None, True),
    ("Answer: The Eiffel Tower.", "eiffel tower", "exact", None, True),
    ("Answer: The Louvre.", "eiffel tower", "exact", None, False),
    ("Answer: yes\nQuestion: Is the sky green? Answer: no", "yes", "exact", None, True),
    ("", "yes", "exact", None, False),
    # --- real instruct models: markdown, LaTeX, units (issue 33) ---
    ("So, Lily has **21** pencils.", "21", "math", None, True),             # a bold result on the last line
    ("She has 14 + 7 = 21 pencils.\n\n**21**", "21", "math", None, True),
    ("**Answer: 12**", "12", "math", None, True),
    ("**Final Answer:** 12", "12", "math", None, True),
    ("**Step 1:** 3 + 4 = 7.\n**Step 2:** 7 * 2 = 14 books.", "7", "math", None, False),  # bold step titles commit to nothing
    ("\\[ 6 \\times 7 = 42 \\]\nSo the answer is \\(\\boxed{42}\\).", "42", "math", None, True),
    ("The final answer is $\\boxed{42}$.", "42", "math", None, True),
    ("The answer is: \\( 42 \\)", "42", "math", None, True),
    ("#### 21 pencils", "21", "math", None, True),
    ("#### $5", "5", "math", None, True),
    ("#### \\$5.00", "5", "math", None, True),
    ("#### 5 dollars", "5", "math", None, True),
    ("#### \\frac{3}{4}", "0.75", "math", None, True),
    ("#### 1{,}000", "1000", "math", None, True),
    ("The answer is \\$1{,}250.", "1250", "math", None, True),
    ("#### 42.0", "42", "math", None, True),
    ("#### **21**", "21", "math", None, True),
    # SmolLM2-135M-Instruct's loop after a right sentence: no '####' answer in it (a rule of hashes is none)
    ("Lily now has 14 + 7 = 21 pencils.\n############\n########\n########\n####", "21", "math", None, True),
    # the prompt's placeholder quoted back is not an answer; the answer phrase before it is
    ('The answer is: 7.\n\nThe line "#### <answer>" is a mathematical shortcut.', "7", "math", None, True),
]


def _case_id(case):
    output, gold, task, _, correct = case
    return f"{task}:{'right' if correct else 'wrong'}:{gold}:{output[:30]!r}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_case(case):
    output, gold, task, choices, expected = case
    result = score(output, gold, task, choices)
    assert isinstance(result, Score)
    assert result.correct is expected, f"{result} for gold {gold!r}"


def test_accuracy_on_the_whole_case_set(capsys):
    hits = sum(score(o, g, t, c).correct is want for o, g, t, c, want in CASES)
    wrong_looking_right = sum(1 for *_, want in CASES if not want)
    with capsys.disabled():
        print(f"\nscorer accuracy on {len(CASES)} labelled cases ({wrong_looking_right} wrong answers): "
              f"{hits}/{len(CASES)} = {hits / len(CASES):.1%}")
    assert len(CASES) >= 80
    assert hits == len(CASES)


@pytest.mark.parametrize("text, task, choices, expected", [
    ("So 3 + 4 = 7.\n#### 7", "math", None, "7"),
    ("#### $1,250.00", "math", None, "1250.00"),
    ("Thus $\\boxed{\\frac{3}{4}}$.", "math", None, "\\frac{3}{4}"),
    ("The answer is 25%.", "math", None, "25%"),
    ("I give up.", "math", None, None),
    ("", "math", None, None),
    ("   \n", "choice", ABC, None),
    ("The answer is London.", "choice", ABC, "B"),
    ("It's (d)", "choice", ABC, "D"),
    ("So the answer is False.", "exact", None, "no"),
    ("Answer: The Eiffel Tower.", "exact", None, "eiffel tower"),
    ("14 apples.\nQuestion: what about 99?", "math", None, "14"),
])
def test_extract_answer(text, task, choices, expected):
    assert extract_answer(text, task, choices) == expected


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown task 'maths'.*math, choice, exact"):
        score("#### 3", "3", "maths")


def test_score_record_adds_fields_and_keeps_the_rest():
    record = {"id": "p1", "answer": "B", "output": "The answer is London.", "task": "choice",
              "choices": ABC, "model": "m"}
    scored = score_record(record)
    assert scored == {**record, "predicted": "B", "correct": True, "reject_reason": None}
    assert "predicted" not in record  # the input is not mutated
    # task precedence: argument > record["task"] > "math"
    assert score_record({"answer": "7", "output": "#### 7"})["correct"] is True
    assert score_record({"answer": "yes", "output": "#### True", "task": "math"}, task="exact")["correct"] is True


def test_scorer_works_off_the_main_thread():
    # math-verify's own timeouts use signal.alarm, which raises in worker threads.
    results, errors = [], []

    def work():
        try:
            results.append((score("So the side is $\\boxed{\\sqrt{8}}$.", "2\\sqrt{2}").correct,
                            score("#### 2^{9}", "1024").correct))
        except Exception as exc:  # pragma: no cover - the failure we guard against
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [(True, False)] * 3


def test_costly_expressions_do_not_hang():
    # A power tower would take sympy forever; the scorer compares such spans as text instead.
    assert score("#### 9^{9^{9^{9}}}", "1").correct is False
    assert score("#### 99999!", "3").correct is False


def test_undo_score_cli(undo, tmp_path):
    rows = [
        {"id": "a", "answer": "72", "output": "48 + 24 = 72\n#### 72"},
        {"id": "b", "answer": "1250", "output": "#### 125.0"},
        {"id": "c", "answer": "B", "task": "choice", "choices": ABC, "output": "The answer is London."},
        {"id": "d", "answer": "no", "task": "exact", "output": "I don't know"},
    ]
    src = tmp_path / "in.jsonl"
    write_jsonl(src, rows)
    out = tmp_path / "scored.jsonl"
    proc = undo("score", src, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["correct"] for r in scored] == [True, False, True, False]
    assert [r["predicted"] for r in scored] == ["72", "125.0", "B", "i dont know"]
    assert "accuracy: 0.5000 (2/4)" in proc.stderr

    # stdin -> stdout, and --task overriding the records' own task
    piped = undo("score", "-", "--task", "exact", input='{"answer": "yes", "output": "#### True"}\n')
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["correct"] is True

    bad = undo("score", src, "--task", "maths", "--output", tmp_path / "never.jsonl")
    assert bad.returncode == 2 and "math, choice, exact" in bad.stderr
    assert not (tmp_path / "never.jsonl").exists()

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"answer": "1", "output": "#### 1"}\n{"answer": "2"}\n')
    proc = undo("score", broken, "--output", tmp_path / "never.jsonl", env={"COLUMNS": "400"})
    assert proc.returncode == 2
    assert f"{broken}:2: field 'output': missing" in proc.stderr
    assert not (tmp_path / "never.jsonl").exists()


# --- strict vs flexible extraction (lm-evaluation-harness's strict-match / flexible-extract) ----------------

MALFORMED = "An has * 5 yine has 8 + 5 + 5 ... + 15 + 15"  # garbled teacher text whose last number is the gold


@pytest.mark.parametrize("output, strict, flexible", [
    (MALFORMED, None, "15"),
    ("So 3 + 4 = 7.\n#### 7", "7", "7"),
    ("We get \\boxed{7}.", "7", "7"),
    ("Adding them, the answer is 7.", "7", "7"),
    ("3 + 4 = 7", None, "7"),
    ("Lily now has 21 pencils.\n############\n########\n####", None, "21"),  # a loop of hashes commits to nothing
    ("So she has \\frac{3}{4} of it.", None, "\\frac{3}{4}"),
    ("So, Lily has **21** pencils.", "21", "21"),
])
def test_strict_reads_only_an_explicit_final_answer(output, strict, flexible):
    assert extract_answer(output, "math", mode="strict") == strict
    assert extract_answer(output, "math", mode="flexible") == flexible
    assert extract_answer(output, "math") == flexible  # the default stays flexible for `undo score`
    assert score(MALFORMED, "15", mode="strict") == Score(None, False)
    assert score(MALFORMED, "15", mode="flexible").correct is True


def test_teacher_rationales_are_step_checked_by_default():
    """TEACHER_VERIFY is `steps`: an explicit final answer (strict) and every arithmetic statement true."""
    from undo_cli.backends.base import Completion
    from undo_cli.stages.generate import GenerateConfig, make_record_builder
    from undo_cli.stages.refine import RefineConfig, verify
    from undo_cli.stages.generation_loop import WorkItem

    problem = {"id": "q1", "question": "An has 5 ...", "answer": "15", "task": "math"}
    item = WorkItem(key="q1", messages=[], data=problem)
    completion = Completion(MALFORMED, "stop", 10, 20)
    cfg = GenerateConfig(teacher="t", input="in.jsonl", output="out.jsonl")
    assert cfg.verify == "steps"
    [record] = make_record_builder(cfg, "hf")(item, [completion])
    assert record["correct"] is False and record["predicted"] is None and record["verify"] == "steps"
    flexible = GenerateConfig(teacher="t", input="in.jsonl", output="out.jsonl", verify="flexible")
    assert make_record_builder(flexible, "hf")(item, [completion])[0]["correct"] is True

    refine = RefineConfig(teacher="t", errors="e.jsonl", targets="t.jsonl", output="o.jsonl")
    assert refine.verify == "steps"
    assert verify(MALFORMED, "stop", problem, refine.verify)[1] is False
    assert verify("5 * 3 = 15\n#### 15", "stop", problem, refine.verify)[1] is True
    assert verify("5 * 3 = 16\n#### 15", "stop", problem, refine.verify)[1] is False  # strict would keep it
    assert verify(MALFORMED, "stop", problem, "flexible")[1] is True
    assert verify(MALFORMED + "\n#### 15", "stop", problem, "strict")[1] is True


# --- real outputs, collected from the real student and teacher (tests/data/real_outputs.jsonl) -------------

def _real_outputs() -> list[dict]:
    from pathlib import Path

    path = Path(__file__).parent / "data" / "real_outputs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("r", _real_outputs(), ids=lambda r: f"{r['model']}:{r['id']}")
def test_real_outputs_read_as_labelled(r):
    """Each collected output with the answer a person reads in it (`read`: strict, flexible) and whether its
    arithmetic is all true (`steps_ok`), labelled by hand."""
    from undo_cli.steps import check_steps

    for mode in ("strict", "flexible"):
        assert extract_answer(r["output"], "math", mode=mode) == r["read"][mode], mode
    assert check_steps(r["output"]).ok is r["steps_ok"], check_steps(r["output"])
