"""Sharded stages: `--shard K/N` splits a stage's work, `undo merge` puts the pieces back together.

    undo generate --teacher T --input train.jsonl --output shards/rationales.0.jsonl --shard 0/3
    undo generate --teacher T --input train.jsonl --output shards/rationales.1.jsonl --shard 1/3
    undo generate --teacher T --input train.jsonl --output shards/rationales.2.jsonl --shard 2/3
    undo merge rationales.jsonl shards/rationales.*.jsonl

(on Slurm: `--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT` in an array job; examples/slurm/.)

**The partition.** A work item belongs to shard `blake2b(problem id) mod N`
(8-byte digest, big-endian). The hash of the id, not the line number and not
Python's `hash()` (salted per process): the same problem lands in the same
shard on every machine, and adding problems to the input moves no other
problem to another shard. Every item is in exactly one shard. `undo refine`
shards its targets by their `problem_id`, so all samples of a problem stay
together; `undo collect-errors` (cheap, no model) classifies everything and
writes its shard's part, so a `--max` sample is the same as unsharded.

**Each shard is a run of its own.** It resumes exactly like an unsharded run
(re-run the same command), and writes a small sidecar next to its output,
`<stem>.shard.json` (`shards/rationales.0.shard.json`):

    {"format": 1, "stage": "generate", "shard": "0/3", "k": 0, "n": 3,
     "inputs": {"input": {"path": "train.jsonl", "sha256": "..."}},
     "settings": {...every setting that decides the records...}, "key": "problem_id",
     "complete": true, "records": 412, "rejected_records": 37}

`settings` are the config's fields that identify a run (undo_cli/identity.py):
those that may differ between shards without changing a record (the server
each task talks to, concurrency, batch size, GPU memory, the teacher budget)
are left out. A shard output with a sidecar for another K/N, input or
settings is refused, and so is an unsharded run writing over a shard's output.
A shard the teacher budget stopped says so (`"stopped": "budget"`, with the
items left and the budget it ran under) and is not complete: `--launcher slurm`
reports the budget instead of resubmitting it, a re-run with more resumes it.

**Merging.** `undo merge OUT SHARD...` checks that the shards are exactly
0..N-1 of one stage, one input and one set of settings (missing, duplicated,
foreign and unfinished shards are refused by name), re-reads the input to know
the order, and writes OUT (plus `<stem>.rejected.jsonl` for generate) in the
order an unsharded run writes it: input order, each item's records in the
order they were generated. The merged file is byte-identical to the unsharded
run's. `undo evaluate`'s metrics are recomputed from the merged predictions and
written beside OUT (`metrics.json`), never averaged from the shards'. The
shards' token ledgers (`<stem>.usage.json`) are added up beside OUT, so later
stages and `undo report` count what the shards paid for.

What a stage's records, keys and merge hooks are is its `StageSpec` (stages/spec.py).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from undo_cli.errors import UndoError

FORMAT = 1


@dataclass(frozen=True)
class Shard:
    """Shard k (0-based) of n."""

    k: int
    n: int

    def __str__(self) -> str:
        return f"{self.k}/{self.n}"


def parse_shard(text: str | None) -> Shard | None:
    """'K/N' -> Shard(K, N), 0 <= K < N (Slurm's 0-based $SLURM_ARRAY_TASK_ID / $SLURM_ARRAY_TASK_COUNT)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise UndoError(f"--shard {text}: expected K/N with 0 <= K < N, e.g. --shard 0/4",
                        hint="shards are numbered from 0, like $SLURM_ARRAY_TASK_ID in `sbatch --array=0-3`")
    return Shard(int(m.group(1)), int(m.group(2)))


def shard_of(key: str, n: int) -> int:
    """The shard of an id: blake2b (8 bytes, big-endian) mod n. Stable across machines and Python versions."""
    digest = hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def sidecar_path(output: str | os.PathLike) -> Path:
    """`shards/rationales.0.jsonl` -> `shards/rationales.0.shard.json` (a shard's output is a regular file)."""
    from undo_cli.records.sidecars import SHARD, sidecar_path as path_of

    return Path(path_of(output, SHARD) or f"{output}.{SHARD}")


def _sha256(path: str) -> str:
    from undo_cli.records import sha256_file

    return sha256_file(path)


