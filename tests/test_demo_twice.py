"""`undo demo` twice, each in a new folder: the same bytes (issue 32: the README said the demo was not
bit-reproducible; two runs on one machine were byte-identical).

Each run is what a new user types, `undo demo` in an empty folder (so the paths written into records are the
same relative ones), with its own teacher cache (a second run would otherwise be answered from the first's
cache: the same text, but `cached: true`), and the demo's flags for a shorter run. Everything it computes is
compared by sha256: the teacher's and every student's weights, the data splits, the rationales,
refinements, training data, predictions, errors and metrics, the run and shard sidecars. Only the files
that record wall-clock times or start dates may differ.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.conftest import run_undo

pytestmark = pytest.mark.slow

SHORTER = ("--teacher-epochs", "2", "--max-iterations", "1")
# Files that record timings (seconds, tokens/s, dates), and the plot, which draws the stage times.
TIMED = {"train_summary.json", "train_run.json", "manifest.json", "summary.json", "report.png"}


def _hashes(workdir: Path) -> dict[str, str]:
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(workdir.rglob("*")) if p.is_file()}


def test_two_demos_in_new_folders_write_the_same_bytes(tmp_path):
    runs = []
    for name in ("a", "b"):
        here = tmp_path / name
        here.mkdir()
        proc = run_undo("demo", *SHORTER, cwd=here, timeout=1200,
                        env={"COLUMNS": "200", "XDG_CACHE_HOME": str(tmp_path / f"cache-{name}")})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(_hashes(here / "undo-demo"))
    first, second = runs
    assert set(first) == set(second)
    differ = sorted(k for k in first if first[k] != second[k])
    assert {Path(k).name for k in differ} <= TIMED, differ
    same = {k for k in first if first[k] == second[k]}
    run = "runs/demo"
    expected = {"models/teacher/model.safetensors", f"{run}/iter_00/student/model.safetensors",
                f"{run}/iter_01/student/model.safetensors", f"{run}/iter_00/rationales.jsonl",
                f"{run}/iter_01/refined.jsonl", f"{run}/iter_01/train_data.jsonl", f"{run}/iter_00/errors.jsonl",
                f"{run}/iter_00/val/predictions.jsonl", f"{run}/iter_01/val/predictions.jsonl",
                f"{run}/iter_00/test/predictions.jsonl", "data/train.jsonl", "data/val.jsonl", "data/test.jsonl"}
    assert expected <= same, sorted(expected - same)
