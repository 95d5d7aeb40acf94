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

Outputs that are not regular files (`/dev/null`, `/dev/stdout`, a named pipe, a
socket, bash's `>(...)`) are opened and written in place, like stdout: renaming
a temp file over `/dev/null` would replace the device with a regular file for
every program on the machine. They are never fsynced (a pipe cannot be) and
never resumed. Input is UTF-8 (a leading byte-order mark is dropped); anything
else fails with `file:line: not UTF-8 (byte 0xe9 at column N)`.

Every file written here honours the umask (0644 under the usual 022), as a file
made by `open()` does: the temp file of an atomic write is created 0600 by
mkstemp, so it is given `0666 & ~umask` before it is renamed into place, and
colleagues and jobs under another user can read the results on a shared cluster.
`honour_umask` does the same for files a library wrote that way (safetensors).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import os
import re
import stat
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


BOM = "\ufeff"


def _decode(raw: bytes, name: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        column = len(raw[: exc.start].decode("utf-8", errors="replace")) + 1  # in characters, as an editor counts
        source, fixed = ("input.jsonl", "fixed.jsonl") if name == "<stdin>" else (name, f"{Path(name).stem}.utf8{Path(name).suffix}")
        raise RecordError(name, lineno, f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {column})",
                          hint=f"convert it to UTF-8 first, e.g. `iconv -f latin1 -t utf-8 {source} > {fixed}` "
                               "(latin1 if it came from an old spreadsheet or Windows tool)") from None


def text_lines(path: str | os.PathLike, *, torn_tail: bool = False) -> Iterator[str]:
    """The lines of a UTF-8 text file (or stdin for `-`), newlines kept, a leading BOM dropped.

    Every reader of user files goes through this, so a Latin-1 file fails with
    `file:line: not UTF-8 (byte 0xe9 at column N)` and a hint instead of a
    UnicodeDecodeError, and a spreadsheet export's byte-order mark is never part
    of the first field. torn_tail: a last line without its newline may end
    inside a multi-byte character (a writer killed mid-write); it is decoded
    with replacement characters so the caller can recognise it as torn.
    """
    name = display_name(path)
    if str(path) == STDIO:
        raw_lines: Iterable[Any] = getattr(sys.stdin, "buffer", None) or sys.stdin
        for lineno, raw in enumerate(raw_lines, start=1):
            line = _decode(raw, name, lineno) if isinstance(raw, bytes) else raw
            yield line[1:] if lineno == 1 and line.startswith(BOM) else line
        return
    p = Path(path)
    if not p.exists():
        raise UndoError(f"{p}: no such file", hint="check the path; stages read JSONL written by `undo data import` or an earlier stage")
    if p.is_dir():
        raise UndoError(f"{p}: is a folder, expected a JSONL file")
    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if torn_tail and not raw.endswith(b"\n"):
                line = raw.decode("utf-8", errors="replace")  # the last line; not JSON if it was cut (see iter_records)
            else:
                line = _decode(raw, name, lineno)
            yield line[1:] if lineno == 1 and line.startswith(BOM) else line


def read_text(path: str | os.PathLike) -> str:
    """A whole UTF-8 text file (see `text_lines`: BOM dropped, non-UTF-8 named by line and column)."""
    return "".join(text_lines(path))


def not_valid_json(exc: json.JSONDecodeError) -> str:
    """`not valid JSON (...)` for one JSONL line, saying where in that line: the decoder, given the line with its
    newline, would put an unfinished record at "line 2 column 1"."""
    line = exc.doc.rstrip("\r\n") if isinstance(exc.doc, str) else ""
    where = "at the end of the line" if exc.pos >= len(line) else f"at column {exc.pos + 1}"
    return f"not valid JSON ({exc.msg} {where})"


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
    lines = list(text_lines(path, torn_tail=True)) if drop_torn_tail else text_lines(path)
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
            cause = exc.__cause__
            raise RecordError(name, lineno, not_valid_json(cause) if isinstance(cause, json.JSONDecodeError)
                              else f"not valid JSON ({cause or exc})", hint=_not_jsonl_hint(name, lineno, line)) from None
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


DATASET_SUFFIXES = (".csv", ".json", ".parquet")  # what `undo data import` reads besides JSONL


def _not_jsonl_hint(name: str, lineno: int, line: str) -> str:
    """What to do about a line that is not JSON: a dataset in another format goes through `undo data import`."""
    suffix = Path(name).suffix.lower()
    first = line.lstrip()
    tabular = lineno == 1 and not first.startswith(("{", "[")) and "," in first  # a header row
    whole_json = lineno == 1 and first.rstrip() in ("[", "{")  # a pretty-printed JSON file, not one object per line
    if suffix in DATASET_SUFFIXES or tabular or whole_json:
        what = ("a CSV file" if suffix == ".csv" or tabular else
                "a JSON file (not one object per line)" if suffix == ".json" or whole_json else f"a {suffix} file")
        return (f"this looks like {what}, not JSONL: `undo data import {name} --output-dir data` turns it into "
                "problems JSONL (--question-field/--answer-field name its columns)")
    return "each line must be one JSON object; fix or delete this line"


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


def current_umask() -> int:
    """The process's umask, read without changing it where the kernel shows it (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable read is a write; put it straight back
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permissions `open()` gives a new file: 0666 less the umask (0644 under 022)."""
    return 0o666 & ~current_umask()


def honour_umask(path: str | os.PathLike) -> None:
    """Give `path` (a file, or every file under a folder) the mode `open()` would have: for files a library
    created 0600 through a temp file (safetensors' save_file), which other users could not read."""
    p = Path(path)
    mode = file_mode()
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and not f.is_symlink()]
    for f in files:
        if stat.S_IMODE(f.stat().st_mode) != mode:
            os.chmod(f, mode)


