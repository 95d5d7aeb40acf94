"""`undo merge OUT SHARD...`: join the outputs of `--shard K/N` runs (see undo_cli/stages/shards.py).

More than flags -> config -> run: the shards are a variable number of positional
arguments, which a config field has no flag form for.
"""

from __future__ import annotations

import click

from undo_cli.cli.builder import SectionedCommand, Special


def build(entry: Special) -> click.Command:
    params = [
        click.Argument(["output"], required=True),
        click.Argument(["shards"], nargs=-1, required=True),
        click.Option(["--metrics"], default=None,
                     help="evaluate shards: where the recomputed metrics.json goes (default: beside OUTPUT)."),
    ]

    def callback(output: str, shards: tuple[str, ...], metrics: str | None) -> None:
        from undo_cli.stages.shards import MergeConfig, merge

        merge(MergeConfig(output=output, shards=list(shards), metrics=metrics))

    return SectionedCommand(entry.name, params=params, callback=callback, help=entry.help, no_args_is_help=True)
