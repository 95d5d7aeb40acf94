"""The next command to run, printed on stderr when a command finishes (the UNDO loop, one step at a time).

    data import -> generate -> train -> evaluate -> collect-errors -> refine -> mix -> train -> ...
    iterate -> report

`next_command(stage, config, summary)` writes the next step with the files this
step just wrote filled in. A `next:` line runs as printed (tests/test_hints.py
pastes every one), so a step that needs what this command never saw (which
teacher, which student, which problems) is not printed at all: after `data
import`, `generate`, `train` and `mix` the README's stage list says what comes
next. What a command can learn from the files it read is used: the errors of
`collect-errors` name their student, whose folder names the data it was
trained on, whose records name the teacher that wrote them, which is what
`undo refine` needs. The command line prints it (`print_next`, called by
`cli/builder.Command` after the stage's `run`); stages called from `undo
iterate` print nothing, since the loop runs the next step itself, and iterate
ends with `undo report runs/NAME`. examples/undo_loop.sh, which also runs each
next step itself, sets UNDO_NEXT=0 for its stages: no `next:` line then.
A note after a command is a shell comment (`  # ...`), so the line still pastes.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

def _q(path: Any) -> str:
    return shlex.quote(str(path))


def _file(output: Any) -> str | None:
    """`output` when it is a file a later command can read (not stdout, a device or a FIFO), else None."""
    from undo_cli.records import is_stream

    return None if not output or is_stream(output) else str(output)


def _sibling(output: str, name: str) -> str:
    return str(Path(output).with_name(name))


def _run_of(folder: Path) -> tuple[Path, int] | None:
    """(the run folder, k) when `folder` is a run's iter_NN (loop/layout.py; also examples/undo_loop.sh's)."""
    from undo_cli.loop.layout import parse_iteration

    k = parse_iteration(folder.name)
    return (folder.parent, k) if k is not None else None


def next_command(stage: str, config: Any, summary: dict[str, Any] | None = None) -> str | None:
    """The command a person runs after `stage`, complete; None when this command cannot know all of it."""
    summary = summary if isinstance(summary, dict) else {}
    stage = {"import": "data", "collect-errors": "collect_errors"}.get(stage, stage)
    saved = _file(getattr(config, "output", None))
    if stage == "evaluate" and saved:
        return f"undo collect-errors {_q(saved)} --output {_q(_errors_for(Path(saved)))}"
    if stage == "collect_errors":
        return _after_collect_errors(saved, summary)
    if stage == "refine" and saved:
        return (f"undo mix --base {_q(config.targets)} --refined {_q(saved)} "
                f"--output {_q(_sibling(saved, 'train_data.jsonl'))}")
    if stage == "score":
        return _after_score(config, summary)
    if stage == "check":
        return _after_check(config, summary)
    if stage == "iterate":
        return f"undo report {_q(summary.get('run_dir') or 'runs/NAME')}" if summary.get("run_dir") else None
    if stage == "report":
        return _after_report(config, summary)
    if stage == "stats":  # undo cache stats
        where = f" --cache-dir {_q(config.cache_dir)}" if getattr(config, "cache_dir", None) else ""
        return f"undo cache prune --older-than 30{where}   # drops the entries no run used for 30 days"
    return None  # data import, generate, train, mix: the next step needs a teacher, a student or problems


def _errors_for(predictions: Path) -> Path:
    """Where the errors of these predictions go: iter_NN/errors.jsonl in a run folder, else beside them."""
    from undo_cli.loop.layout import RunLayout

    run = _run_of(predictions.parent.parent) if predictions.parent.name in ("val", "test") else None
    return RunLayout(run[0]).errors(run[1]) if run else predictions.with_name("errors.jsonl")


def _first(path: str | Path) -> dict[str, Any] | None:
    """The first record of a JSONL file, or None (missing, empty, unreadable)."""
    from undo_cli.errors import UndoError
    from undo_cli.records import iter_records

    try:
        return next(iter_records(path, allow_empty=True), None)
    except (UndoError, OSError):
        return None


def _json(path: Any) -> dict[str, Any]:
    import json

    try:
        found = json.loads(Path(path).read_text(encoding="utf-8"))
    except (TypeError, OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _after_collect_errors(errors: str | None, summary: dict[str, Any]) -> str | None:
    """`undo refine` of these errors, with what the files name: the errors' student (`model`) was trained on some
    rationales (its folder's undo_training.json), written by a teacher (their `teacher`, and the generation budget
    of their run record): refine's teacher, targets and --max-tokens. None when there is nothing to refine or a
    link is missing (a served teacher needs its server flags)."""
    from undo_cli.loop.layout import RunLayout
    from undo_cli.prompts import TRAINING_FORMAT
    from undo_cli.records.sidecars import RUN, sidecar_path

    if not errors or not summary.get("kept", summary.get("errors")):
        return None
    model = (_first(errors) or {}).get("model")
    data = _json(Path(model) / TRAINING_FORMAT).get("data") if isinstance(model, str) else None
    if not isinstance(data, str) or data == "-":
        return None
    teacher, backend = ((_first(data) or {}).get(key) for key in ("teacher", "backend"))
    if not teacher or backend not in ("hf", "vllm"):
        return None
    written = _json(sidecar_path(data, RUN)).get("identity") or {}  # how the teacher wrote them, if it says
    flags = (" --backend vllm" if backend == "vllm" else "") + (
        f" --max-tokens {written['max_tokens']}" if isinstance(written.get("max_tokens"), int) else "")
    run = _run_of(Path(errors).parent) if Path(errors).name == "errors.jsonl" else None
    refined = RunLayout(run[0]).refined(run[1] + 1) if run else Path(errors).with_name("refined.jsonl")
    return (f"undo refine --teacher {_q(teacher)}{flags} --errors {_q(errors)} --targets {_q(data)} "
            f"--output {_q(refined)}")


def _after_check(config: Any, summary: dict[str, Any]) -> str | None:
    """Rationales checked: train on them, with the objective asked (or auto); problems: the teacher writes them."""
    if not config.data or config.data == "-":
        return None
    if summary.get("trainable"):
        url = f" --teacher-url {_q(config.teacher_url)}" if config.teacher_url else ""
        return (f"undo train --student {_q(config.student)} --teacher {_q(config.teacher)}{url} "
                f"--objective {config.objective or 'auto'} --data {_q(config.data)} --output student")
    if config.teacher_url:
        return None  # generating through the server takes its backend flags and key, which check does not know
    return f"undo generate --teacher {_q(config.teacher)} --input {_q(config.data)} --output rationales.jsonl"


def _after_score(config: Any, summary: dict[str, Any]) -> str | None:
    """Predictions scored into a file: collect their errors; scored to stdout: keep the verdicts in a file."""
    if config.output in ("-", ""):
        if config.input == "-":
            return None  # read from stdin: a re-run would wait for it again
        return f"undo score {_q(config.input)} --output scored.jsonl   # the verdicts, one line per record"
    if not _file(config.output):
        return None
    if summary.get("predictions"):
        return f"undo collect-errors {_q(config.output)} --output {_q(_sibling(config.output, 'errors.jsonl'))}"
    return f"head -n 3 {_q(config.output)}   # each record with its predicted answer and whether it is correct"


def _after_report(config: Any, state: dict[str, Any]) -> str | None:
    """The table read: the whole run as one page; the page written: what the chosen student changed on test
    (the run has already tested it; nothing is evaluated again)."""
    from undo_cli.loop.layout import RunLayout

    run = state.get("run_dir") or config.run_dir
    if not getattr(config, "html", None):
        return (f"undo report {_q(run)} --html {_q(Path(run) / 'report.html')}   "
                "# one offline page: every problem's transitions, every refinement")
    best, layout = state.get("best_iteration"), RunLayout(Path(run))
    if best and all(layout.predictions(k, "test").is_file() for k in (0, best)):
        return f"undo diff {_q(run)} 0 best --split test   # what the chosen student fixed and broke on test"
    return None


def print_next(stage: str, config: Any, summary: dict[str, Any] | None = None) -> None:
    import os

    if os.environ.get("UNDO_NEXT") == "0":  # a script that runs the next step itself (examples/undo_loop.sh)
        return
    command = next_command(stage, config, summary)
    if command:
        from undo_cli.console import console

        console.print(f"next: {command}", markup=False, highlight=False, soft_wrap=True)
