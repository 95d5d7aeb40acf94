"""What an UNDO run did, iteration by iteration: tables on stderr, a PNG plot, and (--html) one offline page.

    undo report runs/qwen-gsm8k
    undo report runs/qwen-gsm8k --plot accuracy.png
    undo report runs/qwen-gsm8k --html report.html      # every transition and refinement (loop/report_html.py)

Works on a finished run, on one still running (in another terminal) and on a
folder written by the bash version of the loop (examples/undo_loop.sh), because
it reads the artifacts themselves and uses the manifest only for what only the
manifest knows (status, stage times, the best iteration and why the run
stopped). Per iteration:

    train ex.    examples the student trained on (the mixed training data)
    loss         the final training loss (train_summary.json)
    val acc      validation accuracy (val/predictions.metrics.json)
    errors       validation failures collected for the next refinement
    teacher      iteration 0: verified rationales generated; k >= 1: refinements verified / tried
    verified     the teacher's verification rate (samples whose final answer checks out; with
                 verify = steps, whose arithmetic statements are all true too)
    test acc     held-out accuracy, for the best and the iteration-0 students only
    times        seconds per stage: teacher (generate or refine), train, evaluate (val)

then validation accuracy with n and its 95% Wilson interval beside what each
round changed (fixed, regressed, still wrong, still right against the previous
iteration: loop/transitions.py, the definition `undo diff` and the HTML page
use too), and, when the teacher stages kept token ledgers (undo_cli/economy),
teacher tokens paid and served from the cache per iteration, the cumulative
paid tokens, and their cost when prices are known (`--price-input` /
`--price-output` here, else the prices the run used).

Below the table, the teacher's samples that did not verify, per iteration, by
reason: no final answer / wrong answer / false step (`--verify steps`).

A value that does not exist yet is shown as "—". Test accuracies come with n
and a 95% Wilson interval, so "3.3%" reads as "1 of 30". The marked iteration
is the one the run chose (manifest.json's best_iteration, written by `undo
iterate` after each decision), said as such: "the run's choice" when it
finished, "best so far" while it runs; only a folder without a manifest (the
bash loop) gets it computed here, by the loop's own rule.

The plot (matplotlib, Agg backend: no display needed) has one panel per
kind of number, each with its own axis and x tick labels: accuracy per
iteration (validation and the tested students, each point with its 95%
interval, the chosen iteration marked), the teacher's rationales (verified or
not), the validation errors by type, and with token ledgers accuracy against
the cumulative teacher tokens paid. It goes to RUN_DIR/report.png unless
--plot says otherwise.

`undo iterate` uses the same functions for its progress table and for
summary.json, so they always agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError
from undo_cli.loop.layout import SPLITS, RunLayout, parse_iteration, run_mark

DASH = "—"


@dataclass
class ReportConfig:
    """Everything `undo report` needs."""

    run_dir: str = field(metadata={"argument": True, "help": "The run folder (runs/NAME), finished or still running."})
    plot: str | None = field(default=None, metadata={"help": "Where to write the PNG plot (default: RUN_DIR/report.png)."})
    price_input: float | None = field(default=None, metadata={"help": "Cost the teacher's prompt tokens at this price per million (default: the run's prices)."})
    price_output: float | None = field(default=None, metadata={"help": "Cost the teacher's completion tokens at this price per million."})
    html: str | None = field(default=None, metadata={"help": (
        "Also write the whole run as one self-contained HTML page here (every transition and refinement; no "
        "network: open it from disk).")})
    overwrite: bool = field(default=False, metadata={
        "help": "Let --plot and --html replace an existing file that is not a report of this run (refused otherwise)."})


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict[str, Any]] | None:
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
        kept = _jsonl(layout.rationales())
        rejected = _jsonl(layout.rejected()) or []
        if kept is not None:
            samples = kept + rejected
            row["teacher_written"] = len(kept)
            row["teacher_verified"] = sum(bool(r.get("correct")) for r in samples)
            row["verification_rate"] = row["teacher_verified"] / len(samples) if samples else None
            from undo_cli.scoring import count_reasons

            row["teacher_rejected_by_reason"] = count_reasons(samples)
        data = kept
    else:
        refined = _jsonl(layout.refined(k))
        if refined is not None:
            row["refined"] = len(refined)
            row["refined_verified"] = sum(bool((r.get("refinement") or {}).get("verified")) for r in refined)
            row["refined_kept_previous"] = sum(bool((r.get("refinement") or {}).get("kept_previous")) for r in refined)
            row["verification_rate"] = row["refined_verified"] / len(refined) if refined else None
            row["teacher_rejected_by_reason"] = _refusals(refined)
        # what the round's budget chose (undo refine's summary, kept in the manifest): budget, targets, tokens
        row["targeting"] = ((stages.get(RunLayout.step_key(k, "refine")) or {}).get("summary") or {}).get("targeting")
        data = _jsonl(layout.train_data(k))
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
    errors = _jsonl(layout.errors(k))
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


def _pct(x: float | None) -> str:
    return DASH if x is None else f"{100 * x:.1f}%"


def _num(x: Any, fmt: str = "{}") -> str:
    return DASH if x is None else fmt.format(x)


def _secs(row: dict[str, Any], *names: str) -> str:
    values = [row["seconds"].get(n) for n in names if row["seconds"].get(n)]
    return f"{sum(values):.0f}" if values else DASH


def print_table(state: dict[str, Any], title: str | None = None) -> None:
    """The per-iteration table on stderr (fits 80 columns: a log file or CI is as wide as that)."""
    from rich import box
    from rich.table import Table

    from undo_cli.console import console

    rows = state["rows"]
    table = Table(title=title or f"undo report: {state['run_dir']}", title_justify="left", box=box.SIMPLE_HEAD,
                  padding=(0, 1, 0, 0), pad_edge=False, caption_justify="left",
                  caption="teacher: verified rationales generated (gen) or refinements verified/tried (ref); "
                          "seconds: teacher/train/eval")
    for col in ("iter", "data", "loss", "val acc", "errors", "teacher", "verified", "test acc", "seconds"):
        table.add_column(col, justify="left" if col == "iter" else "right", no_wrap=True)
    for r in rows:
        best = r["iteration"] == state["best_iteration"]
        if r["iteration"] == 0:
            teacher = _num(r.get("teacher_written"), "{} gen")
        else:
            teacher = DASH if r.get("refined") is None else f"{r['refined_verified']}/{r['refined']} ref"
        seconds = "/".join(_secs(r, *names) for names in (("generate", "refine"), ("train",), ("evaluate",)))
        seconds = DASH if seconds == "/".join([DASH] * 3) else seconds
        cells = [f"{r['iteration']}{' ★' if best else ''}", _num(r.get("train_examples")),
                 _num(r.get("train_loss"), "{:.3f}"), _pct(r.get("val_accuracy")), _num(r.get("errors")), teacher,
                 _pct(r.get("verification_rate")), _pct(r.get("test_accuracy")), seconds]
        table.add_row(*cells, style="bold" if best else None)
    console.print(table)
    notes = []
    if state["best_iteration"] is not None:
        notes.append(f"★ chosen: {best_label(state)}")
        notes += choice_lines(state)
    if (state.get("stop") or {}).get("rounds"):
        from undo_cli.loop.stop import describe as describe_round

        notes.append(f"stop_rule {state['stop']['rule']}: what each round cost and gained")
        notes += ["  " + describe_round(r) for r in state["stop"]["rounds"]]
    if state.get("current_step") and state["status"] == "running":
        notes.append(f"running now: {state['current_step']}")
    elif any(r["status"] != "done" for r in rows) and state["status"] != "done":
        notes.append("unfinished: " + ", ".join(f"iteration {r['iteration']} ({r['status']})"
                                                for r in rows if r["status"] != "done"))
    if state.get("stop_reason"):
        notes.append(f"stopped: {state['stop_reason']}")
    rejected = [(r["iteration"], r["teacher_rejected_by_reason"]) for r in rows if r.get("teacher_rejected_by_reason")]
    if any(sum(c.values()) for _, c in rejected):
        notes.append(_rejections_note(rejected))
    for note in notes:
        console.print(f"[dim]{note}[/dim]")
    if state.get("teacher_usage"):
        print_teacher_table(state)


def _rejections_note(rejected: list[tuple[int, dict[str, int]]]) -> str:
    """'teacher not verified (no answer/wrong answer/false step): iter 0 3/5/4; iter 1 0/2/7 (+1 truncated)'."""
    from undo_cli.scoring import REASONS

    parts = []
    for k, counts in rejected:
        extra = "".join(f" (+{v} {name})" for name, v in counts.items() if name not in REASONS and v)
        parts.append(f"iter {k} " + "/".join(str(counts.get(name, 0)) for name in REASONS) + extra)
    names = "/".join(name.replace("_", " ") for name in REASONS)
    return f"teacher not verified ({names}): " + "; ".join(parts)


def _tokens(x: int | None) -> str:
    if x is None:
        return DASH
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e4 else str(x)


def print_teacher_table(state: dict[str, Any]) -> None:
    """Teacher tokens per iteration (paid, from the cache, cumulative) and cost, beside validation accuracy."""
    from rich import box
    from rich.table import Table

    from undo_cli.console import console

    rows = [r for r in state["rows"] if r.get("teacher_tokens") is not None]
    priced = any(r.get("teacher_cost") is not None for r in rows)
    table = Table(title="teacher tokens", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0),
                  pad_edge=False, caption_justify="left",
                  caption="paid: the teacher was called; cached: answered from the teacher cache")
    cols = ["iter", "paid", "requests", "cached", "paid total", "val acc"] + (["cost", "cost total"] if priced else [])
    for col in cols:
        table.add_column(col, justify="left" if col == "iter" else "right", no_wrap=True)
    for r in rows:
        cells = [str(r["iteration"]), _tokens(r["teacher_tokens"]), _num(r.get("teacher_requests")),
                 _tokens(r["teacher_cached_tokens"]), _tokens(r["teacher_tokens_cumulative"]),
                 _pct(r.get("val_accuracy"))]
        if priced:
            cells += [_num(r.get("teacher_cost"), "{:.4f}"), _num(r.get("teacher_cost_cumulative"), "{:.4f}")]
        table.add_row(*cells)
    console.print(table)


def _with_n(result: dict[str, Any]) -> str:
    """'3.3% (1/30, 95% CI 0.6-16.7%)': a rate is read together with how few questions it rests on."""
    if result.get("ci95") is None:
        return _pct(result["accuracy"])
    low, high = result["ci95"]
    return (f"{_pct(result['accuracy'])} ({result['correct']}/{result['count']}, "
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


def choice_lines(state: dict[str, Any]) -> list[str]:
    """The paired tests behind the choice, one line per later iteration (loop/choose.py)."""
    from undo_cli.loop.choose import describe

    choice = state.get("choice") or {}
    return ["  " + describe(t, choice.get("alpha"), choice.get("min_gain")) for t in choice.get("tests") or []]


def verdict_lines(summary: dict[str, Any]) -> list[str]:
    """UNDO's best student against one-shot distillation on test, with n and a 95% interval, whatever the sign."""
    best, one_shot = summary["test"]["best"], summary["test"]["one_shot"]
    if not one_shot:
        return ["no test evaluation yet (it runs once the loop has stopped)"]
    if best is None or best["iteration"] == 0:
        return [f"test accuracy: one-shot (iteration 0) {_with_n(one_shot)}; no refinement round beat it on "
                "validation, so the best student is the one-shot one (gain +0.0 points)"]
    gain = 100 * summary["test"]["gain"]
    return [f"test accuracy: UNDO (iteration {best['iteration']}) {_pct(best['accuracy'])} vs one-shot "
            f"(iteration 0) {_pct(one_shot['accuracy'])}: {gain:+.1f} points "
            f"({best['correct']}/{best['count']} vs {one_shot['correct']}/{one_shot['count']})",
            f"UNDO {_with_n(best)}; one-shot {_with_n(one_shot)}"
            + ("; the intervals overlap: on this many questions the difference may be chance"
               if _overlap(best, one_shot) else "")]


