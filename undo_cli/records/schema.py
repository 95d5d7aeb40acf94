"""The artifact contract: one record shape per JSONL file that stages exchange.

Every artifact is one JSON object per line with a stable `id`, so a person can
`head -1` any file and a later stage can join on it. The shapes (documented with
an example line each in docs/artifacts.md):

    problem     a question with its gold answer           (data import -> everything)
    rationale   a teacher's worked solution for a problem (generate, refine -> train)
    prediction  the student's answer to a problem         (evaluate -> collect-errors)
    error       a failed prediction with its error class  (collect-errors -> refine)
    scorable    anything `undo score` can score: an answer and an output (or a rationale)

Only the fields a consumer relies on are required; stages add more (token
usage, provenance, ...) and readers keep whatever they do not know about, so
artifacts stay forward compatible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TASKS = ("math", "choice", "exact")
ERROR_TYPES = ("no_answer", "wrong_answer", "truncated")


@dataclass(frozen=True)
class Shape:
    name: str
    required: dict[str, tuple[type, ...]]
    optional: dict[str, tuple[type, ...]] = field(default_factory=dict)
    unique_id: bool = True
    description: str = ""


_STR = (str,)
_ANSWER = (str, int, float)  # numbers are accepted and normalised to text
_LIST = (list,)
_DICT = (dict,)
_BOOL = (bool,)
_INT = (int,)
_OPT_STR = (str, type(None))

_PROBLEM_FIELDS = {"id": _STR, "question": _STR, "answer": _ANSWER}
_PROBLEM_OPTIONAL = {"task": _STR, "choices": _LIST, "meta": _DICT, "source": _STR}

SHAPES: dict[str, Shape] = {
    "problem": Shape(
        "problem",
        _PROBLEM_FIELDS,
        _PROBLEM_OPTIONAL,
        description="a question with its gold answer",
    ),
    "rationale": Shape(
        "rationale",
        {**_PROBLEM_FIELDS, "problem_id": _STR, "rationale": _STR},
        {
            **_PROBLEM_OPTIONAL,
            "predicted": _OPT_STR,
            "correct": _BOOL,
            "teacher": _STR,
            "backend": _STR,
            "sample": _INT,
            "usage": _DICT,
            "template": _STR,
            "finish_reason": _OPT_STR,
            "iteration": _INT,
            "teacher_logprobs": _LIST,
            "teacher_offsets": _LIST,
            "refinement": _DICT,
            "verify": _STR,
            "lineage": _DICT,  # where the row came from (stages/lineage.py)
        },
        description="a teacher's worked solution for one problem (one line per sample)",
    ),
    "prediction": Shape(
        "prediction",
        {**_PROBLEM_FIELDS, "output": _STR},
        {**_PROBLEM_OPTIONAL, "predicted": _OPT_STR, "correct": _BOOL, "finish_reason": _OPT_STR,
         "model": _STR, "usage": _DICT, "verify": _STR, "scores": _DICT},
        description="the student's answer to a problem",
    ),
    "error": Shape(
        "error",
        {**_PROBLEM_FIELDS, "output": _STR, "error_type": _STR},
        {**_PROBLEM_OPTIONAL, "predicted": _OPT_STR, "correct": _BOOL, "finish_reason": _OPT_STR,
         "model": _STR, "usage": _DICT, "verify": _STR, "scores": _DICT},
        description="a failed prediction, classified",
    ),
    "scorable": Shape(
        "scorable",
        {"answer": _ANSWER},
        {"id": _STR, "task": _STR, "choices": _LIST, "output": _STR, "rationale": _STR},  # one of the two texts
        unique_id=False,
        description="any record with a gold answer and a model output",
    ),
}


def _type_names(types: tuple[type, ...]) -> str:
    names = ["null" if t is type(None) else {"str": "string", "int": "integer", "float": "number",
             "list": "list", "dict": "object", "bool": "true/false"}.get(t.__name__, t.__name__) for t in types]
    return " or ".join(dict.fromkeys(names))


def check_record(record: Any, kind: str) -> str | None:
    """Return None if `record` fits `kind`, else a message naming the field.

    Normalises in place what is harmless to normalise (a numeric answer becomes
    text) so every consumer can rely on `answer` being a string.
    """
    shape = SHAPES[kind]
    if not isinstance(record, dict):
        return f"expected a JSON object (a {shape.name}), got {type(record).__name__}"
    for name, types in shape.required.items():
        if name not in record:
            return f"field '{name}': missing (a {shape.name} needs {', '.join(shape.required)})"
        value = record[name]
        # bool is a subclass of int: refuse it where a number or text is meant.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"field '{name}': expected {_type_names(types)}, got {type(value).__name__}"
    for name, types in shape.optional.items():
        if name in record and record[name] is not None:
            value = record[name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                return f"field '{name}': expected {_type_names(types)}, got {type(value).__name__}"
    if isinstance(record.get("answer"), (int, float)) and not isinstance(record.get("answer"), bool):
        record["answer"] = _number_text(record["answer"])
    task = record.get("task")
    if task is not None and task not in TASKS:
        return f"field 'task': unknown task '{task}' (use one of: {', '.join(TASKS)})"
    if task == "choice" and not record.get("choices"):
        return "field 'choices': a 'choice' task needs a non-empty list of options"
    if kind == "scorable" and "output" not in record and "rationale" not in record:
        return "field 'output': missing (a scorable needs answer and output; a rationale file's `rationale` counts)"
    if kind == "error" and record.get("error_type") not in ERROR_TYPES:
        return f"field 'error_type': '{record.get('error_type')}' is not one of {', '.join(ERROR_TYPES)}"
    if "id" in record and isinstance(record["id"], str) and not record["id"].strip():
        return "field 'id': empty id"
    return None


def _number_text(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
