"""What a config dataclass says about each of its fields: the one place that reads them.

    from undo_cli.fields import describe
    for spec in describe(TrainConfig):
        print(spec.flag, spec.type, spec.default, spec.help, spec.group)   # --lora-r int 0 'LoRA rank; ...' LoRA

Every setting of `undo` is a field of a stage's config dataclass
(`TrainConfig`, `GenerateConfig`, ...), declared once with its default and
`metadata={"help": ...}`. Two readers turn fields into flags: the command
builder (`cli/builder.py`: `--lora-r` of `undo train`) and the settings of
`undo iterate` (`loop/settings.py`: `--train.lora-r`, `[train] lora_r`).
Both read them through `describe()`, so a field added to a config is a flag
everywhere with no other change.

Field metadata keys:

    help      the flag's help text (required: a test checks every field has one)
    choices   the allowed values, shown in the help as [a|b|c]: a tuple, or a dict
              {value: what it means} whose meanings go into the hint of the error
              `check_choices` raises for any other value (every config calls it)
    identity  False: the field does not identify a run (where the output goes, which
              server answers, how fast or how patiently, a budget); changing it
              between a killed run and its resume changes no record. Default True.
              `undo_cli.identity` is the one definition of what identifies a run: the
              run record beside an output, a shard's sidecar, `undo train`'s
              train_run.json and `undo iterate`'s manifest all read it.
    input     True: the field names an input file; it identifies a run by its content
              (a stage records a digest of what it read; a shard, the file's sha256)
    affects   `undo iterate` only: the stages whose results a top-level key changes
              (absent: every stage)
    short     a short form, e.g. "-o"
    argument  True: a positional argument instead of a --flag
    group     the help section; default: the `help_group` of the option-group
              class that declares the field (see training/config.py), else none

Only the standard library here: `undo --help` imports this.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from undo_cli.errors import SettingError, as_flag, ref

SCALARS = ("int", "float", "str", "bool")
LISTS = ("list[str]",)  # a repeatable flag: --base-url A --base-url B


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: str  # int, float, str, bool, or the annotation's text when it is none of those (dict[str, Any])
    optional: bool  # None is allowed
    default: Any  # dataclasses.MISSING when required
    help: str
    choices: tuple[str, ...] | None
    short: str | None
    argument: bool
    group: str | None
    identity: bool = True  # False: a runtime setting, not part of what identifies a run
    input: bool = False    # an input file: its content identifies the run, not its path

    @property
    def flag(self) -> str:
        return flag(self.name)

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def flag(name: str) -> str:
    """A field name as a flag: `lora_r` -> `--lora-r`."""
    return as_flag(name)


def type_parts(annotation: Any) -> set[str]:
    """The names in a field's annotation: `int | None` -> {'int', 'None'} (a string under `from __future__ import annotations`)."""
    if isinstance(annotation, str):
        return {t.strip() for t in annotation.split("|")}
    import typing

    args = typing.get_args(annotation)
    if args and typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return {"None" if a is type(None) else getattr(a, "__name__", str(a)) for a in args}
    return {getattr(annotation, "__name__", str(annotation))}


def _group(cls: type, name: str) -> str | None:
    for klass in cls.__mro__:  # the most derived class that declares the field owns it
        if name in klass.__dict__.get("__annotations__", {}):
            return klass.__dict__.get("help_group")
    return None


def describe(cls: type) -> list[FieldSpec]:
    """The fields of a config dataclass, in declaration order, as the CLI and the loop's settings see them."""
    specs = []
    for f in dataclasses.fields(cls):
        parts = type_parts(f.type)
        base = [t for t in parts if t != "None"]
        typ = base[0] if len(base) == 1 and base[0] in SCALARS + LISTS else str(f.type)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        meta = f.metadata
        choices = meta.get("choices")
        specs.append(FieldSpec(
            name=f.name, type=typ, optional="None" in parts, default=default, help=meta.get("help", ""),
            choices=tuple(choices) if choices is not None else None, short=meta.get("short"),
            argument=bool(meta.get("argument")), group=meta.get("group") or _group(cls, f.name),
            identity=meta.get("identity", True) is not False, input=bool(meta.get("input")),
        ))
    return specs


def check_choices(config: Any) -> None:
    """Refuse a value outside a field's `choices` (None passes where the field may be None): SettingError.

    `--keep best: unknown keep` with the hint `use --keep correct or --keep all; correct: only verified
    rationales ...; all: ...` when the choices say what each means, else `use one of: hf, openai, vllm`.
    """
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices is None or value in choices or (value is None and "None" in type_parts(f.type)):
            continue
        if isinstance(choices, dict):
            each = [f"{ref(f.name)} {c}" for c in choices]
            hint = "use " + (", ".join(each[:-1]) + " or " + each[-1] if len(each) > 1 else each[0])
            hint += "".join(f"; {c}: {what}" for c, what in choices.items() if what)
        else:
            hint = f"use one of: {', '.join(map(str, choices))}"
        raise SettingError(f.name, value, f"unknown {f.name.replace('_', ' ')}", hint=hint)


def to_flags(config: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """A config instance back as command-line words: every field that differs from its default, as its flag.

    The inverse of the command builder (`cli/builder.py`): `to_flags(TrainConfig(..., lr=3e-3))` gives
    `["--lr", "0.003"]`, `True` gives `--x` and `False` `--no-x`, a list repeats the flag. A positional
    field, or a value no flag can give (None where the default is not None), is an error: the caller
    must set it itself (`skip`).
    """
    words: list[str] = []
    for spec in describe(type(config)):
        if spec.name in skip:
            continue
        value = getattr(config, spec.name)
        if not spec.required and value == spec.default and type(value) is type(spec.default):
            continue
        if spec.argument or value is None or spec.type not in SCALARS + LISTS:
            raise ValueError(f"{type(config).__name__}.{spec.name} = {value!r} has no flag form")
        if spec.type == "bool":
            words.append(spec.flag if value else f"--no-{spec.flag[2:]}")
        elif spec.type == "list[str]":
            for item in value:
                words += [spec.flag, str(item)]
        else:
            words += [spec.flag, str(value)]
    return words
