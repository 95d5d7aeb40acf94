"""What changed for each problem between two evaluations of the student: fixed, regressed, still wrong, still right.

    from undo_cli.loop.transitions import compare
    pairs = compare(preds_a, preds_b, "iter_01/val/predictions.jsonl", "iter_02/val/predictions.jsonl")
    pairs.counts          # {"fixed": 5, "regressed": 3, "still_wrong": 95, "still_right": 2}
    pairs.rows[0]         # {"id": ..., "transition": "fixed", "a": prediction A, "b": prediction B}

The one place that names a transition: `undo diff` (loop/diff.py), `undo
report`'s terminal table and its HTML page (loop/report_html.py) all call
`compare` (or `transition` for one problem), so the terminal, the page and a
script reading `undo diff --format jsonl` can never disagree. A prediction is
right when its `correct` is true (what `undo evaluate` wrote, with the run's
`verify`); a hand-made line without `correct` is scored by the one scorer
first, as `undo collect-errors` does. The error type of a wrong prediction is
collect-errors' `classify` (truncated, no_answer, wrong_answer).

Both files must hold the same problems: an id in one and not in the other is
an error that names the file and the line, since a "transition" against a
problem the other side never answered would be made up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from undo_cli.errors import UndoError

TRANSITIONS = ("fixed", "regressed", "still_wrong", "still_right")
MEANING = {"fixed": "wrong before, right after", "regressed": "right before, wrong after",
           "still_wrong": "wrong both times", "still_right": "right both times"}


def transition(before: bool, after: bool) -> str:
    """The transition of one problem, from whether it was right before and after."""
    if before:
        return "still_right" if after else "regressed"
    return "fixed" if after else "still_wrong"


def error_type(prediction: dict[str, Any]) -> str | None:
    """None when right, else truncated / no_answer / wrong_answer (collect-errors' rule, the one rule)."""
    from undo_cli.stages.collect_errors import classify

    return classify(prediction)


@dataclass
class Comparison:
    """The transitions between two prediction lists of the same problems, in A's order."""

    rows: list[dict[str, Any]]
    counts: dict[str, int]


def _lines_by_id(predictions: list[dict[str, Any]]) -> dict[str, int]:
    return {p["id"]: i + 1 for i, p in enumerate(predictions)}


def _check_same_ids(a: list[dict[str, Any]], b: list[dict[str, Any]], name_a: str, name_b: str) -> None:
    """An UndoError naming the file and line of the first id that only one side has."""
    ids_a, ids_b = _lines_by_id(a), _lines_by_id(b)
    for ids, other_ids, name, other in ((ids_a, ids_b, name_a, name_b), (ids_b, ids_a, name_b, name_a)):
        only = [i for i in ids if i not in other_ids]
        if only:
            raise UndoError(f"{name}:{ids[only[0]]}: field 'id': '{only[0]}' is not in {other} "
                            f"({len(only)} of {len(ids)} ids of {name} are not there)",
                            hint="compare predictions of the same problems (the same --input); an evaluation "
                                 "that has not finished holds fewer")


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]], name_a: str = "A", name_b: str = "B") -> Comparison:
    """Pair predictions by id and name each problem's transition from A to B.

    a, b: prediction records (each with `id`; `correct` or what the scorer needs); name_a, name_b:
    how errors name the two sides (their paths). Ids are unique within each list (the readers check).
    """
    from undo_cli.stages.collect_errors import score_unscored

    _check_same_ids(a, b, name_a, name_b)
    score_unscored(a)
    score_unscored(b)
    by_id = {p["id"]: p for p in b}
    rows = []
    counts = dict.fromkeys(TRANSITIONS, 0)
    for pa in a:
        pb = by_id[pa["id"]]
        name = transition(bool(pa.get("correct")), bool(pb.get("correct")))
        counts[name] += 1
        rows.append({"id": pa["id"], "transition": name, "a": pa, "b": pb})
    return Comparison(rows, counts)
