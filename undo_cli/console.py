"""Where humans read: stderr.

stdout belongs to JSONL (so `undo evaluate --output - | undo collect-errors -`
works); progress bars, tables and warnings all go to this stderr console.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console

console = Console(stderr=True, highlight=False)

# Inside `undo iterate` (and so `undo demo`) a stage's summary table repeats what the loop's own table says
# after every iteration; while the loop runs a stage (RunFolder.stage) this is on and the stage prints the
# one-line form instead. The whole summary is still in the stage's summary file and the run's manifest.
_compact = False


@contextlib.contextmanager
def compact_summaries() -> Iterator[None]:
    """Stages print their one-line summaries while inside this block."""
    global _compact
    saved, _compact = _compact, True
    try:
        yield
    finally:
        _compact = saved


def compact() -> bool:
    """Whether stages print one-line summaries now (`compact_summaries`)."""
    return _compact


def print_stage_summary(table: Any, line: str) -> None:
    """A stage's summary: its table, or `line` inside `undo iterate` (`compact_summaries`)."""
    if _compact:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(table)


def warn(message: str) -> None:
    # soft_wrap: a warning names files; folded at 80 columns in a log file, a long path would break mid-word
    # and no longer match what grep or a paste looks for (a terminal still wraps the line on screen).
    console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)


def info(message: str) -> None:
    console.print(message)


def quiet_transformers() -> None:
    """Silence transformers' own "Loading weights" / "Writing model shards" bars: undo reports progress itself.

    Call only where transformers is being used anyway (importing it costs seconds).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """Progress for a log file: one plain line every `interval` seconds and at each 10%, when stderr is no terminal.

    A rich bar redraws one line in place, which a log file (a batch job, `2> log`) only receives
    when the stage ends; these lines arrive while it runs:

        evaluate: 120/1000 (12%)  elapsed 0:01:00  eta 0:07:20  1,234.5 tok/s
    """

    def __init__(self, what: str, total: int, interval: float = 30.0, unit: str = "", deciles: bool = True):
        import time

        self.what, self.total, self.interval, self.unit = what, max(int(total), 0), interval, unit
        self.deciles = deciles  # False: the caller forces lines often enough (training's log lines); no 10% lines
        self._time = time.monotonic
        self.started = self._time()
        self._last_time = self.started
        self._last_decile = 0
        self.done = 0

    def update(self, done: int, extra: str = "", force: bool = False) -> bool:
        """Record progress; print a line when 10% more is done, `interval` passed, or at the end (once, unless
        `force`d). True if printed."""
        self.done = done
        now = self._time()
        decile = (10 * done) // self.total if self.total else 10
        due = (force or (self.deciles and decile > self._last_decile) or now - self._last_time >= self.interval
               or done >= self.total)
        if not due or (done >= self.total and self._last_decile > 10 and not force):
            return False
        self._last_decile = decile if done < self.total else 11  # the 100% line is printed once
        self._last_time = now
        elapsed = now - self.started
        pct = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        eta = f"  eta {_clock(elapsed / done * (self.total - done))}" if 0 < done < self.total else ""
        line = f"{self.what}: {self.unit}{done}/{self.total}{pct}  elapsed {_clock(elapsed)}{eta}"
        console.print(line + (f"  {extra}" if extra else ""), markup=False, highlight=False, soft_wrap=True)
        return True
