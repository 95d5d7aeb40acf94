"""The `undo` command line being run, and the same line with some flags changed (a "continue with:" hint).

cli/app.main records the arguments (`set_invocation`); a stage or the loop that prints how to resume it
repeats them (`rerun`). It sits at the bottom of the layers, so that stages/train.py and loop/iterate.py
use it without importing guidance.py, which reads the run folder's layout and sits above them.
"""

from __future__ import annotations

import shlex
import sys

_invoked: list[str] | None = None  # the arguments of the `undo` command line being run (set by cli/app.main)


def set_invocation(args: list[str] | None) -> None:
    """Remember the command line `main()` is running (None when it returns), for commands that repeat it."""
    global _invoked
    _invoked = None if args is None else list(args)


def invocation() -> list[str]:
    """The arguments after `undo` of the command line being run (sys.argv's when main() was not called)."""
    return list(_invoked) if _invoked is not None else sys.argv[1:]


def drop_flags(argv: list[str], flags: dict[str, bool]) -> list[str]:
    """argv without `flags` (name -> takes a value), in both `--flag value` and `--flag=value` forms."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in flags:
            skip = flags[name] and "=" not in arg
            continue
        out.append(arg)
    return out


def rerun(command: str, *, drop: dict[str, bool] | None = None, add: list[str] | None = None) -> str | None:
    """`undo <the command line being run>` with some flags dropped and others added, when it is `undo COMMAND ...`.

    None when this process is not that command (a stage called by `undo iterate`, a test, a script): the
    caller then says it in words. `drop` maps a flag to whether it takes a value.
    """
    argv = invocation()
    if argv[:1] != [command]:
        return None
    return "undo " + shlex.join(drop_flags(argv, drop or {}) + list(add or []))
