"""`undo report RUN --html FILE`: the whole run in one self-contained page that makes no network request.

    undo report runs/qwen-gsm8k --html report.html     # then open report.html from disk, offline

Four parts, top to bottom:

* **The run** (plain HTML, drawn here): settings, the per-iteration table
  (accuracy with n and a 95% Wilson interval, errors by type, the teacher's
  work, tokens and cost, stage times), the accuracy plot as inline SVG with
  the intervals drawn, the iteration the run chose and why it stopped, and
  the best student against the one-shot one on test.
* **Transitions**: per pair of consecutive validation iterations (and
  one-shot vs best on test) each problem is fixed, regressed, still wrong or
  still right (loop/transitions.py); counts that double as filters, a filter
  by error type, and per problem the question, the gold answer and the
  student's output at both ends (every iteration on request).
* **Refinements**: every refined record of every iteration: the training
  problem, the previous rationale against the refined one as a word diff
  (against the rejected attempt when the previous one was kept), the student
  failures the teacher was shown (`informed_by`, with their wrong outputs),
  verified or kept-previous, cached, tokens, and every other field of the
  record's `refinement` as it is; and a link to the row's lineage.
* **Lineage**: one refined row's history across the iterations, exactly what
  `undo lineage RUN ROW --format json` prints (loop/lineage.py), embedded for
  every refined row; `report.html#lineage=ROW` opens the page on it, offline.

How it stays safe and fast (limits in report_data.py):

* One file, nothing fetched: CSS and script inline, the plot inline SVG, no
  font, image or library from anywhere. A Content-Security-Policy in the page
  forbids every request and lets only this page's own script run (by its
  sha256), so even a rationale that holds `<script>` could not run it; model
  text is put on the page with `textContent`, never parsed as HTML, and the
  JSON in the page has every `<` escaped, so no text can close its tag.
* The per-problem text is compressed in chunks and inflated only when shown;
  lists are paginated (20 per page by default; "all" on request). A run with
  10k validation problems and 20 iterations opens in about a second
  (bench/report_html.py measures size and time to first render in chromium).

The page's script and style are report_page.js and report_page.css beside this module.
"""

from __future__ import annotations

import shlex

import base64
import hashlib
import html
import json
import time
from pathlib import Path
from typing import Any

from undo_cli.loop.layout import run_mark

HERE = Path(__file__).resolve().parent


def _e(value: Any) -> str:
    """Text for HTML: every value that reaches the page outside the script goes through here."""
    return html.escape("—" if value is None else str(value), quote=True)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _with_ci(correct: Any, count: Any, accuracy: float | None) -> str:
    from undo_cli.loop.run_state import wilson_interval

    if accuracy is None:
        return "—"
    if not isinstance(correct, int) or not isinstance(count, int) or count <= 0:
        return _pct(accuracy)
    low, high = wilson_interval(correct, count)
    return f"{_pct(accuracy)} <small>{correct}/{count}, {100 * low:.1f}–{100 * high:.1f}%</small>"


# --- the accuracy plot, inline SVG ---------------------------------------------------------------

def _points(rows: list[dict[str, Any]], split: str) -> list[tuple[int, float, float, float, str]]:
    """(iteration, accuracy %, low %, high %, tooltip) for each row with an accuracy on the split."""
    from undo_cli.loop.run_state import wilson_interval

    out = []
    for r in rows:
        acc, correct, count = r.get(f"{split}_accuracy"), r.get(f"{split}_correct"), r.get(f"{split}_count")
        if acc is None:
            continue
        low, high = wilson_interval(correct, count) if isinstance(correct, int) and count else (acc, acc)
        tip = f"iteration {r['iteration']}, {split}: {100 * acc:.1f}%"
        if isinstance(correct, int) and count:
            tip += f" ({correct}/{count}), 95% CI {100 * low:.1f}-{100 * high:.1f}%"
        out.append((r["iteration"], 100 * acc, 100 * low, 100 * high, tip))
    return out


