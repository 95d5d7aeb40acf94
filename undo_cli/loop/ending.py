"""How a run's end is said: a finished run's table and verdict, the line that continues a stopped one, and
the command that runs one more round.

    undo iterate --config examples/run.toml --resume --max-iterations 4 --patience 2   # what `more rounds:` prints
"""

from __future__ import annotations

import shlex
from typing import Any

from undo_cli.loop.config import IterateConfig


def _iterate_command(command: list[str] | None, drop: dict[str, bool], add: list[str]) -> str | None:
    """`undo iterate ARGS` with flags dropped and added: ARGS are `command` (the equivalent arguments a caller such
    as `undo demo` gave), else this process's own when it is `undo iterate`; None when neither is known."""
    from undo_cli.invocation import drop_flags, rerun

    drop = {"--resume": False, "--overwrite": False, **drop}
    if command is not None:
        return "undo iterate " + shlex.join(drop_flags(command, drop) + add)
    return rerun("iterate", drop=drop, add=add)


def resume_command(command: list[str] | None = None) -> str:
    """The command that continues this run: the one that was run, plus --resume."""
    # Called from elsewhere without its arguments (a test, a script): say it in words.
    return _iterate_command(command, {}, ["--resume"]) or "the same `undo iterate` command with --resume"


def more_rounds(config: IterateConfig, history: list[dict[str, Any]], command: list[str] | None = None) -> str | None:
    """The command that runs one more refinement round on a finished run, or None when none can help.

    `--resume --max-iterations N` alone is not enough after the patience ran out: the rule would stop
    again at once. So it raises whichever of the two stopped the run, just enough for one more round.
    """
    k = len(history) - 1
    if not history or history[-1]["errors"] == 0:
        return None  # nothing left to refine
    accs = [h["accuracy"] for h in history]
    reference, last_gain = accs[0], 0
    for i in range(1, len(accs)):  # as decide() counts it
        if accs[i] > reference and accs[i] - reference >= config.min_delta - 1e-12:
            reference, last_gain = accs[i], i
    add = ["--resume", "--max-iterations", str(max(config.max_iterations, k + 1))]
    if k - last_gain >= config.patience:
        add += ["--patience", str(k - last_gain + 1)]
    return _iterate_command(command, {"--max-iterations": True, "--patience": True}, add)


def stopped(folder, exc: BaseException, resume_with: str) -> None:
    """A run that stopped on an error or Ctrl-C: the manifest says so, and the user how to go on."""
    from rich.markup import escape

    from undo_cli.console import console

    interrupted = isinstance(exc, KeyboardInterrupt)
    if folder.manifest.get("status") == "running":  # failed outside a stage (e.g. no verified rationale)
        folder.finish("interrupted" if interrupted else "failed",
                      error=getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
    what = "interrupted" if interrupted else "stopped by an error"
    # Printed before the error itself (main() prints that): what finished is kept, and how to go on.
    console.print(f"[yellow]{escape(str(folder.path))}: {what}; every finished stage is kept. Continue with:"
                  f"[/yellow] {escape(resume_with)}" + ("" if interrupted else
                                                              " (after fixing the cause; changed settings are "
                                                              "allowed for stages that have not finished)"),
                  highlight=False)


def finish(folder, best: int | None, stop: str) -> dict[str, Any]:
    from undo_cli.console import console
    from undo_cli.loop import report, run_state

    folder.finish("done", best_iteration=best, stop_reason=stop)
    state = run_state.collect(folder.path)
    summary = run_state.write_summary(folder.path, state)
    report.print_table(state, title=f"{folder.path.name}: UNDO run finished")
    report.print_verdict(summary)
    console.print(f"next: undo report {shlex.quote(str(folder.path))}", markup=False, highlight=False, soft_wrap=True)
    return summary
