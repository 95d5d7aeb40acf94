"""Click commands made from config dataclasses: a field is a flag, declared once.

    Command("mix", "undo_cli.stages.mix:MixConfig", "undo_cli.stages.mix:run", help="...")

becomes `undo mix --base TEXT --refined TEXT [-o TEXT] [--mode [replace|append]]`:
each field of the config (read by `undo_cli.fields.describe`) is an option
`--kebab-name` typed by its annotation (`--x/--no-x` for booleans), with its
default, its `metadata["help"]`, its allowed values (`choices`), its short form
(`short`) and, in `--help`, its section (the option group that declares it).
A field without a default is a required option; `argument: True` makes it
positional. The command builds the config from the parsed flags and calls the
stage's `run(config)`, importing both only then.

Only the invoked command is built (`LazyGroup`): `undo --help` lists the
commands from this table without importing any stage, and stays instant.
Plain click help, no rich: rich's help renderer alone costs ~0.3 s of imports.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

import click

from undo_cli.fields import FieldSpec, describe

CLICK_TYPES = {"int": click.INT, "float": click.FLOAT, "str": click.STRING}


def load(target: str) -> Any:
    """`"package.module:attr"` -> the attribute."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


class SectionedCommand(click.Command):
    """A command whose --help lists its options in sections (the config's option groups)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if isinstance(param, click.Argument):  # click >= 8.3 lists them under "Positional arguments"
                continue
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "help_group", None) or "Options", []).append(record)
        for title, records in sorted(sections.items(), key=lambda kv: kv[0] != "Options"):  # stable: group order
            with formatter.section(title):
                formatter.write_dl(records)


def option(spec: FieldSpec, *, layered: bool = False) -> click.Parameter:
    """One click parameter for one field.

    `layered`: the value may also come from elsewhere (`undo iterate`'s TOML file), so nothing is
    required here and an absent flag is None; the field's default is only shown.
    """
    if spec.type not in ("bool", "list[str]", *CLICK_TYPES):
        raise TypeError(f"{spec.name}: a {spec.type} field has no flag form")
    # A positional list[str] field takes every remaining argument (`undo merge OUT SHARD...`).
    many = spec.argument and spec.type == "list[str]"
    default = None if layered or spec.required else spec.default
    help_text = spec.help
    if layered and not spec.required and spec.default is not None:  # shown, not applied: the TOML file may set it
        shown = str(spec.default).lower() if isinstance(spec.default, bool) else spec.default
        help_text += f"  [default: {shown}]"
    # A flag's default is shown when it is something to know; `[default: no-merge]` says nothing.
    show_default = not layered and not (spec.type == "bool" and spec.default is False)
    if spec.argument:
        param: click.Parameter = click.Argument(
            [spec.name], type=CLICK_TYPES.get(spec.type, click.STRING), default=default,
            required=spec.required and not layered, nargs=-1 if many else 1)
        param.help = spec.help  # set afterwards: Argument() takes no help before click 8.3
        return param
    short = [spec.short] if spec.short else []
    if spec.type == "bool":
        decls = [spec.name, f"{spec.flag}/--no-{spec.flag[2:]}", *short]
        param = click.Option(decls, default=default, help=help_text, show_default=show_default, is_flag=True)
    elif spec.type == "list[str]":  # repeat the flag for several values; none given is None, not ()
        param = click.Option([spec.name, spec.flag, *short], type=click.STRING, multiple=True, default=None,
                             help=help_text, callback=lambda _ctx, _param, value: list(value) or None)
    else:
        metavar = "[" + "|".join(spec.choices) + "]" if spec.choices else None
        param = click.Option([spec.name, spec.flag, *short], type=CLICK_TYPES[spec.type], default=default,
                             help=help_text, show_default=show_default, required=spec.required and not layered,
                             metavar=metavar)
    param.help_group = spec.group  # type: ignore[attr-defined]
    return param


def no_such_option(ctx: click.Context, name: str) -> click.NoSuchOption:
    """click's own "No such option" with its did-you-mean, for a command that lets unknown arguments through
    (`undo iterate`'s dotted stage flags): `--max-iteration` -> "Did you mean --max-iterations?"."""
    import difflib

    known = [o for p in ctx.command.get_params(ctx) for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
    return click.NoSuchOption(name, possibilities=difflib.get_close_matches(name, known), ctx=ctx)


def options(config_cls: type, *, skip: tuple[str, ...] = (), layered: bool = False) -> list[click.Parameter]:
    """The parameters of every scalar field of `config_cls` (fields in `skip` left out)."""
    return [option(spec, layered=layered) for spec in describe(config_cls) if spec.name not in skip]


@dataclass(frozen=True)
class Command:
    """A command whose flags are the fields of `config`; running it calls `run(config_cls(**flags))`."""

    name: str
    config: str  # "module:ConfigClass"
    run: str  # "module:function", called with the config
    help: str  # first line: the summary in `undo --help`; the rest: `undo NAME --help`

    @property
    def module(self) -> str:
        return self.config.partition(":")[0]

    def build(self) -> click.Command:
        config_cls = load(self.config)
        params = options(config_cls)
        arguments = [p for p in params if isinstance(p, click.Argument)]
        help_text = self.help
        if arguments and not hasattr(click.Command, "format_arguments"):  # older click shows no argument help
            help_text += "\n\n" + "\n".join(f"{p.name.upper()}: {p.help}" for p in arguments)  # type: ignore[attr-defined]

        def callback(**flags: Any) -> None:
            from undo_cli.guidance import print_next

            config = config_cls(**flags)
            print_next(self.name, config, load(self.run)(config))  # every command ends with the next one to run

        return SectionedCommand(self.name, params=params, callback=callback, help=help_text,
                                no_args_is_help=any(p.required for p in params))


@dataclass(frozen=True)
class Stage:
    """A stage's command: its flags are its StageSpec's config, running it calls the spec's run (stages/spec.py)."""

    name: str  # the command, `collect-errors` for the stage `collect_errors`
    help: str

    @property
    def stage(self) -> str:
        return self.name.replace("-", "_")

    @property
    def module(self) -> str:  # the module that declares the spec (no import: `undo --help` lists it)
        from undo_cli.stages.spec import MODULES

        return MODULES[self.stage]

    @property
    def config(self) -> str:
        from undo_cli.stages.spec import stage

        cls = stage(self.stage).config
        return f"{cls.__module__}:{cls.__name__}"

    def build(self) -> click.Command:
        from undo_cli.stages.spec import stage

        run = stage(self.stage).run
        return Command(self.name, self.config, f"{run.__module__}:{run.__name__}", self.help).build()


@dataclass(frozen=True)
class Special:
    """A command that needs more than flags -> config -> run: `target` ("module:attr") builds its click command."""

    name: str
    target: str  # a function returning a click.Command
    help: str
    config: str = ""  # "module:ConfigClass" whose fields it also takes as flags, if any

    @property
    def module(self) -> str:
        return (self.config or self.target).partition(":")[0]

    def build(self) -> click.Command:
        return load(self.target)(self)


@dataclass(frozen=True)
class Group:
    """A command with subcommands (`undo data import`)."""

    name: str
    help: str
    commands: list[Command | Stage | Special] = field(default_factory=list)

    @property
    def module(self) -> str:
        return self.commands[0].module

    def build(self) -> click.Command:
        return LazyGroup(self.name, table=self.commands, help=self.help, no_args_is_help=True)


def summary(entry: Command | Stage | Special | Group) -> str:
    return entry.help.strip().split("\n\n")[0].replace("\n", " ")


def landed(entry: Command | Stage | Special | Group) -> bool:
    """False for a command whose module is not in this checkout (yet)."""
    return importlib.util.find_spec(entry.module) is not None


class LazyGroup(click.Group):
    """A group that builds a subcommand from its table entry only when it is invoked."""

    def __init__(self, name: str, *, table: list, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.table = {entry.name: entry for entry in table}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, entry in self.table.items() if landed(entry)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = self.table.get(cmd_name)
        if entry is None or not landed(entry):
            return None
        return entry.build()

    def resolve_command(self, ctx: click.Context, args: list[str]):
        """A misspelt command (`undo evalute`) is answered with the nearest one (`did you mean 'evaluate'?`)."""
        name = args[0] if args else ""
        if name and not name.startswith("-") and name not in self.list_commands(ctx) and not ctx.resilient_parsing:
            import difflib

            close = difflib.get_close_matches(name, self.list_commands(ctx), n=1, cutoff=0.6)
            raise click.UsageError(f"No such command '{name}'." + (f" Did you mean '{close[0]}'?" if close else
                                                                  f" Commands: {', '.join(self.list_commands(ctx))}."),
                                   ctx)
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # From the table, not from built commands: listing them must not import every stage.
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max((len(n) for n in names), default=0)
        rows = [(name, click.utils.make_default_short_help(summary(self.table[name]), limit)) for name in names]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
