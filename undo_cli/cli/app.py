"""The `undo` command line: a thin typer app over the stages.

Command modules under `undo_cli/cli/` import nothing heavy at module level
(no torch, transformers, datasets, math-verify): `undo --help` must be instant.
Each command parses its flags, builds the stage's config dataclass and calls the
stage, importing it inside the function body.

Errors the user can fix (`UndoError`) print one clear message on stderr and
exit with code 2; Ctrl-C exits with 130; anything else is a bug and shows a
traceback with exit code 1.
"""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    name="undo",
    help=(
        "Iterative, error-driven teacher-student distillation (UNDO, DistiLLM, MiniLLM, GKD).\n\n"
        "Stages exchange JSONL files; `-` means stdin/stdout. Run `undo demo` for an offline tour."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: rich's help renderer alone costs ~0.3 s of imports
)

# (command name, module, attribute). Order is the order of a UNDO run.
COMMANDS: list[tuple[str, str, str]] = [
    ("data", "undo_cli.cli.data", "app"),
    ("score", "undo_cli.cli.score", "score"),
    ("generate", "undo_cli.cli.generate", "generate"),
    ("train", "undo_cli.cli.train", "train"),
    ("evaluate", "undo_cli.cli.evaluate", "evaluate"),
    ("collect-errors", "undo_cli.cli.collect_errors", "collect_errors"),
    ("refine", "undo_cli.cli.refine", "refine"),
    ("mix", "undo_cli.cli.mix", "mix"),
    ("iterate", "undo_cli.cli.iterate", "iterate"),
    ("report", "undo_cli.cli.report", "report"),
    ("demo", "undo_cli.cli.demo", "demo"),
]


def _register() -> None:
    for name, module_name, attr in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # a stage that has not landed yet
                continue
            raise
        target = getattr(module, attr)
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=name)
        else:
            # A command may ask for click context settings (undo iterate takes dotted --stage.key flags).
            app.command(name, context_settings=getattr(target, "context_settings", None))(target)


_register()


def main() -> None:
    from undo_cli.errors import UndoError

    try:
        result = app(standalone_mode=False)
    except UndoError as exc:
        from undo_cli.console import console

        console.print(f"[bold red]error:[/bold red] {exc.message}", markup=True, highlight=False)
        if exc.hint:
            console.print(f"  [dim]hint:[/dim] {exc.hint}", markup=True, highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as exc:  # click's own usage errors arrive here in non-standalone mode
        import click
        import typer.exceptions

        # typer >= 0.20 vendors click: its usage errors derive from typer.exceptions.TyperException.
        if isinstance(exc, (click.exceptions.ClickException, typer.exceptions.TyperException)) and hasattr(exc, "show"):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, (click.exceptions.Abort, typer.exceptions.Abort)):
            sys.stderr.write("aborted\n")
            sys.exit(1)
        raise
    # In non-standalone mode typer returns the code of a typer.Exit (130 for Ctrl-C) instead of exiting.
    if isinstance(result, int) and not isinstance(result, bool) and result != 0:
        if result == 130:
            sys.stderr.write("interrupted\n")
        sys.exit(result)


if __name__ == "__main__":
    main()