def accuracy_svg(state: dict[str, Any], width: int = 760, height: int = 300) -> str:
    """Validation and test accuracy per iteration with 95% Wilson intervals and the chosen iteration marked."""
    from undo_cli.loop.run_state import accuracy_axis

    rows = state["rows"]
    val, test = _points(rows, "val"), _points(rows, "test")
    if not val and not test:
        return "<p class='muted'>no accuracy yet: the first evaluation writes iter_00/val/predictions.metrics.json</p>"
    ks = [r["iteration"] for r in rows]
    left, right, top, bottom = 52, 16, 12, 40
    y0, y1 = accuracy_axis([v for p in val + test for v in (p[2], p[3])])
    step = (width - left - right) / max(len(ks), 1)

    def x(k: float) -> float:
        return left + step * (k - ks[0] + 0.5)

    def y(v: float) -> float:
        return top + (height - top - bottom) * (1 - (v - y0) / (y1 - y0))

    parts = [f'<svg class="plot" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="validation and test accuracy per iteration with 95% intervals">']
    parts += _svg_axes(ks, x, y, y0, y1, left, width - right, top, height - bottom)
    best = state.get("best_iteration")
    if best is not None:
        parts.append(f'<line class="best" x1="{x(best):.1f}" x2="{x(best):.1f}" y1="{top}" y2="{height - bottom}"/>')
    for points, cls, dx in ((val, "val", 0.0), (test, "test", 0.18 * min(step, 60) / step)):
        parts += _svg_series(points, cls, lambda k, d=dx: x(k + d), y, labels=len(ks) <= 12)
    parts.append("</svg>")
    return "".join(parts) + _legend(state, val, test)


def _svg_axes(ks: list[int], x, y, y0: float, y1: float, left: float, right: float, top: float,
              bottom: float) -> list[str]:
    import math

    out = [f'<rect class="frame" x="{left}" y="{top}" width="{right - left}" height="{bottom - top}"/>']
    span = y1 - y0
    tick = next(t for t in (1, 2, 5, 10, 20, 25, 50) if span / t <= 8)
    v = math.ceil(y0 / tick) * tick
    while v <= y1:
        out.append(f'<line class="grid" x1="{left}" x2="{right}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>'
                   f'<text class="tick" x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}%</text>')
        v += tick
    every = max(1, math.ceil(len(ks) / 25))
    for k in ks[::every]:
        out.append(f'<text class="tick" x="{x(k):.1f}" y="{bottom + 16}" text-anchor="middle">{k}</text>')
    out.append(f'<text class="label" x="{(left + right) / 2:.1f}" y="{bottom + 34}" text-anchor="middle">'
               'iteration (0 = one-shot distillation)</text>')
    return out


def _svg_series(points, cls: str, x, y, labels: bool) -> list[str]:
    out = []
    if cls == "val" and len(points) > 1:
        out.append(f'<polyline class="{cls}" points="' + " ".join(f"{x(k):.1f},{y(v):.1f}" for k, v, *_ in points)
                   + '"/>')
    for k, v, low, high, tip in points:
        cx = x(k)
        out.append(f'<g class="{cls}"><title>{_e(tip)}</title>'
                   f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(low):.1f}" y2="{y(high):.1f}"/>'
                   f'<line x1="{cx - 4:.1f}" x2="{cx + 4:.1f}" y1="{y(low):.1f}" y2="{y(low):.1f}"/>'
                   f'<line x1="{cx - 4:.1f}" x2="{cx + 4:.1f}" y1="{y(high):.1f}" y2="{y(high):.1f}"/>'
                   + (f'<circle cx="{cx:.1f}" cy="{y(v):.1f}" r="4"/>' if cls == "val" else
                      f'<rect x="{cx - 4:.1f}" y="{y(v) - 4:.1f}" width="8" height="8"/>') + "</g>")
        if labels:  # validation above its interval, test to the right of its square: never on top of each other
            out.append(f'<text class="value {cls}" x="{cx:.1f}" y="{y(high) - 5:.1f}" text-anchor="middle">{v:.1f}%</text>'
                       if cls == "val" else
                       f'<text class="value {cls}" x="{cx + 7:.1f}" y="{y(v) + 4:.1f}">{v:.1f}%</text>')
    return out


def _legend(state, val, test) -> str:
    """The plot's legend, as HTML under it: it wraps where a legend inside the SVG would run off the side."""
    from undo_cli.loop.run_state import best_label

    tested = ", ".join(str(p[0]) for p in test)
    items = [("val", f"validation{_n(state['rows'], 'val')}, 95% intervals")]
    if test:
        items.append(("test", f"test{_n(state['rows'], 'test')}, iteration{'s' if len(test) > 1 else ''} {tested}"))
    if state.get("best_iteration") is not None:
        items.append(("best", f"chosen: {best_label(state)}"))
    marks = {"val": '<circle class="val" cx="6" cy="6" r="4"/>', "test": '<rect class="test" x="2" y="2" width="8" '
             'height="8"/>', "best": '<line class="best" x1="6" x2="6" y1="0" y2="12"/>'}
    return "<p class='legend'>" + "".join(
        f"<span><svg width='12' height='12' viewBox='0 0 12 12'>{marks[c]}</svg> {_e(t)}</span>" for c, t in items
    ) + "</p>"


def _n(rows: list[dict[str, Any]], split: str) -> str:
    counts = {r.get(f"{split}_count") for r in rows if r.get(f"{split}_count")}
    return f" (n = {counts.pop()})" if len(counts) == 1 else ""


# --- the run: static HTML ------------------------------------------------------------------------

