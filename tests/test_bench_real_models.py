"""bench/real_models.py's fixed design: its splits never leak into each other, and `undo iterate` accepts its settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "examples"))
import real_models  # noqa: E402


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_splits_are_disjoint_and_the_cpu_test_is_a_prefix_of_the_gpu_test(tmp_path):
    cpu = {k: _rows(p) for k, p in real_models.write_splits(tmp_path / "cpu", real_models.SCALES["cpu"]).items()}
    gpu = {k: _rows(p) for k, p in real_models.write_splits(tmp_path / "gpu", real_models.SCALES["gpu"]).items()}
    for split in (cpu, gpu):
        questions = {k: {r["question"] for r in rows} for k, rows in split.items()}
        assert not (questions["test"] & questions["val"]) and not (questions["test"] & questions["train"])
        assert not (questions["val"] & questions["train"])
    assert cpu["test"] == gpu["test"][: len(cpu["test"])]
    gpu_test = {r["question"] for r in gpu["test"]}
    assert not any(r["question"] in gpu_test for r in cpu["val"] + cpu["train"])
    assert {r["meta"]["events"] for r in cpu["test"]} == {1, 2, 3}
    assert all(str(int(r["answer"])) == r["answer"] for r in gpu["train"])


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_undo_iterate_accepts_the_bench_settings(tmp_path, scale, tiny_model, tiny_teacher, monkeypatch):
    """Every key the bench writes to run.toml is one `undo iterate` knows, with a value it accepts (tiny models
    stand in for the real ones: --dry-run loads none)."""
    monkeypatch.setattr(real_models, "STUDENT_PATH", str(tiny_model))
    data = real_models.write_splits(tmp_path / "data", real_models.SCALES[scale])
    teacher, backend, url = ("served-teacher", "openai", "http://127.0.0.1:9/v1") if scale == "cpu" else \
        (str(tiny_teacher), "hf", None)
    (tmp_path / "run.toml").write_text(real_models.run_toml(real_models.SCALES[scale], data, teacher, backend, url,
                                                            f"real-{scale}"))
    proc = subprocess.run([sys.executable, "-m", "undo_cli", "iterate", "--config", str(tmp_path / "run.toml"),
                           "--dry-run", "--format", "json"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    settings = json.loads(proc.stdout)
    assert "real-" + scale in json.dumps(settings)
