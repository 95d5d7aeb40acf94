"""`undo collect-errors`: keep the student's failures, classified (see undo_cli/stages/collect_errors.py)."""

from __future__ import annotations

from typing import Optional

import typer


def collect_errors(
    predictions: str = typer.Argument(..., help="Predictions JSONL from `undo evaluate` ('-' reads stdin)."),
    output: str = typer.Option("-", "--output", "-o", help="Where to write error records ('-' is stdout)."),
    max: Optional[int] = typer.Option(None, "--max", help="Keep a seeded random sample of at most N errors."),
    seed: int = typer.Option(0, "--seed", help="Seed for the --max sample."),
) -> None:
    """Keep the failed predictions with the student's own output; classify each as
    truncated, no_answer or wrong_answer.

    Example: undo evaluate --model out/student --input val.jsonl --output - | undo collect-errors - > errors.jsonl
    """
    from undo_cli.stages.collect_errors import CollectErrorsConfig, run

    run(CollectErrorsConfig(predictions=predictions, output=output, max=max, seed=seed))
