"""One error type for everything a user can fix.

Every stage raises `UndoError` for bad input (a malformed line, a missing field,
an unknown model, a server that is down). The CLI catches it, prints the message
on stderr without a traceback and exits with code 2, so bash scripts can tell a
usage problem (2) from a crash (1) from success (0).
"""

from __future__ import annotations


class UndoError(Exception):
    """A problem the user can fix; the message says where and what to do."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class RecordError(UndoError):
    """A JSONL line that does not match the artifact contract.

    The message always names the file, the 1-based line number and the field,
    because that is what a person needs to open the file and fix it.
    """

    def __init__(self, path: str, line: int | None, message: str, *, field: str | None = None, hint: str | None = None):
        self.path = path
        self.line = line
        self.field = field
        where = path if line is None else f"{path}:{line}"
        what = message if field is None else f"field '{field}': {message}"
        super().__init__(f"{where}: {what}", hint=hint)
