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
from pathlib import Path
from typing import Any


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
        return None
    if stage == "check":
        url = f" --teacher-url {_q(config.teacher_url)}" if config.teacher_url else ""
        objective = config.objective or "auto"
        return (f"undo train --student {_q(config.student)} --teacher {_q(config.teacher)}{url} --objective {objective} "
                f"--data {_q(config.data or 'rationales.jsonl')} --output student")
    if stage == "iterate":
        return f"undo report {_q(summary.get('run_dir') or 'runs/NAME')}"
    return None


def print_next(stage: str, config: Any, summary: dict[str, Any] | None = None) -> None:
    command = next_command(stage, config, summary)
    if command:
        from undo_cli.console import console

        console.print(f"next: {command}", markup=False, highlight=False, soft_wrap=True)
