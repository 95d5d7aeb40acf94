"""`undo batch status|wait|cancel`: the batches an output (or a whole run folder) has at a batch API, and what
they cost (here, above backends/: it reads the output's ledger).

    undo batch status out/rationales.jsonl          # per batch: status, answered/failed of total, tokens, cost
    undo batch status runs/my-run --json            # every manifest under the run, one JSON object a batch
    undo batch wait runs/my-run                     # until every batch has ended, with progress
    undo batch cancel out/rationales.jsonl          # stop the open ones (a re-run submits their rows again)

Reads `<stem>.batches.json` (manifest.py) and asks the API about each batch still open; the key comes from
the variable the manifest names, and a key whose fingerprint differs is refused before any request.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError

_TARGET = {"argument": True, "help": "An output file (out/rationales.jsonl), its .batches.json, or a run folder."}


@dataclass
class BatchStatusConfig:
    """What `undo batch status` needs."""

    target: str = field(metadata=_TARGET)
    json: bool = field(default=False, metadata={"help": "One JSON object per batch on stdout."})


@dataclass
class BatchWaitConfig:
    """What `undo batch wait` needs."""

    target: str = field(metadata=_TARGET)
    poll_s: float = field(default=30.0, metadata={"help": "Seconds between looks."})
    timeout_s: float | None = field(default=None, metadata={"help": "Give up (exit 2) after this many seconds."})


@dataclass
class BatchCancelConfig:
    """What `undo batch cancel` needs."""

    target: str = field(metadata=_TARGET)


def _manifests(target: str):
    from undo_cli.backends.batch.manifest import find_manifests, read

    paths = find_manifests(target)
    if not paths:
        raise UndoError(f"no batch manifest for {target}",
                        hint="a stage run with --backend openai-batch or anthropic-batch writes <output stem>."
                             "batches.json beside its --output; pass that output, the file, or the run folder")
    return [read(p) for p in paths]


def _api(manifest):
    from undo_cli.backends.batch import open_provider

    api, fingerprint = open_provider(manifest.provider, manifest.endpoint, manifest.api_key_env)
    if fingerprint != manifest.key_fingerprint:
        api.client.close()
        raise UndoError(f"{manifest.path}: its batches were made with another API key (fingerprint "
                        f"{manifest.key_fingerprint}, ${manifest.api_key_env} now {fingerprint})",
                        hint=f"a batch is visible only to the key that created it: put that key in "
                             f"${manifest.api_key_env}")
    return api


def _refresh(manifest, api) -> None:
    """Ask the API about every batch not known to have ended; save what it said."""
    for entry in manifest.batches:
        if entry.get("state") == "submitted" and entry.get("batch_id"):
            look = api.look(entry["batch_id"])
            entry.update(status=look.status, expires_at=look.expires_at or entry.get("expires_at"),
                         counts={"total": look.total, "done": look.done, "failed": look.failed})
            if look.ended:
                entry["state"] = "ended"
    manifest.save()


def _cost(manifest, entry: dict[str, Any]) -> float | None:
    """What a read batch cost, at the prices its output's ledger books (the batch price)."""
    from undo_cli.economy.accounting import Prices, read_ledger

    usage = entry.get("usage")
    ledger = read_ledger(str(Path(manifest.path).with_name(Path(manifest.path).name.replace(".batches.json",
                                                                                             ".usage.json"))))
    if not usage or not ledger or not ledger.get("prices"):
        return None
    p = ledger["prices"]
    return Prices(p.get("input"), p.get("output")).cost(usage["prompt_tokens"], usage["completion_tokens"])


def _rows(manifests) -> list[dict[str, Any]]:
    rows = []
    for m in manifests:
        for e in m.batches:
            counts = e.get("counts") or {}
            rows.append({"manifest": m.path, "api": m.provider, "local_id": e["local_id"], "batch_id": e.get("batch_id"),
                         "state": e.get("state"), "status": e.get("status"), "requests": e.get("requests"),
                         "answered": counts.get("done"), "failed": counts.get("failed"),
                         "created_at": e.get("created_at"), "expires_at": e.get("expires_at"),
                         "usage": e.get("usage"), "cost": _cost(m, e)})
    return rows


