"""What a stage is, declared once: `StageSpec`, one per stage module, read by everything that runs stages.

    SPEC = StageSpec(name="evaluate", config=EvaluateConfig, run=run, records="prediction",
                     shard_key="id", item_keys=item_keys, keep=keep_in_manifest, ...)   # stages/evaluate.py

    from undo_cli.stages.spec import stage
    stage("evaluate").run(config)

Every place that handles "a stage" reads its spec instead of a list of its own:
the command line (`undo evaluate` builds its flags from `spec.config`),
`undo merge` and `--shard` (stages/shards.py: the record kind, the keys, the
merge hooks), the Slurm launcher (stages/slurm.py: what a task runs, the
summary of the merged shards) and `undo iterate` (loop/: the stage tables,
what the manifest keeps, which stages call the teacher). What identifies a
run of a stage is not declared here but read from its config's fields
(undo_cli/identity.py), and so are its input files (`input: True`).

A new stage: a module `stages/<name>.py` with its config, `run()` and `SPEC`,
one line in `MODULES` below, one row in cli/app.py's COMMANDS
(docs/DEVELOPING.md). Importing this module imports no stage: `undo --help`
stays instant.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

# Every stage, in the order of a UNDO run, and the module that declares its SPEC.
MODULES: dict[str, str] = {
    "cluster": "undo_cli.stages.cluster",
    "generate": "undo_cli.stages.generate",
    "train": "undo_cli.stages.train",
    "evaluate": "undo_cli.stages.evaluate",
    "collect_errors": "undo_cli.stages.collect_errors",
    "refine": "undo_cli.stages.refine",
    "mix": "undo_cli.stages.mix",
}


def _everything(summary: dict[str, Any]) -> dict[str, Any]:
    return summary


@dataclass(frozen=True)
class StageSpec:
    """One stage: its config and run, its output's records and keys, how its shards merge, what a loop keeps.

    name: the stage's name everywhere: `undo iterate`'s table (`[train]`), its manifest steps
        (`iter_00/train`), a shard sidecar's `stage`.
    config, run: the config dataclass (its fields are the flags) and `run(config) -> summary`.
    records: the record kind of its --output (records/schema.py); None for a folder (train).
    key: the field of those records that identifies a work item (generate: `problem_id`): resume
        skips items whose key is on disk, a finished output and `undo merge` are in item-key order.
    shard_key: the field `--shard K/N` hashes (refine: `problem_id`, so a problem's samples stay
        together); None: the stage has no `--shard` (on Slurm it runs as one job or in the controller).
    item_keys: config -> every work item's key in run order (what `undo merge` orders by).
    merge_consume: config -> a function that reads the merged records in the merge's own pass and
        returns what `after_merge` needs (evaluate: the metrics, recomputed, never averaged).
    after_merge: (config, merge config, merge summary, what merge_consume returned) -> None.
    merged_summary: (config, merge summary) -> the stage summary of a run whose shards were merged
        (the Slurm launcher: what `run()` would have returned, from the merged files).
    keep: what of a summary `undo iterate`'s manifest keeps (default: all of it).
    teacher: it calls the teacher: it takes the teacher economy's settings (cache, budget) and may be
        stopped by the budget, which `undo iterate` then reports as the reason it stopped.
    heavy: it loads a model: under `--launcher slurm` it runs on the cluster (a job array of its shards, or
        one job: train); a light stage (seconds of JSON: collect-errors, mix) runs in the controller.
    table: `undo iterate` has a table for it (`[refine] k = 3`); mix has none (its one setting is `mix`).
    """

    name: str
    config: type
    run: Callable[[Any], dict[str, Any]]
    records: str | None = None
    key: str = "id"
    shard_key: str | None = None
    item_keys: Callable[[Any], list[str]] | None = None
    merge_consume: Callable[[Any], Callable] | None = None
    after_merge: Callable[..., None] | None = None
    merged_summary: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None
    keep: Callable[[dict[str, Any]], dict[str, Any]] = _everything
    teacher: bool = False
    heavy: bool = False
    table: bool = True

    @property
    def sharded(self) -> bool:
        return self.shard_key is not None

    def identity(self, config: Any, **inputs: Any) -> dict[str, Any]:
        """What identifies a run of this stage (undo_cli/identity.py), its name included."""
        from undo_cli.identity import identity

        return {"stage": self.name, **identity(config, **inputs)}

    def inputs(self) -> list[str]:
        """The config fields that name input files (metadata `input: True`)."""
        import dataclasses

        return [f.name for f in dataclasses.fields(self.config) if f.metadata.get("input")]


def stage(name: str) -> StageSpec:
    """The spec of stage `name` (imports its module)."""
    if name not in MODULES:
        from undo_cli.errors import UndoError

        raise UndoError(f"unknown stage '{name}'", hint=f"stages: {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name]).SPEC


def tables() -> list[str]:
    """The stages `undo iterate` has a settings table for, in run order."""
    return [name for name in MODULES if stage(name).table]


def keep_keys(*keys: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A `keep` that keeps these keys of a summary (those it has)."""
    return lambda summary: {k: summary[k] for k in keys if k in summary}
