"""A finished output in item order: whatever a backend's batching did, the same file for a run, a resumed run
and `undo merge` of its shards.

    put_in_order("rationales.jsonl", "rationale", keys=[item.key for item in items], key="problem_id")

stages/generation_loop.py calls it when every item is done; a stream (`-`, a FIFO, a device) is never read back.
"""

from __future__ import annotations

from typing import Any, Iterable

from undo_cli.records.io import read_records, write_records
from undo_cli.records.sidecars import can_read_back


def order_records(records: list[dict[str, Any]], keys: Iterable[str], key: str) -> list[dict[str, Any]]:
    """Records grouped by `record[key]` in the order of `keys`; within a key, as given. Unknown keys go last."""
    position = {k: i for i, k in enumerate(keys)}
    last = len(position)
    # sorted() is stable: the records of one key keep the order they were generated in.
    return sorted(records, key=lambda r: position.get(r.get(key), last))


def put_in_order(path: str, kind: str, keys: list[str], key: str) -> None:
    """Rewrite a finished JSONL output (atomically) in item order, if it is not already."""
    if not can_read_back(path):
        return
    records = read_records(path, kind, allow_empty=True)
    ordered = order_records(records, keys, key)
    if any(a is not b for a, b in zip(records, ordered)):
        write_records(path, ordered)