def _when(t: float | None) -> str:
    return "-" if not t else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _print(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from undo_cli.console import console

    table = Table(title="batches", title_justify="left")
    for col in ("manifest", "batch", "status", "answered / failed / requests", "tokens", "cost", "created",
                "expires"):
        table.add_column(col)
    for r in rows:
        tokens = "-" if not r["usage"] else f"{r['usage']['prompt_tokens'] + r['usage']['completion_tokens']:,}"
        table.add_row(Path(r["manifest"]).name, r["batch_id"] or f"({r['local_id']}, not created)",
                      f"{r['status'] or r['state']}", f"{r['answered'] if r['answered'] is not None else '-'} / "
                      f"{r['failed'] if r['failed'] is not None else '-'} / {r['requests']}", tokens,
                      "-" if r["cost"] is None else f"{r['cost']:.4f}", _when(r["created_at"]), _when(r["expires_at"]))
    console.print(table)
    open_ = sum(r["state"] == "submitted" for r in rows)
    console.print(f"{len(rows)} batch(es): {open_} in flight, {len(rows) - open_} ended or dropped. Results are read "
                  "into the output by running its stage again (or by the stage still waiting on them).")


def status(config: BatchStatusConfig) -> dict[str, Any]:
    manifests = _manifests(config.target)
    for m in manifests:
        if any(e.get("state") == "submitted" for e in m.batches):
            api = _api(m)
            try:
                _refresh(m, api)
            finally:
                api.client.close()
    rows = _rows(manifests)
    if config.json:
        for r in rows:
            sys.stdout.write(json.dumps(r) + "\n")
    else:
        _print(rows)
    return {"batches": len(rows), "in_flight": sum(r["state"] == "submitted" for r in rows)}


def wait(config: BatchWaitConfig) -> dict[str, Any]:
    from undo_cli.console import console

    manifests = _manifests(config.target)
    apis = {m.path: _api(m) for m in manifests if any(e.get("state") == "submitted" for e in m.batches)}
    started = time.monotonic()
    try:
        while True:
            for m in manifests:
                if m.path in apis:
                    _refresh(m, apis[m.path])
            rows = _rows(manifests)
            open_ = [r for r in rows if r["state"] == "submitted"]
            if not open_:
                break
            answered = sum(r["answered"] or 0 for r in open_)
            total = sum(r["requests"] or 0 for r in open_)
            console.print(f"waiting on {len(open_)} batch(es): {answered:,}/{total:,} requests answered "
                          f"({', '.join(sorted({str(r['status']) for r in open_}))}); next look in {config.poll_s:g} s")
            if config.timeout_s is not None and time.monotonic() - started > config.timeout_s:
                raise UndoError(f"{len(open_)} batch(es) still open after {config.timeout_s:g} s",
                                hint="they go on at the API; wait again later, or `undo batch cancel`")
            time.sleep(config.poll_s)
    finally:
        for api in apis.values():
            api.client.close()
    _print(rows)
    return {"batches": len(rows), "in_flight": 0}


def cancel(config: BatchCancelConfig) -> dict[str, Any]:
    from undo_cli.console import console

    cancelled = 0
    for m in _manifests(config.target):
        open_ = [e for e in m.batches if e.get("state") == "submitted" and e.get("batch_id")]
        if not open_:
            continue
        api = _api(m)
        try:
            for e in open_:
                api.cancel(e["batch_id"])
                cancelled += 1
            _refresh(m, api)
        finally:
            api.client.close()
    console.print(f"asked the API to cancel {cancelled} batch(es); requests already answered stay paid and are "
                  "read into the output by running its stage again, which submits the cancelled rows anew")
    return {"cancelled": cancelled}
