"""`undo report`: a run's iterations as a table and an accuracy plot (see undo_cli/stages/report.py)."""

from __future__ import annotations

from typing import Optional

import typer


def report(
    run_dir: str = typer.Argument(..., help="The run folder (runs/NAME), finished or still running."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Where to write the PNG plot [default: RUN_DIR/report.png]."),
) -> None:
    """Per-iteration table (validation accuracy, errors, refinements, verification rate, loss, stage times)
    and a PNG plot of validation and test accuracy.

    Example: undo report runs/qwen-gsm8k
    """
    from undo_cli.stages.report import run

    run(run_dir, plot)
