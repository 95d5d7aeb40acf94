"""What `undo report --html` costs at scale: page size, build time, and time to first render in real chromium.

    python bench/report_html.py                       # 10k validation problems x 20 iterations (+ baselines)
    python bench/report_html.py --val 2000 --loads 1  # a quicker look

Settings, fixed here before any measurement (seed 0):

* the run: a synthetic run folder in the layout and record shapes of `undo
  iterate` (tests/run_folders.py): --val validation problems (10k) evaluated at
  each of --iterations iterations (20), 2,000 test problems (one-shot and best
  students), 4,000 training rationales, 1,000 refined records per refinement
  round (half rewrite the previous rationale completely, half keep most of it:
  a warning first, one sentence changed), student outputs and rationales of ~400 characters of arithmetic
  sentences with random names and numbers (real text may compress
  differently: the raw size is printed too);
* the page: built in process (`run_state.collect` + `report_html.write`, what
  `undo report --html` does besides the table and the PNG), timed;
* the browser: Debian's chromium, headless, driven over the DevTools protocol
  (tests/browser.py), 1280x900; each load in a fresh browser, --loads times
  (3), the median reported. Timings are from navigation start, read from the
  page: `first paint` is chromium's first-contentful-paint (the run section
  with its plot), `counts` is when the page's script has parsed the index
  and drawn the transition counts and controls, `lists` when the first page
  of problems (with their text, inflated from the compressed chunks) and of
  refinements is on screen, `load` the load event. Also the DOM size and the
  JS heap once everything is shown.

Baselines, measured in the same run:

* the same page at 100 validation problems (everything else equal): what the
  size of the run costs;
* the naive page: the 10k page opened with `#size=all&filter=all`, which
  renders every problem of the default pair and every refinement of the
  first iteration at once instead of 20 per page (a page that renders
  everything would render even more: every pair, every iteration). Bounded
  by --naive-timeout seconds.

And the choice of the word diff (loop/report_data.py): the refinement chunks
as built (difflib's operations: the common text once) against the same
records with the previous and refined rationales written out whole (what a
page diffing in the browser would have to embed), raw and compressed, and
the time difflib takes.

Output: a rich table on stderr, JSON in bench/results/report_html.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))

SEED = 0
TEST, TRAIN, REFINED, CHARS, REWRITE = 2000, 4000, 1000, 400, 0.5
MARKS = ("firstPaint", "undoReady", "undoList", "undoRefinements", "load")
READ = """window.undoReport.idle().then(() => {
  const t = performance.getEntriesByType("navigation")[0];
  const paint = performance.getEntriesByName("first-contentful-paint")[0];
  const d = document.documentElement.dataset;
  return {firstPaint: paint ? paint.startTime : null, undoReady: Number(d.undoReady), undoList: Number(d.undoList),
          undoRefinements: Number(d.undoRefinements), load: t.loadEventEnd,
          nodes: document.getElementsByTagName("*").length,
          problems: document.querySelectorAll("#t-list article").length,
          refinements: document.querySelectorAll("#r-list article").length};
})"""


def build(root: Path, val: int, iterations: int) -> dict:
    """Write the synthetic run and its page; returns the page's path, sizes and build time."""
    from tests.run_folders import write_run
    from undo_cli.loop import report_html, run_state

    run = root / f"val{val}"
    started = time.perf_counter()
    write_run(run, val=val, test=TEST, train=TRAIN, iterations=iterations, refinements=REFINED, chars=CHARS,
              seed=SEED, rewrite=REWRITE)
    written = time.perf_counter() - started
    started = time.perf_counter()
    state = run_state.collect(run)
    summary = {"test": run_state.test_verdict(state)}
    page = root / f"val{val}.html"
    sizes = report_html.write(run, state, summary, page)
    return {"run": run, "page": page, "write_run_s": round(written, 1),
            "build_s": round(time.perf_counter() - started, 2), **sizes,
            "run_folder_bytes": sum(p.stat().st_size for p in run.rglob("*") if p.is_file())}


def load(page: Path, fragment: str = "", timeout: float = 120.0) -> dict:
    """One load of the page in a fresh headless chromium: the marks, DOM size and JS heap."""
    from tests.browser import Chromium

    with Chromium(timeout=timeout) as browser:
        browser.open(page.resolve().as_uri() + fragment)
        marks = browser.evaluate(READ, timeout=timeout)
        metrics = {m["name"]: m["value"] for m in browser.call("Performance.getMetrics", session=True)["metrics"]} \
            if browser.call("Performance.enable", session=True) is not None else {}
        marks["js_heap_mb"] = round(metrics.get("JSHeapUsedSize", 0) / 1e6, 1)
        marks["errors"] = browser.console_errors()
        marks["requests"] = len(browser.requests())
    return marks


def loads(page: Path, n: int, fragment: str = "", timeout: float = 120.0) -> dict:
    """Median of n loads (each in a fresh browser); None for a load that ran past the timeout."""
    from tests.browser import BrowserError

    runs = []
    for _ in range(n):
        try:
            runs.append(load(page, fragment, timeout))
        except BrowserError as exc:
            return {"timed_out": True, "error": str(exc), "timeout_s": timeout}
    out = {k: round(statistics.median(r[k] for r in runs if r[k] is not None), 1) if any(r[k] is not None for r in runs)
           else None for k in MARKS}
    out.update({k: runs[0][k] for k in ("nodes", "problems", "refinements", "js_heap_mb", "requests")})
    out["errors"] = sorted({e for r in runs for e in r["errors"]})
    out["loads"] = [{k: r[k] for k in MARKS} for r in runs]
    return out