def real_stdout():
    """The process's stdout, even while a rich live display (the progress bar) has swapped `sys.stdout`.

    In a terminal rich replaces `sys.stdout` with a proxy that prints into the
    (stderr) console; JSONL written there would land on the screen instead of
    in the pipe. The proxy keeps the file it replaced; unwrap it.
    """
    fh = sys.stdout
    while hasattr(fh, "rich_proxied_file"):
        fh = fh.rich_proxied_file
    return fh


def _fsync(fh) -> None:
    """fsync a regular file; pipes, terminals, sockets and devices are left alone (fsync fails on them: EINVAL)."""
    try:
        fd = fh.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fsync(fd)
    except (OSError, ValueError, io.UnsupportedOperation):  # no real fd (a test's captured stdout): nothing to sync
        pass


def is_stream(path: str | os.PathLike) -> bool:
    """True for `-` and for an existing path that is not a regular file or folder (a device, FIFO, socket).

    Streams are written in place, never renamed over, never resumed, and get no sidecar files.
    """
    if str(path) == STDIO:
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def _is_our_stdout(path: str | os.PathLike) -> bool:
    """`path` is the very file our stdout is (/dev/stdout, /proc/self/fd/1, or the file stdout was redirected to)."""
    try:
        a, b = os.stat(path), os.fstat(real_stdout().fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def check_output_path(path: str | os.PathLike, flag: str = "--output") -> None:
    """Refuse an output that cannot be a file: a folder, or a path under a regular file (`ok.jsonl/x.jsonl`)."""
    if str(path) == STDIO:
        return
    p = Path(path)
    if p.is_dir():
        raise UndoError(f"{flag} {p}: is a folder, expected a file name", hint=f"e.g. {flag} {p / 'out.jsonl'}")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UndoError(f"{flag} {p}: {parent} is a file, not a folder",
                                hint="choose a path whose folders are folders (they are created if missing)")
            break


def open_stream(path: str | os.PathLike):
    """A text handle writing in place to stdout or to an existing non-regular file; (handle, close it?)."""
    if str(path) == STDIO or _is_our_stdout(path):
        return real_stdout(), False
    if stat.S_ISSOCK(os.stat(path).st_mode):  # a unix socket cannot be open()ed: connect to it
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(path))
        except OSError as exc:
            sock.close()
            raise UndoError(f"--output {path}: a socket nobody is listening on ({exc.strerror})") from None
        fh = sock.makefile("w", encoding="utf-8")
        sock.close()  # the file object keeps the connection open until it is closed
        return fh, True
    return open(path, "w", encoding="utf-8"), True  # a device or FIFO: written in place, never replaced


