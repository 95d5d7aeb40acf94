"""What a run's files say, read once for every view of it: the per-iteration rows, the chosen iteration, the test verdict.

    from undo_cli.loop.run_state import collect, test_verdict
    state = collect("runs/qwen-gsm8k"); summary = {"test": test_verdict(state)}

`collect` reads the artifacts themselves (and the manifest for what only it knows), so it works on a finished
run, a running one and the bash loop's folder; `write_summary` is summary.json. Below them are the words and
numbers every view shares, so that `undo report`'s tables (loop/report.py), its plot (loop/report_plot.py),
the HTML page (loop/report_html.py, loop/report_data.py, loop/cluster_view.py) and `undo iterate`'s progress
cannot disagree: the Wilson interval, the accuracy axis, which iteration is marked and on whose word, and the
verdict lines. Everything here is below those views; none of them is imported here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError
from undo_cli.loop.layout import SPLITS, RunLayout, parse_iteration

DASH = "—"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def records_so_far(path: Path) -> list[dict[str, Any]] | None:
    """The complete records of a JSONL file, or None if it does not exist.

    Tolerant on purpose (unlike records.read_records): the report reads files
    that a running stage is appending to, whose last line may be half written.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")  # a damaged byte spoils its line, not the report
    except OSError:
        return None
    out = []
    for line in text.split("\n"):  # not splitlines(): it also splits at U+2028 and friends inside a JSON string
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _iterations(run_dir: Path, manifest: dict[str, Any] | None) -> list[int]:
    found = set(RunLayout(run_dir).iterations())
    for key in (manifest or {}).get("stages", {}):
        if "/" in key and (k := parse_iteration(key)) is not None:
            found.add(k)
    return sorted(found)


ROW_KEYS = ("train_examples", "train_loss", "train_steps", "val_accuracy", "val_correct", "val_count", "errors",
            "error_types", "teacher_written", "teacher_verified", "refined", "refined_verified",
            "refined_kept_previous", "teacher_rejected_by_reason", "verification_rate", "test_accuracy", "test_correct", "test_count",
            "teacher_tokens", "teacher_cached_tokens", "teacher_requests", "teacher_cost", "teacher_tokens_cumulative",
            "teacher_cost_cumulative", "targeting")


def _refusals(refined: list[dict[str, Any]]) -> dict[str, int]:
    """Refinements that did not verify, by reason (as `undo refine` counts them)."""
    from undo_cli.scoring import REASONS
    from undo_cli.stages.refine import refusal_of

    counts = dict.fromkeys(REASONS, 0)
    for r in refined:
        if (reason := refusal_of(r.get("refinement") or {})) is not None:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def _row(run_dir: Path, k: int, stages: dict[str, Any]) -> dict[str, Any]:
    layout = RunLayout(run_dir)
    # Every key is always there (None until known), so summary.json has one shape for every row.
    row: dict[str, Any] = {"iteration": k, **dict.fromkeys(ROW_KEYS)}
    if k == 0:
        kept = records_so_far(layout.rationales())
        rejected = records_so_far(layout.rejected()) or []
        if kept is not None:
            samples = kept + rejected
            row["teacher_written"] = len(kept)
            row["teacher_verified"] = sum(bool(r.get("correct")) for r in samples)
            row["verification_rate"] = row["teacher_verified"] / len(samples) if samples else None
            from undo_cli.scoring import count_reasons

            row["teacher_rejected_by_reason"] = count_reasons(samples)
        data = kept
    else:
        refined = records_so_far(layout.refined(k))
        if refined is not None:
            row["refined"] = len(refined)
            row["refined_verified"] = sum(bool((r.get("refinement") or {}).get("verified")) for r in refined)
            row["refined_kept_previous"] = sum(bool((r.get("refinement") or {}).get("kept_previous")) for r in refined)
            row["verification_rate"] = row["refined_verified"] / len(refined) if refined else None
            row["teacher_rejected_by_reason"] = _refusals(refined)
        # what the round's budget chose (undo refine's summary, kept in the manifest): budget, targets, tokens
        row["targeting"] = ((stages.get(RunLayout.step_key(k, "refine")) or {}).get("summary") or {}).get("targeting")
        data = records_so_far(layout.train_data(k))
    row["train_examples"] = len(data) if data is not None else None
    trained = _read_json(layout.student(k) / "train_summary.json")
    if trained:
        row["train_loss"] = trained.get("final_loss")
        row["train_steps"] = trained.get("steps")
    for split in SPLITS:
        # Runs made before metrics were named after their predictions wrote metrics.json: still read.
        metrics = _read_json(layout.metrics(k, split)) or _read_json(layout.metrics(k, split).with_name("metrics.json"))
        if metrics:
            row[f"{split}_accuracy"] = metrics.get("accuracy")
            row[f"{split}_correct"] = metrics.get("correct")
            row[f"{split}_count"] = metrics.get("count")
    errors = records_so_far(layout.errors(k))
    row["errors"] = len(errors) if errors is not None else None
    if errors is not None:
        types: dict[str, int] = {}
        for e in errors:
            types[str(e.get("error_type") or "unknown")] = types.get(str(e.get("error_type") or "unknown"), 0) + 1
        row["error_types"] = dict(sorted(types.items()))
    seconds = {}
    status = None
    for name in ("generate", "refine", "mix", "train", "evaluate", "collect_errors", "test"):
        stage = stages.get(RunLayout.step_key(k, name))
        if stage is None:
            continue
        seconds[name] = stage.get("seconds")
        if stage.get("status") != "done" and status is None and name != "test":
            status = f"{name} {stage.get('status')}"
    row["seconds"] = seconds
    row["status"] = status or ("done" if row["errors"] is not None else "incomplete")
    return row


