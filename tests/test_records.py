"""The artifact reader/writers (undo_cli/records/io.py): atomic writes, resumable appends, errors a person can act on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from undo_cli.errors import RecordError, UndoError
from undo_cli.records import AppendLog, atomic_write_text, read_records, write_json, write_records

WIDE = {"COLUMNS": "400"}  # rich wraps stderr at the terminal width; keep each message on one line
PROBLEM = {"id": "p1", "question": "What is 2 + 2?", "answer": "4"}


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- atomic whole-file writes --------------------------------------------------------------

def test_write_records_roundtrip_keeps_unicode_readable(tmp_path):
    path = tmp_path / "out" / "problems.jsonl"  # the folder is created
    records = [PROBLEM, {"id": "p2", "question": "Combien font 3 × 3 ?", "answer": 9}]
    assert write_records(path, records) == 2
    assert "×" in path.read_text(encoding="utf-8")  # ensure_ascii=False: a person can read it
    back = read_records(path, "problem")
    assert [r["id"] for r in back] == ["p1", "p2"]
    assert back[1]["answer"] == "9"  # numeric answers are normalised to text


def test_a_failure_mid_write_leaves_the_old_file_and_no_temp_files(tmp_path):
    path = tmp_path / "problems.jsonl"
    write_records(path, [PROBLEM])
    before = path.read_bytes()

    def records():
        yield {"id": "p2", "question": "q", "answer": "1"}
        raise RuntimeError("the stage crashed half way")

    with pytest.raises(RuntimeError):
        write_records(path, records())
    with pytest.raises(TypeError):  # a value JSON cannot encode, after good records
        write_records(path, [{"id": "p3", "question": "q", "answer": "1"}, {"id": "p4", "bad": object()}])
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    """Whole-file writes go through a mkstemp temp file (0600): the result must have the mode `open()` gives."""
    old = os.umask(umask)
    try:
        write_records(tmp_path / "split.jsonl", [PROBLEM])
        write_json(tmp_path / "manifest.json", {"a": 1})
        write_json(tmp_path / "manifest.json", {"a": 2})  # replacing an existing file too
        with AppendLog(tmp_path / "rationales.jsonl") as log:
            log.append([{"id": "r1"}])
    finally:
        os.umask(old)
    for name in ("split.jsonl", "manifest.json", "rationales.jsonl"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(mode), name


def test_a_killed_whole_file_write_leaves_a_temp_that_the_next_write_of_that_file_removes(tmp_path):
    """SIGKILL mid-write leaves `.NAME.XXXXXXXX.tmp`; the next write of NAME removes it, and only it: not a temp a
    live writer of NAME holds (a concurrent process), not another file's."""
    import fcntl

    path = tmp_path / "metrics.json"
    script = textwrap.dedent(f"""
        import time
        from undo_cli.records.io import atomic_output
        with atomic_output({str(path)!r}) as fh:  # what write_json/write_records write through
            fh.write("{{")
            print("writing", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    (killed,) = _leftovers(tmp_path)  # what the kill left: the real mkstemp name
    live = tmp_path / ".metrics.json.live0000.tmp"  # a writer that is still going holds its temp's lock
    live.write_text("{")
    other = tmp_path / ".other.json.abcd1234.tmp"  # another file's temp, maybe another process's
    other.write_text("{")
    with live.open() as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        write_json(path, {"accuracy": 1.0})
        assert _leftovers(tmp_path) == sorted([live.name, other.name])
    assert killed not in _leftovers(tmp_path) and json.loads(path.read_text()) == {"accuracy": 1.0}


def test_a_crash_during_the_rename_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json(path, {"accuracy": 0.5})

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_text(path, "new text that must not appear")
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert _leftovers(tmp_path) == []


# --- resumable appends ------------------------------------------------------------------------

def test_append_log_resumes_after_a_torn_last_line(tmp_path, capsys):
    path = tmp_path / "rationales.jsonl"
    with AppendLog(path, kind="problem") as log:
        assert log.existing == []
        log.append([{**PROBLEM, "id": f"p{i}"} for i in range(3)])
    # A kill in the middle of a write leaves half a line and no newline.
    with path.open("a", encoding="utf-8") as fh:
        fh.write('{"id": "p3", "question": "What is 5 + ')

    log = AppendLog(path, kind="problem")
    flat = "".join(capsys.readouterr().err.split())  # rich wraps long paths anywhere
    assert "rationales.jsonl:4:droppingatornlastline" in flat
    assert [r["id"] for r in log.existing] == ["p0", "p1", "p2"]
    todo = [f"p{i}" for i in range(5) if f"p{i}" not in log.done_ids()]
    assert todo == ["p3", "p4"]
    log.append([{**PROBLEM, "id": rid} for rid in todo])
    log.close()
    assert [r["id"] for r in _lines(path)] == ["p0", "p1", "p2", "p3", "p4"]  # nothing lost, nothing twice


def test_append_log_drops_a_tail_torn_inside_a_multibyte_character(tmp_path, capsys):
    # Records are written with ensure_ascii=False: a kill can cut "é" (0xc3 0xa9) in half. That tail
    # is torn, not "not UTF-8": it is dropped and redone like any other torn line.
    path = tmp_path / "out.jsonl"
    with AppendLog(path, kind="problem") as log:
        log.append([{**PROBLEM, "id": "p0", "question": "café?"}])
    with path.open("ab") as fh:
        fh.write('{"id": "p1", "question": "caf'.encode() + "é".encode()[:1])
    with AppendLog(path, kind="problem") as log:
        assert log.done_ids() == {"p0"}
        log.append([{**PROBLEM, "id": "p1", "question": "café?"}])
    assert [r["question"] for r in _lines(path)] == ["café?", "café?"]
    assert "droppingatornlastline" in "".join(capsys.readouterr().err.split())


def test_append_log_keeps_a_whole_record_missing_only_its_newline(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}')
    with AppendLog(path) as log:
        assert log.done_ids() == {"a", "b"}
        log.append([{"id": "c"}])
    assert [r["id"] for r in _lines(path)] == ["a", "b", "c"]


def test_append_log_refuses_an_id_twice_and_fresh_starts_over(tmp_path):
    path = tmp_path / "out.jsonl"
    with AppendLog(path) as log:
        log.append([{"id": "a"}])
        with pytest.raises(UndoError, match="refusing to write id 'a' twice"):
            log.append([{"id": "a"}])
    with AppendLog(path, fresh=True) as log:
        assert log.existing == []
        log.append([{"id": "a"}])
    assert _lines(path) == [{"id": "a"}]


def test_a_killed_writer_loses_nothing_on_resume(tmp_path):
    """A real process appending batches is SIGKILLed; the next run finishes the job exactly once."""
    path = tmp_path / "long.jsonl"
    script = textwrap.dedent(f"""
        import sys, time
        from undo_cli.records import AppendLog
        log = AppendLog({str(path)!r})
        done = log.done_ids()
        todo = [f"r{{i:03d}}" for i in range(int(sys.argv[1])) if f"r{{i:03d}}" not in done]
        for start in range(0, len(todo), 5):
            log.append({{"id": rid, "text": "x" * 2000}} for rid in todo[start:start + 5])
            print(start, flush=True)
            time.sleep(float(sys.argv[2]))
        log.close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, "200", "0.05"], stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # let it finish a few batches, then kill it without warning
        proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    partial = len(path.read_text().splitlines())
    assert 15 <= partial < 200
    done = subprocess.run([sys.executable, "-c", script, "200", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ids = [r["id"] for r in _lines(path)]
    assert ids == [f"r{i:03d}" for i in range(200)]


# --- errors that name file, line and field -------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    # where in the line: the column of that line, not the decoder's "line 2 column 1" past its newline
    ('{"id": "p1", "question": "q", "answer": "1"}\n{"id": "p2", "question": "q", "answer": \n',
     ":2: not valid JSON (Expecting value at the end of the line)"),
    ('{"id": "p1", "question": "q", answer: "1"}\n', ":1: not valid JSON (Expecting property name enclosed in "
                                                      "double quotes at column 31)"),
    ('{"id": "p1", "question": "q", "answer": "1"} x\r\n', ":1: not valid JSON (Extra data at column 46)"),
    ('{"id": "p1", "question": "q"}\n', ":1: field 'answer': missing"),
    ('{"id": "p1", "question": 7, "answer": "1"}\n', ":1: field 'question': expected string, got int"),
    ('{"id": "p1", "question": "q", "answer": true}\n', ":1: field 'answer': expected string or integer or number, got bool"),
    ('{"id": "p1", "question": "q", "answer": "1"}\n\n{"id": "p1", "question": "q2", "answer": "2"}\n',
     ":3: field 'id': duplicate id 'p1' (first seen on line 1)"),
    ('{"id": "p1", "question": "q", "answer": "1", "task": "maths"}\n', ":1: field 'task': unknown task 'maths'"),
    ('{"id": "p1", "question": "q", "answer": "A", "task": "choice"}\n', ":1: field 'choices'"),
    ('["id", "p1"]\n', ":1: expected a JSON object"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, content, expected):
    path = tmp_path / "problems.jsonl"
    path.write_text(content)
    with pytest.raises(RecordError) as err:
        read_records(path, "problem")
    assert f"{path}{expected}" in str(err.value)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UndoError, match="empty.jsonl: no records"):
        read_records(empty, "problem")
    assert read_records(empty, "problem", allow_empty=True) == []
    with pytest.raises(UndoError, match="nope.jsonl: no such file"):
        read_records(tmp_path / "nope.jsonl", "problem")


@pytest.mark.parametrize("content, expected", [
    ("", "empty.jsonl: no records"),
    ('{"answer": "1", "output": "#### 1"}\n{"answer": "2", "output": "x"\n', "empty.jsonl:2: not valid JSON"),
    ('{"answer": "1", "output": 5}\n', "empty.jsonl:1: field 'output': expected string, got int"),
])
def test_bad_input_through_the_cli_exits_2_without_partial_output(undo, tmp_path, content, expected):
    src = tmp_path / "empty.jsonl"
    src.write_text(content)
    out = tmp_path / "scored.jsonl"
    proc = undo("score", src, "--output", out, env=WIDE)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_missing_file_through_the_cli(undo, tmp_path):
    out = tmp_path / "scored.jsonl"
    missing = undo("score", tmp_path / "missing.jsonl", "--output", out, env=WIDE)
    assert missing.returncode == 2 and "missing.jsonl: no such file" in missing.stderr
    assert not out.exists()


def test_dash_is_stdin_and_stdout_through_the_real_cli(undo):
    """Two stages composed as in a bash pipeline: stdout carries JSONL only, tables go to stderr."""
    rows = [{"id": f"q{i}", "answer": str(i), "output": f"so it is {i}\n#### {i}"} for i in range(3)]
    rows.append({"id": "q3", "answer": "7", "output": "no idea"})
    first = undo("score", "-", input="".join(json.dumps(r) + "\n" for r in rows))
    assert first.returncode == 0, first.stderr
    assert "accuracy" in first.stderr and "accuracy" not in first.stdout
    second = undo("score", "-", "--output", "-", input=first.stdout)
    assert second.returncode == 0, second.stderr
    out = [json.loads(line) for line in second.stdout.splitlines()]
    assert [r["correct"] for r in out] == [True, True, True, False]
    assert out[3]["predicted"] is None
    assert "accuracy: 0.7500 (3/4)" in second.stderr


def test_every_example_line_in_docs_artifacts_fits_its_shape():
    """docs/artifacts.md shows one example line per shape; each must pass the reader's validation."""
    import re
    from pathlib import Path

    from undo_cli.records import check_record

    doc = (Path(__file__).resolve().parent.parent / "docs" / "artifacts.md").read_text(encoding="utf-8")
    shapes = {"problem": "problem", "rationale": "rationale", "prediction": "prediction", "error": "error",
              "refined rationale": "rationale", "scorable": "scorable"}
    found = {}
    training = []
    for section, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", doc, flags=re.S | re.M):
        for block in re.findall(r"```json\n(.*?)\n```", body, flags=re.S):
            record = json.loads(block)
            if section == "training data":  # what `undo train` accepts: each must become a rationale
                training.append(record)
                continue
            if section == "transition":  # what `undo diff --format jsonl` writes: loop/diff.py's line, exactly
                from undo_cli.loop.diff import line

                side = lambda s: {"id": record["id"], "question": record["question"],  # noqa: E731
                                  "answer": record["answer"], **{k: s[k] for k in ("output", "predicted", "correct",
                                                                                    "finish_reason")}}
                assert line({"id": record["id"], "transition": record["transition"], "a": side(record["a"]),
                             "b": side(record["b"])}) == record
                continue
            if section == "clusters":  # one JSON object, read by undo_cli.clusters.load: the example must load
                import tempfile

                from undo_cli.clusters import load

                with tempfile.TemporaryDirectory() as folder:
                    path = Path(folder) / "clusters.json"
                    path.write_text(json.dumps(record), encoding="utf-8")
                    clusters = load(str(path))
                assert clusters.of("arith-000") == "c00" and clusters.of("never-seen") == "rest"
                continue
            if section == "Shards":  # a sidecar, not a record: valid JSON (parsed above) that says what it is
                assert record["format"] == 1 and record["shard"] == f"{record['k']}/{record['n']}"
                continue
            assert check_record(record, shapes[section]) is None, (section, check_record(record, shapes[section]))
            found[section] = record
    assert set(found) == set(shapes)
    from undo_cli.training.data import to_rationale

    assert len(training) == 4
    for i, record in enumerate(training):
        field = "meta.solution" if "meta" in record else None
        converted, problem, _ = to_rationale(record, i, rationale_field=field)
        assert problem is None and check_record(converted, "rationale") is None, record
    assert "refinement" in found["refined rationale"] and found["error"]["error_type"] == "wrong_answer"
