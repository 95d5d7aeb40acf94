"""`<output stem>.batches.json`: every batch an output's requests went into, written BEFORE each is created.

    {"provider": "openai-batch", "endpoint": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY",
     "key_fingerprint": "3f2a...", "model": "gpt-4o-mini",
     "batches": [{"local_id": "b0001-...", "state": "submitted", "batch_id": "batch_abc", "input_sha256": "...",
                  "requests": 500, "bytes": 812345, "custom_ids": ["u1c9...", ...], "created_at": 1765..,
                  "expires_at": 1765.., "status": "in_progress", "counts": {"total": 500, "done": 120,
                  "failed": 0}, "usage": null}]}

The order of writes is what makes a kill cheap: the entry (its input's hash and custom_ids) is written with
state "creating" before the upload; the batch id is written the moment the API returns it. A run killed
after that polls the stored id instead of paying again; one killed inside the create call finds its batch by
the `undo_local_id` metadata where the API keeps metadata (OpenAI), and otherwise resubmits those rows (the
window is one HTTP request). The key itself is never written: a fingerprint of it is, so that a batch made
under another key (which the API will not show: `404 No batch found`) is refused in words, not by a 404.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError

FINAL = ("ended", "cancelled", "abandoned")  # states whose requests will not change any more


def key_fingerprint(key: str) -> str:
    """Enough to tell two keys apart, nothing to recover one from (a salted sha256, 16 hex digits)."""
    return hashlib.sha256(b"undo-batch-key:" + key.encode()).hexdigest()[:16]


@dataclass
class Manifest:
    path: str
    provider: str
    endpoint: str
    api_key_env: str
    key_fingerprint: str
    model: str
    batches: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, path: str, *, provider: str, endpoint: str, api_key_env: str, fingerprint: str,
             model: str) -> "Manifest":
        """The output's manifest, new or as a killed run left it; refused when it was made elsewhere."""
        mine = cls(path, provider, endpoint, api_key_env, fingerprint, model)
        if not Path(path).is_file():
            return mine
        old = read(path)
        if old.batches:  # an empty manifest binds nothing
            for what, was, now in (("API", old.provider, provider), ("endpoint", old.endpoint, endpoint),
                                   ("API key", old.key_fingerprint, fingerprint)):
                if was != now:
                    shown = (f"fingerprint {was}, now {now}" if what == "API key" else f"{was}, now {now}")
                    raise UndoError(
                        f"{path}: the batches of this output were made with another {what} ({shown})",
                        hint=("a batch is visible only to the key and project that created it: put that key back "
                              f"in ${api_key_env}" if what == "API key" else
                              f"use the {what} they were made with")
                             + ", or pass --overwrite to start this output again (what those batches cost is lost)")
        mine.batches = old.batches
        return mine

    def save(self) -> None:
        from undo_cli.records import write_json

        write_json(self.path, {"provider": self.provider, "endpoint": self.endpoint, "api_key_env": self.api_key_env,
                               "key_fingerprint": self.key_fingerprint, "model": self.model,
                               "batches": self.batches})

    def new_entry(self, custom_ids: list[str], lines: list[bytes]) -> dict[str, Any]:
        """The entry of a batch about to be created, saved before the API hears of it."""
        data = b"".join(lines)
        entry = {"local_id": f"b{len(self.batches) + 1:04d}-{hashlib.sha256(data).hexdigest()[:12]}",
                 "state": "creating", "batch_id": None, "input_file_id": None,
                 "input_sha256": hashlib.sha256(data).hexdigest(), "requests": len(custom_ids), "bytes": len(data),
                 "custom_ids": custom_ids, "created_at": round(time.time(), 3), "expires_at": None,
                 "status": None, "counts": None, "usage": None}
        self.batches.append(entry)
        self.save()
        return entry


def read(path: str) -> Manifest:
    from undo_cli.records import read_json

    try:
        data = read_json(path)
        return Manifest(path, data["provider"], data["endpoint"], data.get("api_key_env") or "",
                        data["key_fingerprint"], data.get("model") or "", list(data.get("batches") or []))
    except UndoError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise UndoError(f"{path}: not a batch manifest ({type(exc).__name__}: {exc})",
                        hint="it is written by the openai-batch and anthropic-batch backends; move it away to "
                             "start again (batches listed in it would be paid twice)") from None


def find_manifests(target: str) -> list[str]:
    """The manifests of an output (`out/rationales.jsonl`), a manifest itself, or every one under a run folder."""
    from undo_cli.records.sidecars import BATCHES, sidecar_path

    p = Path(target)
    if p.is_dir():
        return sorted(str(m) for m in p.rglob(f"*.{BATCHES}"))
    if p.name.endswith(f".{BATCHES}"):
        return [str(p)] if p.is_file() else []
    side = sidecar_path(target, BATCHES)
    return [side] if side and Path(side).is_file() else []


def discard(path: str | None) -> None:
    """`--overwrite`: the output starts again, and so does its record of batches (those still open are said)."""
    if not path or not Path(path).is_file():
        return
    try:
        open_ = [b.get("batch_id") or b["local_id"] for b in read(path).batches if b.get("state") == "submitted"]
    except UndoError:
        open_ = []
    if open_:
        from undo_cli.console import warn

        warn(f"--overwrite drops the record of {len(open_)} batch(es) still open ({', '.join(open_[:3])}"
             f"{', ...' if len(open_) > 3 else ''}): they run on and are billed; `undo batch cancel` stops them")
    Path(path).unlink()
