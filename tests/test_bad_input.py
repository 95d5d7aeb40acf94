"""Bad input, command by command: exit 2, a message naming file/line/field, no traceback, nothing written.

    undo score bad.jsonl --output scored.jsonl        ->  error: bad.jsonl:2: not UTF-8 (byte 0xe9 at column 31)

One table: for every command (score, generate, evaluate, collect-errors,
refine, mix, train, data import, iterate, report) and every input slot it
reads, a broken copy of a good file (not UTF-8, not JSON, a missing field, a
wrong type, a duplicate id, empty), plus the output mistakes (an output under a
regular file, the output being the input, through a symlink too, the output
being a folder). For each case:

* exit code 2 and no Python traceback;
* the message names the file, and the line and field where there is one;
* nothing on stdout (no partial output), no temp file left behind;
* an output that existed before is byte for byte what it was, and an output
  that did not exist still does not.

Every case fails before a model is loaded (inputs are read and checked first),
so the table runs in this process through the CLI's own `main()` (`undo_inproc`:
stdout and stderr read at the file descriptors, exit code from SystemExit): a
subprocess per case would add only an interpreter start (99 cases: 58 s as
subprocesses, 13 s in process, at load 7). The tiny model only makes
`--student`/`--model` paths real.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

WIDE = {"COLUMNS": "2000"}  # rich wraps long paths otherwise, and the assertions search the message

GOOD: dict[str, list[dict]] = {
    "problem": [{"id": "p0", "question": "What is 1 plus 1?", "answer": "2"},
                {"id": "p1", "question": "What is 2 plus 2?", "answer": "4"}],
    "scorable": [{"id": "p0", "answer": "2", "output": "#### 2"}, {"id": "p1", "answer": "4", "output": "#### 5"}],
    "prediction": [{"id": "p0", "question": "What is 1 plus 1?", "answer": "2", "output": "#### 2", "predicted": "2",
                    "correct": True},
                   {"id": "p1", "question": "What is 2 plus 2?", "answer": "4", "output": "#### 5", "predicted": "5",
                    "correct": False}],
    "error": [{"id": "p0", "question": "What is 1 plus 1?", "answer": "2", "output": "#### 3", "predicted": "3",
               "correct": False, "error_type": "wrong_answer"},
              {"id": "p1", "question": "What is 2 plus 2?", "answer": "4", "output": "#### 5", "predicted": "5",
               "correct": False, "error_type": "wrong_answer"}],
    "rationale": [{"id": "p0#0", "problem_id": "p0", "question": "What is 1 plus 1?", "answer": "2",
                   "rationale": "1 + 1 = 2\n#### 2"},
                  {"id": "p1#0", "problem_id": "p1", "question": "What is 2 plus 2?", "answer": "4",
                   "rationale": "2 + 2 = 4\n#### 4"}],
}
MISSING = {"problem": "question", "scorable": "output", "prediction": "output", "error": "error_type",
           "rationale": "rationale"}


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def broken(kind: str, how: str) -> tuple[bytes, list[str]]:
    """A file of `kind` broken on line 2 in the way `how`; (bytes, what the message must say besides the name)."""
    first, second = GOOD[kind]
    if how == "latin1":
        text = json.dumps({**second, "question" if "question" in second else "output": "café"}, ensure_ascii=False)
        return _jsonl([first]) + text.encode("latin-1") + b"\n", [":2:", "not UTF-8", "0xe9", "iconv"]
    if how == "json":
        return _jsonl([first]) + b'{"id": "p1", "question": \n', [":2:", "not valid JSON"]
    if how == "missing":
        f = MISSING[kind]
        return _jsonl([first, {k: v for k, v in second.items() if k != f}]), [":2:", f"field '{f}'", "missing"]
    if how == "type":
        return _jsonl([first, {**second, "answer": ["4"]}]), [":2:", "field 'answer'", "expected"]
    if how == "dup":
        return _jsonl([first, {**second, "id": first["id"]}]), [":2:", "duplicate id"]
    if how == "empty":
        return b"", ["no r"]  # "no records" / "no rows to import"
    raise AssertionError(how)


# --- the commands -------------------------------------------------------------------------------

@dataclass
class Command:
    name: str
    slots: dict[str, str]                   # input slot -> record kind
    argv: object                            # (files, out, model) -> argv list
    output: str = "file"                    # file | dir | runs | none
    tolerant: tuple[tuple[str, str], ...] = ()  # (slot, how) that are fine for this command (not errors)
    output_is_input: str | None = None      # the slot an output may not equal


COMMANDS = [
    Command("score", {"input": "scorable"}, lambda f, o, m: ["score", f["input"], "--output", o],
            tolerant=(("input", "dup"),), output_is_input="input"),  # scorable records need no unique id
    Command("generate", {"input": "problem"},
            lambda f, o, m: ["generate", "--teacher", m, "--input", f["input"], "--output", o],
            output_is_input="input"),
    Command("evaluate", {"input": "problem"},
            lambda f, o, m: ["evaluate", "--model", m, "--input", f["input"], "--output", o],
            output_is_input="input"),
    Command("collect-errors", {"predictions": "prediction"},
            lambda f, o, m: ["collect-errors", f["predictions"], "--output", o], output_is_input="predictions"),
    Command("refine", {"errors": "error", "targets": "rationale"},
            lambda f, o, m: ["refine", "--teacher", m, "--errors", f["errors"], "--targets", f["targets"],
                             "--select", "errors", "--output", o],
            tolerant=(("errors", "empty"),), output_is_input="targets"),  # no errors: nothing to refine, exit 0
    Command("cluster", {"problems": "problem"}, lambda f, o, m: ["cluster", f["problems"], "--output", o],
            output_is_input="problems"),
    Command("mix", {"base": "rationale", "refined": "rationale"},
            lambda f, o, m: ["mix", "--base", f["base"], "--refined", f["refined"], "--output", o],
            tolerant=(("refined", "empty"),), output_is_input="base"),
    Command("train", {"data": "rationale"},
            lambda f, o, m: ["train", "--student", m, "--data", f["data"], "--output", o], output="dir"),
    Command("data import", {"source": "problem"},
            lambda f, o, m: ["data", "import", f["source"], "--output-dir", o], output="dir"),
    Command("iterate", {"train": "problem", "val": "problem", "test": "problem"},
            lambda f, o, m: ["iterate", "--teacher", m, "--student", m, "--train-file", f["train"],
                             "--val-file", f["val"], "--test-file", f["test"], "--runs-dir", o, "--name", "r"],
            output="runs"),
]
BY_NAME = {c.name: c for c in COMMANDS}
HOWS = ("latin1", "json", "missing", "type", "dup", "empty")


@dataclass
class Case:
    command: str
    slot: str | None = None
    how: str | None = None
    mistake: str | None = None            # an output mistake instead of a broken input
    expect: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.command}:{self.slot}:{self.how}" if self.how else f"{self.command}:{self.mistake}"


def _input_cases() -> list[Case]:
    cases = []
    for cmd in COMMANDS:
        for i, slot in enumerate(cmd.slots):
            # Every way of breaking the first slot; the others get the two that differ per reader.
            for how in HOWS if i == 0 else ("latin1", "missing"):
                if (slot, how) not in cmd.tolerant:
                    cases.append(Case(cmd.name, slot, how))
    cases.append(Case("data import", "source", "csv-latin1"))
    cases.append(Case("data import", "source", "csv-missing"))
    return cases


def _output_cases() -> list[Case]:
    cases = []
    for cmd in COMMANDS:
        if cmd.output == "runs":
            continue
        cases.append(Case(cmd.name, mistake="under-a-file", expect=["ok.jsonl", "is a file, not a folder"]))
        if cmd.output == "file":
            cases.append(Case(cmd.name, mistake="is-a-folder", expect=["is a folder"]))
        if cmd.output_is_input:
            cases.append(Case(cmd.name, mistake="is-the-input", expect=["is the", "file"]))
            cases.append(Case(cmd.name, mistake="is-the-input-via-symlink", expect=["is the", "file"]))
    cases.append(Case("data import", mistake="split-over-the-source", expect=["would overwrite the source"]))
    return cases


CASES = _input_cases() + _output_cases()


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_and_writes_nothing(case: Case, tmp_path, undo_inproc, tiny_model):
    cmd = BY_NAME[case.command]
    files: dict[str, Path] = {}
    for slot, kind in cmd.slots.items():
        files[slot] = tmp_path / f"{slot}.jsonl"
        files[slot].write_bytes(_jsonl(GOOD[kind]))
    expect = list(case.expect)
    if case.how:
        bad = files[case.slot]
        if case.how.startswith("csv-"):
            files[case.slot].unlink()
            bad = files[case.slot] = tmp_path / "source.csv"
            if case.how == "csv-latin1":
                bad.write_bytes("question,answer\nWhat is 1 plus 1?,2\nCafé?,4\n".encode("latin-1"))
                expect = [":3:", "not UTF-8", "0xe9"]
            else:
                bad.write_bytes(b"question,answer\nWhat is 1 plus 1?,2\n,4\n")
                expect = [":3:", "field 'question'"]
        else:
            content, expect = broken(cmd.slots[case.slot], case.how)
            bad.write_bytes(content)
        expect = [bad.name] + expect

    # Where the command writes; an existing output must survive untouched.
    if cmd.output == "file":
        out = tmp_path / "out.jsonl"
        out.write_bytes(b'{"id": "keep me"}\n')
    elif cmd.output == "dir":
        out = tmp_path / "outdir"
        if case.command == "data import":  # an earlier import's split: must not be replaced
            out.mkdir()
            (out / "train.jsonl").write_bytes(b'{"id": "keep me"}\n')
    else:
        out = tmp_path / "runs"
    if case.mistake == "under-a-file":
        (tmp_path / "ok.jsonl").write_bytes(b"not a folder\n")
        out = tmp_path / "ok.jsonl" / ("x.jsonl" if cmd.output == "file" else "x")
    elif case.mistake == "is-a-folder":
        out = tmp_path / "a_folder"
        out.mkdir()
    elif case.mistake == "is-the-input":
        out = files[cmd.output_is_input]
    elif case.mistake == "is-the-input-via-symlink":
        out = tmp_path / "link.jsonl"
        out.symlink_to(files[cmd.output_is_input].name)
    elif case.mistake == "split-over-the-source":
        out = tmp_path / "data"
        out.mkdir()
        files["source"] = out / "all.jsonl"
        files["source"].write_bytes(_jsonl(GOOD["problem"]))

    argv = [str(a) for a in cmd.argv(files, out, tiny_model)]
    if case.mistake == "split-over-the-source":
        argv += ["--split", "all=1"]
    before = _snapshot(tmp_path)
    result = undo_inproc(*argv, env=WIDE)

    err = " ".join(result.stderr.split())
    assert result.returncode == 2, f"{argv}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for text in expect:
        assert text in err, f"{text!r} not in: {err[-1000:]}"
    assert result.stdout == ""  # no partial output
    after = _snapshot(tmp_path)
    assert after == before, "files changed: " + ", ".join(sorted(set(after) ^ set(before)) or
                                                          [k for k in after if after[k] != before.get(k)])


def test_the_table_covers_every_command():
    names = {c.command for c in CASES} | {"report"}
    assert names == {"score", "generate", "evaluate", "collect-errors", "refine", "cluster", "mix", "train",
                     "data import", "iterate", "report"}


# --- report: it reads a run folder, not a JSONL file ------------------------------------------------

@pytest.mark.parametrize("make, expect", [
    (lambda d: None, ["no such run folder"]),
    (lambda d: d.mkdir(), ["no iterations yet"]),
    (lambda d: (d.mkdir(), (d / "manifest.json").write_bytes(b'{"status": "caf\xe9"}')), ["manifest.json", "not UTF-8"]),
    (lambda d: (d.mkdir(), (d / "manifest.json").write_text('{"status": ')), ["manifest.json", "not valid JSON"]),
], ids=["missing", "empty-folder", "manifest-latin1", "manifest-torn"])
def test_report_of_a_bad_run_folder(tmp_path, undo_inproc, make, expect):
    run = tmp_path / "runs" / "r"
    (tmp_path / "runs").mkdir()
    make(run)
    before = _snapshot(tmp_path)
    result = undo_inproc("report", run, env=WIDE)
    err = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert all(text in err for text in expect), err
    assert _snapshot(tmp_path) == before


# --- what must be accepted: a byte-order mark, everywhere -------------------------------------------

BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("command", ["score", "collect-errors", "mix", "data import", "data import csv"])
def test_a_utf8_bom_is_accepted(tmp_path, undo, command):
    if command == "data import csv":
        src = tmp_path / "quiz.csv"
        src.write_bytes(BOM + b"question,answer\nWhat is 1 plus 1?,2\n")
        argv = ["data", "import", src, "--output-dir", tmp_path / "d", "--split", "all=1"]
    elif command == "data import":
        src = tmp_path / "p.jsonl"
        src.write_bytes(BOM + _jsonl(GOOD["problem"]))
        argv = ["data", "import", src, "--output-dir", tmp_path / "d", "--split", "all=1"]
    else:
        cmd = BY_NAME[command]
        files = {slot: tmp_path / f"{slot}.jsonl" for slot in cmd.slots}
        for slot, kind in cmd.slots.items():
            files[slot].write_bytes(BOM + _jsonl(GOOD[kind]))
        argv = cmd.argv(files, tmp_path / "out.jsonl", "unused")
    result = undo(*map(str, argv), env=WIDE)
    assert result.returncode == 0, result.stderr
    if command.startswith("data import"):
        rows = [json.loads(line) for line in (tmp_path / "d" / "all.jsonl").read_text().splitlines()]
        assert rows and all("\ufeff" not in k and "\ufeff" not in str(v) for r in rows for k, v in r.items())
        assert rows[0]["question"] == "What is 1 plus 1?"
