"""A stage's error in `undo iterate`'s terms: `train.lr` and `refine.max_tokens`, not `undo train`'s `--lr`
or `undo refine`'s `--max-tokens`, which are no flags of `undo iterate`.

    in_config_terms("refine", lambda: refine.run(cfg))()    # how loop/rounds.py runs a stage
"""

from __future__ import annotations

import dataclasses
import re

from undo_cli.errors import UndoError


def config_words(table: str):
    """How `undo iterate` names a stage's setting: `train.lr`, or the loop's own key for a field the loop sets
    itself (generate's `backend` is `teacher_backend`)."""
    from undo_cli.loop.settings import OWNED

    owned = {**OWNED.get(table, {}), **({"mode": "mix"} if table == "mix" else {})}

    def name(field: str) -> str:
        if field in owned and not owned[field].startswith("("):
            return owned[field].split(" ")[0]
        return f"{table}.{field}"
    return name


def in_loop_terms(table: str, exc: UndoError, *, where_always: bool = True) -> UndoError:
    """A stage's error in the loop's terms: `train.lr`, not `undo train`'s `--lr`.

    Settings named with `ref()` (every config check) are worded here; a message a stage writes while it runs
    may still name a flag as text (`lower --max-tokens to ...`): a flag of that stage is renamed too.
    where_always: add where such keys are set even when the message names none (the checks before any
    work are all about settings; an error while a stage runs, a server down say, may not be).
    """
    from undo_cli.errors import word
    from undo_cli.loop.settings import OWNED, stage_class

    name = config_words(table)
    known = {f.name for f in dataclasses.fields(stage_class(table))} if table != "mix" else {"mode"}
    known |= set(OWNED.get(table, {}))

    def loop_terms(text: str | None) -> str | None:
        text = word(text, name)
        return None if text is None else re.sub(  # a stage's flag written as text
            r"(?<![\w-])--([a-z][a-z0-9-]*)",
            lambda m: name(m.group(1).replace("-", "_")) if m.group(1).replace("-", "_") in known else m.group(0), text)

    message, hint = loop_terms(exc._text[0]) or "", loop_terms(exc._text[1])
    where = f"set in the config's {table} table or with --{table.replace('_', '-')}.KEY"
    if not where_always and (message, hint) == (exc.message, exc.hint):
        return exc  # nothing about a stage option in it: as the stage said it
    return UndoError(message, hint=f"{hint}; {where}" if hint else where, setting=exc.setting)


def in_config_terms(table: str, fn):
    """`fn` (a stage's run), its errors about the stage's options said in the loop's terms: `lower --max-tokens`
    from `undo refine` is `lower refine.max_tokens` here, where `--max-tokens` is no flag of `undo iterate`."""
    def run():
        try:
            return fn()
        except UndoError as exc:
            raise in_loop_terms(table.replace("-", "_"), exc, where_always=False) from None
    return run
