"""The per-problem and per-refinement data of `undo report --html`, read from the run folder.

    index, chunks = page_data(run_dir, state)    # state: run_state.collect(run_dir)

What the page shows, computed here once so that the page's script only
displays it:

* **splits**: for validation (every iteration) and test (the tested
  students), each problem's id and, per iteration, one status letter:
  `c` right, `w` wrong_answer, `n` no_answer, `t` truncated (collect-errors'
  classes), `-` not evaluated (yet).
* **pairs**: the transitions (loop/transitions.py, the one definition) between
  consecutive validation iterations and between the one-shot (0) and the best
  student on test: one letter per problem, `F` fixed, `R` regressed, `W` still
  wrong, `S` still right, and the counts. Only finished evaluations (their
  metrics file is written) are compared; a running one shows as `-`.
* **refinements**: for every `iter_NN/refined.jsonl`, one entry per record:
  verified or kept-previous, cached, error type (the letters the filters use),
  and in the chunk the training problem, the word-level diff of the previous
  rationale against the refined one (or against the rejected attempt when the
  previous one was kept), the failures shown to the teacher (`informed_by`,
  pointing at their wrong outputs in the validation data of iteration k-1),
  tokens, and every other `refinement` field (a verification mode's own
  fields, such as a rejection reason, are shown as they are).
* **lineage**: for every refined row, its history across the run's
  iterations exactly as `undo lineage RUN ROW --format json` prints it
  (loop/lineage.py), in chunks; the page's lineage view shows one row's at
  `page.html#lineage=ROW`, and each refinement card links there.

The heavy text (questions, outputs, rationales) goes into **chunks**: JSON
lists of up to CHUNK_PROBLEMS problems (their questions, or their outputs at
one iteration) or CHUNK_REFINEMENTS refinements, compressed with zlib (stdlib)
and embedded as base64; the page inflates only the chunks it shows (the
browser's DecompressionStream). The word diff is
computed here with difflib (stdlib): its operations hold the common text once,
so both texts cost less than writing them out whole (bench/report_html.py
measures it).

Tolerant like the rest of `undo report`: it reads folders that a running
`undo iterate` is writing (a half-written last line is skipped).
"""

from __future__ import annotations

import base64
import difflib
import json
import re
import zlib
from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError
from undo_cli.loop.layout import RunLayout

CHUNK_PROBLEMS = 100
CHUNK_REFINEMENTS = 50
STATUS = {None: "c", "wrong_answer": "w", "no_answer": "n", "truncated": "t"}
CODES = {"fixed": "F", "regressed": "R", "still_wrong": "W", "still_right": "S"}
# The refinement fields shown in their own place; any other field is listed as it is.
SHOWN = {"informed_by", "iteration", "verified", "kept_previous", "previous_rationale", "rejected_rationale",
         "rejected_predicted", "rejected_finish_reason", "more_rejected", "error_type", "similarity", "attempts",
         "usage", "template", "teacher", "backend", "reject_reason", "step_error"}
REASONS = {"no_answer": "n", "wrong_answer": "w", "false_step": "f", "truncated": "t"}  # why an attempt was refused
_TOKEN = re.compile(r"\S+\s*")  # words with their trailing space (leading space is its own token): the exact text
_LEADING = re.compile(r"^\s+")
_TRAILING_SPACE = re.compile(r"\s*$")


def _tokens(text: str) -> list[str]:
    lead = _LEADING.match(text)
    return ([lead.group()] if lead else []) + _TOKEN.findall(text)


