"""Between refine and train: fold the refined rationales into the training data.

    undo mix --base iter_00/rationales.jsonl --refined iter_01/refined.jsonl --output iter_01/train_data.jsonl
    undo mix --base iter_01/train_data.jsonl --refined iter_02/refined.jsonl --mode append -o iter_02/train_data.jsonl

`undo refine` writes one line per target it tried, with the *same id* as the
rationale it re-teaches. The UNDO paper leaves open what happens to the old
rationale; we make it an option (docs/method.md §1):

* `replace` (default): the refined record takes the old one's place, by id, in
  the base file's order. A refinement that did not verify carries the previous
  rationale unchanged (`refinement.kept_previous`), so replacing with it changes
  no training text, only adds the provenance of the attempt.
* `append`: the base stays as it is and every *verified* refinement is added as
  an extra example with the id `<old id>@<iteration>` (ids stay unique, and a
  person can see which round produced it). Unverified ones are not appended:
  they would only repeat a rationale that is already in the base.

This is the step `undo iterate` runs as `iter_NN/mix`; as a command it lets the
bash version of the loop (examples/undo_loop.sh) produce the same files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from undo_cli.errors import UndoError, ref
from undo_cli.stages.spec import StageSpec

MODES = {"replace": "refined rationales take the old ones' place by id, the default",
         "append": "verified ones are added"}


@dataclass
class MixConfig:
    """Everything `undo mix` needs."""

    base: str = field(metadata={"input": True, "help": "The current training rationales (what `undo refine --targets` read)."})
    refined: str = field(metadata={"input": True, "help": "Refined rationales from `undo refine` (same ids as the base)."})
    output: str = field(default="-", metadata={"identity": False, "short": "-o", "help": "The new training data JSONL ('-' is stdout)."})
    mode: str = field(default="replace", metadata={"choices": MODES,
        "help": "replace: refined rationales take the old ones' place by id; append: verified ones are added."})

    def __post_init__(self) -> None:
        from undo_cli.fields import check_choices
        from undo_cli.records import check_output_path
        from undo_cli.stages.options import check_output_is_new

        check_choices(self)
        check_output_is_new(self.output, {ref("base"): self.base, ref("refined"): self.refined},
                            hint="write to a new file")
        check_output_path(self.output)
        if self.base == "-" and self.refined == "-":
            raise UndoError(f"{ref('base')} and {ref('refined')} cannot both read stdin",
                            hint="give one of them as a file")


def _verified(record: dict[str, Any]) -> bool:
    return bool((record.get("refinement") or {}).get("verified"))


def mix(base: list[dict[str, Any]], refined: list[dict[str, Any]], mode: str) -> tuple[list[dict[str, Any]], dict]:
    """The new training records and counts: replaced, kept_previous, appended, unmatched."""
    by_id = {r["id"]: r for r in refined}
    known = {r["id"] for r in base}
    unmatched = [r for r in refined if r["id"] not in known]
    if mode == "replace":
        out = [by_id.get(r["id"], r) for r in base] + unmatched
        appended = len(unmatched)
    else:
        extra = []
        for r in refined:
            if not _verified(r):
                continue
            iteration = (r.get("refinement") or {}).get("iteration", r.get("iteration", 0))
            extra.append({**r, "id": f"{r['id']}@{iteration}"})
        out = base + extra
        appended = len(extra)
        if len({r["id"] for r in out}) != len(out):
            raise UndoError("mixing would give two records the same id (was this refined file appended twice?)",
                            hint="mix each refine output into the training data once")
    counts = {
        "base": len(base),
        "refined": len(refined),
        "verified": sum(_verified(r) for r in refined),
        "replaced": sum(_verified(r) for r in refined if r["id"] in known) if mode == "replace" else 0,
        "kept_previous": sum(not _verified(r) for r in refined),
        "appended": appended,
        "unmatched": len(unmatched),
        "records": len(out),
        "mode": mode,
    }
    return out, counts


def run(config: MixConfig) -> dict[str, Any]:
    """Read both files, mix, write atomically; prints one line and returns the counts."""
    from undo_cli.console import console, warn
    from undo_cli.records import read_records, write_records

    base = read_records(config.base, "rationale")
    refined = read_records(config.refined, "rationale", allow_empty=True)
    out, counts = mix(base, refined, config.mode)
    if counts["unmatched"]:
        warn(f"{counts['unmatched']} refined records have ids that are not in {config.base}; they were added as new "
             "examples (was `undo refine --targets` a different file?)")
    write_records(config.output, out)
    counts["output"] = config.output
    what = (f"{counts['replaced']} replaced by verified refinements, {counts['kept_previous']} kept"
            if config.mode == "replace" else f"{counts['appended']} verified refinements appended")
    console.print(f"undo mix ({config.mode}): {counts['base']} base + {counts['refined']} refined -> "
                  f"{counts['records']} records ({what})")
    return counts


SPEC = StageSpec(name="mix", config=MixConfig, run=run, records="rationale", table=False)
