"""What identifies a run, read from the fields, and what changed since the last one.

    identity(config, input=digest(problems))   # {"teacher": ..., "temperature": 0.0, ..., "input": "3f2a..."}
    changes(old, new, defaults)                # [("generate.temperature", 0.0, 0.7)]

A config field identifies a run unless its metadata says `identity: False`
(undo_cli/fields.py): the output path, the server a request goes to, batch
sizes and concurrency, timeouts, budgets and prices, `--overwrite`/`--resume`
change no record, so a killed run may resume with other values. Everything
else does, and one definition serves every place that compares runs:

* `<stem>.run.json` beside a generating stage's output (stages/generation_loop.py),
* a shard's `<stem>.shard.json` (stages/shards.py): what `undo merge` and the Slurm launcher compare,
* `undo train`'s `train_run.json` (stages/train.py),
* `undo iterate`'s manifest (loop/iterate.py), stage tables included.

An input file (`input: True`) identifies a run by its content: a stage passes a
digest of what it read in place of the path.

`changes` is the one comparison. A key the old identity lacks holds its default
(a setting added by a later version of undo, at its default, is no change); a
key only the old one has no longer identifies anything and is ignored.
Only the standard library here (gguf_models too, at import).
"""

from __future__ import annotations

import dataclasses
from typing import Any


def identity(config: Any, **inputs: Any) -> dict[str, Any]:
    """Every field of `config` not marked `identity: False`, by name, in order; `inputs` replace input paths.

    A field naming a GGUF file (`--teacher model.gguf`) is followed by `<field>_sha256`, the file's hash: another
    file under the same name is another model (undo_cli/gguf_models.py; hashed once per path, size and mtime).
    """
    from undo_cli.gguf_models import identity as gguf_identity

    found: dict[str, Any] = {}
    for name in identity_names(type(config)):
        found[name] = inputs[name] if name in inputs else getattr(config, name)
        gguf = gguf_identity(found[name])
        if gguf is not None:
            found[f"{name}_sha256"] = gguf["sha256"]
    return found


def identity_names(cls: type) -> list[str]:
    """The fields of a config class that identify a run."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("identity", True) is not False]


def defaults(cls: type) -> dict[str, Any]:
    """The identifying fields' defaults (required fields have none)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("identity", True) is False:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}: how differences are named to the user."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class _Unset:
    def __repr__(self) -> str:
        return "unset"


UNSET = _Unset()  # the old value of a key the old identity did not have


def changes(old: dict[str, Any], new: dict[str, Any],
            defaults: dict[str, Any] | None = None) -> list[tuple[str, Any, Any]]:
    """(flattened key, old value or UNSET, new value) for each key of `new` whose value differs from `old`'s.

    A key missing from `old` is compared as `defaults[key]` (flattened), else None; keys only `old` has are ignored.
    """
    a, b, d = flatten(old), flatten(new), flatten(defaults or {})
    return [(key, a.get(key, UNSET), value) for key, value in b.items() if a.get(key, d.get(key)) != value]


def shown(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def describe(found: list[tuple[str, Any, Any]], width: int = 200) -> list[str]:
    """'key: was X, now Y' for each change (X is `unset` for a key the old identity lacked)."""
    return [f"{key}: was {shown(was, width)}, now {shown(now, width)}" for key, was, now in found]