def _iteration_table(state: dict[str, Any]) -> str:
    best = state.get("best_iteration")
    priced = any(r.get("teacher_cost") is not None for r in state["rows"])
    head = ["iter", "train ex.", "loss", "val acc (n, 95% CI)", "val errors", "teacher", "verified",
            "test acc (n, 95% CI)", "teacher tokens paid / cached"] + (["cost"] if priced else []) + \
        ["seconds teacher/train/eval"]
    out = ["<table class='iterations'><thead><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for r in state["rows"]:
        k = r["iteration"]
        types = r.get("error_types") or {}
        errors = _e(r.get("errors")) + (" <small>" + ", ".join(f"{_e(t)} {n}" for t, n in types.items() if n)
                                        + "</small>" if types else "")
        teacher = (f"{_e(r.get('teacher_written'))} generated" if k == 0 else "—" if r.get("refined") is None else
                   f"{r['refined_verified']}/{r['refined']} refined, {r.get('refined_kept_previous') or 0} kept previous")
        secs = r.get("seconds") or {}
        times = "/".join(f"{sum(secs.get(n) or 0 for n in names):.0f}" if any(secs.get(n) for n in names) else "—"
                         for names in (("generate", "refine"), ("train",), ("evaluate",)))
        cells = [f"{k}{' ★' if k == best else ''}", _e(r.get("train_examples")),
                 "—" if r.get("train_loss") is None else f"{r['train_loss']:.3f}",
                 _with_ci(r.get("val_correct"), r.get("val_count"), r.get("val_accuracy")), errors, teacher,
                 _pct(r.get("verification_rate")),
                 _with_ci(r.get("test_correct"), r.get("test_count"), r.get("test_accuracy")),
                 f"{_e(r.get('teacher_tokens'))} / {_e(r.get('teacher_cached_tokens'))}"]
        if priced:
            cells.append("—" if r.get("teacher_cost") is None else f"{r['teacher_cost']:.4f}")
        cells.append(times)
        out.append(f"<tr class='{'best' if k == best else ''}'>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _settings(state: dict[str, Any]) -> str:
    from undo_cli.identity import flatten

    config = state.get("config")
    if not config:
        return ("<p class='muted'>" + ("manifest.json holds no settings" if state.get("has_manifest") else
                                        "no manifest.json: the settings are unknown (a folder of the bash loop?)")
                + "</p>")
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v)}"
                   "</td></tr>" for k, v in flatten(config).items())
    return f"<details><summary>settings ({len(flatten(config))})</summary><table class='settings'>{rows}</table></details>"


def _teacher_line(state: dict[str, Any]) -> str:
    usage = state.get("teacher_usage")
    if not usage:
        return "<p class='muted'>no teacher token ledger in this run folder</p>"
    paid, cached = usage["paid"], usage["cached"]
    cost = "" if usage.get("cost") is None else f"; cost {usage['cost']:.4f}"
    return (f"<p>teacher: {paid['tokens']:,} tokens paid ({paid['prompt_tokens']:,} prompt + "
            f"{paid['completion_tokens']:,} completion) in {paid['requests']:,} requests; {cached['tokens']:,} tokens "
            f"from the cache in {cached['requests']:,} requests{cost}</p>")


def cluster_table(run_dir: str | Path | None) -> str:
    """Failure clusters (loop/cluster_view.py): per cluster and iteration, validation errors of its problems,
    fixed and regressed since the iteration before, and the refinements of its training problems that round."""
    from undo_cli.loop.cluster_view import cluster_rows

    data = cluster_rows(run_dir) if run_dir is not None else None
    if not data or not data["clusters"]:
        return ""
    ks = data["iterations"]
    out = [f"<h3>Failure clusters <small>({_e(data['method'])}, clusters.json; validation problems)</small></h3>",
           "<table class='clusters'><thead><tr><th>cluster</th><th>characteristic words</th>",
           *(f"<th>iter {k}</th>" for k in ks), "</tr></thead><tbody>"]
    for c in data["clusters"]:
        cells = []
        for k in ks:
            row = c["per"].get(k)
            if row is None:
                cells.append("<td>—</td>")
                continue
            n, e = row["problems"], row["errors"]
            rate = f" {100 * e / n:.0f}%" if n else ""
            moves = (f"<br><small>fixed {row.get('fixed', 0)}, regressed {row.get('regressed', 0)}</small>"
                     if "errors_before" in row else "")
            refined = (f"<br><small>refined {row['targets']} ({row['verified']} verified)</small>"
                       if row.get("targets") else "")
            title = ", ".join(f"{t} {m}" for t, m in row["by_type"].items())
            cells.append(f"<td title='{_e(title)}'><b>{e}/{n}</b>{rate}{moves}{refined}</td>")
        out.append(f"<tr><th>{_e(c['id'])}</th><td>{_e(c['label'])}</td>{''.join(cells)}</tr>")
    out.append("</tbody></table><p class='muted'>errors/problems of the cluster on validation; fixed and regressed "
               "since the iteration before; refined: the cluster's training problems that round's refine re-taught "
               "(those whose refinement verified)</p>")
    return "".join(out)


