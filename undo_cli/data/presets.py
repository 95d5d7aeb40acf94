"""Column layouts of the datasets this field evaluates on, turned into problem records.

    undo data import --preset gsm8k --output-dir data/
    undo data import my_gsm8k_copy.jsonl --preset gsm8k --output-dir data/

Each preset knows where a dataset lives on the Hugging Face Hub and which
columns hold the question, the gold answer, the options and the id, plus the
one thing that is special about it:

    gsm8k           openai/gsm8k (main)      `answer` is a worked solution ending "#### 72"
    svamp           ChilleD/SVAMP            question = `Body` + `Question`, numeric `Answer` (3.0 -> "3")
    math            EleutherAI/hendrycks_math the answer is the last \\boxed{} of `solution`; `level`, `type` kept
    commonsense_qa  tau/commonsense_qa       `choices` {label, text} + `answerKey`
    strategyqa      ChilleD/StrategyQA       boolean `answer` -> yes/no, scored as an `exact` task
    arc             allenai/ai2_arc (ARC-Challenge) like commonsense_qa; labels may be 1-4 instead of A-D

Choice answers are stored as the letter of the option's *position* (A for the
first), because that is how prompts show the options (prompts.problem_variables)
and how the scorer reads them; ARC's "1"-"4" labels are mapped the same way.

Column names can be overridden with --question-field/--answer-field/
--choices-field/--id-field, e.g. for a copy of a dataset with renamed columns.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any, Callable

from undo_cli.scoring import boxed_contents


class FieldProblem(ValueError):
    """A row that does not fit the layout; `field` names the source column."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


@dataclass(frozen=True)
class Fields:
    """Which source columns hold what (a preset's defaults, overridden by flags)."""

    question: str = "question"
    answer: str = "answer"
    choices: str | None = None
    id: str | None = None


def get(row: dict[str, Any], column: str, *, kinds: tuple[type, ...] = (str,), allow_empty: bool = False) -> Any:
    """row[column], or a FieldProblem that names the column and lists the ones that exist."""
    if column not in row or row[column] is None:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise FieldProblem(column, f"missing (the row has: {present})")
    value = row[column]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise FieldProblem(column, f"expected {names}, got {type(value).__name__}")
    if isinstance(value, str) and not allow_empty and not value.strip():
        raise FieldProblem(column, "empty")
    return value


def number_text(value: Any) -> str:
    """3.0 -> '3', 2.5 -> '2.5', '1,250' stays '1,250' (the scorer reads commas)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def parse_choices(value: Any, column: str) -> tuple[list[str], list[str]]:
    """Options and their labels from a list, a {label, text} mapping, or a JSON / '|'-separated string (CSV)."""
    import json

    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") or text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise FieldProblem(column, f"not a valid JSON list of options ({exc.msg})") from None
        else:
            value = [part.strip() for part in text.split("|")]
    if isinstance(value, dict):
        texts, labels = value.get("text"), value.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise FieldProblem(column, "expected {label: [...], text: [...]} of equal length")
        options, labels = [str(t) for t in texts], [str(lab) for lab in labels]
    elif isinstance(value, list):
        options, labels = [str(t) for t in value], list(string.ascii_uppercase[: len(value)])
    else:
        raise FieldProblem(column, f"expected a list of options, got {type(value).__name__}")
    if len(options) < 2:
        raise FieldProblem(column, f"a multiple-choice question needs at least 2 options, got {len(options)}")
    if len(options) > 26:
        raise FieldProblem(column, f"at most 26 options (A-Z), got {len(options)}")
    if any(not o.strip() for o in options):
        raise FieldProblem(column, "an option is empty")
    return options, labels


def choice_letter(answer: Any, options: list[str], labels: list[str], column: str) -> str:
    """The gold as the letter of the option's position: from a label ('C', '3') or the option text."""
    a = number_text(answer)
    letters = string.ascii_uppercase
    for i, label in enumerate(labels):
        if a == label or a.upper() == label.upper():
            return letters[i]
    for i, option in enumerate(options):
        if a.strip().lower() == option.strip().lower():
            return letters[i]
    raise FieldProblem(column, f"'{a}' is neither an option label ({', '.join(labels)}) nor an option's text")


def yes_no(value: Any, column: str) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value).strip().lower()
    if text in ("yes", "true", "1"):
        return "yes"
    if text in ("no", "false", "0"):
        return "no"
    raise FieldProblem(column, f"expected a boolean (true/false or yes/no), got '{value}'")


# --- the presets ---------------------------------------------------------------------

Convert = Callable[[dict[str, Any], Fields], dict[str, Any]]


def _gsm8k(row: dict[str, Any], f: Fields) -> dict[str, Any]:
    solution = get(row, f.answer)
    if "####" not in solution:
        raise FieldProblem(f.answer, "a GSM8K answer ends with '#### <number>'; this one has no '####'")
    work, final = solution.rsplit("####", 1)
    final = final.strip()
    if not final:
        raise FieldProblem(f.answer, "nothing after '####'")
    # <<48/2=24>> are GSM8K's calculator annotations: noise for a reader and a student.
    work = re.sub(r"<<[^<>]*>>", "", work).strip()
    return {"question": get(row, f.question).strip(), "answer": final,
            "meta": {"solution": f"{work}\n#### {final}"}}