def print_verdict(summary: dict[str, Any]) -> None:
    """The verdict lines on stderr: a refinement round that made the student worse is a result too."""
    from rich.markup import escape

    from undo_cli.console import console

    lines = verdict_lines(summary)
    console.print(f"[bold]{escape(lines[0])}[/bold]" if len(lines) > 1 else escape(lines[0]), highlight=False)
    for line in lines[1:]:
        console.print(f"  {escape(line)}", highlight=False)


def val_transitions(run_dir: str | Path, rows: list[dict[str, Any]]) -> dict[int, dict[str, int]]:
    """{k: transition counts from iteration k-1 to k} on validation, for finished evaluations only."""
    from undo_cli.loop.transitions import compare

    layout = RunLayout(Path(run_dir))
    out: dict[int, dict[str, int]] = {}
    previous = None
    for r in rows:
        k = r["iteration"]
        path = layout.predictions(k, "val")
        records = _jsonl(path) if layout.metrics(k, "val").is_file() else None
        if previous is not None and previous[1] is not None and records is not None:
            try:
                out[k] = compare(previous[1], records, str(previous[2]), str(path)).counts
            except UndoError:  # not the same problems (edited by hand?): no transitions for this pair
                pass
        previous = (k, records, path)
    return out


def print_transitions(state: dict[str, Any]) -> dict[int, dict[str, int]]:
    """Validation accuracy with n and its 95% interval, and what each round changed: the plot's numbers."""
    from rich import box
    from rich.table import Table

    from undo_cli.console import console

    changes = val_transitions(state["run_dir"], state["rows"])
    rows = [r for r in state["rows"] if r.get("val_accuracy") is not None]
    if not rows:
        return changes
    table = Table(title="validation: accuracy (95% Wilson interval) and what changed since the previous iteration",
                  title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False)
    for col in ("iter", "val acc", "n", "95% CI", "fixed", "regressed", "still wrong", "still right"):
        table.add_column(col, justify="left" if col == "iter" else "right", no_wrap=True)
    for r in rows:
        k, correct, count = r["iteration"], r.get("val_correct"), r.get("val_count")
        ci = DASH
        if isinstance(correct, int) and isinstance(count, int) and count:
            low, high = wilson_interval(correct, count)
            ci = f"{100 * low:.1f}-{100 * high:.1f}%"
        c = changes.get(k) or {}
        table.add_row(f"{k}{' ★' if k == state['best_iteration'] else ''}", _pct(r["val_accuracy"]),
                      f"{_num(correct)}/{_num(count)}", ci,
                      *(_num(c.get(t)) for t in ("fixed", "regressed", "still_wrong", "still_right")))
    console.print(table)
    return changes


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("ci95") is None or b.get("ci95") is None:
        return False
    return a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1]