def shard_meta(spec: Any, shard: Shard, config: Any) -> dict[str, Any]:
    """The sidecar of one shard of `spec`'s stage (not yet complete): what merge compares across shards."""
    from undo_cli.identity import identity

    inputs = {}
    for name in spec.inputs():
        path = getattr(config, name)
        if path is None:
            continue
        if path == "-":
            raise UndoError(f"--shard {shard} cannot read --{name.replace('_', '-')} from stdin",
                            hint="give the input as a file: every shard reads it, and `undo merge` re-reads it")
        inputs[name] = {"path": path, "sha256": _sha256(path)}
    from undo_cli.records import is_stream

    if is_stream(getattr(config, "output", "-")):
        raise UndoError(f"--shard {shard} needs --output FILE, not stdout or a stream",
                        hint="each shard writes its own file (e.g. out/rationales.{k}.jsonl); `undo merge` joins them")
    settings = identity(config)
    if settings.get("cascade"):  # a tier's prices, budget and servers change no record (economy/cascade.py); the
        from undo_cli.economy.cascade import parse_tier  # Slurm launcher gives each shard its share of a budget

        settings["cascade"] = [parse_tier(t).identifying_spec() for t in settings["cascade"]]
    return {"format": FORMAT, "stage": spec.name, "shard": str(shard), "k": shard.k, "n": shard.n,
            "inputs": inputs, "settings": settings, "key": spec.key, "complete": False}


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    from undo_cli.records import read_json

    return read_json(path) if path.is_file() else None


def _identity(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in ("format", "stage", "k", "n", "settings")} | {
        "inputs": {name: v.get("sha256") for name, v in (meta.get("inputs") or {}).items()}}


def _differences(old: dict[str, Any], new: dict[str, Any], *, ignore: tuple[str, ...] = ()) -> list[str]:
    """How two sidecars' runs differ ('key: was X, now Y'); a setting an older sidecar lacks holds its default."""
    from undo_cli.identity import changes, defaults, describe
    from undo_cli.stages.spec import MODULES, stage

    a, b = ({k: v for k, v in _identity(m).items() if k not in ignore} for m in (old, new))
    known = {"settings": defaults(stage(new["stage"]).config)} if new.get("stage") in MODULES else {}
    return describe(changes(a, b, known))


def begin(output: str, meta: dict[str, Any], *, fresh: bool = False) -> None:
    """Before a shard starts: refuse an output that belongs to another shard or run; write the sidecar.

    An existing output with the same sidecar is resumed (the sidecar is left as
    it is, complete or not: the runner marks it complete again at the end).
    """
    from undo_cli.records import write_json

    side = sidecar_path(output)
    old = _read_sidecar(side)
    if Path(output).exists() and not fresh:
        if old is None:
            raise UndoError(f"{output} exists and is not a shard's output (no {side.name} beside it)",
                            hint="write each shard to a new file, e.g. out/rationales.{k}.jsonl")
        changed = _differences(old, meta)
        if changed:
            raise UndoError(f"{output} holds shard {old.get('shard')} of another run; these differ:\n  "
                            + "\n  ".join(changed[:8]),
                            hint="resume with the same --shard, input and settings, or write to a new file")
        return
    write_json(side, meta)


def refuse_unsharded(output: str) -> None:
    """An unsharded run must not resume into (and silently complete) a shard's output."""
    from undo_cli.records import is_stream

    if is_stream(output):
        return
    side = sidecar_path(output)
    if side.is_file() and Path(output).exists():
        old = _read_sidecar(side) or {}
        raise UndoError(f"{output} is the output of shard {old.get('shard')} (see {side.name})",
                        hint=f"add --shard {old.get('shard')} to resume that shard, or write to a new file")


def finish(output: str, meta: dict[str, Any], **counts: Any) -> None:
    """After a shard's every item is done: mark the sidecar complete (merge accepts only complete shards)."""
    from undo_cli.records import write_json

    write_json(sidecar_path(output), {**meta, "complete": True, **counts})


def stopped_by_budget(output: str, meta: dict[str, Any], *, left: int, budget: dict[str, Any], **counts: Any) -> None:
    """A shard the teacher budget stopped with `left` items to do: not complete, and it says why (for the
    launcher, which then stops the stage with the reason `budget` instead of resubmitting the shard)."""
    from undo_cli.records import write_json

    write_json(sidecar_path(output), {**meta, "complete": False, "stopped": "budget", "left_by_budget": left,
                                      "budget": budget, **counts})