def word_diff(old: str, new: str) -> list[list[Any]]:
    """[[op, text], ...] with op 0 (both), -1 (only old), 1 (only new): difflib over words.

    The old text is the ops 0 and -1 joined, the new one 0 and 1, so the page stores both texts in one list.
    Words keep their trailing space (ten times faster than diffing spaces as tokens of their own); a space
    that a replaced word and its replacement share is given back to the common text, so `27.\n` -> `30.\n`
    shows as `27.` -> `30.` and one unchanged line break.
    """
    a, b = _tokens(old), _tokens(new)
    ops: list[list[Any]] = []

    def push(op: int, text: str) -> None:
        if not text:
            return
        if ops and ops[-1][0] == op:
            ops[-1][1] += text
        else:
            ops.append([op, text])

    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        gone, came = "".join(a[i1:i2]), "".join(b[j1:j2])
        if tag == "equal":
            push(0, gone)
            continue
        space = ""
        if gone and came:
            x, y = _TRAILING_SPACE.search(gone).group(), _TRAILING_SPACE.search(came).group()
            space = x if x == y else ""
        push(-1, gone[:len(gone) - len(space)])
        push(1, came[:len(came) - len(space)])
        push(0, space)
    return ops


def _records(path: Path) -> list[dict[str, Any]] | None:
    from undo_cli.loop.run_state import records_so_far

    return records_so_far(path)