def collect(run_dir: str | Path, prices: Any = None) -> dict[str, Any]:
    """Everything known about a run, from its files and (when present) its manifest.

    prices: an economy.accounting.Prices to cost the teacher's tokens at (default: the run's own).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UndoError(f"{run_dir}: no such run folder", hint="pass runs/NAME, the folder `undo iterate` writes")
    manifest_path = RunLayout(run_dir).manifest
    manifest = _read_json(manifest_path)
    if manifest is None and manifest_path.is_file():
        from undo_cli.records import read_json

        # undo writes the manifest atomically, so an unreadable one was damaged by hand: say where.
        read_json(manifest_path)
    iterations = _iterations(run_dir, manifest)
    if not iterations:
        raise UndoError(f"{run_dir}: no iterations yet (no iter_00/ and no manifest.json)",
                        hint="pass the folder `undo iterate` or examples/undo_loop.sh writes")
    stages = (manifest or {}).get("stages", {})
    rows = [_row(run_dir, k, stages) for k in iterations]
    usage = _teacher_usage(run_dir, rows, prices)
    scored = [r for r in rows if r.get("val_accuracy") is not None]
    best = (manifest or {}).get("best_iteration")
    source = "run" if best is not None else None
    choice = (manifest or {}).get("choice")
    if best is None and scored:  # no manifest (the bash loop): the loop's rule, the paired test at its defaults
        from undo_cli.loop.choose import ALPHA, MIN_GAIN, choose, read_outcomes

        layout = RunLayout(run_dir)
        outcomes = [read_outcomes(layout.predictions(k, "val")) for k in range(max(iterations) + 1)]
        best, tests = choose(outcomes)
        choice, source = {"alpha": ALPHA, "min_gain": MIN_GAIN, "tests": tests}, "validation"
    current = (manifest or {}).get("current") or {}
    return {
        "run_dir": str(run_dir),
        "name": run_dir.name,
        "has_manifest": manifest is not None,
        "status": (manifest or {}).get("status", "unknown (no manifest.json)"),
        "current_step": current.get("step"),
        "stop_reason": (manifest or {}).get("stop_reason"),
        "best_iteration": best,
        "best_source": source,
        "choice": choice,
        "stop": (manifest or {}).get("stop"),  # the stopping rule and each round's cost and gain (loop/stop.py)
        "decided_through": (manifest or {}).get("iterations_done", 0) - 1 if manifest else None,
        "config": (manifest or {}).get("config"),
        "rows": rows,
        "teacher_usage": usage["total"] if usage["iterations"] else None,
    }


def _teacher_usage(run_dir: Path, rows: list[dict[str, Any]], prices: Any) -> dict[str, Any]:
    """Teacher tokens per iteration from the stages' ledgers (undo_cli/economy/accounting.py) into the rows."""
    from undo_cli.loop.usage import usage_by_iteration

    usage = usage_by_iteration(run_dir, prices)
    by_k = {u["iteration"]: u for u in usage["iterations"]}
    for row in rows:
        u = by_k.get(row["iteration"])
        if u:
            row.update(teacher_tokens=u["paid"]["tokens"], teacher_cached_tokens=u["cached"]["tokens"],
                       teacher_requests=u["paid"]["requests"], teacher_cost=u["cost"],
                       teacher_tokens_cumulative=u["paid_tokens_cumulative"], teacher_cost_cumulative=u["cost_cumulative"])
    return usage