def accuracy_axis(percents: list[float]) -> tuple[float, float]:
    """The accuracy panel's y-range: the data's, with room for the labels, inside -1..101."""
    low, high = min(percents), max(percents)
    pad = max(2.0, 0.25 * (high - low))
    return max(-1.0, low - pad - 2), min(101.0, high + pad + 2)


def plot(state: dict[str, Any], path: str | Path) -> Path | None:
    """The PNG (loop/report_plot.py); None when nothing is scored yet."""
    from undo_cli.loop.report_plot import plot as draw

    return draw(state, path)


def run(run_dir: str, plot_path: str | None = None, price_input: float | None = None,
        price_output: float | None = None, html: str | None = None) -> dict[str, Any]:
    """`undo report`: print the tables and the verdict, write the plot (and the page); returns the summary."""
    from undo_cli.console import console
    from undo_cli.economy.accounting import Prices

    state = collect(run_dir, Prices(price_input, price_output) if price_input is not None or price_output is not None
                    else None)
    print_table(state)
    changes = print_transitions(state)
    summary = {"test": test_verdict(state)}
    print_verdict(summary)
    out = plot(state, plot_path or RunLayout(Path(run_dir)).report_plot)
    if out is None:
        console.print("no accuracy yet, so no plot (the first evaluation writes iter_00/val/predictions.metrics.json)")
    else:
        console.print(f"plot written to {out}", highlight=False, markup=False)
    page = None
    if html:
        from undo_cli.loop import report_html

        page = report_html.write(run_dir, state, summary, html)
        console.print(f"html report written to {html} ({page['bytes'] / 1e6:.1f} MB; one file, no network: open it "
                      "from disk)", highlight=False, markup=False)
    return {**state, **summary, "plot": str(out) if out else None, "transitions": changes,
            "html": str(html) if html else None, "html_bytes": page["bytes"] if page else None}


