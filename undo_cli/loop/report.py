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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError
from undo_cli.loop.layout import RunLayout, run_mark
from undo_cli.loop.run_state import DASH, best_label, collect, pct, records_so_far, test_verdict, verdict_lines, wilson_interval


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
                 _num(r.get("train_loss"), "{:.3f}"), pct(r.get("val_accuracy")), _num(r.get("errors")), teacher,
                 pct(r.get("verification_rate")), pct(r.get("test_accuracy")), seconds]
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
                 pct(r.get("val_accuracy"))]
        if priced:
            cells += [_num(r.get("teacher_cost"), "{:.4f}"), _num(r.get("teacher_cost_cumulative"), "{:.4f}")]
        table.add_row(*cells)
    console.print(table)


def choice_lines(state: dict[str, Any]) -> list[str]:
    """The paired tests behind the choice, one line per later iteration (loop/choose.py)."""
    from undo_cli.loop.choose import describe

    choice = state.get("choice") or {}
    return ["  " + describe(t, choice.get("alpha"), choice.get("min_gain")) for t in choice.get("tests") or []]


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
        records = records_so_far(path) if layout.metrics(k, "val").is_file() else None
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
        table.add_row(f"{k}{' ★' if k == state['best_iteration'] else ''}", pct(r["val_accuracy"]),
                      f"{_num(correct)}/{_num(count)}", ci,
                      *(_num(c.get(t)) for t in ("fixed", "regressed", "still_wrong", "still_right")))
    console.print(table)
    return changes


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
        found = reported_run(page) if page.is_file() and not config.overwrite else run_mark(config.run_dir)
        if found != run_mark(config.run_dir):
            what = "a report of another run" if found else "not a report of this run"
            raise UndoError(f"--html {page}: exists and is {what}; writing the report would replace it",
                            hint="give a new file name, or add --overwrite to replace it")
    return run(config.run_dir, config.plot, config.price_input, config.price_output, config.html)
