"""`undo score`: add `predicted` and `correct` to JSONL records (see undo_cli/stages/score.py)."""

from __future__ import annotations

from typing import Optional

import typer


def score(
    input: str = typer.Argument(..., help="JSONL with `answer` (gold) and `output` (model text); '-' reads stdin."),
    output: str = typer.Option("-", "--output", "-o", help="Where to write the scored records ('-' is stdout)."),
    task: Optional[str] = typer.Option(None, "--task", help="math, choice or exact; overrides each record's `task` "
                                       "(default: the record's task, else math)."),
) -> None:
    """Score model outputs against gold answers; print the accuracy on stderr.

    Math answers are verified mathematically (1,250.00 = 1250, \\frac{3}{4} = 0.75);
    choice answers by letter or option text; exact answers as normalised strings.

    Example: undo score predictions.jsonl --output scored.jsonl
    """
    from undo_cli.stages.score import ScoreConfig, run

    run(ScoreConfig(input=input, output=output, task=task))