def diff_choice(run: Path) -> dict:
    """Refinement records: difflib ops (as built) vs both texts written whole; raw and compressed bytes, time."""
    from undo_cli.loop.report_data import word_diff

    ops_raw = both_raw = 0
    ops_z = both_z = 0
    seconds = 0.0
    for refined in sorted(run.glob("iter_*/refined.jsonl")):
        records = [json.loads(line) for line in refined.read_text().splitlines()]
        ops, both = [], []
        for r in records:
            ref = r["refinement"]
            old, new = (ref["previous_rationale"], r["rationale"]) if ref.get("verified") else \
                (r["rationale"], ref.get("rejected_rationale", ""))
            started = time.perf_counter()
            ops.append(word_diff(old, new))
            seconds += time.perf_counter() - started
            both.append([old, new])
        a = json.dumps(ops, separators=(",", ":")).encode()
        b = json.dumps(both, separators=(",", ":")).encode()
        ops_raw, both_raw = ops_raw + len(a), both_raw + len(b)
        ops_z, both_z = ops_z + len(zlib.compress(a, 6)), both_z + len(zlib.compress(b, 6))
    return {"difflib_ops_bytes": ops_raw, "both_texts_bytes": both_raw, "difflib_ops_zlib_bytes": ops_z,
            "both_texts_zlib_bytes": both_z, "difflib_seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val", type=int, default=10_000)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--baseline-val", type=int, default=100)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--naive-timeout", type=float, default=120.0)
    parser.add_argument("--output", default=str(RESULTS / "report_html.json"))
    args = parser.parse_args()
    from tests.browser import available

    if available():
        sys.exit(f"bench/report_html.py needs chromium: {available()}")
    with tempfile.TemporaryDirectory(prefix="undo-bench-html-") as tmp:
        root = Path(tmp)
        pages = {"scale": build(root, args.val, args.iterations), "small": build(root, args.baseline_val, args.iterations)}
        results = {
            f"{args.val} val, paged": {**_public(pages["scale"]), **loads(pages["scale"]["page"], args.loads)},
            f"{args.baseline_val} val, paged": {**_public(pages["small"]), **loads(pages["small"]["page"], args.loads)},
            f"{args.val} val, naive": {**_public(pages["scale"]), **loads(
                pages["scale"]["page"], 1, "#size=all&filter=all", args.naive_timeout)},
        }
        diff = diff_choice(pages["scale"]["run"])
    report = {"settings": {"val": args.val, "iterations": args.iterations, "test": TEST, "train": TRAIN,
                           "refined_per_iteration": REFINED, "chars": CHARS, "rewrite": REWRITE, "seed": SEED, "loads": args.loads,
                           "baseline_val": args.baseline_val, "naive_timeout_s": args.naive_timeout},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
              "results": results, "word_diff": diff}
    _print(report)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}", file=sys.stderr)


def _public(built: dict) -> dict:
    return {k: v for k, v in built.items() if k not in ("run", "page")}


def _print(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, width=max(100, Console(stderr=True).width))
    table = Table(title=f"undo report --html: {report['settings']['iterations']} iterations, load average "
                        f"{report['machine']['load_avg'][0]:.1f} on {report['machine']['cpus']} CPUs (ms from "
                        "navigation start; medians)", title_justify="left")
    for col in ("page", "MB", "build s", "first paint", "counts", "lists", "load", "DOM nodes", "JS heap MB"):
        table.add_column(col, justify="left" if col == "page" else "right")
    scale = next(iter(report["results"].values()))
    for name, r in report["results"].items():
        if r.get("timed_out"):
            table.add_row(name, f"{r['bytes'] / 1e6:.1f}", str(r["build_s"]), *[f"> {r['timeout_s']:.0f} s"] * 4, "—", "—")
            continue
        ratio = "" if r is scale or not scale.get("undoList") else f" ({r['undoList'] / scale['undoList']:.2g}x)"
        table.add_row(name, f"{r['bytes'] / 1e6:.1f}", str(r["build_s"]), *(f"{r[k]:.0f}" if r[k] is not None else "—"
                      for k in ("firstPaint", "undoReady")), f"{r['undoList']:.0f}{ratio}", f"{r['load']:.0f}",
                      str(r["nodes"]), str(r["js_heap_mb"]))
    console.print(table)
    d = report["word_diff"]
    console.print(f"word diff of the refinements: difflib ops {d['difflib_ops_bytes'] / 1e6:.1f} MB raw, "
                  f"{d['difflib_ops_zlib_bytes'] / 1e6:.1f} MB compressed, vs both texts whole "
                  f"{d['both_texts_bytes'] / 1e6:.1f} MB raw, {d['both_texts_zlib_bytes'] / 1e6:.1f} MB compressed; "
                  f"difflib took {d['difflib_seconds']} s")
    for name, r in report["results"].items():
        if r.get("errors"):
            console.print(f"[red]{name}: console errors: {r['errors']}[/red]")


if __name__ == "__main__":
    main()
