"""What an UNDO run did, iteration by iteration: a table on stderr and a plot of accuracy.

    undo report runs/qwen-gsm8k
    undo report runs/qwen-gsm8k --plot accuracy.png

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

and, when the teacher stages kept token ledgers (undo_cli/economy), a second
table: teacher tokens paid and served from the cache per iteration, the
cumulative paid tokens, and their cost when prices are known (`--price-input`
/ `--price-output` here, else the prices the run used).

Below the table, the teacher's samples that did not verify, per iteration, by
reason: no final answer / wrong answer / false step (`--verify steps`).

A value that does not exist yet is shown as "—". Test accuracies come with n
and a 95% Wilson interval, so "3.3%" reads as "1 of 30". The plot (matplotlib,
Agg backend: no display needed) has two panels: validation accuracy per
iteration and the test accuracy of the students that were tested, labelled with
n, the best iteration marked; and what changed per iteration (teacher
rationales verified, refinements kept-previous, validation errors by type). It
goes to RUN_DIR/report.png unless --plot says otherwise. With token ledgers a
third panel plots validation and test accuracy against the cumulative teacher
tokens paid: what each refinement round bought.

`undo iterate` uses the same functions for its progress table and for
summary.json, so the three always agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError
from undo_cli.loop.layout import SPLITS, RunLayout, parse_iteration

DASH = "—"


@dataclass
class ReportConfig:
    """Everything `undo report` needs."""

    run_dir: str = field(metadata={"argument": True, "help": "The run folder (runs/NAME), finished or still running."})
    plot: str | None = field(default=None, metadata={"help": "Where to write the PNG plot (default: RUN_DIR/report.png)."})
    price_input: float | None = field(default=None, metadata={"help": "Cost the teacher's prompt tokens at this price per million (default: the run's prices)."})
    price_output: float | None = field(default=None, metadata={"help": "Cost the teacher's completion tokens at this price per million."})


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
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    out = []
    for line in text.splitlines():
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
            "teacher_cost_cumulative")


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
    if best is None and scored:
        best = max(scored, key=lambda r: (r["val_accuracy"], -r["iteration"]))["iteration"]
    current = (manifest or {}).get("current") or {}
    return {
        "run_dir": str(run_dir),
        "name": run_dir.name,
        "has_manifest": manifest is not None,
        "status": (manifest or {}).get("status", "unknown (no manifest.json)"),
        "current_step": current.get("step"),
        "stop_reason": (manifest or {}).get("stop_reason"),
        "best_iteration": best,
        "config": (manifest or {}).get("config"),
        "rows": rows,
        "teacher_usage": usage["total"] if usage["iterations"] else None,
    }


def _teacher_usage(run_dir: Path, rows: list[dict[str, Any]], prices: Any) -> dict[str, Any]:
    """Teacher tokens per iteration from the stages' ledgers (undo_cli/economy/accounting.py) into the rows."""
    from undo_cli.economy.accounting import usage_by_iteration

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