def _temp_name(target: Path) -> re.Pattern[str]:
    """The names mkstemp gives the temp files of `target` here: `.NAME.` + 8 random characters + `.tmp`."""
    return re.compile(re.escape(f".{target.name}.") + r"[a-z0-9_]{8}" + re.escape(".tmp"))


def _lock(fd: int, *, wait: bool) -> bool:
    """An exclusive flock on fd; False when another process holds one (never with wait=True)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no advisory locks (Windows): no temp file is ever taken for stale
        return not wait
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return wait  # a file system without flock: a writer goes on, a cleaner touches nothing


def remove_stale_temps(path: str | os.PathLike) -> list[str]:
    """Delete the temp files killed atomic writes of `path` left beside it; returns their names.

    Only temps of this very name (`.rationales.jsonl.k3j2_x9a.tmp` for `rationales.jsonl`, never
    another file's), and only those no live process is writing: an atomic write holds an exclusive
    flock on its temp file until the rename, so a temp whose lock can be taken belongs to a writer
    that died (SIGKILL, a lost node). Concurrent shard writers write other names and are never touched.
    """
    target = Path(os.path.realpath(path))
    if not target.parent.is_dir():
        return []
    pattern, removed = _temp_name(target), []
    for entry in os.scandir(target.parent):
        if not pattern.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # gone already (its writer renamed it)
            continue
        try:
            if _lock(fd, wait=False):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(entry.name)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Any]:
    """A text handle whose content replaces `path` at once when the block ends, or not at all if it fails.

    Readers see the old file or the new one, never a mix. Only regular files are replaced by
    rename; a device, FIFO or socket (`/dev/null`, `/dev/stdout`, `>(...)`) is written in place
    (see the module docstring). The one home of write-then-rename: every whole-file writer uses it.
    """
    if is_stream(path) or _is_our_stdout(path):
        fh, owned = open_stream(path)
        try:
            yield fh
            fh.flush()
        finally:
            if owned:
                fh.close()
        return
    check_output_path(path)
    # A symlink to a file stays a symlink: the new file replaces its target, not the link.
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)  # what a killed write of this file left behind
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    fh = os.fdopen(fd, "w", encoding="utf-8")
    try:
        _lock(fh.fileno(), wait=True)  # held until the rename: remove_stale_temps leaves a live write alone
        os.fchmod(fh.fileno(), file_mode())  # mkstemp made it 0600; it must honour the umask like any new file
        yield fh
        fh.flush()
        os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        fh.close()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (regular files) or in place (streams): see `atomic_output`."""
    with atomic_output(path) as fh:
        fh.write(text)


def write_records(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write a whole JSONL file atomically (or to stdout for `-`, or in place to a stream); returns the count."""
    buf = io.StringIO()
    writer = jsonlines.Writer(buf, dumps=_dumps, flush=False)
    n = 0
    for record in records:
        writer.write(record)
        n += 1
    atomic_write_text(path, buf.getvalue())
    return n


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write a pretty JSON document (metrics, summaries, manifests)."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (what identifies an input file whatever its name)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        return json.loads(read_text(p))
    except json.JSONDecodeError as exc:
        raise UndoError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None


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
        self._stream = is_stream(self.path)
        if self._stream:  # stdout, /dev/null, a FIFO, ...: written in place, nothing to resume
            self._fh, self._owned = open_stream(self.path)
            return
        check_output_path(self.path)
        self._owned = True
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
        return not self._stream

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
        # Decided by what the fd is, not by comparing with sys.stdout: rich's progress bar swaps
        # sys.stdout while it runs, and fsync on a pipe fails with EINVAL (issue: pipes in a terminal).
        _fsync(self._fh)
        return len(lines)

    def close(self) -> None:
        if self._owned and not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "AppendLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
