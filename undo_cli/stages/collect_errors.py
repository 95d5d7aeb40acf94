"""Step 4 of the UNDO loop: keep the student's failures, with its own words, classified.

    undo collect-errors predictions.jsonl --output errors.jsonl
    undo evaluate --model out/student --input val.jsonl --output - | undo collect-errors - > errors.jsonl

The input is what `undo evaluate` writes (one prediction per problem: the
student's full `output`, the `predicted` answer, `correct`, `finish_reason`).
Every prediction that is not correct becomes one error record: the prediction
unchanged plus an `error_type`, because `undo refine` shows the teacher the
student's actual output, and a person reading errors.jsonl wants to see it too.

Three classes, checked in this order (the first that applies wins):

    truncated     finish_reason == "length": the student ran out of tokens. Usually
                  it also has no answer, but the fix is different (shorter
                  rationales, a larger --max-tokens), so it gets its own class.
    no_answer     nothing could be extracted from the output (predicted is null).
    wrong_answer  an answer was extracted and it is not the gold one.

A prediction file written by hand (or by another tool) may lack `correct`; such
lines are scored with `undo_cli.scoring` (the one scorer) rather than trusted.

`--max N` keeps a seeded random sample of N errors, so a large validation set
does not turn into a refinement budget nobody asked for. The sample is drawn
from the errors sorted by id, so it depends on the seed and the set of errors,
not on the order in which a concurrent `evaluate` happened to write them.
Output keeps the input order. `--shard K/N` classifies and samples all
predictions and writes the errors whose id hashes to shard K (stages/shards.py).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from undo_cli.backends.stopping import CUT_SHORT
from undo_cli.errors import SettingError
from undo_cli.records.schema import ERROR_TYPES
from undo_cli.stages.spec import StageSpec


@dataclass
class CollectErrorsConfig:
    """Everything `undo collect-errors` needs."""

    predictions: str = field(metadata={"argument": True, "input": True, "help": "Predictions JSONL from `undo evaluate` ('-' reads stdin)."})
    output: str = field(default="-", metadata={"identity": False, "short": "-o", "help": "Where to write the error records ('-' is stdout)."})
    max: int | None = field(default=None, metadata={
        "help": "Keep at most this many errors: a seeded random sample (default: keep all)."})
    seed: int = field(default=0, metadata={"help": "Seed for the --max sample; same seed, same sample."})
    shard: str | None = field(default=None, metadata={"identity": False,
        "help": "K/N: write shard K (0-based) of N only, by a stable hash of the id; `undo merge` joins them."})

    def __post_init__(self) -> None:
        if self.shard is not None:
            from undo_cli.stages.shards import parse_shard

            parse_shard(self.shard)
        if self.max is not None and self.max < 1:
            raise SettingError("max", self.max, "must be at least 1", hint="leave it out to keep every error")
        from undo_cli.records import check_output_path
        from undo_cli.stages.options import check_output_is_new

        # Written after reading, so `-o preds.jsonl` would silently replace the predictions with the errors.
        check_output_is_new(self.output, {"predictions": self.predictions}, hint="write errors to a new file")
        check_output_path(self.output)


def classify(prediction: dict[str, Any]) -> str | None:
    """The error class of a scored prediction, or None when it is correct."""
    if prediction.get("correct"):
        return None
    if prediction.get("finish_reason") in CUT_SHORT:  # max tokens, or cut in a loop (backends/stopping.py)
        return "truncated"
    if prediction.get("predicted") is None:
        return "no_answer"
    return "wrong_answer"


def score_unscored(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Score in place the lines without a true/false `correct` (hand-made files; `undo evaluate`'s have it)."""
    unscored = [p for p in predictions if not isinstance(p.get("correct"), bool)]
    if unscored:
        # Only hand-made files get here; import the scorer (math-verify) only then.
        from undo_cli.scoring import score_record

        for p in unscored:
            p.update(score_record(p))
    return predictions


