"""`undo diff`: which problems the student newly got right, which it lost, between two evaluations.

    undo diff runs/qwen-gsm8k 1 2                       # validation, iteration 1 -> 2: counts + the changed problems
    undo diff runs/qwen-gsm8k 0 best --split test       # one-shot vs the run's best student on test
    undo diff runs/qwen-gsm8k 1 2 --format jsonl | jq -c 'select(.transition == "regressed") | .id'
    undo diff before.jsonl after.jsonl                  # any two prediction files of the same problems

Each problem is `fixed` (wrong in A, right in B), `regressed` (right, then
wrong), `still_wrong` or `still_right` (loop/transitions.py, the one
definition, which `undo report` and its HTML page use too). The counts go to
stderr as a table; `--format table` (default) adds the fixed and regressed
problems (id, gold answer, both predicted answers, the question),
`--format jsonl` writes one line per problem to stdout (or --output):

    {"id": "val-3", "transition": "fixed", "question": "...", "answer": "22",
     "a": {"correct": false, "predicted": "18", "error_type": "wrong_answer", "finish_reason": "stop", "output": "..."},
     "b": {"correct": true, "predicted": "22", "error_type": null, "finish_reason": "stop", "output": "..."}}

A run folder's A and B are iteration numbers (or `best`: the iteration the
run chose); their predictions are `iter_NN/<split>/predictions.jsonl`. When
the run has failure clusters (clusters.json, `undo cluster`), a second table
gives per cluster its errors in A and B, fixed and regressed, and the
refinements its training problems got in the rounds after A up to B
(loop/cluster_view.py); `--format jsonl` lines then carry the `cluster`. On
test only the best and the one-shot (0) students are evaluated. Files are
read strictly (records/io.py): a malformed line, a missing field or a
duplicate id is an error naming the file and line, and so is an id that only
one side has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError
from undo_cli.loop.layout import SPLITS, RunLayout


@dataclass
class DiffConfig:
    """Everything `undo diff` needs."""

    paths: list[str] = field(metadata={"argument": True, "help": (
        "RUN A B: a run folder and two iterations (numbers, or `best`); or PRED_A PRED_B: two prediction files "
        "of the same problems.")})
    split: str = field(default="val", metadata={"choices": list(SPLITS), "help": (
        "RUN A B only: which evaluation to compare (test: only the best and the one-shot students have one).")})
    format: str = field(default="table", metadata={"choices": ["table", "jsonl"], "help": (
        "table: counts and the fixed and regressed problems on stderr; jsonl: one line per problem "
        "(id, transition, both outputs) to --output, counts on stderr.")})
    output: str = field(default="-", metadata={"short": "-o", "help": "--format jsonl: where to write ('-' is stdout)."})
    rows: int = field(default=10, metadata={"help": "--format table: at most this many fixed and this many regressed "
                                                    "problems listed (0: counts only)."})

    def __post_init__(self) -> None:
        self.paths = list(self.paths)  # the CLI passes a tuple
        if len(self.paths) not in (2, 3):
            raise UndoError(f"undo diff takes RUN A B or PRED_A PRED_B, got {len(self.paths)} argument(s)",
                            hint="undo diff runs/NAME 1 2   or   undo diff a.jsonl b.jsonl")
        for name, allowed in (("split", SPLITS), ("format", ("table", "jsonl"))):
            if getattr(self, name) not in allowed:
                raise UndoError(f"--{name} {getattr(self, name)}: unknown choice", hint=f"use one of: {', '.join(allowed)}")
        if self.rows < 0:
            raise UndoError(f"--rows {self.rows}: must be 0 or more")
        if self.format == "jsonl" and self.output != "-":
            from undo_cli.records import check_output_path

            check_output_path(self.output)


@dataclass
class Side:
    """One side of the comparison: its label and where its predictions are (and, in a run, its iteration)."""

    label: str
    path: Path
    iteration: int | None = None


def _iteration(run_dir: Path, text: str, split: str, best: int | None) -> Side:
    """`2` or `best` -> iteration k's predictions on the split; errors say which iterations exist."""
    layout = RunLayout(run_dir)
    have = layout.iterations()
    if text == "best":
        if best is None:
            raise UndoError(f"{run_dir}: no best iteration yet (nothing evaluated on validation)",
                            hint="give iteration numbers: undo diff RUN 0 1")
        k = best
    else:
        try:
            k = int(text)
        except ValueError:
            raise UndoError(f"'{text}': expected an iteration number or `best`",
                            hint=f"iterations in {run_dir}: {', '.join(map(str, have)) or 'none yet'}") from None
    if k not in have:
        raise UndoError(f"{run_dir}: no iteration {k} (iterations: {', '.join(map(str, have)) or 'none yet'})",
                        hint="give iterations the run has")
    path = layout.predictions(k, split)
    if not path.is_file():
        tested = [i for i in have if layout.predictions(i, split).is_file()]
        why = (f"only the best and the one-shot (0) students are tested; tested here: {', '.join(map(str, tested))}"
               if split == "test" else "its evaluation has not run yet")
        raise UndoError(f"{path}: no such file: iteration {k} has no {split} predictions ({why})",
                        hint=f"undo diff {run_dir} 0 best --split test" if split == "test" else
                        "wait for the evaluation (undo report shows where the run is)")
    return Side(f"iteration {k}{' (best)' if k == best else ''}", path, k)