def run_section(state: dict[str, Any], summary: dict[str, Any]) -> str:
    """The run at a glance: everything here is numbers and settings, drawn once, no script needed."""
    from undo_cli.loop.run_state import best_label, verdict_lines

    stop = state.get("stop_reason")
    facts = [f"status: <b>{_e(state.get('status'))}</b>",
             f"stopped: {_e(stop)}" if stop else None,
             f"chosen: {_e(best_label(state))}" if state.get("best_iteration") is not None else None,
             f"run folder: <code>{_e(state.get('run_dir'))}</code>"]
    verdict = "".join(f"<p>{_e(line)}</p>" for line in verdict_lines(summary))
    rounds = (state.get("stop") or {}).get("rounds") or []
    if rounds:  # what each refinement round cost and gained, and its paired test (loop/stop.py)
        from undo_cli.loop.stop import describe as describe_round

        verdict += (f"<p class='muted'>stop_rule {_e(state['stop']['rule'])}: what each round cost and gained</p><ul>"
                    + "".join(f"<li>{_e(describe_round(r))}</li>" for r in rounds) + "</ul>")
    return ("<section id='run'><h2>The run</h2>"
            f"<p class='facts'>{' · '.join(f for f in facts if f)}</p>"
            f"<div class='verdict'>{verdict}</div>"
            f"{accuracy_svg(state)}{_iteration_table(state)}{cluster_table(state.get('run_dir'))}"
            f"{_teacher_line(state)}{_settings(state)}</section>")


# --- the page ------------------------------------------------------------------------------------

def _json_for_script(data: Any) -> str:
    """JSON that cannot end its <script> element: every <, > and & is a \\u escape (still the same JSON)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _csp(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    # Nothing may be fetched, connected to or framed; only this page's own script (by hash) runs.
    return (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
            "base-uri 'none'; form-action 'none'")


def build(run_dir: str | Path, state: dict[str, Any], summary: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the page, its sizes): the run's index JSON first, then the script, then the compressed chunks."""
    from undo_cli.loop.report_data import page_data

    index, chunks = page_data(run_dir, state)
    # Each refinement card shows the command that prints its row's history (loop/lineage.py), to copy.
    index["run"] = {"name": state["name"], "best_iteration": state.get("best_iteration"),
                    "lineage": f"undo lineage {shlex.quote(str(run_dir))}"}
    script = (HERE / "report_page.js").read_text(encoding="utf-8")
    style = (HERE / "report_page.css").read_text(encoding="utf-8")
    title = f"undo report: {state['name']}"
    page = "".join([
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<meta http-equiv='Content-Security-Policy' content=\"{_csp(script)}\">",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<meta name='undo-run' content='{_e(run_mark(run_dir))}'>",  # lets a later --html tell its own page
        f"<title>{_e(title)}</title><style>{style}</style></head><body>",
        f"<header><h1>{_e(title)}</h1><p class='muted'>written by <code>undo report --html</code> on "
        f"{_e(time.strftime('%Y-%m-%d %H:%M'))}; one file, no network: safe to open offline and to send</p></header>",
        run_section(state, summary),
        (HERE / "report_page.html").read_text(encoding="utf-8"),
        f"<script type='application/json' id='undo-index'>{_json_for_script(index)}</script>",
        f"<script>{script}</script>",
        *(f"<script type='application/octet-stream' id='c{i}'>{c}</script>" for i, c in enumerate(chunks.items)),
        "</body></html>",
    ])
    sizes = {"bytes": len(page.encode("utf-8")), "chunks": len(chunks.items), "chunk_bytes_raw": chunks.raw_bytes,
             "chunk_bytes": sum(len(c) for c in chunks.items)}
    return page, sizes


def reported_run(path: str | Path) -> str | None:
    """The `undo-run` mark of an HTML page at `path` (a report's `run_mark`), or None for any other file."""
    import re

    try:
        with open(path, "rb") as fh:
            head = fh.read(4096).decode("utf-8", "replace")  # the mark sits in <head>, before any content
    except OSError:
        return None
    found = re.search(r"<meta name='undo-run' content='([^']*)'>", head)
    return found.group(1) if found else None


def write(run_dir: str | Path, state: dict[str, Any], summary: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Write the page atomically; returns its sizes."""
    from undo_cli.records import atomic_write_text

    page, sizes = build(run_dir, state, summary)
    atomic_write_text(path, page)
    return sizes

