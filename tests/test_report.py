"""`undo report` on runs in every state: running (half-written files), written by the bash loop, missing.

The report reads artifacts that the stages write; here they are laid out on
disk the way `undo iterate` lays them out (with a manifest) and the way
examples/undo_loop.sh does (without one). The finished-run case, on a run the
real loop produced, is in test_iterate.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from undo_cli.records import write_json


def _jsonl(path: Path, rows: list[dict], torn: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)


def _rationale(i: int, **extra) -> dict:
    return {"id": f"p{i}#0", "problem_id": f"p{i}", "question": f"q{i}", "answer": "1", "rationale": "#### 1",
            "correct": True, **extra}


def _iteration(run: Path, k: int, val: float | None, *, loss: float = 1.0, refined: int = 0, verified: int = 0,
               test: float | None = None) -> None:
    d = run / f"iter_{k:02d}"
    if k == 0:
        _jsonl(d / "rationales.jsonl", [_rationale(i) for i in range(8)])
        _jsonl(d / "rationales.rejected.jsonl", [_rationale(i, correct=False) for i in range(8, 10)])
    else:
        _jsonl(d / "refined.jsonl", [_rationale(i, refinement={"verified": i < verified}) for i in range(refined)])
        _jsonl(d / "train_data.jsonl", [_rationale(i) for i in range(8)])
    write_json(d / "student" / "train_summary.json", {"final_loss": loss, "steps": 10})
    if val is not None:
        write_json(d / "val" / "predictions.metrics.json", {"accuracy": val, "correct": int(val * 20), "count": 20})
        _jsonl(d / "val" / "predictions.jsonl", [{"id": f"v{i}", "correct": i < int(val * 20)} for i in range(20)])
        _jsonl(d / "errors.jsonl", [{"id": f"v{i}"} for i in range(20 - int(val * 20))])
    if test is not None:
        # the name runs made before metrics were named after their predictions: still read
        write_json(d / "test" / "metrics.json", {"accuracy": test, "correct": int(test * 40), "count": 40})


def test_report_of_a_running_run_shows_what_exists(tmp_path, capsys):
    from undo_cli.loop import report

    run = tmp_path / "runs" / "live"
    _iteration(run, 0, 0.25, loss=1.5)
    _iteration(run, 1, 0.40, loss=1.2, refined=6, verified=4)
    # Iteration 2 is refining right now: two records and a half-written third.
    _jsonl(run / "iter_02" / "refined.jsonl", [_rationale(i, refinement={"verified": True}) for i in range(2)],
           torn='{"id": "p2#0", "proble')
    stages = {f"iter_{k:02d}/{s}": {"status": "done", "seconds": 10.0 + k}
              for k in (0, 1) for s in ("train", "evaluate", "collect_errors")}
    stages.update({"iter_00/generate": {"status": "done", "seconds": 30.0},
                   "iter_01/refine": {"status": "done", "seconds": 20.0},
                   "iter_02/refine": {"status": "running", "seconds": 0.0},
                   "iter_02/mix": {"status": "pending", "seconds": 0.0},
                   "iter_02/train": {"status": "pending", "seconds": 0.0}})
    write_json(run / "manifest.json", {"status": "running", "stages": stages, "best_iteration": 1,
                                       "current": {"step": "iter_02/refine"}})

    result = report.run(str(run))
    err = capsys.readouterr().err
    rows = {r["iteration"]: r for r in result["rows"]}
    assert rows[0]["verification_rate"] == 0.8 and rows[0]["teacher_written"] == 8
    assert rows[1]["refined_verified"] == 4 and rows[1]["val_accuracy"] == 0.40
    assert rows[2]["refined"] == 2 and rows[2]["val_accuracy"] is None and rows[2]["status"] == "refine running"
    assert "running now: iter_02/refine" in err and "—" in err
    assert "4/6 ref" in err and "30/10/10" in err
    assert Path(result["plot"]).read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_bash_loop_folder_without_manifest(tmp_path, capsys):
    from undo_cli.loop import report

    run = tmp_path / "bash-run"
    _iteration(run, 0, 0.30, test=0.25)
    _iteration(run, 1, 0.80, refined=5, verified=5, test=0.45)
    plot = tmp_path / "plots" / "acc.png"
    result = report.run(str(run), str(plot))
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines at 80 columns
    assert result["best_iteration"] == 1  # from the validation predictions, no manifest needed
    assert "iteration 1 vs 0: +10/-0 of 20 (+50.0 points), exact McNemar p = 0.002: kept" in err
    assert result["test"]["gain"] == 0.45 - 0.25
    assert "UNDO (iteration 1) 45.0% vs one-shot (iteration 0) 25.0%: +20.0 points" in err
    assert plot.is_file() and str(plot) in err.replace(" ", "")


def test_plot_replaces_only_a_plot_of_this_run(tmp_path, undo_inproc):
    """Issue 32: `--plot PATH` overwrote any file at PATH. Now: a new file, this run's own plot (its default path, or
    a PNG whose text chunk marks it as this run's) or --overwrite."""
    wide = {"COLUMNS": "300"}
    run, other = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    for folder in (run, other):
        _iteration(folder, 0, 0.30)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    refused = undo_inproc("report", run, "--plot", notes, env=wide)
    assert refused.returncode == 2 and f"--plot {notes}: exists and is not a plot of {run}" in refused.stderr
    assert "--overwrite" in refused.stderr and notes.read_text() == "mine\n"
    plot = tmp_path / "plot.png"
    assert undo_inproc("report", other, "--plot", plot, env=wide).returncode == 0
    another = plot.read_bytes()
    assert undo_inproc("report", run, "--plot", plot, env=wide).returncode == 2  # another run's plot
    assert plot.read_bytes() == another
    for args in ((other, "--plot", plot), (run, "--plot", run / "report.png"), (run,), (run,)):  # its own: again
        assert undo_inproc("report", *args, env=wide).returncode == 0, args
    assert undo_inproc("report", run, "--plot", notes, "--overwrite", env=wide).returncode == 0
    assert notes.read_bytes()[:4] == b"\x89PNG"


