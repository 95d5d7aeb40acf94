"""`undo diff`: transitions between two evaluations, checked against the prediction files read here.

In process (`undo_here`) on a synthetic run folder (tests/run_folders.py) for
the counts, both forms and the errors; one subprocess for the JSONL on stdout
as a script reads it. `undo diff` on a run the real loop produced is in
test_iterate.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.run_folders import write_run
from tests.test_report_html import _counts, _read, expected_pairs


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diff") / "runs" / "synthetic"
    made = write_run(root, val=50, test=30, iterations=4, refinements=5)
    assert made["best"] != 0
    return root


def _jsonl_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_counts_and_lines_equal_the_files(run, tmp_path, undo_here):
    expected = expected_pairs(run)
    for key, truth in expected.items():
        split, pair = key.split()
        a, b = pair.split("->")
        out = tmp_path / f"{split}-{a}-{b}.jsonl"
        code, err = undo_here("diff", run, a, b, "--split", split, "--format", "jsonl", "-o", out)
        assert code == 0, err
        lines = _jsonl_out(out)
        assert {r["id"]: r["transition"] for r in lines} == truth  # every problem once, its transition
        counts = _counts(truth)
        for name, n in counts.items():
            assert f"{name} {n} " in err
        pa = {p["id"]: p for p in _read(run / f"iter_{int(a):02d}/{split}/predictions.jsonl")}
        pb = {p["id"]: p for p in _read(run / f"iter_{int(b):02d}/{split}/predictions.jsonl")}
        for r in lines:  # both outputs, as written
            assert r["a"]["output"] == pa[r["id"]]["output"] and r["b"]["output"] == pb[r["id"]]["output"]
            assert r["answer"] == pa[r["id"]]["answer"] and r["a"]["correct"] == pa[r["id"]]["correct"]
    # The terminal report's table counts the same, per iteration against the one before.
    from undo_cli.loop.report import val_transitions
    from undo_cli.loop.run_state import collect

    shown = val_transitions(run, collect(run)["rows"])
    assert {f"val {k - 1}->{k}": c for k, c in shown.items()} == {
        key: _counts(t) for key, t in expected.items() if key.startswith("val")}
    # `best` is the run's choice (manifest.json), on test the one-shot student against it.
    best = json.loads((run / "manifest.json").read_text())["best_iteration"]
    code, err = undo_here("diff", run, "0", "best", "--split", "test")
    assert code == 0 and f"A = iteration 0, B = iteration {best} (best)" in err
    assert all(f"{n} {c} " in err for n, c in _counts(expected[f"test 0->{best}"]).items())


def test_table_lists_the_fixed_and_regressed_problems(run, undo_here):
    truth = expected_pairs(run)["val 1->2"]
    code, err = undo_here("diff", run, "1", "2", "--rows", "100")
    assert code == 0, err
    fixed = [i for i, t in truth.items() if t == "fixed"]
    assert f"fixed: {len(fixed)}" in err and all(i in err for i in fixed)
    still = [i for i, t in truth.items() if t == "still_wrong"]
    assert not any(f" {i} " in err for i in still)  # only what changed is listed
    code, err = undo_here("diff", run, "1", "2", "--rows", "0")
    assert code == 0 and "fixed:" not in err


def test_two_prediction_files_on_stdout(run, tmp_path, undo):
    a, b = run / "iter_00/val/predictions.jsonl", run / "iter_03/val/predictions.jsonl"
    # A file of another tool: no `correct`, the answer a number; scored by the one scorer.
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({"id": p["id"], "question": p["question"], "answer": int(p["answer"]),
                                        "output": p["output"]}) + "\n" for p in _read(b)))
    proc = undo("diff", a, bare, "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    before = {p["id"]: p["correct"] for p in _read(a)}
    after = {p["id"]: p["correct"] for p in _read(b)}
    assert len(lines) == len(before) == len(after)
    for r in lines:
        assert r["transition"] == {(False, True): "fixed", (True, False): "regressed", (False, False): "still_wrong",
                                   (True, True): "still_right"}[(before[r["id"]], after[r["id"]])]
    assert "undo diff" in proc.stderr and proc.stdout.count("\n") == len(before)


def test_errors_name_the_file_line_and_what_to_do(run, tmp_path, undo_here):
    a = run / "iter_00/val/predictions.jsonl"
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(a.read_text().splitlines(keepends=True)[:-3]))
    code, err = undo_here("diff", a, fewer)
    missing = _read(a)[-3]["id"]
    said = f"{a}:{len(_read(a)) - 2}: field 'id': '{missing}' is not in {fewer}"
    assert code == 2 and said.replace(" ", "") in err.replace(" ", "")  # rich wraps long paths
    assert "3 of 50 ids" in err and "hint:" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text(a.read_text().replace('"output"', '"outptu"', 1))
    code, err = undo_here("diff", broken, a)
    assert code == 2 and f"{broken}:1: field 'output': missing".replace(" ", "") in err.replace(" ", "")
    code, err = undo_here("diff", run, "0", "7")
    assert code == 2 and "no iteration 7 (iterations: 0, 1, 2, 3)" in err
    code, err = undo_here("diff", run, "1", "2", "--split", "test")
    assert code == 2 and "iteration 1 has no test predictions" in err and "undo diff" in err
    code, err = undo_here("diff", run, "one", "2")
    assert code == 2 and "'one': expected an iteration number or `best`" in err
    code, err = undo_here("diff", run, "1")
    assert code == 2 and "is a folder" in err
    code, err = undo_here("diff", a)
    assert code == 2 and "got 1 argument" in err
    code, err = undo_here("diff", run, "0", "1", "--format", "csv")
    assert code == 2


@pytest.mark.slow
def test_readme_commands_as_written_in_a_terminal(tmp_path):
    """The README's block for `undo report --html` and `undo diff`, line by line, in a pseudo-terminal."""
    import re
    import shutil

    from tests.conftest import REPO
    from tests.test_terminal_pipes import UNDO, run_in_terminal

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What each round taught", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 5 and all(line.startswith("undo ") for line in lines)
    run = tmp_path / "runs" / "NAME"
    write_run(run, val=40, test=20, iterations=3, refinements=6)
    for side, k in (("before", 1), ("after", 2)):
        (tmp_path / side).mkdir()
        shutil.copy(run / f"iter_{k:02d}/val/predictions.jsonl", tmp_path / side / "predictions.jsonl")
    truth = expected_pairs(run)["val 1->2"]
    for line in lines:
        if "| jq" in line and shutil.which("jq") is None:
            continue  # the README's jq example needs jq; everything before the pipe is checked by the others
        script = "set -o pipefail; " + re.sub(r"(^|\| )undo ", lambda m: f"{m.group(1)}{UNDO} ", line)
        if "| jq" in line:
            script += " > regressed.txt"
        code, screen = run_in_terminal(script, tmp_path)
        assert code == 0 and "Traceback" not in screen, (line, screen[-2000:])
        if "--html" in line:
            assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")
        elif "| jq" in line:
            regressed = [json.loads(x) for x in (tmp_path / "regressed.txt").read_text().split()]
            assert sorted(regressed) == sorted(i for i, t in truth.items() if t == "regressed")
        elif "before/" in line:
            assert all(f"{n} {c} " in " ".join(screen.split()) for n, c in _counts(truth).items())


