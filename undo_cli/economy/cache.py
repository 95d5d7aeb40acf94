"""A content-addressed cache of teacher completions: one SQLite file, safe for several writer processes.

    from undo_cli.economy.cache import TeacherCache, default_cache_dir
    with TeacherCache(default_cache_dir()) as cache:
        identity = cache.model_identity("out/teacher")           # or a hub / server model name
        key = request_key(identity, messages, sampling)
        cache.put_many([(key, identity, completions)]); cache.get_many([key])

    undo cache stats                   # entries, size, tokens the cache saved, per model
    undo cache prune --older-than 30   # drop entries not used for 30 days (also --model NAME, --all)

**The key** is the sha256 of what determines a teacher's answer and nothing
else: the model's identity and the backend-independent request (the rendered
chat messages, n, temperature, top_p, max_tokens, stop strings, seed, logprobs
K, the end rules `stop_at_answer` and `repetition_cut`). The backend is *not* in it: the same teacher folder served by `hf`,
`vllm` or a server behind `openai` answers the same request, and an entry
means "this model's answer to this request", not a bit-exact replay (two GPUs
already disagree in the last bits). Greedy decoding ignores seed and top_p,
so they are normalised away for it. The `n` samples of one request are stored
together, in sample order (the sample index is the position): backends draw
them jointly (one seeded call with n return sequences), so sample 0 of an
n=4 request is not sample 0 of an n=2 one, and `n` is part of the key.

**Model identity.** A local folder is identified by the sha256 of every file
in it (config, tokenizer, chat template, weights; `checkpoints/` excepted). A
multi-GB weight file is hashed once and the digest memoised in this database
by (path, size, mtime_ns), so later runs only stat the files. A `.gguf` file
is identified by its sha256 (undo_cli/gguf_models.py). A name that is
not a local folder (a hub name, a server's model name) is identified by the
name plus a revision: the one given with `--model-revision`, else the commit
the local hub cache resolves `main` to, if any. A server that swaps the
weights behind an unchanged name (and no revision given) would be served old
answers: give `--model-revision` or prune that model's entries.

**Concurrency.** WAL journal mode (readers never block the writer), a busy
timeout of 60 s for writers that meet each other, one short transaction per
batch, and `INSERT OR IGNORE`: when two `--shard` processes answer the same
request, the first answer stays (both are valid samples). SQLite's own locking
makes this safe for any number of processes on one machine.

**Network filesystems.** WAL needs shared memory between the processes, which
NFS, SMB/CIFS, Lustre and similar cannot provide, and their byte-range locks are
often unreliable. When the cache folder is on one of those (read from
/proc/self/mountinfo), the cache warns and falls back to the rollback journal;
that is safe for one machine at a time, but processes on *different* machines
writing the same cache file can corrupt it. Keep `--cache-dir` on a local disk
(the default, under ~/.cache), one per machine, and copy the file to share it.

The stored completions are zlib-compressed JSON, log-probabilities packed as
binary arrays after it (see encode_completions).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import zlib
from pathlib import Path
from typing import Any, Iterable

from undo_cli.errors import UndoError

FILENAME = "teacher-cache.sqlite3"
FORMAT = 1  # bump when the key or the stored value changes shape: old entries then simply miss
BUSY_TIMEOUT_MS = 60_000
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "glusterfs", "9p",
              "fuse.sshfs", "ceph", "fuse.ceph", "afs", "fuse.gcsfuse", "fuse.s3fs"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    key TEXT PRIMARY KEY,              -- sha256 of the canonical request (request_key)
    model TEXT NOT NULL,               -- the model identity's digest
    model_name TEXT NOT NULL,          -- the name as given (for stats and `prune --model`)
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL
);
-- The answers live in their own table: SQLite rewrites a whole row on UPDATE, and counting a hit
-- must not rewrite a 25 KB answer with log-probs (it made a lookup ~10x slower).
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL                -- encode_completions: the n completions, in sample order
);
CREATE INDEX IF NOT EXISTS completions_model ON completions(model_name);
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL
);
"""


def default_cache_dir() -> Path:
    """$UNDO_CACHE_DIR, else $XDG_CACHE_HOME/undo, else ~/.cache/undo: undo's one cache folder (gguf_models.cache_root)."""
    from undo_cli.gguf_models import cache_root

    return cache_root()


