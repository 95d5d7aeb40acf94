"""`undo mix`: fold refined rationales into the training data (see undo_cli/stages/mix.py)."""

from __future__ import annotations

import typer


def mix(
    base: str = typer.Option(..., "--base", help="The current training rationales (what `undo refine --targets` read)."),
    refined: str = typer.Option(..., "--refined", help="Refined rationales from `undo refine` (same ids as the base)."),
    output: str = typer.Option("-", "--output", "-o", help="The new training data JSONL ('-' is stdout)."),
    mode: str = typer.Option("replace", "--mode", help="replace: refined rationales take the old ones' place by id; append: verified ones are added."),
) -> None:
    """Mix refined rationales into the training data: replace the old ones by id, or append the verified ones.

    Example: undo mix --base iter_00/rationales.jsonl --refined iter_01/refined.jsonl -o iter_01/train_data.jsonl
    """
    from undo_cli.stages.mix import MixConfig, run

    run(MixConfig(base=base, refined=refined, output=output, mode=mode))
