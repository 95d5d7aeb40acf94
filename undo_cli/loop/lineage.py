"""`undo lineage`: one training row's history across a run's iterations, from the files themselves.

    undo lineage runs/demo p07#0                  # a table on stderr: every iteration's version of the row
    undo lineage runs/demo p07#0 --format json    # the same on stdout (jq-able)
    undo lineage runs/demo p07                    # every row (sample) of problem p07

For each iteration it reads the files the loop wrote (loop/layout.py):
iteration 0's `rationales.jsonl` (and `rationales.rejected.jsonl`: a row the
teacher could not verify), then per refinement round `refined.jsonl` (what
the teacher wrote for the row, verified or refused) and `train_data.jsonl`
(whether the student of that iteration trained on it, and which text). Each
step shows the row's `lineage` (stages/lineage.py: teacher and model hash,
template hash, sampling, parent row, failure cluster, the cascade's attempts
with tokens, cost and verdict, cache hit, the failures that informed it) and
a hash of its text, so a changed rationale shows where it changed. Rows
written before lineage existed show what their records hold (teacher,
template, refinement) and `lineage: null`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError

FORMATS = {"table": "a table on stderr", "json": "JSON on stdout"}


@dataclass
class LineageConfig:
    """Everything `undo lineage` needs."""

    run: str = field(metadata={"argument": True, "help": "The run folder (runs/NAME)."})
    row: str = field(metadata={"argument": True, "help": "A training row's id (p07#0), or a problem id for all its rows."})
    format: str = field(default="table", metadata={"choices": FORMATS, "help": "table: on stderr; json: on stdout."})

    def __post_init__(self) -> None:
        from undo_cli.fields import check_choices

        check_choices(self)


def _text_hash(text: Any) -> str | None:
    return hashlib.sha256(str(text).encode("utf-8")).hexdigest()[:16] if isinstance(text, str) else None


def _read(path: Path) -> list[dict[str, Any]]:
    from undo_cli.records import read_records

    return read_records(str(path), "rationale", allow_empty=True) if path.is_file() else []


def _step(k: int, path: Path, record: dict[str, Any], event: str, root: Path) -> dict[str, Any]:
    r = record.get("refinement") or {}
    lineage = record.get("lineage")
    teacher = (lineage or {}).get("teacher", {}).get("id") if lineage else record.get("teacher")
    return {"iteration": k, "file": str(path.relative_to(root)), "event": event, "id": record.get("id"),
            "problem_id": record.get("problem_id"), "teacher": teacher,
            "correct": record.get("correct"), "reject_reason": record.get("reject_reason") or r.get("reject_reason"),
            "rationale_hash": _text_hash(record.get("rationale")), "rationale": record.get("rationale"),
            "informed_by": r.get("informed_by"), "lineage": lineage}


def history(run_dir: str | Path, row: str) -> list[dict[str, Any]]:
    """Every version of `row` (an id, or a problem id: all its rows) in the run folder, iteration by iteration."""
    from undo_cli.loop.layout import RunLayout

    root = Path(run_dir)
    if not root.is_dir():
        raise UndoError(f"{run_dir}: no such run folder", hint="give the folder `undo iterate` wrote (runs/NAME)")
    match = (lambda r: r.get("id") == row or r.get("problem_id") == row) if "#" not in row else \
        (lambda r: r.get("id") == row)
    steps = _walk(root, match, _read)
    if not steps:
        raise UndoError(f"{run_dir}: no row '{row}' in its rationales, refinements or training data",
                        hint="give a row id as the files write it (p07#0) or a problem id (p07); "
                             f"head -n 1 {RunLayout(root).rationales()} shows one")
    return steps


def histories(run_dir: str | Path, rows: list[str], read=None) -> dict[str, list[dict[str, Any]]]:
    """The history of each row id in `rows` (as `history` gives it), read in one pass over the run's files
    (`undo report --html` embeds every refined row's). read: how a file is read (default: strictly, as
    `undo lineage` does; the report passes its tolerant reader, for a run still writing)."""
    wanted = set(rows)
    out: dict[str, list[dict[str, Any]]] = {r: [] for r in rows}
    for step in _walk(Path(run_dir), lambda r: r.get("id") in wanted, read or _read):
        out[step["id"]].append(step)
    return out


def as_json(run: str, row: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """What `undo lineage RUN ROW --format json` prints (and the HTML report embeds per refined row)."""
    return {"run": run, "row": row, "history": steps}


def _walk(root: Path, match, read) -> list[dict[str, Any]]:
    from undo_cli.loop.layout import RunLayout

    layout = RunLayout(root)
    steps: list[dict[str, Any]] = []
    for k in layout.iterations():
        if k == 0:
            files = [(layout.rationales(), "generated and verified"), (layout.rejected(), "generated, not verified")]
        else:
            files = [(layout.refined(k), "refined"), (layout.train_data(k), "trained on")]
        for path, event in files:
            for record in (read(path) or []) if path.is_file() else []:
                if not match(record):
                    continue
                if event == "refined":
                    ok = (record.get("refinement") or {}).get("verified")
                    event_now = "refined and verified" if ok else "refinement refused; previous text kept"
                else:
                    event_now = event
                steps.append(_step(k, path, record, event_now, root))
    return steps


def _attempts(lineage: dict[str, Any] | None) -> str:
    if not lineage:
        return "-"
    parts = []
    for a in lineage.get("cascade") or []:
        cost = f", cost {a['cost']:.6g}" if a.get("cost") is not None else ""
        parts.append(f"{a['teacher']}: {a['verdict']} ({a['tokens']:,} tokens{cost}{', cached' if a.get('cached') else ''})")
    return "; ".join(parts) or "-"


def run(config: LineageConfig) -> dict[str, Any]:
    import json

    from undo_cli.console import console

    steps = history(config.run, config.row)
    if config.format == "json":
        print(json.dumps(as_json(config.run, config.row, steps), ensure_ascii=False, indent=1))
        return {"steps": len(steps)}
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"undo lineage {config.run} {config.row}", title_justify="left")
    for col in ("iter", "row", "event", "teacher (model hash)", "text", "cascade attempts", "informed by / parent"):
        table.add_column(col, overflow="fold")
    for s in steps:
        lin = s["lineage"] or {}
        teacher = lin.get("teacher") or {}
        parent = lin.get("parent")
        informed = ", ".join(s["informed_by"] or lin.get("informed_by") or [])
        source = "; ".join(x for x in (informed and f"failures {informed}",
                                       parent and f"parent {parent['id']} @ iter {parent['iteration']}",
                                       lin.get("failure_cluster") is not None and f"cluster {lin['failure_cluster']}")
                           if x) or "-"
        table.add_row(str(s["iteration"]), escape(str(s["id"])), s["event"] + (
            f" ({s['reject_reason']})" if s["reject_reason"] and "verified" not in s["event"] else ""),
            escape(f"{s['teacher'] or '-'}" + (f" ({teacher.get('hash')})" if teacher.get("hash") else "")),
            s["rationale_hash"] or "-", escape(_attempts(s["lineage"])), escape(source))
    console.print(table)
    return {"steps": len(steps)}