def run_report(config: ReportConfig) -> dict[str, Any]:
    """`run` for the command line, which hands over a config."""
    if config.plot:
        from undo_cli.loop.report_plot import plotted_run
        from undo_cli.records import check_output_path, is_stream

        check_output_path(config.plot, "--plot")
        target = Path(config.plot)
        own = target.resolve() == RunLayout(Path(config.run_dir)).report_plot.resolve()
        if (target.exists() and not is_stream(target) and not own and not config.overwrite
                and plotted_run(target) != run_mark(config.run_dir)):
            raise UndoError(f"--plot {target}: exists and is not a plot of {config.run_dir}; writing the plot would "
                            "replace it", hint="give a new file name, or add --overwrite to replace it")
    if config.html:
        from undo_cli.records import check_output_path

        check_output_path(config.html, "--html")  # before reading the run: a folder or an impossible path
        from undo_cli.loop.report_html import reported_run

        page = Path(config.html)
        if page.is_file() and not config.overwrite and reported_run(page) != run_mark(config.run_dir):
            what = "a report of another run" if reported_run(page) else "not a report of this run"
            raise UndoError(f"--html {page}: exists and is {what}; writing the report would replace it",
                            hint="give a new file name, or add --overwrite to replace it")
    return run(config.run_dir, config.plot, config.price_input, config.price_output, config.html)