def test_per_cluster_errors_fixes_and_refinements_equal_the_files(tmp_path, capsys):
    """With clusters.json, `undo diff RUN A B` counts per cluster what the files say (counted here by hand)."""
    from undo_cli.loop.diff import DiffConfig, run as diff_run
    from tests.conftest import wide_console

    root = tmp_path / "runs" / "clustered"
    made = write_run(root, val=40, test=20, iterations=3, refinements=6, clusters=3)
    assign = made["assign"]
    with wide_console():
        result = diff_run(DiffConfig(paths=[str(root), "0", "2"], rows=0))
    a = {p["id"]: p for p in _read(root / "iter_00" / "val" / "predictions.jsonl")}
    b = {p["id"]: p for p in _read(root / "iter_02" / "val" / "predictions.jsonl")}
    refined = _read(root / "iter_01" / "refined.jsonl") + _read(root / "iter_02" / "refined.jsonl")
    for cluster, row in result["clusters"].items():
        mine = [i for i in b if assign[i] == cluster]
        assert row["problems"] == len(mine)
        assert row["errors_before"] == sum(not a[i]["correct"] for i in mine)
        assert row["errors"] == sum(not b[i]["correct"] for i in mine)
        assert row.get("fixed", 0) == sum(not a[i]["correct"] and b[i]["correct"] for i in mine)
        assert row.get("regressed", 0) == sum(a[i]["correct"] and not b[i]["correct"] for i in mine)
        targets = {(r["problem_id"]) for r in refined if assign[r["problem_id"]] == cluster}
        assert row.get("targets", 0) == len(targets)
    err = capsys.readouterr().err
    assert "per failure cluster" in err and "words of c00" in err
    # jsonl lines carry each problem's cluster
    out = tmp_path / "lines.jsonl"
    diff_run(DiffConfig(paths=[str(root), "0", "2"], format="jsonl", output=str(out)))
    assert all(line["cluster"] == assign[line["id"]] for line in _jsonl_out(out))
