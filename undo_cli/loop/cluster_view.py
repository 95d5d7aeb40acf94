"""Failure clusters through a run: each cluster's validation errors per iteration, what each round fixed and broke
in it, and the refinements it got. Read by `undo report --html` (a table in "The run") and `undo diff RUN A B`.

    rows = cluster_rows(run_dir)            # None when the run folder has no clusters.json
    table = between(clusters, preds_a, preds_b, refined)   # one comparison, per cluster

A problem's cluster is the run's clusters.json (`undo cluster`, made once before
iteration 0), so a cluster is the same set of validation problems at every
iteration. An error is collect-errors' rule (stages/collect_errors.classify, by
way of loop/transitions.py); fixed and regressed are loop/transitions.py's, on
the problems of the cluster. Refinements of round k (iter_NN/refined.jsonl)
count per cluster of their *target* (a training problem): `refinement.cluster`,
or the clusters file's when an older record lacks it; targets are problems,
verified are those whose refinement verified (its rationales replaced).
Tolerant like the rest of `undo report`: unfinished evaluations are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from undo_cli.loop.layout import RunLayout


def _refined_per_cluster(clusters, records: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per cluster: target problems of a round's refined records, and those with a verified refinement."""
    problems: dict[str, dict[str, bool]] = {}
    for r in records:
        ref = r.get("refinement") or {}
        cluster = ref.get("cluster") or clusters.of(r.get("problem_id"))
        seen = problems.setdefault(cluster, {})
        seen[str(r.get("problem_id"))] = seen.get(str(r.get("problem_id")), False) or bool(ref.get("verified"))
    return {c: {"targets": len(p), "verified": sum(p.values())} for c, p in problems.items()}


def between(clusters, a: list[dict[str, Any]] | None, b: list[dict[str, Any]],
            refined: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Per cluster: problems, errors in A (when given) and in B with B's by class, fixed and regressed A -> B,
    and the targets / verified refinements of `refined` (the rounds between A and B)."""
    from undo_cli.loop.transitions import error_type, transition

    out: dict[str, dict[str, Any]] = {c: {"problems": 0, "errors": 0, "by_type": {}} for c in clusters.ids}
    before = {p.get("id"): bool(p.get("correct")) for p in a} if a is not None else None
    for p in b:
        row = out[clusters.of(p.get("id"))]
        row["problems"] += 1
        kind = error_type(p)
        if kind is not None:
            row["errors"] += 1
            row["by_type"][kind] = row["by_type"].get(kind, 0) + 1
        if before is not None and p.get("id") in before:
            move = transition(before[p.get("id")], bool(p.get("correct")))
            row[move] = row.get(move, 0) + 1
            row["errors_before"] = row.get("errors_before", 0) + (not before[p.get("id")])
    for c, counts in _refined_per_cluster(clusters, refined or []).items():
        out.setdefault(c, {"problems": 0, "errors": 0, "by_type": {}}).update(counts)
    return {c: row for c, row in out.items() if row["problems"] or row.get("targets")}


def cluster_rows(run_dir: str | Path) -> dict[str, Any] | None:
    """{"iterations": [k, ...], "clusters": [{"id", "label", "per": {k: between()'s row}}]} for a run folder's
    finished validation evaluations; None without clusters.json."""
    from undo_cli.clusters import load
    from undo_cli.loop.run_state import records_so_far

    layout = RunLayout(Path(run_dir))
    if not layout.clusters.is_file():
        return None
    try:
        clusters = load(str(layout.clusters))
    except Exception:  # a clusters file being written, or foreign: the report goes on without the table
        return None
    done = [k for k in layout.iterations()
            if layout.metrics(k, "val").is_file() and layout.predictions(k, "val").is_file()]
    per: dict[int, dict[str, dict[str, Any]]] = {}
    previous = None
    for k in done:
        preds = records_so_far(layout.predictions(k, "val")) or []
        refined = (records_so_far(layout.refined(k)) or []) if k > 0 else None
        per[k] = between(clusters, previous if previous is not None and k - 1 in per else None, preds, refined)
        previous = preds
    ids = [c for c in clusters.ids if any(c in per[k] for k in per)]
    return {"iterations": done, "method": clusters.method,
            "clusters": [{"id": c, "label": clusters.label(c), "per": {k: per[k][c] for k in per if c in per[k]}}
                         for c in ids]}
