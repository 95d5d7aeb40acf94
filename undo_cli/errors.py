"""One error type for everything a user can fix.

Every stage raises `UndoError` for bad input (a malformed line, a missing field,
an unknown model, a server that is down). The CLI catches it, prints the message
on stderr without a traceback and exits with code 2, so bash scripts can tell a
usage problem (2) from a crash (1) from success (0).

A message about a setting names it with `ref("lora_r")`, not as a flag: whoever
shows the error words it for its reader. The command line reads `--lora-r 0:
must be ...` (the default wording), `undo iterate` reads `train.lora_r 0: must
be ...` (`exc.worded(...)`), so one check serves both without rewriting text:

    raise SettingError("lora_r", self.lora_r, "must be >= 0", hint=f"use {ref('lora_r')} 16, or 0 for full fine-tuning")
"""

from __future__ import annotations

from typing import Any, Callable

_REF = "\x1f"  # the unit separator: a character no message contains, around a setting's name


def ref(name: str) -> str:
    """The setting `name` (a config field) inside a message; worded when shown (`--lora-r`, `train.lora_r`)."""
    return f"{_REF}{name}{_REF}"


def as_flag(name: str) -> str:
    """A setting as the command line spells it: `lora_r` -> `--lora-r`."""
    return "--" + name.replace("_", "-")


def word(text: str | None, name_of: Callable[[str], str] = as_flag) -> str | None:
    """`text` with every `ref(name)` replaced by `name_of(name)`."""
    if text is None or _REF not in text:
        return text
    return "".join(name_of(part) if i % 2 else part for i, part in enumerate(text.split(_REF)))


class UndoError(Exception):
    """A problem the user can fix; the message says where and what to do.

    setting: the config field at fault, when one is (an error from a config's checks).
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None, setting: str | None = None):
        self._text = (message, hint)
        self.setting = setting
        self.message = word(message) or ""
        self.hint = word(hint)
        super().__init__(self.message if self.hint is None else f"{self.message}\n  hint: {self.hint}")

    def worded(self, name_of: Callable[[str], str], *, hint: str | None = None) -> "UndoError":
        """The same error with its settings named by `name_of` (`train.lora_r`), `hint` added to its own."""
        message, own = self._text
        hints = [h for h in (word(own, name_of), hint) if h]
        return UndoError(word(message, name_of) or "", hint="; ".join(hints) or None, setting=self.setting)


class SettingError(UndoError):
    """A setting's value that cannot work: `--lora-r -1: must be >= 0` (`train.lora_r -1: ...` in iterate)."""

    def __init__(self, name: str, value: Any, problem: str, *, hint: str | None = None):
        super().__init__(f"{ref(name)} {value}: {problem}", hint=hint, setting=name)


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