def test_html_replaces_only_a_page_of_this_run(tmp_path, undo_inproc):
    """Issue 32's "no silent overwrite", for `--html PATH` as for --plot: an existing page is replaced only when it
    is this run's own report (its `undo-run` mark) or with --overwrite; a hand-written page survives."""
    wide = {"COLUMNS": "300"}
    run, other = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    for folder in (run, other):
        _iteration(folder, 0, 0.30)
    mine = tmp_path / "index.html"
    mine.write_text("<html><body>my notes</body></html>\n")
    refused = undo_inproc("report", run, "--html", mine, env=wide)
    assert refused.returncode == 2 and f"--html {mine}: exists and is not a report of this run" in refused.stderr
    assert "--overwrite" in refused.stderr and mine.read_text() == "<html><body>my notes</body></html>\n"
    page = tmp_path / "page.html"
    assert undo_inproc("report", other, "--html", page, env=wide).returncode == 0
    theirs = page.read_bytes()
    refused = undo_inproc("report", run, "--html", page, env=wide)  # another run's page
    assert refused.returncode == 2 and "is a report of another run" in refused.stderr and page.read_bytes() == theirs
    assert undo_inproc("report", other, "--html", page, env=wide).returncode == 0  # its own page: again
    assert undo_inproc("report", run, "--html", mine, "--overwrite", env=wide).returncode == 0
    assert "undo-run" in mine.read_text()[:4096] and "my notes" not in mine.read_text()


def test_report_errors_name_the_folder(tmp_path, undo):
    wide = {"COLUMNS": "300"}
    missing = undo("report", tmp_path / "nope", env=wide)
    assert missing.returncode == 2 and f"{tmp_path / 'nope'}: no such run folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = undo("report", tmp_path / "empty", env=wide)
    assert empty.returncode == 2 and "no iterations yet" in empty.stderr


def test_wilson_interval_matches_hand_computed_values():
    from undo_cli.loop.run_state import wilson_interval

    # Hand-computed from Wilson (1927) with z = 1.96: 1 of 30 and 0 of 105 and n of n.
    low, high = wilson_interval(1, 30)
    assert abs(low - 0.005909) < 1e-4 and abs(high - 0.166711) < 1e-4
    low, high = wilson_interval(0, 105)
    assert low == 0.0 and abs(high - 0.035262) < 1e-4
    low, high = wilson_interval(40, 40)
    assert abs(low - 0.912376) < 1e-4 and high == 1.0


def test_verdict_prints_n_interval_and_a_negative_gain(tmp_path, capsys):
    from undo_cli.loop import report

    run = tmp_path / "worse"
    _iteration(run, 0, 0.30, test=0.50)
    _iteration(run, 1, 0.80, refined=5, verified=2, test=0.25)  # better on val, worse on test: still printed
    result = report.run(str(run))
    err = " ".join(capsys.readouterr().err.split())
    assert result["test"]["gain"] == 0.25 - 0.50
    assert "-25.0 points" in err and "(10/40, 95% CI" in err and "(20/40, 95% CI" in err
    assert result["test"]["best"]["ci95"][0] < 0.25 < result["test"]["best"]["ci95"][1]


