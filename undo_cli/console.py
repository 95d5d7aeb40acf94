"""Where humans read: stderr.

stdout belongs to JSONL (so `undo evaluate --output - | undo collect-errors -`
works); progress bars, tables and warnings all go to this stderr console.
"""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True, highlight=False)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


def info(message: str) -> None:
    console.print(message)