def wilson_interval(correct: int, count: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (Wilson 1927): sane at 0/n and n/n, unlike the normal one.

    It turns "3.3%" into "1 of 30, somewhere between 0.6% and 16.7%", which is
    what a small test split can say.
    """
    if count <= 0:
        return 0.0, 1.0
    p = correct / count
    denom = 1 + z * z / count
    centre = (p + z * z / (2 * count)) / denom
    half = z * ((p * (1 - p) / count + z * z / (4 * count * count)) ** 0.5) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _test(rows: list[dict[str, Any]], k: int | None) -> dict[str, Any] | None:
    row = next((r for r in rows if r["iteration"] == k), None)
    if row is None or row.get("test_accuracy") is None:
        return None
    out = {"iteration": k, "accuracy": row["test_accuracy"], "correct": row.get("test_correct"),
           "count": row.get("test_count")}
    if isinstance(out["correct"], int) and isinstance(out["count"], int):
        out["ci95"] = [round(v, 4) for v in wilson_interval(out["correct"], out["count"])]
    return out


def test_verdict(state: dict[str, Any]) -> dict[str, Any]:
    """{"best", "one_shot", "gain"}: the chosen and the iteration-0 students on test (None where not tested)."""
    best, one_shot = _test(state["rows"], state["best_iteration"]), _test(state["rows"], 0)
    return {"best": best, "one_shot": one_shot,
            "gain": best["accuracy"] - one_shot["accuracy"] if best and one_shot else None}


def write_summary(run_dir: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """summary.json: per-iteration numbers, the best iteration, and test accuracy best vs one-shot."""
    from undo_cli.records import write_json

    summary = {
        "name": state["name"],
        "run_dir": state["run_dir"],
        "status": state["status"],
        "stop_reason": state["stop_reason"],
        "best_iteration": state["best_iteration"],
        "choice": state.get("choice"),
        "stop": state.get("stop"),
        "best_student": str(RunLayout(Path(state["run_dir"])).student(state["best_iteration"]))
        if state["best_iteration"] is not None else None,
        "test": test_verdict(state),
        "iterations": state["rows"],
        "teacher_usage": state.get("teacher_usage"),
    }
    write_json(RunLayout(Path(run_dir)).summary, summary)
    return summary


def pct(x: float | None) -> str:
    return DASH if x is None else f"{100 * x:.1f}%"


def _with_n(result: dict[str, Any]) -> str:
    """'3.3% (1/30, 95% CI 0.6-16.7%)': a rate is read together with how few questions it rests on."""
    if result.get("ci95") is None:
        return pct(result["accuracy"])
    low, high = result["ci95"]
    return (f"{pct(result['accuracy'])} ({result['correct']}/{result['count']}, "
            f"95% CI {100 * low:.1f}-{100 * high:.1f}%)")


def best_label(state: dict[str, Any], short: bool = False) -> str:
    """Which iteration is marked and on whose word: the run's choice, its best so far, or computed here.

    The table, the plot and the HTML page all say it with this sentence, so they cannot disagree.
    """
    k = state.get("best_iteration")
    if k is None:
        return "none yet"
    if short:
        return f"iteration {k}"
    rule = "a later iteration only when better on the same validation items by a paired test"
    if state.get("best_source") == "validation":
        return f"iteration {k}, by the loop's rule ({rule}; no manifest.json: computed here)"
    if state.get("status") == "done":
        return f"iteration {k}, the run's choice ({rule})"
    through = state.get("decided_through")
    return (f"iteration {k}, best so far (the run is {state.get('status')}; decided through iteration {through})"
            if through is not None and through >= 0 else f"iteration {k}, best so far")


def verdict_lines(summary: dict[str, Any]) -> list[str]:
    """UNDO's best student against one-shot distillation on test, with n and a 95% interval, whatever the sign."""
    best, one_shot = summary["test"]["best"], summary["test"]["one_shot"]
    if not one_shot:
        return ["no test evaluation yet (it runs once the loop has stopped)"]
    if best is None or best["iteration"] == 0:
        return [f"test accuracy: one-shot (iteration 0) {_with_n(one_shot)}; no refinement round beat it on "
                "validation, so the best student is the one-shot one (gain +0.0 points)"]
    gain = 100 * summary["test"]["gain"]
    return [f"test accuracy: UNDO (iteration {best['iteration']}) {pct(best['accuracy'])} vs one-shot "
            f"(iteration 0) {pct(one_shot['accuracy'])}: {gain:+.1f} points "
            f"({best['correct']}/{best['count']} vs {one_shot['correct']}/{one_shot['count']})",
            f"UNDO {_with_n(best)}; one-shot {_with_n(one_shot)}"
            + ("; the intervals overlap: on this many questions the difference may be chance"
               if _overlap(best, one_shot) else "")]


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("ci95") is None or b.get("ci95") is None:
        return False
    return a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1]


def accuracy_axis(percents: list[float]) -> tuple[float, float]:
    """The accuracy panel's y-range: the data's, with room for the labels, inside -1..101."""
    low, high = min(percents), max(percents)
    pad = max(2.0, 0.25 * (high - low))
    return max(-1.0, low - pad - 2), min(101.0, high + pad + 2)