def collect(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Error records (prediction + error_type) for the failed predictions, in input order."""
    score_unscored(predictions)
    errors = []
    for p in predictions:
        kind = classify(p)
        if kind is not None:
            errors.append({**p, "error_type": kind})
    return errors


def sample(errors: list[dict[str, Any]], max_errors: int | None, seed: int = 0) -> list[dict[str, Any]]:
    """A seeded random subset of `max_errors` errors (all when there are fewer), in input order."""
    if max_errors is None or len(errors) <= max_errors:
        return errors
    by_id = sorted(errors, key=lambda e: e["id"])
    keep = {e["id"] for e in random.Random(seed).sample(by_id, max_errors)}
    return [e for e in errors if e["id"] in keep]


def run(config: CollectErrorsConfig) -> dict[str, Any]:
    """Read predictions, write errors, print a table; returns the summary."""
    from undo_cli.records import read_records, write_records

    from undo_cli.stages.shards import ShardPlan

    plan = ShardPlan(SPEC, config)
    predictions = read_records(config.predictions, "prediction")
    all_errors = collect(predictions)
    # Classify and sample everything, then keep this shard's part: cheap (no model), and a
    # --max sample is then exactly the unsharded one.
    errors = sample(all_errors, config.max, config.seed)
    errors = plan.mine(errors, [e["id"] for e in errors])
    plan.claim(fresh=True)  # a whole-file rewrite: nothing to resume
    write_records(config.output, errors)
    which = plan.done(records=len(errors))  # {'shard': 'K/N'} for a shard

    found = Counter(e["error_type"] for e in all_errors)
    kept = Counter(e["error_type"] for e in errors)
    summary = {
        "predictions": len(predictions),
        "correct": len(predictions) - len(all_errors),
        "errors": len(all_errors),
        "kept": len(errors),
        "by_type": {t: found.get(t, 0) for t in ERROR_TYPES},
        "kept_by_type": {t: kept.get(t, 0) for t in ERROR_TYPES},
        "output": config.output,
    }
    _print_table(summary, sampled=config.max is not None and len(all_errors) > len(errors))
    summary.update(which)
    return summary


def item_keys(config: CollectErrorsConfig) -> list[str]:
    """Prediction ids in input order (errors keep it): how `undo merge` orders shards."""
    from undo_cli.stages.shards import ids_of

    return ids_of(config.predictions)


def _print_table(summary: dict[str, Any], *, sampled: bool) -> None:
    from rich.table import Table

    from undo_cli.console import console, print_stage_summary

    n = max(summary["predictions"], 1)
    table = Table(title="undo collect-errors", title_justify="left")
    table.add_column("class")
    table.add_column("errors", justify="right")
    table.add_column("% of predictions", justify="right")
    if sampled:
        table.add_column("kept (--max)", justify="right")
    meaning = {"truncated": "ran out of tokens", "no_answer": "no answer extracted", "wrong_answer": "answered, wrongly"}
    for t in ERROR_TYPES:
        row = [f"{t} [dim]({meaning[t]})[/dim]", str(summary["by_type"][t]), f"{100 * summary['by_type'][t] / n:.1f}"]
        if sampled:
            row.append(str(summary["kept_by_type"][t]))
        table.add_row(*row)
    total = [f"[bold]all errors[/bold] of {summary['predictions']}", str(summary["errors"]),
             f"{100 * summary['errors'] / n:.1f}"]
    if sampled:
        total.append(str(summary["kept"]))
    table.add_row(*total)
    kinds = ", ".join(f"{t} {summary['by_type'][t]}" for t in ERROR_TYPES if summary["by_type"][t])
    print_stage_summary(table, f"undo collect-errors: {summary['errors']} errors of {summary['predictions']}"
                               + (f" ({kinds})" if kinds else ""))
    if summary["errors"] == 0:
        console.print("[green]no errors:[/green] the student answered every prediction correctly; nothing to refine")


SPEC = StageSpec(name="collect_errors", config=CollectErrorsConfig, run=run, records="error", key="id", shard_key="id",
                 item_keys=item_keys)