def check_figure(state: dict) -> dict:
    """What a reader of report.png relies on, read from the figure itself; returns what it found.

    Every iteration panel labels every iteration on its own x axis; each accuracy point has its 95% Wilson
    interval drawn; the ring and the dotted line sit at the iteration the run chose; error counts have an
    axis of their own; consecutive panels leave no blank band between them.
    """
    from matplotlib.container import ErrorbarContainer

    from undo_cli.loop.run_state import wilson_interval
    from undo_cli.loop.report_plot import figure

    fig = figure(state)
    fig.canvas.draw()
    axes = fig.axes
    ks = [r["iteration"] for r in state["rows"]]
    try:
        for ax in axes[:3]:
            assert [t.get_text() for t in ax.get_xticklabels()] == [str(k) for k in ks]
        acc, teacher, errors = axes[:3]
        bars = [c for c in acc.containers if isinstance(c, ErrorbarContainer)]
        val = next(c for c in bars if c.get_label().startswith("validation"))
        segments = val.lines[2][0].get_segments()
        scored = [r for r in state["rows"] if r.get("val_accuracy") is not None]
        assert len(segments) == len(scored)
        for seg, r in zip(segments, scored):
            low, high = wilson_interval(r["val_correct"], r["val_count"])
            assert seg[0][0] == r["iteration"]
            assert abs(seg[0][1] - 100 * low) < 1e-6 and abs(seg[1][1] - 100 * high) < 1e-6
        best = state["best_iteration"]
        ring = [c for c in acc.collections if c.get_label().startswith("chosen")]
        assert len(ring) == 1 and ring[0].get_offsets()[0][0] == best
        assert any(list(line.get_xdata()) == [best, best] for line in acc.lines)
        legend = [t.get_text() for t in acc.get_legend().get_texts()]
        tested = [r["iteration"] for r in state["rows"] if r.get("test_accuracy") is not None]
        if tested:
            assert any(t.startswith(f"test, iteration{'s' if len(tested) > 1 else ''} "
                                    f"{', '.join(map(str, tested))}") for t in legend)
        assert errors.get_ylabel() == "val errors" and teacher.get_ylabel() == "teacher rationales"
        shown = {p.get_label(): [] for p in errors.containers}
        for c in errors.containers:
            shown[c.get_label()] = [round(b.get_height()) for b in c]
        for kind, heights in shown.items():
            assert heights == [(r.get("error_types") or {}).get(kind, 0) for r in state["rows"]]
        renderer = fig.canvas.get_renderer()
        boxes = [ax.get_tightbbox(renderer) for ax in axes]
        for ax, box in zip(axes, boxes):  # what each panel draws (title, labels, ticks, legend): none cut at an edge
            assert box.x0 >= -1 and box.x1 <= fig.bbox.width + 1, (ax.get_title(loc="left"), box)
            assert box.y0 >= -1 and box.y1 <= fig.bbox.height + 1, (ax.get_title(loc="left"), box)
        height = fig.bbox.height
        for upper, lower in zip(boxes, boxes[1:]):
            assert upper.y0 - lower.y1 < 0.05 * height  # no blank band between panels
        return {"legend": legend, "axes": len(axes)}
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


@pytest.mark.slow
def test_plot_is_readable_with_one_and_with_twenty_iterations(tmp_path):
    from undo_cli.loop import report, run_state
    from tests.run_folders import write_run

    one = tmp_path / "one"
    _iteration(one, 0, 0.02, test=0.03)
    many = tmp_path / "many"
    made = write_run(many, val=40, test=20, iterations=20, refinements=6)
    legends = {}
    for run in (one, many):
        state = run_state.collect(run)
        legends[run.name] = check_figure(state)["legend"]
        out = report.plot(state, run / "report.png")
        assert out.read_bytes()[:4] == b"\x89PNG"
    assert run_state.collect(many)["best_iteration"] == made["best"]
    assert f"chosen: iteration {made['best']}, the run's choice" in " ".join(legends["many"]).replace("\n", " ")
    # Without a manifest (the bash loop) the mark says it was computed here.
    assert "chosen: iteration 0, by the loop's rule" in " ".join(legends["one"]).replace("\n", " ")
    assert "no manifest.json" in " ".join(legends["one"])
    import matplotlib.pyplot as plt

    assert not plt.get_fignums()  # every figure closed
    # The y-axis is fitted to the data: 2-3% is not drawn on a 0-100 axis, and 0% stays visible.
    assert run_state.accuracy_axis([2.0, 3.0]) == (-1.0, 7.0)
    low, high = run_state.accuracy_axis([20.0, 42.0])
    assert 10 < low < 20 and 42 < high < 55
