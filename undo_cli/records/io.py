"""Reading and writing JSONL artifacts: the one reader and the two writers.

Three guarantees every stage gets for free by going through this module:

* **Errors a person can act on.** A bad line fails with `file:line: field 'x': ...`
  and a hint, never a bare JSONDecodeError. Duplicate ids are refused, because
  every join downstream (resume, refine, evaluate) assumes ids are unique.
* **Whole files appear atomically.** `write_records`/`write_json` write a temp
  file in the same folder, fsync it and rename it over the target, so a reader
  never sees half a file and a crash leaves the old file (or none), never a torso.
* **Long stages resume.** `AppendLog` appends records in batches, flushing and
  fsyncing each batch. A run killed mid-write leaves at most a torn last line,
  which the next run detects, drops with a warning and overwrites, then skips
  every id already on disk. Nothing is lost beyond the batch in flight and
  nothing is written twice.

`-` is stdin for readers and stdout for writers everywhere, so stages compose
in a bash pipeline. stdout is never resumable (there is nothing to re-read).
"""

from __future__ import annotations

import functools
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import jsonlines

from undo_cli.console import warn
from undo_cli.errors import RecordError, UndoError
from undo_cli.records.schema import SHAPES, check_record

STDIO = "-"

# ensure_ascii=False keeps rationales readable when a person opens the file.
_dumps = functools.partial(json.dumps, ensure_ascii=False)


def display_name(path: str | os.PathLike) -> str:
    return "<stdin>" if str(path) == STDIO else str(path)


def _open_lines(path: str | os.PathLike) -> Iterator[str]:
    if str(path) == STDIO:
        yield from sys.stdin
        return
    p = Path(path)
    if not p.exists():
        raise UndoError(f"{p}: no such file", hint="check the path; stages read JSONL written by `undo data import` or an earlier stage")
    if p.is_dir():
        raise UndoError(f"{p}: is a folder, expected a JSONL file")
    with p.open("r", encoding="utf-8") as fh:
        yield from fh


def iter_records(
    path: str | os.PathLike,
    kind: str | None = None,
    *,
    allow_empty: bool = False,
    drop_torn_tail: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield validated records from a JSONL file (or stdin for `-`).

    kind: a shape name from `records.schema.SHAPES`; None skips validation.
    drop_torn_tail: a last line without a newline that does not parse is what a
        killed writer leaves behind; drop it with a warning instead of failing.
    """
    name = display_name(path)
    shape = SHAPES[kind] if kind else None
    seen: dict[str, int] = {}
    count = 0
    lines = list(_open_lines(path)) if drop_torn_tail else _open_lines(path)
    total = len(lines) if drop_torn_tail else None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = next(iter(jsonlines.Reader([line], loads=json.loads)))
        except jsonlines.InvalidLineError as exc:
            if drop_torn_tail and lineno == total and not line.endswith("\n"):
                warn(f"{name}:{lineno}: dropping a torn last line (a run was interrupted mid-write); it will be redone")
                return
            raise RecordError(name, lineno, f"not valid JSON ({exc.__cause__ or exc})",
                              hint="each line must be one JSON object; fix or delete this line") from None
        if shape is not None:
            problem = check_record(record, shape.name)
            if problem is not None:
                raise RecordError(name, lineno, problem, hint=f"a {shape.name} line looks like the example in docs/artifacts.md")
            if shape.unique_id and "id" in record:
                rid = record["id"]
                if rid in seen:
                    raise RecordError(name, lineno, f"duplicate id '{rid}' (first seen on line {seen[rid]})", field="id",
                                      hint="ids must be unique within a file; de-duplicate or re-number them")
                seen[rid] = lineno
        count += 1
        yield record
    if count == 0 and not allow_empty:
        raise UndoError(f"{name}: no records (the file is empty)", hint="point the stage at a file with at least one JSONL record")


def read_records(path: str | os.PathLike, kind: str | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """Read a whole JSONL file into memory, validated (see `iter_records`)."""
    return list(iter_records(path, kind, **kwargs))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a mix."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_records(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write a whole JSONL file atomically (or to stdout for `-`); returns the count."""
    buf = io.StringIO()
    writer = jsonlines.Writer(buf, dumps=_dumps, flush=False)
    n = 0
    for record in records:
        writer.write(record)
        n += 1
    if str(path) == STDIO:
        sys.stdout.write(buf.getvalue())
        sys.stdout.flush()
    else:
        atomic_write_text(path, buf.getvalue())
    return n


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write a pretty JSON document (metrics, summaries, manifests)."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UndoError(f"{p}: no such file") from None
    except json.JSONDecodeError as exc:
        raise UndoError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg})") from None


class AppendLog:
    """A JSONL output that grows batch by batch and survives being killed.

    Usage in a stage::

        out = AppendLog(args.output, kind="rationale")
        todo = [p for p in problems if p["id"] not in out.done_ids("problem_id")]
        for batch in batches(todo):
            out.append(make_records(batch))   # flushed and fsynced
        out.close()

    On open it reads what a previous run left (dropping a torn last line and
    truncating the file back to the last complete record), so `existing` holds
    every finished record exactly once. With `fresh=True` (or `-`) it starts empty.
    """

    def __init__(self, path: str | os.PathLike, kind: str | None = None, *, fresh: bool = False):
        self.path = str(path)
        self.kind = kind
        self.existing: list[dict[str, Any]] = []
        self._ids: set[str] = set()
        if self.path == STDIO:
            self._fh = sys.stdout
            return
        p = Path(self.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists() and not fresh:
            self.existing = read_records(p, kind, allow_empty=True, drop_torn_tail=True)
            self._truncate_to_complete_lines(p)
        elif p.exists():
            p.unlink()
        self._ids = {r["id"] for r in self.existing if "id" in r}
        self._fh = p.open("a", encoding="utf-8")

    @staticmethod
    def _truncate_to_complete_lines(p: Path) -> None:
        data = p.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with p.open("r+b") as fh:
                try:  # a whole record that only lacks its newline was kept by the reader: keep it on disk too
                    json.loads(data[cut:])
                    fh.seek(0, os.SEEK_END)
                    fh.write(b"\n")
                except ValueError:  # a torn record: cut it off
                    fh.truncate(cut)
                fh.flush()
                os.fsync(fh.fileno())

    @property
    def resumable(self) -> bool:
        return self.path != STDIO

    def done_ids(self, key: str = "id") -> set[Any]:
        """Values of `key` over the records already on disk (for skipping finished work)."""
        return {r.get(key) for r in self.existing}

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Append a batch, then flush and fsync: after this returns, the batch is durable."""
        lines = []
        for record in records:
            rid = record.get("id")
            if rid is not None:
                if rid in self._ids:
                    raise UndoError(f"{self.path}: refusing to write id '{rid}' twice",
                                    hint="this is a bug in the stage; please report it")
                self._ids.add(rid)
            lines.append(_dumps(record) + "\n")
        if not lines:
            return 0
        self._fh.write("".join(lines))
        self._fh.flush()
        if self._fh is not sys.stdout:
            os.fsync(self._fh.fileno())
        return len(lines)

    def close(self) -> None:
        if self._fh is not sys.stdout and not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "AppendLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