def write_summary(run_dir: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """summary.json: per-iteration numbers, the best iteration, and test accuracy best vs one-shot."""
    from undo_cli.records import write_json

    best, one_shot = _test(state["rows"], state["best_iteration"]), _test(state["rows"], 0)
    summary = {
        "name": state["name"],
        "run_dir": state["run_dir"],
        "status": state["status"],
        "stop_reason": state["stop_reason"],
        "best_iteration": state["best_iteration"],
        "best_student": str(RunLayout(Path(state["run_dir"])).student(state["best_iteration"]))
        if state["best_iteration"] is not None else None,
        "test": {"best": best, "one_shot": one_shot,
                 "gain": best["accuracy"] - one_shot["accuracy"] if best and one_shot else None},
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
        notes.append(f"★ best iteration by validation accuracy: {state['best_iteration']}")
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


def print_verdict(summary: dict[str, Any]) -> None:
    """UNDO's best student against one-shot distillation on the test split, with n and a 95% interval.

    Printed whatever the sign: a refinement round that made the student worse is a result too.
    """
    from undo_cli.console import console

    best, one_shot = summary["test"]["best"], summary["test"]["one_shot"]
    if not one_shot:
        console.print("[dim]no test evaluation yet (it runs once the loop has stopped)[/dim]")
        return
    if best is None or best["iteration"] == 0:
        console.print(f"test accuracy: one-shot (iteration 0) {_with_n(one_shot)}; no refinement round "
                      "beat it on validation, so the best student is the one-shot one (gain +0.0 points)")
        return
    gain = 100 * summary["test"]["gain"]
    console.print(f"[bold]test accuracy: UNDO (iteration {best['iteration']}) {_pct(best['accuracy'])} vs one-shot "
                  f"(iteration 0) {_pct(one_shot['accuracy'])}: {gain:+.1f} points[/bold] "
                  f"({best['correct']}/{best['count']} vs {one_shot['correct']}/{one_shot['count']})")
    console.print(f"  UNDO {_with_n(best)}; one-shot {_with_n(one_shot)}"
                  + ("; the intervals overlap: on this many questions the difference may be chance"
                     if _overlap(best, one_shot) else ""))


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
    """Two panels: accuracy per iteration (val line, test points, labels with n) and what changed per iteration.

    The top panel's y-axis is fitted to the data (with room for the labels), so
    2% and 4% do not sit on the floor of a 0-100 axis. The bottom panel shows,
    per iteration, the teacher's work (rationales generated at 0; refinements
    verified / kept-previous afterwards) and the validation errors by type that
    the next refinement round is given. Labels thin out past 12 iterations so
    that twenty stay readable. With the teacher's token ledgers, a third panel:
    accuracy against the cumulative teacher tokens paid. None when nothing is scored yet.
    """
    rows = [r for r in state["rows"] if r.get("val_accuracy") is not None or r.get("test_accuracy") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: works over ssh and in CI, no display needed
    import matplotlib.pyplot as plt

    all_rows = state["rows"]
    n_iter = len(all_rows)
    spend = [r for r in rows if r.get("teacher_tokens_cumulative") is not None]
    # With token ledgers, a third panel (its own x-axis): accuracy against what the teacher cost so far.
    fig, axes = plt.subplots(3 if spend else 2, 1, figsize=(max(6.4, 0.45 * n_iter + 3), 10.0 if spend else 7.0),
                             dpi=120, gridspec_kw={"height_ratios": [3, 2, 3] if spend else [3, 2]})
    ax, bx = axes[0], axes[1]
    ax.sharex(bx)
    ax.tick_params(labelbottom=False)
    if spend:
        _plot_against_tokens(axes[2], spend)
    val = [(r["iteration"], 100 * r["val_accuracy"], r.get("val_correct"), r.get("val_count"))
           for r in rows if r.get("val_accuracy") is not None]
    test = [(r["iteration"], 100 * r["test_accuracy"], r.get("test_correct"), r.get("test_count"))
            for r in rows if r.get("test_accuracy") is not None]
    label_every = max(1, n_iter // 12)
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], marker="o", label="validation")
    if test:
        ax.scatter([t[0] for t in test], [t[1] for t in test], marker="s", s=60, color="tab:red", zorder=3,
                   label="test (best and iteration 0)")
    # Test labels to the right of their points; validation labels above theirs, or to the left where a
    # test point shares the iteration (they would collide above it).
    tested = {t[0] for t in test}
    for points, color in ((val, "tab:blue"), (test, "tab:red")):
        for k, y, correct, count in points:
            if k % label_every and points is val and k not in tested:
                continue
            text = f"{y:.1f}%" + (f"\n{correct}/{count}" if correct is not None and count else "")
            if points is test:
                offset, align, valign = (9, 0), "left", "center"
            elif k in tested:
                offset, align, valign = (-9, 0), "right", "center"
            else:
                offset, align, valign = (0, 8), "center", "bottom"
            ax.annotate(text, (k, y), textcoords="offset points", xytext=offset, ha=align, va=valign,
                        fontsize=7, color=color)
    best = state["best_iteration"]
    if best is not None:
        ax.axvline(best, color="grey", linestyle=":", linewidth=1, label=f"best iteration ({best})")
    ax.set_ylim(*accuracy_axis([v[1] for v in val + test]))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"undo: {state['name']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")

    ks = [r["iteration"] for r in all_rows]
    width = 0.2
    teacher_ok = [r.get("teacher_verified") if r["iteration"] == 0 else r.get("refined_verified") for r in all_rows]
    kept_prev = [r.get("refined_kept_previous") or 0 for r in all_rows]
    bx.bar([k - 1.5 * width for k in ks], [v or 0 for v in teacher_ok], width, color="tab:green",
           label="teacher: verified (generated at 0, refined after)")
    bx.bar([k - 0.5 * width for k in ks], kept_prev, width, color="tab:olive", label="refinement kept previous")
    kinds = sorted({t for r in all_rows for t in (r.get("error_types") or {})})
    bottom = [0] * len(ks)
    colors = {"no_answer": "tab:grey", "truncated": "tab:orange", "wrong_answer": "tab:purple"}
    for kind in kinds:
        heights = [(r.get("error_types") or {}).get(kind, 0) for r in all_rows]
        bx.bar([k + 0.5 * width for k in ks], heights, width, bottom=bottom, color=colors.get(kind),
               label=f"val errors: {kind}")
        bottom = [b + h for b, h in zip(bottom, heights)]
    bx.set_ylabel("records")
    bx.set_xlabel("UNDO iteration (0 = one-shot distillation)")
    bx.set_xticks(ks[::label_every])
    bx.grid(alpha=0.3, axis="y")
    # Below the panel: inside it, the legend would hide bars whatever their heights.
    bx.legend(loc="upper center", bbox_to_anchor=(0.5, -0.32), fontsize="x-small", ncol=2, frameon=False)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _plot_against_tokens(ax, rows: list[dict[str, Any]]) -> None:
    val = [(r["teacher_tokens_cumulative"], 100 * r["val_accuracy"], r["iteration"]) for r in rows
           if r.get("val_accuracy") is not None]
    test = [(r["teacher_tokens_cumulative"], 100 * r["test_accuracy"]) for r in rows
            if r.get("test_accuracy") is not None]
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], marker="o", label="validation")
        for x, y, k in val:
            ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if test:
        ax.scatter([t[0] for t in test], [t[1] for t in test], marker="s", s=60, color="tab:red", zorder=3,
                   label="test")
    ax.set_ylim(*accuracy_axis([v[1] for v in val] + [t[1] for t in test]))
    ax.set_xlabel("cumulative teacher tokens paid (labels: iteration)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def run(run_dir: str, plot_path: str | None = None, price_input: float | None = None,
        price_output: float | None = None) -> dict[str, Any]:
    """`undo report`: print the table and the verdict, write the plot; returns the summary (not written)."""
    from undo_cli.console import console
    from undo_cli.economy.accounting import Prices

    state = collect(run_dir, Prices(price_input, price_output) if price_input is not None or price_output is not None
                    else None)
    print_table(state)
    best, one_shot = _test(state["rows"], state["best_iteration"]), _test(state["rows"], 0)
    summary = {"test": {"best": best, "one_shot": one_shot,
                        "gain": best["accuracy"] - one_shot["accuracy"] if best and one_shot else None}}
    print_verdict(summary)
    out = plot(state, plot_path or RunLayout(Path(run_dir)).report_plot)
    if out is None:
        console.print("no accuracy yet, so no plot (the first evaluation writes iter_00/val/predictions.metrics.json)")
    else:
        console.print(f"plot written to {out}")
    return {**state, **summary, "plot": str(out) if out else None}


def run_report(config: ReportConfig) -> dict[str, Any]:
    """`run` for the command line, which hands over a config."""
    return run(config.run_dir, config.plot, config.price_input, config.price_output)
