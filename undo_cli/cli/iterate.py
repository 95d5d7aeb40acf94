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

from undo_cli.cli.builder import SectionedCommand, Special, load, no_such_option, options
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
        click.Option(["--format", "dry_run_format"], type=click.Choice(FORMATS), default="text", show_default=True,
                     help="--dry-run's output: text (tables on stderr), json (also the same as one JSON object "
                          "on stdout), shell (each stage's flags as bash arrays, for examples/undo_loop.sh)."),
        # A table-valued top-level field ([prices] in run.toml; --price-input/--price-output as flags) has no flag.
        *sorted(options(config_cls, layered=True,
                        skip=(*TABLES, *(s.name for s in describe(config_cls) if s.type not in SCALARS + LISTS))),
                key=_section_order),  # the economy's fields are declared first (a composed class): shown in place
    ]

    @click.pass_context
    def callback(ctx: click.Context, config: str | None, resume: bool, overwrite: bool, dry_run: bool,
                 dry_run_format: str, **flags: Any) -> None:
        from undo_cli.errors import UndoError
        from undo_cli.loop.iterate import run
        from undo_cli.loop.plan import dry_run as show_plan
        from undo_cli.loop.settings import resolve

        if dry_run_format != "text" and not dry_run:
            raise UndoError(f"--format {dry_run_format} is the format of --dry-run's output",
                            hint="add --dry-run (a run itself prints tables on stderr and one JSON line on stdout)")
        for arg in ctx.args:  # what click let through is a dotted stage flag (or its value); anything else a typo
            name = arg.split("=", 1)[0]
            if name.startswith("--") and "." not in name:
                raise no_such_option(ctx, name)
        origins: dict[str, str] = {}
        resolved = resolve(config_cls, config, flags, list(ctx.args), origins)
        if dry_run and dry_run_format == "shell":  # what examples/undo_loop.sh evaluates; nothing for people
            from undo_cli.loop.script import shell_settings

            sys.stdout.write(shell_settings(resolved))
            return
        if dry_run:
            shown = show_plan(resolved, origins)  # tables on stderr, for people
            if dry_run_format == "json":  # `undo iterate ... --dry-run --format json | jq .teacher_estimate.tokens`
                sys.stdout.write(json.dumps(shown, default=str) + "\n")
            return
        summary = run(resolved, resume=resume, overwrite=overwrite)
        # One JSON line on stdout (people read stderr): `undo iterate ... | jq .test` works.
        sys.stdout.write(json.dumps({k: summary[k] for k in ("name", "run_dir", "status", "best_iteration",
                                                              "best_student", "stop_reason", "test")}) + "\n")

    # Dotted stage flags (--train.lr 2e-5) are not declared: they arrive in ctx.args (see loop/settings.py).
    return IterateCommand(entry.name, params=params, callback=callback, help=entry.help,
                          context_settings={"allow_extra_args": True, "ignore_unknown_options": True})


FORMATS = ("text", "json", "shell")
# The order of the sections of `undo iterate --help` (the fields' `group` metadata; a stable sort keeps each
# section's fields in declaration order).
SECTIONS = ("Models and data", "Backends", "The loop", "Teacher economy (docs/economy.md)", "Where stages run")


def _section_order(param: click.Parameter) -> int:
    group = getattr(param, "help_group", None)
    return SECTIONS.index(group) if group in SECTIONS else len(SECTIONS)

# The dotted flags' section of `undo iterate --help`: one row per stage table, pointing at the stage's own help.
STAGE_FLAGS = [
    ("--generate.KEY VALUE", "generate", "the teacher's rationales", "--generate.n 4 --generate.temperature 0.7"),
    ("--train.KEY VALUE", "train", "the student's training, every iteration",
     "--train.lr 2e-5 --train.lora-r 16 --train.merge"),
    ("--evaluate.KEY VALUE", "evaluate", "the student on val and test", "--evaluate.max-tokens 256"),
    ("--collect-errors.KEY VALUE", "collect-errors", "which failures go to refine", "--collect-errors.max 200"),
    ("--refine.KEY VALUE", "refine", "the teacher's re-teaching", "--refine.k 1 --refine.select errors"),
    ("--slurm.KEY VALUE", None, "--launcher slurm: the SlurmConfig fields (README, 'Scaling out')",
     "--slurm.shards 16 --slurm.partition gpu"),
]


class IterateCommand(SectionedCommand):
    """`undo iterate --help`: the top-level options in their sections, then the dotted stage flags."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_options(ctx, formatter)
        rows = [(flag, f"{what}: any option of `undo {stage} --help`, without its dashes (e.g. {example})"
                 if stage else f"{what} (e.g. {example})") for flag, stage, what, example in STAGE_FLAGS]
        with formatter.section("Stage settings (dotted flags; a [table] of the --config file)"):
            formatter.write_dl(rows)
            formatter.write_paragraph()
            formatter.write_text("KEY is the stage option's name (--lora-r: --train.lora-r, or lora_r = 16 under "
                                 "[train]); VALUE is TOML (2e-5, true, \"text\"); a bare dotted flag is true. "
                                 "Options the loop sets itself (paths, models, backends) are refused with what to "
                                 "set instead. `--dry-run` lists every key of every stage with its value and where "
                                 "it comes from.")
