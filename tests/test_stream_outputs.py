"""`--output` to a device, a FIFO, a socket, stdout by name or bash's `>(...)`: written in place, never replaced.

    undo score preds.jsonl --output /dev/null
    undo score preds.jsonl --output /dev/stdout | head
    undo score preds.jsonl --output >(gzip > scored.jsonl.gz)

Whole-file writers write a temp file and rename it over the target; done to
`/dev/null` as root (the usual user in ML containers) that replaced the device
with a regular file for every program on the machine. Only regular files get
the atomic rename; anything else is opened and written in place, gets no
sidecar files, and is never fsynced.

These tests run as root. They never touch the machine's own /dev: the
character device is a `mknod` twin of /dev/null (major 1, minor 3) in the
test's folder, and "/dev/stdout" is a link to /proc/self/fd/1 exactly like the
real one, so a regression breaks only the test's folder.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import write_jsonl

ROWS = [{"id": "a", "answer": "2", "output": "#### 2"}, {"id": "b", "answer": "3", "output": "#### 4"}]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the bug needs root: only root can rename over a device")


def _input(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "preds.jsonl", ROWS)


def _scored(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@root_only
@pytest.mark.parametrize("command", ["score", "collect-errors"])
def test_a_character_device_stays_a_device(tmp_path, undo, command):
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's twin
    os.chmod(null, 0o666)  # mknod's mode went through the umask
    args = [command, _input(tmp_path), "--output", null]
    if command == "collect-errors":
        args = [command, _input_predictions(tmp_path), "--output", null]
    result = undo(*args)
    assert result.returncode == 0, result.stderr
    st = os.stat(null)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3) and stat.S_IMODE(st.st_mode) == 0o666
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["null", "preds.jsonl"])  # no temp, no sidecar


def _input_predictions(tmp_path: Path) -> Path:
    rows = [{**r, "question": "q", "predicted": r["output"][-1], "correct": r["id"] == "a"} for r in ROWS]
    return write_jsonl(tmp_path / "preds.jsonl", rows)


@pytest.mark.slow
@root_only
def test_evaluate_into_a_device_writes_no_sidecars(tmp_path, undo, tiny_model):
    # The resumable writer (AppendLog) and the metrics: /dev/null.metrics.json must not appear next to the device.
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    problems = write_jsonl(tmp_path / "val.jsonl", [{"id": "v0", "question": "What is 1 plus 1?", "answer": "2"}])
    result = undo("evaluate", "--model", tiny_model, "--input", problems, "--output", null, "--max-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert stat.S_ISCHR(os.stat(null).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null", "val.jsonl"]


def test_stdout_by_name(tmp_path, undo):
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")  # what /dev/stdout is
    result = undo("score", _input(tmp_path), "--output", link)  # stdout is a pipe here
    assert result.returncode == 0, result.stderr
    assert [r["id"] for r in _scored(result.stdout)] == ["a", "b"]
    assert link.is_symlink() and os.readlink(link) == "/proc/self/fd/1"


def test_a_named_pipe(tmp_path, undo):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = undo("score", _input(tmp_path), "--output", fifo)
    assert result.returncode == 0, result.stderr
    reader.join(timeout=60)
    assert [r["id"] for r in _scored(got[0].decode())] == ["a", "b"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_unix_socket(tmp_path, undo):
    path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    got = bytearray()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(65536):
                got.extend(chunk)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result = undo("score", _input(tmp_path), "--output", path)
        assert result.returncode == 0, result.stderr
        thread.join(timeout=60)
    finally:
        server.close()
    assert [r["id"] for r in _scored(got.decode())] == ["a", "b"]
    assert stat.S_ISSOCK(os.stat(path).st_mode)


def test_process_substitution(tmp_path):
    _input(tmp_path)
    undo = f"{sys.executable} -m undo_cli"
    proc = subprocess.run(["bash", "-c", f"{undo} score preds.jsonl --output >(cat > got.jsonl)"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 30  # bash does not wait for the substituted process
    while (not (tmp_path / "got.jsonl").exists() or (tmp_path / "got.jsonl").read_text().count("\n") < 2):
        assert time.monotonic() < deadline, "nothing arrived through >(...)"
        time.sleep(0.05)
    assert [r["id"] for r in _scored((tmp_path / "got.jsonl").read_text())] == ["a", "b"]


# --- the generating stages: a FIFO or a device is written, never read back, and gets no sidecar ---------

PROBLEMS = [{"id": f"p{i}", "question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(2)]


def _stage_config(stage: str, tmp_path: Path, model: Path, output: Path):
    from undo_cli.stages import evaluate, generate, refine

    problems = write_jsonl(tmp_path / "problems.jsonl", PROBLEMS)
    common = {"max_tokens": 4, "output": str(output)}
    if stage == "generate":  # the teacher economy is on (the default): its ledger would be a sidecar
        return generate, generate.GenerateConfig(teacher=str(model), input=str(problems), keep="all", **common)
    if stage == "evaluate":
        return evaluate, evaluate.EvaluateConfig(model=str(model), input=str(problems), **common)
    targets = write_jsonl(tmp_path / "targets.jsonl", [{**p, "id": f"{p['id']}#0", "problem_id": p["id"],
                                                        "rationale": f"#### {p['answer']}"} for p in PROBLEMS])
    errors = write_jsonl(tmp_path / "errors.jsonl", [{**p, "output": "#### 0", "predicted": "0", "correct": False,
                                                      "error_type": "wrong_answer"} for p in PROBLEMS])
    return refine, refine.RefineConfig(teacher=str(model), errors=str(errors), targets=str(targets), select="errors",
                                       budget="none", **common)


@pytest.mark.parametrize("stage", ["generate", "evaluate", "refine"])
def test_a_generating_stage_into_a_fifo_ends_and_leaves_no_sidecar(tmp_path, tiny_model, stage):
    """`undo generate --output >(gzip > r.jsonl.gz)` used to hang once written: the stage re-read its output."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    module, config = _stage_config(stage, tmp_path, tiny_model, fifo)
    before = sorted(p.name for p in tmp_path.iterdir())
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["summary"] = module.run(config)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(timeout=120)
    if worker.is_alive():  # stuck opening the FIFO to read it back: give it a writer (an EOF), then fail
        with open(fifo, "w"):
            pass
        worker.join(timeout=60)
        pytest.fail(f"undo {stage} --output FIFO did not end after writing: it re-read its own output")
    assert "error" not in outcome, outcome.get("error")
    reader.join(timeout=60)
    records = [json.loads(line) for line in got[0].decode().splitlines()]
    summary = outcome["summary"]
    assert summary["questions"] == len(PROBLEMS) and len(records) == summary["kept"]  # what was kept arrived
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no fifo.run.json, fifo.usage.json, temp files


@root_only
def test_generate_into_a_device_writes_no_ledger_beside_it(tmp_path, tiny_model):
    """`--output /dev/null` used to write `/dev/null.usage.json` (the teacher's token ledger)."""
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    module, config = _stage_config("generate", tmp_path, tiny_model, null)
    before = sorted(p.name for p in tmp_path.iterdir())
    summary = module.run(config)
    assert summary["samples"] == len(PROBLEMS) and summary["teacher_usage"]["paid"]["requests"] == len(PROBLEMS)
    assert stat.S_ISCHR(os.stat(null).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