class Chunks:
    """The compressed chunks of a page, numbered in the order they are added."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.raw_bytes = 0

    def add(self, data: Any) -> int:
        raw = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self.raw_bytes += len(raw)
        self.items.append(base64.b64encode(zlib.compress(raw, 6)).decode("ascii"))
        return len(self.items) - 1


def _split_data(layout: RunLayout, split: str, iterations: list[int], chunks: Chunks, pairs_for) -> dict | None:
    """One split: ids, status letters per iteration, chunks of text; `pairs_for` adds the transitions.

    Text is chunked by blocks of CHUNK_PROBLEMS problems: one chunk of questions and gold answers per
    block, and one chunk of outputs and predicted answers per block and iteration, so that showing two
    iterations of a problem (or one failure's output) inflates only those.
    """
    from undo_cli.stages.collect_errors import classify as error_type  # the one rule (transitions.error_type)

    have = [k for k in iterations if layout.predictions(k, split).is_file()]
    if not have:
        return None
    ids: list[str] = []
    where: dict[str, int] = {}
    status: list[list[str]] = []
    questions: list[list[Any]] = []  # per problem: [question, gold]
    outputs: list[dict[int, list[Any]]] = []  # per iteration: problem -> [output, predicted]
    complete, pairs, previous = [], [], None
    for pos, k in enumerate(have):
        records = [p for p in _records(layout.predictions(k, split)) or [] if isinstance(p.get("id"), str)]
        done = layout.metrics(k, split).is_file()
        complete.append(done)
        outputs.append({})
        for p in records:
            i = where.get(p["id"])
            if i is None:
                i = where[p["id"]] = len(ids)
                ids.append(p["id"])
                status.append(["-"] * len(have))
                questions.append([p.get("question"), p.get("answer")])
            status[i][pos] = STATUS.get(error_type(p), "w")
            outputs[pos][i] = [p.get("output"), p.get("predicted")]
        pairs += pairs_for(k, records if done else None, previous)
        previous = (k, records if done else None)
    blocks = range(0, len(ids), CHUNK_PROBLEMS)
    return {"split": split, "iterations": have, "complete": complete, "ids": ids,
            "status": ["".join(s) for s in status], "chunk_size": CHUNK_PROBLEMS,
            "questions": [chunks.add(questions[b:b + CHUNK_PROBLEMS]) for b in blocks],
            "outputs": [[chunks.add([texts.get(i) for i in range(b, min(b + CHUNK_PROBLEMS, len(ids)))])
                         for b in blocks] for texts in outputs],
            "pairs": pairs}


def _pair(split: str, a: tuple[int, list | None], b: tuple[int, list | None], layout: RunLayout,
          kind: str) -> dict[str, Any]:
    """The transitions from iteration a to b of a split (None records: that evaluation has not finished)."""
    from undo_cli.loop.transitions import compare

    pair: dict[str, Any] = {"split": split, "a": a[0], "b": b[0], "kind": kind}
    if a[1] is None or b[1] is None:
        pair["note"] = "an evaluation of this pair has not finished yet"
        return pair
    try:
        result = compare(a[1], b[1], str(layout.predictions(a[0], split)), str(layout.predictions(b[0], split)))
    except UndoError as exc:  # shown in the page instead of failing the whole report
        pair["note"] = exc.message
        return pair
    pair["counts"] = result.counts
    pair["codes"] = {r["id"]: CODES[r["transition"]] for r in result.rows}
    return pair


def _finish_pairs(split: dict[str, Any]) -> None:
    """Codes by id -> one letter per problem of the split, in the split's order."""
    for pair in split["pairs"]:
        codes = pair.pop("codes", None)
        if codes is not None:
            pair["codes"] = "".join(codes.get(i, "-") for i in split["ids"])


def splits_and_pairs(layout: RunLayout, state: dict[str, Any], chunks: Chunks) -> list[dict[str, Any]]:
    """Validation (consecutive iterations) and test (one-shot vs best) with their transitions."""
    iterations = [r["iteration"] for r in state["rows"]]
    best = state.get("best_iteration")

    def val_pairs(k, records, previous):
        return [] if previous is None else [_pair("val", previous, (k, records), layout, "consecutive")]

    seen: dict[int, list | None] = {}

    def test_pairs(k, records, previous):
        seen[k] = records
        return []

    out = []
    val = _split_data(layout, "val", iterations, chunks, val_pairs)
    if val:
        out.append(val)
    test = _split_data(layout, "test", iterations, chunks, test_pairs)
    if test:
        if best is not None and best != 0 and 0 in seen and best in seen:
            test["pairs"].append(_pair("test", (0, seen[0]), (best, seen[best]), layout, "one-shot vs best"))
        out.append(test)
    for split in out:
        _finish_pairs(split)
    return out


def _failures(layout: RunLayout, k: int) -> dict[str, dict[str, Any]]:
    """The error records of iteration k (what refine k+1 showed the teacher), by id."""
    return {e.get("id"): e for e in _records(layout.errors(k)) or []}


def _informed(ids: list[str], previous_k: int, val: dict[str, Any] | None, index: dict[str, int],
              errors: dict[str, dict]) -> list:
    """Each failure shown to the teacher: a pointer into the validation data, or the error record itself.

    index: validation id -> its position (made once per page: per record it would cost O(problems) each).
    """
    out = []
    pos = val["iterations"].index(previous_k) if val and previous_k in val["iterations"] else None
    for i in ids:
        if i in index and pos is not None and val["status"][index[i]][pos] != "-":
            out.append([i, index[i], pos])  # the page reads question, gold and the wrong output from the chunk
        else:
            e = errors.get(i) or {}
            out.append([i, None, None, {"question": e.get("question"), "answer": e.get("answer"),
                                        "output": e.get("output"), "predicted": e.get("predicted"),
                                        "error_type": e.get("error_type")}])
    return out


def _refinement(record: dict[str, Any], informed: list) -> list[Any]:
    """One refined record as the page's chunk holds it."""
    r = record.get("refinement") or {}
    verified, kept = bool(r.get("verified")), bool(r.get("kept_previous"))
    if verified and isinstance(r.get("previous_rationale"), str):
        diff, against = word_diff(r["previous_rationale"], str(record.get("rationale") or "")), "refined"
    elif kept and isinstance(r.get("rejected_rationale"), str):
        diff, against = word_diff(str(record.get("rationale") or ""), r["rejected_rationale"]), "rejected"
    else:
        diff, against = [[0, str(record.get("rationale") or "")]], "none"
    usage = r.get("usage") or {}
    extra = {k: v for k, v in r.items() if k not in SHOWN}
    if record.get("verify") is not None:
        extra = {"verify": record["verify"], **extra}
    return [record.get("id"), record.get("problem_id"), record.get("question"), record.get("answer"), against, diff,
            informed, {"attempts": r.get("attempts"), "similarity": r.get("similarity"),
                       "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
                       "rejected_predicted": r.get("rejected_predicted"),
                       "rejected_finish_reason": r.get("rejected_finish_reason"), "template": r.get("template"),
                       "teacher": r.get("teacher"), "reject_reason": _refusal(r), "step_error": r.get("step_error")},
            r.get("more_rejected") or [], extra]


def _refusal(refinement: dict[str, Any]) -> str | None:
    """Why the attempt was refused, as `undo refine` counts it (stages/refine.py, the one reading)."""
    from undo_cli.stages.refine import refusal_of

    return refusal_of(refinement)


def _flags(record: dict[str, Any]) -> str:
    """Four letters the page filters on: verified/kept previous, cached, the failure's error type, the refusal."""
    r = record.get("refinement") or {}
    outcome = "v" if r.get("verified") else "k" if r.get("kept_previous") else "-"
    cached = {True: "1", False: "0"}.get(record.get("cached"), "-")
    kind = STATUS.get(r.get("error_type"), "-") if r.get("error_type") else "-"
    reason = _refusal(r)
    return outcome + cached + kind + (REASONS.get(reason, "?") if reason else "-")


def refinements(layout: RunLayout, state: dict[str, Any], splits: list[dict[str, Any]], chunks: Chunks) -> list:
    """Every iter_NN/refined.jsonl: flags per record for the filters, the records in chunks."""
    val = next((s for s in splits if s["split"] == "val"), None)
    index = {i: n for n, i in enumerate(val["ids"])} if val else {}
    out = []
    for row in state["rows"]:
        k = row["iteration"]
        records = _records(layout.refined(k)) if k > 0 else None
        if records is None:
            continue
        errors = _failures(layout, k - 1)
        flags, items = [], []
        for rec in records:
            r = rec.get("refinement") or {}
            flags.append(_flags(rec))
            items.append(_refinement(rec, _informed(list(r.get("informed_by") or []), k - 1, val, index, errors)))
        out.append({"iteration": k, "count": len(records), "flags": flags, "ids": [rec.get("id") for rec in records],
                    "chunk_size": CHUNK_REFINEMENTS,
                    "chunks": [chunks.add(items[i:i + CHUNK_REFINEMENTS])
                               for i in range(0, len(items), CHUNK_REFINEMENTS)]})
    return out


def page_data(run_dir: str | Path, state: dict[str, Any]) -> tuple[dict[str, Any], Chunks]:
    """(the index the page loads first, the chunks it inflates on demand)."""
    layout = RunLayout(Path(run_dir))
    chunks = Chunks()
    splits = splits_and_pairs(layout, state, chunks)
    refined = refinements(layout, state, splits, chunks)
    return {"splits": splits, "refinements": refined, "lineage": lineages(run_dir, refined, chunks)}, chunks


def lineages(run_dir: str | Path, refined: list[dict[str, Any]], chunks: Chunks) -> dict[str, Any]:
    """Every refined row's history, as `undo lineage RUN ROW --format json` prints it (loop/lineage.py), for the
    page's lineage view: the row ids in order, their JSON in chunks of CHUNK_REFINEMENTS rows."""
    from undo_cli.loop.lineage import as_json, histories

    ids = list(dict.fromkeys(i for group in refined for i in group["ids"] if isinstance(i, str)))
    found = histories(run_dir, ids, read=_records)
    rows = [as_json(str(run_dir), i, found[i]) for i in ids]
    return {"ids": ids, "chunk_size": CHUNK_REFINEMENTS,
            "chunks": [chunks.add(rows[i:i + CHUNK_REFINEMENTS]) for i in range(0, len(rows), CHUNK_REFINEMENTS)]}