def read_sidecar(output: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar of a shard output, or None if there is none."""
    return _read_sidecar(sidecar_path(output))


class ShardPlan:
    """What `--shard K/N` means for one run of a stage, decided once, before any work, and handed to the stage.

        plan = ShardPlan(SPEC, config)                      # checks --shard, its inputs and its output
        items = plan.mine(items, [it.key for it in items])  # this shard's items, in their order (all, unsharded)
        plan.claim(fresh=config.overwrite)                  # before the first write
        summary.update(plan.done(records=n, left_by_budget=left, budget=limits))   # after the last

    `claim` refuses an output that belongs to another shard or run and writes the sidecar (unsharded: refuses
    to write over a shard's output); `done` marks the sidecar complete, or stopped by the teacher budget with
    the items left, and says which shard this was (unsharded: nothing). The stage meets shards only here.
    """

    def __init__(self, spec: Any, config: Any):
        self.output = config.output
        self.part = parse_shard(config.shard)
        self.meta = None if self.part is None else shard_meta(spec, self.part, config)

    def mine(self, items: Iterable[Any], keys: Iterable[str]) -> list[Any]:
        """The items this run is responsible for: shard K's, by a stable hash of each item's key (`keys`, in step)."""
        if self.part is None:
            return list(items)
        return [item for item, key in zip(items, keys, strict=True) if shard_of(key, self.part.n) == self.part.k]

    def claim(self, *, fresh: bool) -> None:
        if self.meta is None:
            refuse_unsharded(self.output)
        else:
            begin(self.output, self.meta, fresh=fresh)

    def done(self, *, left_by_budget: int = 0, budget: dict[str, Any] | None = None, **counts: Any) -> dict[str, Any]:
        if self.meta is None:
            return {}
        if left_by_budget:  # not complete (merge refuses it); what stopped it, for the launcher
            stopped_by_budget(self.output, self.meta, left=left_by_budget, budget=budget or {}, **counts)
        else:
            finish(self.output, self.meta, **counts)
        return {"shard": self.meta["shard"]}


# --- merge -------------------------------------------------------------------------------------------


@dataclass
class MergeConfig:
    """Everything `undo merge` needs."""

    output: str = field(metadata={"help": "The merged JSONL (what the unsharded run would have written).",
                                  "argument": True})
    shards: list[str] = field(metadata={"help": "The shard outputs, all N (each with its <stem>.shard.json beside it).",
                                        "argument": True})
    metrics: str | None = field(default=None, metadata={
        "help": "evaluate shards: where to write the recomputed metrics.json (default: beside the output)."})

    def __post_init__(self) -> None:
        self.shards = list(self.shards)  # the CLI passes a tuple
        if not self.shards:
            raise UndoError("no shards given", hint="undo merge OUT shards/rationales.*.jsonl")
        if self.output == "-":
            raise UndoError("undo merge writes a file, not stdout", hint="give OUT as a path")
        for s in self.shards:
            if Path(s).resolve() == Path(self.output).resolve():
                raise UndoError(f"OUT {self.output} is one of the shards", hint="merge into a new file")


def check_shards(paths: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(path, sidecar) by K, checked to be shards 0..N-1 of one stage, input and settings, all complete."""
    from undo_cli.stages.spec import MODULES

    metas = []
    for p in paths:
        if not Path(p).is_file():
            raise UndoError(f"{p}: no such shard output", hint="pass the files the shards wrote with --output")
        side = sidecar_path(p)
        meta = _read_sidecar(side)
        if meta is None:
            raise UndoError(f"{p}: not a shard (no {side.name} beside it)",
                            hint="only outputs of a run with --shard K/N can be merged")
        if meta.get("format") != FORMAT or meta.get("stage") not in MODULES:
            raise UndoError(f"{side}: not a shard sidecar this version of undo reads")
        metas.append(meta)
    first = metas[0]
    n = first["n"]
    for p, meta in zip(paths, metas):
        changed = _differences(first, meta, ignore=("k",))
        if changed:
            raise UndoError(f"{p} is not a shard of the same run as {paths[0]}; these differ:\n  "
                            + "\n  ".join(changed[:8]),
                            hint="merge only the shards of one command (same stage, input, settings and N)")
    seen: dict[int, str] = {}
    for p, meta in zip(paths, metas):
        if meta["k"] in seen:
            raise UndoError(f"shard {meta['shard']} given twice: {seen[meta['k']]} and {p}",
                            hint="pass each shard's output once")
        seen[meta["k"]] = p
    missing = [f"{k}/{n}" for k in range(n) if k not in seen]
    if missing:
        raise UndoError(f"missing shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} of {n}",
                        hint="run the missing shards (same command with --shard K/N), then merge all of them")
    unfinished = [f"{p} ({m['shard']}{', stopped by the teacher budget' if m.get('stopped') == 'budget' else ''})"
                  for p, m in zip(paths, metas) if not m.get("complete")]
    if unfinished:
        raise UndoError(f"unfinished shard{'s' if len(unfinished) > 1 else ''}: {', '.join(unfinished)}",
                        hint="re-run those shards' commands (with a higher budget where it stopped them): they "
                             "resume where they stopped")
    for name, v in first["inputs"].items():
        if not Path(v["path"]).is_file() or _sha256(v["path"]) != v["sha256"]:
            raise UndoError(f"{v['path']} ({name}) changed or is gone since the shards read it",
                            hint="merge needs the very input the shards read: restore it, or re-run the shards")
    return sorted(zip(paths, metas), key=lambda t: t[1]["k"])


def stage_config(meta: dict[str, Any], **overrides: Any):
    """The stage's config as the shards ran it (per-shard settings at their defaults), for merge-time work."""
    from undo_cli.stages.spec import stage

    return stage(meta["stage"]).config(**{**meta["settings"], **overrides})


def ids_of(path: str, field: str = "id") -> list[str]:
    """The `field` of every line of a JSONL file, in order, parsed lightly: for merge, whose inputs were
    validated by the shards that read them and are checked unchanged (sha256) before this is called."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)[field] for line in fh if line.strip()]


def _lines(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield line if line.endswith("\n") else line + "\n", json.loads(line)


def _merge_files(paths: list[str], out: str, position: dict[str, int], key: str, shard_key: str,
                 metas: list[dict[str, Any]], consume=None) -> tuple[int, Any]:
    """k-way merge of shard files (each already in item order) into `out`, atomically.

    consume: called once with an iterator over the merged records as they are written (evaluate
    computes its metrics in the same pass, so a million predictions are parsed once and never held).
    Returns (count, what consume returned).
    """
    from undo_cli.records.io import atomic_output

    last = len(position)

    def stream(path: str, meta: dict[str, Any]):
        previous = -1
        for lineno, (line, record) in enumerate(_lines(path), start=1):
            if shard_of(record.get(shard_key), meta["n"]) != meta["k"]:
                raise UndoError(f"{path}:{lineno}: {shard_key} '{record.get(shard_key)}' does not belong to "
                                f"shard {meta['shard']}", hint="this file was edited or is not this shard's output")
            pos = position.get(record.get(key), last)
            if pos < previous:  # the generation loop writes finished shards in item order; anything else was edited
                raise UndoError(f"{path}:{lineno}: records are not in input order",
                                hint="re-run the shard's command once: it puts a finished output in order")
            previous = pos
            yield pos, line, record

    count = 0
    consumed = None
    with atomic_output(out) as fh:  # a regular file appears whole or not at all; /dev/null stays a device
        streams = [stream(p, m) for p, m in zip(paths, metas) if Path(p).exists()]

        def records():
            nonlocal count
            # Ties cannot happen across shards (a key lives in one shard); heapq.merge is stable within one.
            for _, line, record in heapq.merge(*streams, key=lambda t: t[0]):
                fh.write(line)
                count += 1
                yield record

        if consume is None:
            for _ in records():
                pass
        else:
            consumed = consume(records())
            for _ in records():  # whatever consume left unread
                pass
    return count, consumed


def merge(config: MergeConfig) -> dict[str, Any]:
    """Check the shards, merge them (their rejected sidecars and ledgers too) in input order; evaluate: metrics."""
    import time

    from undo_cli.console import console
    from undo_cli.economy.accounting import merge_ledgers
    from undo_cli.records.sidecars import REJECTED, USAGE, sidecar_path as path_of
    from undo_cli.stages.spec import stage

    started = time.perf_counter()
    checked = check_shards(config.shards)
    paths, metas = [p for p, _ in checked], [m for _, m in checked]
    first = metas[0]
    spec = stage(first["stage"])
    stage_cfg = stage_config(first, output=config.output)
    position = {k: i for i, k in enumerate(spec.item_keys(stage_cfg))}
    consume = spec.merge_consume(stage_cfg) if spec.merge_consume else None
    records, consumed = _merge_files(paths, config.output, position, spec.key, spec.shard_key, metas, consume=consume)
    summary: dict[str, Any] = {"stage": spec.name, "shards": first["n"], "output": config.output, "records": records,
                               "inputs": {n: v["path"] for n, v in first["inputs"].items()}}
    out_side = path_of(config.output, REJECTED)  # None when OUT is a stream: no sidecar there
    if out_side is not None and any(m.get("rejected_records") is not None for m in metas):
        summary["rejected_output"] = out_side
        summary["rejected"], _ = _merge_files([path_of(p, REJECTED) for p in paths], out_side, position, spec.key,
                                              spec.shard_key, metas)
    usage = merge_ledgers([path_of(p, USAGE) for p in paths], config.output)
    if usage is not None:
        summary["teacher_usage"] = usage
    if spec.after_merge:
        spec.after_merge(stage_cfg, config, summary, consumed)
    summary["wall_s"] = round(time.perf_counter() - started, 3)
    console.print(f"merged {first['n']} {spec.name} shards: {records} records -> {config.output}"
                  + (f" (+{summary['rejected']} rejected -> {summary['rejected_output']})"
                     if "rejected_output" in summary else ""))
    return summary
