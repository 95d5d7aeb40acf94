"""The files that belong to an output, named in one place; a stream has none.

    out/rationales.jsonl             a stage's --output
    out/rationales.run.json          what produced it (stages/generation_loop.py): checked on resume
    out/rationales.usage.json        the teacher's tokens spent on it (economy/accounting.py)
    out/rationales.shard.json        which shard of which run it is (stages/shards.py)
    out/rationales.rejected.jsonl    generate's samples that did not verify
    out/rationales.metrics.json      evaluate's metrics (for out/predictions.jsonl: predictions.metrics.json)
    out/rationales.batches.json      the batches a batch API backend created for it (backends/batch/manifest.py)

    sidecar_path("out/rationales.jsonl", USAGE)   # "out/rationales.usage.json"
    sidecar_path("/dev/null", USAGE)              # None
    can_read_back("/dev/null")                    # False

An output that is not a regular file (`-`, `/dev/null`, a FIFO, a socket, bash's
`>(...)`) is written in place and that is all: it gets no sidecar (no
`/dev/null.usage.json`), and nothing is ever read back from it (opening a FIFO
to read what was written would wait forever for a writer).

A stage that owns an output calls `remove_stale_temps_of(output)` before it
writes: the temp files killed atomic writes of the output and its sidecars left
behind go (never a live writer's, never another output's: records/io.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from undo_cli.records.io import is_stream, remove_stale_temps

RUN = "run.json"
USAGE = "usage.json"
SHARD = "shard.json"
REJECTED = "rejected.jsonl"
METRICS = "metrics.json"
BATCHES = "batches.json"
SIDECARS = (RUN, USAGE, SHARD, REJECTED, METRICS, BATCHES)


def stem(output: str | os.PathLike) -> str:
    """`out/rationales.jsonl` -> `rationales` (a name without .jsonl is its own stem)."""
    name = Path(output).name
    return name[: -len(".jsonl")] if name.endswith(".jsonl") else name


def sidecar_path(output: str | os.PathLike, suffix: str) -> str | None:
    """The file `suffix` (RUN, USAGE, ...) of `output`, beside it; None for a stream."""
    if is_stream(output):
        return None
    return str(Path(output).with_name(f"{stem(output)}.{suffix}"))


def sidecar_paths(output: str | os.PathLike) -> list[str]:
    """Every sidecar `output` may have (none for a stream)."""
    return [p for p in (sidecar_path(output, s) for s in SIDECARS) if p]


def can_read_back(output: str | os.PathLike) -> bool:
    """True when `output` is a regular file that exists: a stage may re-read what it wrote there."""
    return not is_stream(output) and Path(output).is_file()


def remove_stale_temps_of(output: str | os.PathLike) -> list[str]:
    """Delete what killed atomic writes of `output` and of its sidecars left behind (records.remove_stale_temps)."""
    if is_stream(output):
        return []
    return [name for path in (str(output), *sidecar_paths(output)) for name in remove_stale_temps(path)]
