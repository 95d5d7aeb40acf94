"""`undo iterate`: the whole UNDO loop, resumable (see undo_cli/loop/iterate.py and loop/settings.py).

More than flags -> config -> run: the flags are IterateConfig's top-level
fields, none required and none defaulted here (a --config TOML file may set
them; loop/settings.py layers defaults < TOML < flags), plus --config and
--resume; dotted stage flags (--train.lr 2e-5) are not declared but arrive as
extra arguments; the summary goes to stdout as one JSON line.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from undo_cli.cli.builder import SectionedCommand, Special, load, options
from undo_cli.fields import LISTS, SCALARS, describe


def build(entry: Special) -> click.Command:
    config_cls = load(entry.config)
    from undo_cli.loop.settings import TABLES

    params = [
        click.Option(["--config", "-c"], default=None, help="TOML file with the run's settings (flags override it)."),
        click.Option(["--resume"], is_flag=True, default=False,
                     help="Continue the run in runs_dir/name from its first unfinished stage (changed settings are "
                          "allowed for stages that have not finished; they rerun)."),
        click.Option(["--overwrite"], is_flag=True, default=False, help="Delete the run in runs_dir/name and start over."),
        click.Option(["--dry-run"], is_flag=True, default=False,
                     help="Print every setting (a default, from the file or a flag), the plan of stages and "
                          "files, and an upper bound of iteration 0's teacher tokens (and cost, with prices); "
                          "run nothing, load no model."),
        # A table-valued top-level field ([prices] in run.toml; --price-input/--price-output as flags) has no flag.
        *options(config_cls, layered=True,
                 skip=(*TABLES, *(s.name for s in describe(config_cls) if s.type not in SCALARS + LISTS))),
    ]

    @click.pass_context
    def callback(ctx: click.Context, config: str | None, resume: bool, overwrite: bool, dry_run: bool,
                 **flags: Any) -> None:
        from undo_cli.loop.iterate import dry_run as show_plan, run
        from undo_cli.loop.settings import resolve

        origins: dict[str, str] = {}
        resolved = resolve(config_cls, config, flags, list(ctx.args), origins)
        if dry_run:
            shown = show_plan(resolved, origins)
            # JSON on stdout, like a real run: `undo iterate ... --dry-run | jq .teacher_estimate.tokens`
            sys.stdout.write(json.dumps(shown, default=str) + "\n")
            return
        summary = run(resolved, resume=resume, overwrite=overwrite)
        # One JSON line on stdout (people read stderr): `undo iterate ... | jq .test` works.
        sys.stdout.write(json.dumps({k: summary[k] for k in ("name", "run_dir", "status", "best_iteration",
                                                              "best_student", "stop_reason", "test")}) + "\n")

    # Dotted stage flags (--train.lr 2e-5) are not declared: they arrive in ctx.args (see loop/settings.py).
    return SectionedCommand(entry.name, params=params, callback=callback, help=entry.help,
                            context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