def filesystem_type(path: Path) -> str | None:
    """The filesystem type of the mount holding `path` (Linux /proc/self/mountinfo), None if unknown."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    target, best, kind = str(path.resolve()), -1, None
    for line in lines:
        left, _, right = line.partition(" - ")
        parts, rest = left.split(), right.split()
        if len(parts) < 5 or not rest:
            continue
        mount = parts[4].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > best:
            best, kind = len(mount), rest[0]
    return kind


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def request_key(model: str, messages: list[dict[str, str]], sampling: Any) -> str:
    """sha256 of the model identity digest and the backend-independent request (module docstring)."""
    greedy = sampling.temperature == 0
    request = {
        "format": FORMAT,
        "model": model,
        "messages": messages,
        "n": sampling.n,
        "temperature": float(sampling.temperature),
        "top_p": 1.0 if greedy else float(sampling.top_p),       # greedy decoding ignores both
        "seed": None if greedy else sampling.seed,
        "max_tokens": sampling.max_tokens,
        "stop": list(sampling.stop or []),
        "logprobs": sampling.logprobs,
        # where the completion was made to end (backends/stopping.py): a cut answer is another answer
        "stop_at_answer": bool(sampling.stop_at_answer),
        "repetition_cut": int(sampling.repetition_cut),
    }
    return hashlib.sha256(_canonical(request)).hexdigest()


def encode_completions(completions: list[Any]) -> bytes:
    """zlib'd JSON of the texts and counts, then the log-probabilities as raw arrays (if any).

    Log-probs are most of the bytes and, as JSON, most of the time (300 tokens x top-5
    is 3,600 numbers): packed as int32 ids and float64 log-probs (exact, so a cached
    record is byte-identical to a fresh one) they encode and decode ~10x faster.
    """
    import array
    import struct

    rows, packed = [], []
    for c in completions:
        row = {"text": c.text, "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
               "completion_tokens": c.completion_tokens, "logprobs": None}
        if c.logprobs is not None:
            counts = array.array("H", [len(t.top) for t in c.logprobs])
            ids, lps = array.array("i"), array.array("d")
            for t in c.logprobs:
                ids.append(t.token_id)
                lps.append(t.logprob)
                for i, lp in t.top:
                    ids.append(i)
                    lps.append(lp)
            row["logprobs"] = len(c.logprobs)
            packed += [counts.tobytes(), ids.tobytes(), lps.tobytes()]
        rows.append(row)
    # Level 1: text compresses ~3x even so, at a fraction of level 6's time.
    head = zlib.compress(_canonical(rows), 1)
    return struct.pack("<I", len(head)) + head + b"".join(packed)


def decode_completions(blob: bytes) -> list[Any]:
    import array
    import struct

    from undo_cli.backends.base import Completion, TokenLogprobs

    (size,) = struct.unpack_from("<I", blob)
    rows = json.loads(zlib.decompress(blob[4 : 4 + size]))
    view, at = memoryview(blob), 4 + size
    out = []
    for r in rows:
        logprobs = None
        if r["logprobs"] is not None:
            counts = array.array("H")
            counts.frombytes(view[at : at + 2 * r["logprobs"]])
            at += 2 * r["logprobs"]
            total = r["logprobs"] + sum(counts)
            ids, lps = array.array("i"), array.array("d")
            ids.frombytes(view[at : at + 4 * total])
            at += 4 * total
            lps.frombytes(view[at : at + 8 * total])
            at += 8 * total
            ids_l, lps_l = ids.tolist(), lps.tolist()
            logprobs, p = [], 0
            for k in counts:
                logprobs.append(TokenLogprobs(ids_l[p], lps_l[p], list(zip(ids_l[p + 1 : p + 1 + k],
                                                                            lps_l[p + 1 : p + 1 + k]))))
                p += 1 + k
        out.append(Completion(text=r["text"], finish_reason=r["finish_reason"], prompt_tokens=r["prompt_tokens"],
                              completion_tokens=r["completion_tokens"], logprobs=logprobs, cached=True))
    return out


# What `undo train` writes beside the weights about how they were made (stages/train.py RUN_FILE, SUMMARY_FILE:
# timings, paths, dates): provenance, not the model. Two trainings that wrote the same bytes of weights, tokenizer
# and config are one model to the cache and to lineage's model hash.
RUN_RECORDS = frozenset({"train_run.json", "train_summary.json"})

class TeacherCache:
    """The SQLite store (module docstring). One connection per process; close it (or use `with`)."""

    def __init__(self, folder: str | os.PathLike, *, quiet: bool = False):
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UndoError(f"--cache-dir {self.folder}: cannot create it ({exc.strerror})",
                            hint="pass a writable folder with --cache-dir, or --no-cache") from None
        self.path = self.folder / FILENAME
        self.fs = filesystem_type(self.folder)
        self.network = self.fs in NETWORK_FS
        try:
            # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE takes the write lock up
            # front, so two writers queue on the busy timeout instead of failing on a lock upgrade).
            self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self.journal_mode = self._set_up(quiet)
        except sqlite3.DatabaseError as exc:
            raise UndoError(f"the teacher cache {self.path} cannot be opened: {exc}",
                            hint="run with --no-cache, or move the file away (a new one is created)") from None

    def _set_up(self, quiet: bool) -> str:
        """Journal mode, sync level and schema; retried while another process is doing the same.

        Switching a fresh file to WAL, or creating the schema, while another process does the same
        can fail at once with "database is locked": SQLite skips the busy handler where waiting
        could deadlock. Those steps are idempotent, so they are retried (with jitter) up to the busy
        timeout. Returns the journal mode in force.
        """
        import random
        import time

        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        warned = quiet
        while True:
            try:
                if self.network:
                    mode = self.db.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
                    if not warned:
                        from undo_cli.console import warn

                        warn(f"the teacher cache {self.path} is on a network filesystem ({self.fs}): SQLite's WAL "
                             "mode cannot work there, so it uses a rollback journal; do not write it from several "
                             "machines at once (keep --cache-dir on a local disk)")
                        warned = True
                else:
                    mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                # WAL + NORMAL: a crash of the process loses nothing; a power cut may lose the last
                # transactions, which for a cache only means paying for those answers again.
                self.db.execute("PRAGMA synchronous=NORMAL")
                if not self._has_schema():
                    self.db.executescript(_SCHEMA)  # IF NOT EXISTS: two processes creating it at once is fine
                return mode
            except sqlite3.OperationalError as exc:
                if not any(w in str(exc) for w in ("locked", "busy")) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05 + 0.1 * random.random())

    # -- plumbing --------------------------------------------------------------------------------

    def _has_schema(self) -> bool:
        row = self.db.execute("SELECT count(*) FROM sqlite_master WHERE name IN ('completions', 'answers', "
                              "'file_hashes')")
        return row.fetchone()[0] == 3

    def _write(self, fn):
        """Run `fn` in one write transaction (BEGIN IMMEDIATE; the busy timeout queues concurrent writers)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            result = fn()
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return result

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "TeacherCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- completions -------------------------------------------------------------------------------

    def get_many(self, keys: list[str]) -> dict[str, list[Any]]:
        """The cached completions of those keys that are stored (hits are counted and dated)."""
        found: dict[str, list[Any]] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):  # SQLite caps the number of bound parameters
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, blob in self.db.execute(f"SELECT key, value FROM answers WHERE key IN ({marks})", chunk):
                found[key] = decode_completions(blob)
        if found:
            now = time.time()
            hit = list(found)

            def touch():
                for start in range(0, len(hit), 500):
                    chunk = hit[start : start + 500]
                    self.db.execute(f"UPDATE completions SET hits = hits + 1, last_used = ? "
                                    f"WHERE key IN ({','.join('?' * len(chunk))})", [now, *chunk])

            self._write(touch)
        return found

    def put_many(self, entries: Iterable[tuple[str, dict[str, Any], list[Any]]]) -> None:
        """Store (key, model identity, completions) triples in one transaction; an existing key is kept."""
        now = time.time()
        rows, answers = [], []
        for key, identity, completions in entries:
            rows.append((key, identity["digest"], identity["name"], now, now,
                         completions[0].prompt_tokens if completions else 0,
                         sum(c.completion_tokens for c in completions)))
            answers.append((key, encode_completions(completions)))

        def insert():
            self.db.executemany("INSERT OR IGNORE INTO completions (key, model, model_name, created, last_used, "
                                "prompt_tokens, completion_tokens) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            self.db.executemany("INSERT OR IGNORE INTO answers (key, value) VALUES (?, ?)", answers)

        if rows:
            self._write(insert)

    # -- model identity --------------------------------------------------------------------------

    def file_sha256(self, path: Path) -> str:
        """sha256 of a file, memoised by (path, size, mtime_ns): a weight file is read once."""
        st = path.stat()
        key = str(path.resolve())
        row = self.db.execute("SELECT size, mtime_ns, sha256 FROM file_hashes WHERE path = ?", (key,)).fetchone()
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return row[2]
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        digest = h.hexdigest()
        self._write(lambda: self.db.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)",
                                            (key, st.st_size, st.st_mtime_ns, digest)))
        return digest

    def model_identity(self, model: str, *, revision: str | None = None, adapter: str | None = None) -> dict[str, Any]:
        """{"name", "digest", ...}: what identifies the model's weights (module docstring)."""
        parts: dict[str, Any] = {"name": model}
        p = Path(model).expanduser()
        from undo_cli.gguf_models import identity as gguf_identity

        gguf = gguf_identity(model)
        if gguf is not None:  # a .gguf file: its bytes (a moved or renamed file is the same model)
            parts = {"gguf_sha256": gguf["sha256"]}
        elif p.is_dir():
            parts = {"files": self._folder_digest(p)}  # a copied or moved folder is the same model
        else:
            parts["revision"] = revision or hub_revision(model)
        if revision and "revision" not in parts:
            parts["revision"] = revision
        if adapter:
            parts["adapter"] = self._folder_digest(Path(adapter))
        return {"name": model, "digest": hashlib.sha256(_canonical(parts)).hexdigest(), **parts}

    def _folder_digest(self, folder: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(folder.rglob("*")):
            rel = f.relative_to(folder)
            if f.is_file() and "checkpoints" not in rel.parts and not rel.name.startswith(".") \
                    and rel.as_posix() not in RUN_RECORDS:
                h.update(f"{rel.as_posix()}:{self.file_sha256(f)}\n".encode())
        return h.hexdigest()

    # -- maintenance -------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        rows = self.db.execute(
            "SELECT model_name, count(*), sum(hits), sum(prompt_tokens + completion_tokens), "
            "sum(hits * (prompt_tokens + completion_tokens)), min(created), max(last_used) "
            "FROM completions GROUP BY model_name ORDER BY count(*) DESC").fetchall()
        models = [{"model": m, "entries": n, "hits": h or 0, "tokens_stored": t or 0, "tokens_saved": s or 0,
                   "oldest": c, "last_used": u} for m, n, h, t, s, c, u in rows]
        size = sum(f.stat().st_size for f in self.folder.glob(FILENAME + "*") if f.is_file())
        return {"path": str(self.path), "bytes": size, "journal_mode": self.journal_mode, "filesystem": self.fs,
                "entries": sum(m["entries"] for m in models), "hits": sum(m["hits"] for m in models),
                "tokens_saved": sum(m["tokens_saved"] for m in models), "models": models}

    def prune(self, *, older_than_days: float | None = None, model: str | None = None, everything: bool = False) -> int:
        """Delete entries (unused for N days, of one model name, or all); returns how many; compacts the file."""
        where, args = [], []
        if older_than_days is not None:
            where.append("last_used < ?")
            args.append(time.time() - older_than_days * 86400)
        if model is not None:
            where.append("model_name = ?")
            args.append(model)
        if not where and not everything:
            raise UndoError("undo cache prune: say what to drop", hint="--older-than DAYS, --model NAME, or --all")
        sql = "DELETE FROM completions" + (" WHERE " + " AND ".join(where) if where else "")

        def delete() -> int:
            count = self.db.execute(sql, args).rowcount
            self.db.execute("DELETE FROM answers WHERE key NOT IN (SELECT key FROM completions)")
            return count

        removed = self._write(delete)
        if everything and not where:
            self._write(lambda: self.db.execute("DELETE FROM file_hashes"))
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.execute("VACUUM")
        return removed


def hub_revision(name: str) -> str | None:
    """The commit the local hub cache resolves `main` to for a hub model name, if it is cached."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    home = os.environ.get("HF_HUB_CACHE") or str(Path(os.environ.get("HF_HOME") or Path.home() / ".cache/huggingface") / "hub")
    ref = Path(home) / f"models--{name.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None