def sides(config: DiffConfig) -> tuple[Side, Side]:
    """The two prediction files the paths name (run form or two-file form)."""
    paths = config.paths
    if len(paths) == 2:
        for p in paths:
            if Path(p).is_dir():
                raise UndoError(f"{p}: is a folder; with two arguments undo diff compares two prediction files",
                                hint=f"a run folder takes two iterations: undo diff {p} 0 1")
        return Side(paths[0], Path(paths[0])), Side(paths[1], Path(paths[1]))
    run_dir = Path(paths[0])
    if not run_dir.is_dir():
        raise UndoError(f"{run_dir}: no such run folder", hint="undo diff runs/NAME A B, or two prediction files")
    best = None
    if "best" in paths[1:]:
        from undo_cli.loop.run_state import collect

        best = collect(run_dir)["best_iteration"]
    return _iteration(run_dir, paths[1], config.split, best), _iteration(run_dir, paths[2], config.split, best)


def _side(p: dict[str, Any]) -> dict[str, Any]:
    from undo_cli.loop.transitions import error_type

    return {"correct": bool(p.get("correct")), "predicted": p.get("predicted"), "error_type": error_type(p),
            "finish_reason": p.get("finish_reason"), "output": p.get("output")}


def line(row: dict[str, Any]) -> dict[str, Any]:
    """One problem of the comparison as `--format jsonl` writes it."""
    a = row["a"]
    return {"id": row["id"], "transition": row["transition"], "question": a.get("question"),
            "answer": a.get("answer"), "a": _side(a), "b": _side(row["b"])}


def run(config: DiffConfig) -> dict[str, Any]:
    """Read both sides, compare, print the counts (and the changed problems or the JSONL); returns the counts."""
    from undo_cli.loop.transitions import compare
    from undo_cli.records import read_records, write_records

    a, b = sides(config)
    preds_a, preds_b = read_records(a.path, "prediction"), read_records(b.path, "prediction")
    result = compare(preds_a, preds_b, str(a.path), str(b.path))
    print_counts(result.counts, a, b)
    clusters = _clusters(config)
    by_cluster = None
    if clusters is not None:
        by_cluster = per_cluster(clusters, config, a, b, preds_a, preds_b)
        print_clusters(clusters, by_cluster, a, b)
    if config.format == "jsonl":
        write_records(config.output, ({**line(r), "cluster": clusters.of(r["id"])} if clusters is not None
                                      else line(r) for r in result.rows))
    elif config.rows:
        print_changed(result.rows, config.rows)
    out = {"a": str(a.path), "b": str(b.path), "counts": result.counts, "problems": len(result.rows)}
    if by_cluster is not None:
        out["clusters"] = by_cluster
    return out


def _clusters(config: DiffConfig):
    """The run's failure clusters (RUN A B form with a clusters.json), else None."""
    if len(config.paths) != 3:
        return None
    layout = RunLayout(Path(config.paths[0]))
    if not layout.clusters.is_file():
        return None
    from undo_cli.clusters import load

    return load(str(layout.clusters))


