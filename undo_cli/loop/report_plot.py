"""report.png: one panel per kind of number, each on its own axis, every panel with its own x tick labels.

    from undo_cli.loop import report, run_state
    report.plot(run_state.collect("runs/demo"), "runs/demo/report.png")

Panels, top to bottom (matplotlib, Agg backend: files only, no display):

1. accuracy per iteration: validation (a line) and the tested students
   (squares, nudged right so that both stay visible at one iteration), each
   point with its 95% Wilson interval; the iteration the run chose is ringed
   and marked by a dotted line, labelled with run_state.best_label (the run's
   choice, its best so far, or computed for a folder without a manifest);
2. the teacher's rationales: at iteration 0 the samples generated (verified,
   rejected), afterwards the refinements (verified, or not, when the previous
   rationale was kept), stacked: the bar is what the teacher was asked for;
3. the validation errors of each type side by side (their own axis: a
   no_answer count of 2 beside 99 wrong answers must not vanish into a bar of
   rationales), with the count written on each bar while it fits;
4. with token ledgers: validation and test accuracy against the cumulative
   teacher tokens paid, labelled by iteration.

Legends stand to the right of their panel and the figure is laid out by
matplotlib's constrained layout, so there is no blank band between panels;
it widens with the number of iterations (x labels are thinned only past 25).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from undo_cli.loop.layout import run_mark

ERROR_COLORS = {"wrong_answer": "tab:purple", "no_answer": "tab:grey", "truncated": "tab:orange"}


def series(rows: list[dict[str, Any]], split: str) -> list[tuple[int, float, float, float, int | None, int | None]]:
    """(iteration, accuracy %, low %, high %, correct, count) of every row scored on the split."""
    from undo_cli.loop.run_state import wilson_interval

    out = []
    for r in rows:
        acc = r.get(f"{split}_accuracy")
        if acc is None:
            continue
        correct, count = r.get(f"{split}_correct"), r.get(f"{split}_count")
        known = isinstance(correct, int) and isinstance(count, int) and count > 0
        low, high = wilson_interval(correct, count) if known else (acc, acc)
        out.append((r["iteration"], 100 * acc, 100 * low, 100 * high, correct if known else None,
                    count if known else None))
    return out


def _figure(ks: list[int], tokens: bool):
    import matplotlib

    matplotlib.use("Agg")  # files only: works over ssh and in CI, no display needed
    import matplotlib.pyplot as plt

    heights = [3.0, 1.6, 1.6] + ([2.4] if tokens else [])
    width = max(8.0, 0.34 * len(ks) + 6.0)  # room for every iteration's tick and the legends on the right
    fig, axes = plt.subplots(len(heights), 1, figsize=(width, sum(heights) + 0.9), dpi=110,
                             gridspec_kw={"height_ratios": heights}, layout="constrained")
    every = max(1, math.ceil(len(ks) / 25))
    for ax in axes[:3]:  # the iteration panels: the same x range and tick labels on each
        ax.set_xlim(ks[0] - 0.6, ks[-1] + 0.6)
        ax.set_xticks(ks[::every])
        ax.tick_params(labelbottom=True)
        ax.grid(alpha=0.3, axis="y")
    # Titles and x labels start at the panel's left edge: centred over a panel narrowed by the legends on its
    # right, a long one ran off the figure's left edge, where constrained layout does not make room.
    axes[2].set_xlabel("UNDO iteration (0 = one-shot distillation)", loc="left")
    return fig, axes


def _legend(ax, order: list[str] | None = None) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if order:  # the order the eye reads the panel in, not matplotlib's (collections before error bars)
        rank = {label: next((i for i, o in enumerate(order) if label.startswith(o)), len(order)) for label in labels}
        handles, labels = zip(*sorted(zip(handles, labels), key=lambda hl: rank[hl[1]]))
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False,
              borderaxespad=0)


def _draw_accuracy(ax, state: dict[str, Any], val: list, test: list, label_every: int) -> None:
    from undo_cli.loop.run_state import accuracy_axis, best_label

    def errorbar(points, dx, **style):
        xs = [p[0] + dx for p in points]
        ys = [p[1] for p in points]
        ax.errorbar(xs, ys, yerr=[[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]], capsize=3,
                    elinewidth=1, **style)
        return xs, ys

    ns = {p[5] for p in val if p[5]}
    if val:
        errorbar(val, 0.0, fmt="-o", color="tab:blue", markersize=5,
                 label=f"validation{f' (n = {ns.pop()})' if len(ns) == 1 else ''}, 95% CI")
    if test:
        tested = ", ".join(str(p[0]) for p in test)
        errorbar(test, 0.2, fmt="s", color="tab:red", markersize=6,
                 label=f"test, iteration{'s' if len(test) > 1 else ''} {tested}, 95% CI")
    # Validation labels above their interval; test labels right of their square (never on top of each other).
    for i, (k, y, _low, high, correct, count) in enumerate(val):
        if i % label_every and k != state.get("best_iteration") and i != len(val) - 1:
            continue
        ax.annotate(f"{y:.1f}%" + (f"\n{correct}/{count}" if count else ""), (k, high), textcoords="offset points",
                    xytext=(0, 3), ha="center", va="bottom", fontsize=7, color="tab:blue")
    for k, y, _low, _high, correct, count in test:
        ax.annotate(f"{y:.1f}%" + (f"\n{correct}/{count}" if count else ""), (k + 0.2, y), textcoords="offset points",
                    xytext=(6, 0), ha="left", va="center", fontsize=7, color="tab:red")
    best = state.get("best_iteration")
    chosen = [p for p in val if p[0] == best]
    if chosen:
        ax.axvline(best, color="grey", linestyle=":", linewidth=1)
        ax.scatter([best], [chosen[0][1]], s=170, facecolors="none", edgecolors="black", linewidths=1.2, zorder=4,
                   label=f"chosen: {best_label(state)}".replace(" (", "\n("))
    bounds = [v for p in val + test for v in (p[2], p[3])]
    low, high = accuracy_axis(bounds)
    ax.set_ylim(low, high + 0.12 * (high - low))  # room for the labels above the intervals
    ax.set_ylabel("accuracy (%)")
    running = "" if state.get("status") == "done" or not state.get("has_manifest") else f" ({state.get('status')})"
    ax.set_title(f"undo: {state['name']}{running}" + (f" — stopped: {state['stop_reason']}"
                                                       if state.get("stop_reason") else ""), fontsize="medium",
                 loc="left")
    _legend(ax, ["validation", "test", "chosen"])


def _draw_teacher(ax, rows: list[dict[str, Any]]) -> None:
    ks = [r["iteration"] for r in rows]
    verified, other = [], []
    for r in rows:
        if r["iteration"] == 0:
            ok = r.get("teacher_verified") or 0
            rate = r.get("verification_rate")
            total = round(ok / rate) if rate else ok
            verified.append(ok), other.append(total - ok)
        else:
            verified.append(r.get("refined_verified") or 0), other.append(r.get("refined_kept_previous") or 0)
    ax.bar(ks, verified, 0.6, color="tab:green", label="verified (generated at 0, refined after)")
    ax.bar(ks, other, 0.6, bottom=verified, color="tab:olive",
           label="not verified (0: rejected sample;\nafter: refinement failed, previous kept)")
    # Set, not margins: the stacked bars' bottoms are sticky edges that would pin the top to the highest bar.
    ax.set_ylim(0, 1.12 * max([v + o for v, o in zip(verified, other)] + [1]))
    ax.set_ylabel("teacher rationales")
    _legend(ax)


def _draw_errors(ax, rows: list[dict[str, Any]], label: bool) -> None:
    ks = [r["iteration"] for r in rows]
    found = {t for r in rows for t, n in (r.get("error_types") or {}).items() if n}
    kinds = [t for t in ERROR_COLORS if t in found] + sorted(found - set(ERROR_COLORS))  # known classes first
    width = 0.8 / max(len(kinds), 1)
    for j, kind in enumerate(kinds):
        xs = [k - 0.4 + width * (j + 0.5) for k in ks]
        heights = [(r.get("error_types") or {}).get(kind, 0) for r in rows]
        bars = ax.bar(xs, heights, width, color=ERROR_COLORS.get(kind, "tab:brown"), label=kind)
        if label:
            ax.bar_label(bars, labels=[str(h) if h else "" for h in heights], fontsize=7, padding=1)
    if not kinds:
        ax.text(0.5, 0.5, "no validation errors collected yet", transform=ax.transAxes, ha="center", va="center",
                color="grey")
    ax.margins(y=0.18)
    ax.set_ylabel("val errors")
    if kinds:
        _legend(ax)


def _draw_tokens(ax, rows: list[dict[str, Any]]) -> None:
    from matplotlib.ticker import EngFormatter

    from undo_cli.loop.run_state import accuracy_axis

    val = [(r["teacher_tokens_cumulative"], 100 * r["val_accuracy"], r["iteration"]) for r in rows
           if r.get("val_accuracy") is not None]
    test = [(r["teacher_tokens_cumulative"], 100 * r["test_accuracy"]) for r in rows
            if r.get("test_accuracy") is not None]
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], marker="o", label="validation")
        for x, y, k in val:
            ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if test:
        ax.scatter([t[0] for t in test], [t[1] for t in test], marker="s", s=40, color="tab:red", zorder=3,
                   label="test")
    ax.set_ylim(*accuracy_axis([v[1] for v in val] + [t[1] for t in test]))
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel("cumulative teacher tokens paid (labels: iteration)", loc="left")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    _legend(ax)


def figure(state: dict[str, Any]):
    """The matplotlib figure (closed by the caller), or None when nothing is scored yet."""
    rows = state["rows"]
    val, test = series(rows, "val"), series(rows, "test")
    if not val and not test:
        return None
    spend = [r for r in rows if r.get("teacher_tokens_cumulative") is not None and
             (r.get("val_accuracy") is not None or r.get("test_accuracy") is not None)]
    ks = [r["iteration"] for r in rows]
    fig, axes = _figure(ks, bool(spend))
    try:
        _draw_accuracy(axes[0], state, val, test, label_every=max(1, math.ceil(len(ks) / 12)))
        _draw_teacher(axes[1], rows)
        _draw_errors(axes[2], rows, label=len(ks) <= 12)
        if spend:
            _draw_tokens(axes[3], spend)
    except BaseException:
        import matplotlib.pyplot as plt

        plt.close(fig)
        raise
    return fig


def plotted_run(path: str | Path) -> str | None:
    """The `Source` text of a PNG at `path` (a plot's `run_mark`), or None for any other file."""
    import struct

    try:
        with open(path, "rb") as fh:
            data = fh.read(1 << 16)  # text chunks come before the image data
    except OSError:
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"tEXt":
            key, _, value = data[pos + 8:pos + 8 + length].partition(b"\0")
            if key == b"Source":
                return value.decode("latin-1")
        if kind == b"IDAT":
            return None
        pos += 12 + length
    return None


def plot(state: dict[str, Any], path: str | Path) -> Path | None:
    """Draw the panels and write the PNG (atomically, marked with `run_mark`); None when nothing is scored yet."""
    fig = figure(state)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    try:
        png = io.BytesIO()
        fig.savefig(png, format="png", metadata={"Source": run_mark(state["run_dir"])})
    finally:
        plt.close(fig)
    from undo_cli.records.io import atomic_output

    with atomic_output(path) as fh:  # the PNG appears whole or not at all, like every file undo writes
        fh.buffer.write(png.getvalue())
    return Path(path)