def _svamp(row: dict[str, Any], f: Fields) -> dict[str, Any]:
    body = get(row, "Body", allow_empty=True).strip()
    question = get(row, f.question).strip()
    answer = get(row, f.answer, kinds=(int, float, str))
    meta = {k: row[k] for k in ("Equation", "Type") if row.get(k) is not None}
    joined = question if not body else f"{body}{'' if body.endswith(('.', '?', '!')) else '.'} {question}"
    return {"question": joined, "answer": number_text(answer), "meta": {k.lower(): v for k, v in meta.items()}}


def _math(row: dict[str, Any], f: Fields) -> dict[str, Any]:
    solution = get(row, "solution")
    if f.answer != "solution" and row.get(f.answer) not in (None, ""):  # MATH-500 has its own `answer` column
        answer = number_text(get(row, f.answer, kinds=(str, int, float)))
    else:
        boxed = boxed_contents(solution)
        if not boxed:
            raise FieldProblem("solution", "no \\boxed{...} answer in the solution")
        answer = boxed[-1].strip()
    meta = {"solution": solution}
    for key in ("level", "type", "subject"):
        if row.get(key) is not None:
            meta[key] = row[key]
    return {"question": get(row, f.question).strip(), "answer": answer, "meta": meta}


def _lettered(row: dict[str, Any], f: Fields) -> dict[str, Any]:
    options, labels = parse_choices(get(row, f.choices or "choices", kinds=(list, dict, str)), f.choices or "choices")
    letter = choice_letter(get(row, f.answer, kinds=(str, int)), options, labels, f.answer)
    meta = {"answer_text": options[string.ascii_uppercase.index(letter)]}
    if row.get("question_concept"):
        meta["concept"] = row["question_concept"]
    return {"question": get(row, f.question).strip(), "answer": letter, "choices": options, "meta": meta}


def _strategyqa(row: dict[str, Any], f: Fields) -> dict[str, Any]:
    answer = yes_no(get(row, f.answer, kinds=(bool, str, int)), f.answer)
    meta = {}
    for key in ("term", "description", "facts", "decomposition"):
        if row.get(key) not in (None, "", []):
            meta[key] = row[key]
    return {"question": get(row, f.question).strip(), "answer": answer, "meta": meta}


@dataclass(frozen=True)
class Preset:
    name: str
    hub: str
    config: str | None
    split: str
    task: str
    fields: Fields
    convert: Convert
    description: str


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("gsm8k", "openai/gsm8k", "main", "train", "math", Fields("question", "answer", None, None), _gsm8k,
           "grade-school math; answer after '####'"),
    Preset("svamp", "ChilleD/SVAMP", None, "train", "math", Fields("Question", "Answer", None, "ID"), _svamp,
           "arithmetic word problems; Body + Question, numeric Answer"),
    Preset("math", "EleutherAI/hendrycks_math", "algebra", "train", "math", Fields("problem", "answer", None, "unique_id"),
           _math, "competition math; last \\boxed{} of the solution (config: one subject, e.g. algebra)"),
    Preset("commonsense_qa", "tau/commonsense_qa", None, "train", "choice", Fields("question", "answerKey", "choices", "id"),
           _lettered, "5-way multiple choice; choices {label, text} + answerKey"),
    Preset("strategyqa", "ChilleD/StrategyQA", None, "train", "exact", Fields("question", "answer", None, "qid"),
           _strategyqa, "yes/no questions needing implicit reasoning"),
    Preset("arc", "allenai/ai2_arc", "ARC-Challenge", "train", "choice", Fields("question", "answerKey", "choices", "id"),
           _lettered, "grade-school science multiple choice; choices {label, text} + answerKey"),
]}


def generic(task: str | None) -> Convert:
    """The mapping without a preset: the named columns, taken as they are."""

    def convert(row: dict[str, Any], f: Fields) -> dict[str, Any]:
        question = get(row, f.question).strip()
        out: dict[str, Any] = {"question": question}
        if f.choices is None and isinstance(row.get("choices"), (list, dict)):
            f = Fields(f.question, f.answer, "choices", f.id)  # a problems file passes through as it is
        own = row.get("task") if row.get("task") in ("math", "choice", "exact") else None
        kind = task or own or ("choice" if f.choices else "math")
        if kind == "choice":
            if not f.choices:
                raise FieldProblem("choices", "a choice task needs --choices-field naming the options column")
            options, labels = parse_choices(get(row, f.choices, kinds=(list, dict, str)), f.choices)
            out["choices"] = options
            out["answer"] = choice_letter(get(row, f.answer, kinds=(str, int, float)), options, labels, f.answer)
        elif kind == "exact":
            value = get(row, f.answer, kinds=(str, int, float, bool))
            out["answer"] = yes_no(value, f.answer) if isinstance(value, bool) else number_text(value)
        else:
            out["answer"] = number_text(get(row, f.answer, kinds=(str, int, float)))
        out["task"] = kind
        # Everything else the row carries is kept in `meta` (a problems file's own meta included),
        # so importing never silently drops a worked solution or a difficulty label.
        mapped = {f.question, f.answer, f.choices, f.id, "id", "task", "meta", "source"}
        meta = dict(row["meta"]) if isinstance(row.get("meta"), dict) else {}
        for key, value in row.items():
            if key not in mapped and isinstance(value, (str, int, float, bool, list, dict)):
                meta.setdefault(str(key), value)
        if meta:
            out["meta"] = meta
        return out

    return convert