def per_cluster(clusters, config: DiffConfig, a: Side, b: Side, preds_a, preds_b) -> dict[str, dict[str, Any]]:
    """loop/cluster_view.between over A -> B, with the refinements of every round after A up to B."""
    from undo_cli.loop.cluster_view import between
    from undo_cli.records import read_records

    layout = RunLayout(Path(config.paths[0]))
    refined: list[dict[str, Any]] = []
    low, high = sorted((a.iteration or 0, b.iteration or 0))
    for k in range(low + 1, high + 1):
        if layout.refined(k).is_file():
            refined += read_records(layout.refined(k), "rationale", allow_empty=True)
    return between(clusters, preds_a, preds_b, refined)


def print_clusters(clusters, rows: dict[str, dict[str, Any]], a: Side, b: Side) -> None:
    """Per cluster: errors in A and B, fixed, regressed, and the refinements in between, on stderr."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from undo_cli.console import console

    table = Table(title=f"per failure cluster ({clusters.method}; {clusters.path})", title_justify="left",
                  box=box.SIMPLE_HEAD)
    for col in ("cluster", "problems", "errors A", "errors B", "fixed", "regressed", "refined (verified)", "words"):
        table.add_column(col, justify="left" if col in ("cluster", "words") else "right")
    for c, row in rows.items():
        refined = f"{row['targets']} ({row['verified']})" if row.get("targets") else "—"
        table.add_row(c, str(row["problems"]), str(row.get("errors_before", "—")), str(row["errors"]),
                      str(row.get("fixed", 0)), str(row.get("regressed", 0)), refined, Text(clusters.label(c)))
    console.print(table)


def print_counts(counts: dict[str, int], a: Side, b: Side) -> None:
    """The four transitions with their share, on stderr."""
    from rich import box
    from rich.table import Table

    from undo_cli.console import console
    from undo_cli.loop.transitions import MEANING

    total = max(sum(counts.values()), 1)
    right_a, right_b = counts["still_right"] + counts["regressed"], counts["still_right"] + counts["fixed"]
    table = Table(title=f"undo diff: A = {a.label}, B = {b.label}", title_justify="left", box=box.SIMPLE_HEAD,
                  caption=f"A: {a.path}\nB: {b.path}\nright: A {right_a}/{total}, B {right_b}/{total} "
                          f"(net {right_b - right_a:+d})", caption_justify="left")
    for col in ("transition", "problems", "%", "meaning"):
        table.add_column(col, justify="right" if col in ("problems", "%") else "left")
    for name, n in counts.items():
        table.add_row(name, str(n), f"{100 * n / total:.1f}", MEANING[name])
    console.print(table)


def print_changed(rows: list[dict[str, Any]], limit: int) -> None:
    """The fixed and the regressed problems (at most `limit` of each): what changed, at a glance."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from undo_cli.console import console

    for name in ("fixed", "regressed"):
        chosen = [r for r in rows if r["transition"] == name]
        if not chosen:
            continue
        table = Table(title=f"{name}: {len(chosen)}" + (f" (first {limit})" if len(chosen) > limit else ""),
                      title_justify="left", box=box.SIMPLE_HEAD, expand=True)
        shown = [(r["id"], str(r["a"].get("answer")), _answer(r["a"]), _answer(r["b"]),
                  " ".join(str(r["a"].get("question") or "").split())) for r in chosen[:limit]]
        for j, col in enumerate(("id", "gold", "A", "B")):  # shown whole (up to 30 characters); the question gets the rest
            table.add_column(col, no_wrap=True, min_width=min(30, max(len(col), *(len(c[j]) for c in shown))))
        table.add_column("question", no_wrap=True, overflow="ellipsis", ratio=1)
        for cells in shown:
            table.add_row(*(Text(c) for c in cells))  # Text: model output is never read as rich markup
        console.print(table)
    console.print("the outputs themselves: --format jsonl, or undo report RUN --html report.html", style="dim",
                  highlight=False)


def _answer(p: dict[str, Any]) -> str:
    from undo_cli.loop.transitions import error_type

    kind = error_type(p)
    shown = "—" if p.get("predicted") is None else str(p["predicted"])
    return shown if kind in (None, "wrong_answer") else f"{shown} ({kind})"
