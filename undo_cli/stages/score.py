"""Score model outputs against gold answers: the CLI face of `undo_cli.scoring`.

    undo score predictions.jsonl --output scored.jsonl
    cat outputs.jsonl | undo score - --task choice > scored.jsonl
    undo score rationales.jsonl --verify steps -o checked.jsonl   # also every arithmetic step true

Input is any JSONL whose lines have a gold `answer` and a model `output`
(optionally `id`, `task`, `choices`): a "scorable" record. Every record is
written back unchanged plus `predicted` (the extracted answer, null when the
output commits to none), `correct` and `reject_reason` (null when correct, else
`no_answer`, `wrong_answer` or, with `--verify steps`, `false_step` with
`step_error` quoting the first false statement). `--verify` picks the reading:
`flexible` (default: the explicit final answer, else the last number), `strict`
(only an explicit final answer) or `steps` (strict, and every arithmetic
statement of the output true: undo_cli/steps.py). A file of rationales
(`undo generate`'s) is read too: its `rationale` is the output when there is no
`output`. The accuracy, overall and per task,
goes to stderr as a small table, so stdout stays pure JSONL for a pipeline.

`--task` overrides each record's own `task` (useful for files written by
other tools, which carry none); without either, records are scored as math.
Scoring is pure CPU and fast, so the whole file is read, scored and written
atomically: a failure leaves no partial output.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from undo_cli.records.schema import TASKS
from undo_cli.stages.options import verify_field


@dataclass
class ScoreConfig:
    """Everything `undo score` needs."""

    input: str = field(metadata={"argument": True, "help": "JSONL with `answer` (gold) and `output` (model text); '-' reads stdin."})
    output: str = field(default="-", metadata={"short": "-o", "help": "Where to write the scored records ('-' is stdout)."})
    task: str | None = field(default=None, metadata={"choices": TASKS,
        "help": "Score every record as this task (math, choice or exact); default: each record's `task`, else math."})
    verify: str = verify_field("flexible", "flexible: the explicit final answer, else the last number; strict: only an "
                               "explicit final answer (#### x, \\boxed{x}, 'The answer is x'); steps: strict, and "
                               "every arithmetic statement in the output is true (6 * 4 = 24).")

    def __post_init__(self) -> None:
        from undo_cli.fields import check_choices

        check_choices(self)  # task, verify
        from undo_cli.records import check_output_path
        from undo_cli.stages.options import check_output_is_new

        check_output_is_new(self.output, {"input": self.input}, hint="write scored records to a new file")
        check_output_path(self.output)


def run(config: ScoreConfig) -> dict[str, Any]:
    """Score every record of `config.input`; returns {records, correct, accuracy, no_answer, by_task}."""
    from rich.progress import track
    from rich.table import Table

    from undo_cli.console import console
    from undo_cli.records import read_records, write_records
    from undo_cli.records.io import display_name
    from undo_cli.scoring import count_reasons, reasons_text, score_record

    records = read_records(config.input, "scorable")
    scored = [score_record(r, config.task, config.verify) for r in
              track(records, description="scoring", console=console, transient=True, disable=len(records) < 2000)]
    write_records(config.output, scored)

    totals: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    empty: Counter[str] = Counter()
    for r in scored:
        task = config.task or r.get("task") or "math"
        totals[task] += 1
        hits[task] += bool(r["correct"])
        empty[task] += r["predicted"] is None
    n, k = len(scored), sum(hits.values())
    summary = {
        "records": n, "correct": k, "accuracy": k / n, "no_answer": sum(empty.values()), "verify": config.verify,
        "rejected_by_reason": count_reasons(scored),
        # Shaped as `undo evaluate`'s predictions (an id and a question each): `undo collect-errors` reads them.
        "predictions": all(isinstance(r.get("id"), str) and isinstance(r.get("question"), str) for r in scored),
        "by_task": {t: {"records": totals[t], "correct": hits[t], "accuracy": hits[t] / totals[t],
                        "no_answer": empty[t]} for t in sorted(totals)},
    }

    table = Table(title=f"undo score {display_name(config.input)}", title_justify="left")
    for col in ("task", "records", "correct", "no answer", "accuracy"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for t, row in summary["by_task"].items():
        table.add_row(t, str(row["records"]), str(row["correct"]), str(row["no_answer"]), f"{row['accuracy']:.1%}")
    if len(totals) > 1:
        table.add_row("all", str(n), str(k), str(summary["no_answer"]), f"{k / n:.1%}", style="bold")
    console.print(table)
    console.print(f"not verified: {reasons_text(summary['rejected_by_reason'])} (--verify {config.verify})")
    console.print(f"accuracy: {k / n:.4f} ({k}/{n})")
    return summary
