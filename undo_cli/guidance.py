"""The next command to run, printed on stderr when a command finishes (the UNDO loop, one step at a time).

    data import -> generate -> train -> evaluate -> collect-errors -> refine -> mix -> train -> ...
    iterate -> report

`next_command(stage, config, summary)` writes the next step with the files this
step just wrote filled in, and placeholders (TEACHER, STUDENT) for what it
cannot know. The command line prints it (`print_next`, called by
`cli/builder.Command` after the stage's `run`); stages called from `undo
iterate` print nothing, since the loop runs the next step itself, and iterate
ends with `undo report runs/NAME`.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

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


def _q(path: Any) -> str:
    return shlex.quote(str(path))


def _sibling(output: str, name: str) -> str:
    """A file next to `output` (or in the current folder when the output went to stdout)."""
    return name if output in ("-", "") else str(Path(output).with_name(name))


def next_command(stage: str, config: Any, summary: dict[str, Any] | None = None) -> str | None:
    """The command a person runs after `stage` (None when there is no obvious next step)."""
    summary = summary if isinstance(summary, dict) else {}
    stage = {"import": "data", "collect-errors": "collect_errors"}.get(stage, stage)
    out = getattr(config, "output", "-")
    saved = out if out != "-" else None
    if stage == "data":
        splits = summary.get("splits") or {}
        train = (splits.get("train") or next(iter(splits.values()), {})).get("path", "train.jsonl")
        return f"undo generate --teacher TEACHER --input {_q(train)} --output rationales.jsonl"
    if stage == "generate":
        return f"undo train --student STUDENT --data {_q(saved or 'rationales.jsonl')} --output student"
    if stage == "train":
        return f"undo evaluate --model {_q(out)} --input val.jsonl --output {_q(Path(out) / 'val' / 'predictions.jsonl')}"
    if stage == "evaluate":
        preds = saved or "predictions.jsonl"
        return f"undo collect-errors {_q(preds)} --output {_q(_sibling(out, 'errors.jsonl'))}"
    if stage == "collect_errors":
        errors = saved or "errors.jsonl"
        return (f"undo refine --teacher TEACHER --errors {_q(errors)} --targets rationales.jsonl "
                f"--output {_q(_sibling(out, 'refined.jsonl'))}")
    if stage == "refine":
        refined = saved or "refined.jsonl"
        return (f"undo mix --base {_q(config.targets)} --refined {_q(refined)} "
                f"--output {_q(_sibling(out, 'train_data.jsonl'))}")
    if stage == "mix":
        data = saved or "train_data.jsonl"
        return f"undo train --student STUDENT --data {_q(data)} --output student_next"
    if stage == "score":
        return _after_score(config, summary)
    if stage == "check":
        url = f" --teacher-url {_q(config.teacher_url)}" if config.teacher_url else ""
        objective = config.objective or "auto"
        return (f"undo train --student {_q(config.student)} --teacher {_q(config.teacher)}{url} --objective {objective} "
                f"--data {_q(config.data or 'rationales.jsonl')} --output student")
    if stage == "iterate":
        return f"undo report {_q(summary.get('run_dir') or 'runs/NAME')}"
    if stage == "report":
        return _after_report(summary)
    if stage == "stats":  # undo cache stats
        where = f" --cache-dir {_q(config.cache_dir)}" if getattr(config, "cache_dir", None) else ""
        return f"undo cache prune --older-than 30{where}   (drops the entries no run used for 30 days)"
    return None


def _after_score(config: Any, summary: dict[str, Any]) -> str:
    """Predictions scored into a file: collect their errors; scored to stdout: keep the verdicts in a file."""
    if config.output in ("-", ""):
        return f"undo score {_q(config.input)} --output scored.jsonl   (the verdicts, one line per record)"
    if summary.get("predictions"):
        return f"undo collect-errors {_q(config.output)} --output {_q(_sibling(config.output, 'errors.jsonl'))}"
    return f"head -n 3 {_q(config.output)}   (each record with `predicted` and `correct`)"


def _after_report(state: dict[str, Any]) -> str | None:
    """The best student, put to use: the command that evaluates it on the run's test problems, as the run did."""
    from undo_cli.loop.layout import PREDICTIONS, RunLayout

    best, config = state.get("best_iteration"), state.get("config") or {}
    test = config.get("test_file")
    if best is None or not state.get("run_dir") or not test:
        return None
    student = RunLayout(Path(state["run_dir"])).student(best)
    evaluate = config.get("evaluate") or {}
    flags = f" --max-tokens {evaluate['max_tokens']}" if evaluate.get("max_tokens") else ""
    flags += f" --verify {config['verify']}" if config.get("verify", "strict") != "strict" else ""
    out = student.parent / "eval" / PREDICTIONS
    return (f"undo evaluate --model {_q(student)} --input {_q(test)}{flags} --output {_q(out)}   "
            f"(the best student, iteration {best}; any problems file works)")



def print_next(stage: str, config: Any, summary: dict[str, Any] | None = None) -> None:
    command = next_command(stage, config, summary)
    if command:
        from undo_cli.console import console

        console.print(f"next: {command}", markup=False, highlight=False, soft_wrap=True)
