"""Settings of `undo iterate`: a TOML file, flags that override it, and stage tables checked against the stages.

    undo iterate --config run.toml --max-iterations 5 --train.lr 1e-5 --generate.n 4

Three sources, later ones win: the dataclass defaults, the TOML file
(`--config`, read with the standard library's tomllib), the command line.

Top-level keys are `IterateConfig` fields and each has its own flag
(`max_iterations` <-> `--max-iterations`). Stage settings live in tables named
after the stages, `[cluster] [generate] [train] [evaluate] [collect_errors] [refine]`,
and map one to one onto the fields of that stage's config dataclass
(`TrainConfig`, ...). On the command line a table key is a dotted flag:
`--train.lr 2e-5`, `--train.lora-r=16`, `--refine.k 0`, `--train.merge` (a
bare dotted flag is `true`). Because the keys are checked against the stage's
dataclass, not against a list here, a field added to `TrainConfig` later is
settable from `undo iterate` with no change to this module, and a typo is an
error naming the fields that exist. The fields are read through
`undo_cli.fields`, as the command builder reads them for `undo train`'s flags.

Values on the command line are read as TOML values (`2e-5` is a number,
`true` a boolean, `[1, 2]` a list) and anything that is not valid TOML is text
(`cosine`); `none` unsets an optional field. Dotted flags are parsed from the
leftover arguments of the click command rather than declared, which keeps
`undo --help` instant (declaring every stage's fields would import them all).

Some fields belong to the loop and cannot be set in a table: input/output
paths, the models (`teacher`, `student`), the backends (set per role at the
top: `teacher_backend`, `student_backend`) and `iteration`; an attempt says so.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError
from undo_cli.fields import describe, flag, type_parts
from undo_cli.stages.spec import tables

# The stage tables of run.toml, in run order: every stage whose spec has one (stages/spec.py; mix has none).
STAGES: tuple[str, ...] = tuple(tables())
# Every table of run.toml: the stages' plus [slurm] (`--launcher slurm`, stages/slurm.py), checked the same way.
TABLES: tuple[str, ...] = (*STAGES, "slurm")

# The teacher economy's fields of generate/refine: the loop's own top-level keys of the same names
# (economy/options.py, declared once): one cache, one budget and one price list for the whole run.
_ECONOMY = {"cache_dir": "cache_dir", "cache": "cache", "cache_unseeded": "cache_unseeded",
            "model_revision": "model_revision", "max_teacher_tokens": "max_teacher_tokens (for the whole run)",
            "max_cost": "max_cost (for the whole run)", "price_input": "price_input", "price_output": "price_output"}

# A teacher cascade (economy/cascade.py) is the run's: [[teachers]] tables and a [teacher_routes] table.
_CASCADE = {"cascade": "teachers (one table per teacher)", "route": "teacher_routes"}

# Fields each stage gets from the loop, with what to set instead.
OWNED: dict[str, dict[str, str]] = {
    "cluster": {"problems": "train_file / val_file", "output": "(the run folder)"},
    "generate": {"teacher": "teacher", "input": "train_file", "output": "(the run folder)",
                 "backend": "teacher_backend", "base_url": "teacher_base_url", "api_key_env": "teacher_api_key_env",
                 "iteration": "(the loop)", "trust_remote_code": "trust_remote_code", "overwrite": "(a new --name)",
                 **_ECONOMY, "shard": "slurm.shards", **_CASCADE},
    "refine": {"teacher": "teacher", "errors": "(the loop)", "targets": "(the loop)", "output": "(the run folder)",
               "clusters": "(the loop: the run's clusters.json, the [cluster] table)", "previous_errors": "(the loop)",
               "backend": "teacher_backend", "base_url": "teacher_base_url", "api_key_env": "teacher_api_key_env",
               "iteration": "(the loop)", "trust_remote_code": "trust_remote_code", "overwrite": "(a new --name)",
               **_ECONOMY, "shard": "slurm.shards", **_CASCADE},
    "train": {"student": "student / init", "data": "(the loop)", "output": "(the run folder)",
              "resume": "--resume", "overwrite": "(a new --name)", "trust_remote_code": "trust_remote_code"},
    "evaluate": {"model": "(the trained student)", "adapter": "(the trained student)", "input": "val_file / test_file",
                 "output": "(the run folder)", "metrics": "(the run folder)", "backend": "student_backend",
                 "verify": "verify",
                 "base_url": "student_backend", "api_key_env": "student_backend",
                 "trust_remote_code": "trust_remote_code", "overwrite": "(a new --name)",
                 "shard": "slurm.shards"},
    "collect_errors": {"predictions": "(the loop)", "output": "(the run folder)", "shard": "slurm.shards"},
}


# Top-level keys renamed since: an older run.toml's key still means the setting (the stages' own name now).
RENAMED = {"teacher_revision": "model_revision"}


def stage_class(table: str):
    """The config class of a table: the stage's (its StageSpec), or SlurmConfig for [slurm]."""
    if table == "slurm":
        from undo_cli.stages.slurm import SlurmConfig

        return SlurmConfig
    from undo_cli.stages.spec import stage

    return stage(table).config


def parse_value(text: str) -> Any:
    """A command-line value as TOML (numbers, booleans, lists, quoted strings); plain text otherwise."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def check_type(value: Any, annotation: Any, where: str) -> Any:
    """`value` fitted to a dataclass field's annotation (`int | None`, as text or as a type)."""
    type_str = str(annotation)
    allowed = type_parts(annotation)
    if value is None:
        if "None" in allowed:
            return None
        raise UndoError(f"{where}: cannot be unset (none)", hint=f"give a value of type {type_str}")
    if not allowed <= {"int", "float", "str", "bool", "None"}:
        return value  # a richer annotation (list, dict, Literal): the stage's own checks apply
    if isinstance(value, bool):
        if "bool" in allowed:
            return value
    elif isinstance(value, int) and "int" in allowed:
        return value
    elif isinstance(value, (int, float)) and "float" in allowed:
        return float(value)
    elif isinstance(value, str) and "str" in allowed:
        return value
    elif isinstance(value, (int, float)) and "str" in allowed:
        return str(value)
    names = {"int": "an integer", "float": "a number", "str": "text", "bool": "true or false", "None": "none"}
    expected = " or ".join(names[t] for t in names if t in allowed)
    raise UndoError(f"{where}: expected {expected}, got {value!r}", hint="fix the value in the config or the flag")


def split_dotted(args: list[str]) -> list[tuple[str, Any]]:
    """Leftover command-line arguments -> [(`table.key`, value)] from `--table.key value` / `--table.key=value`."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            hint = "stage settings are dotted flags such as --train.lr 2e-5; see `undo iterate --help`"
            if arg.startswith("-"):
                raise UndoError(f"no such option: {arg.split('=', 1)[0]}", hint=hint)
            raise UndoError(f"unexpected argument: {arg}", hint=hint)
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"  # a bare boolean flag: --train.merge
        table, _, key = name.partition(".")
        out.append((f"{table.replace('-', '_')}.{key.replace('-', '_')}", parse_value(value)))
        i += 1
    return out


def read_toml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UndoError(f"--config {path}: no such file", hint="see examples/run.toml for a complete example")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UndoError(f"{path}: not valid TOML ({exc})", hint="fix the line it names (TOML strings need quotes)") \
            from None


def resolve(config_cls, toml_path: str | None, flags: dict[str, Any], dotted: list[str],
            origins: dict[str, str] | None = None):
    """Build the loop's config: defaults < TOML < flags. Stage tables are checked against their dataclasses.

    origins: if given, filled with where each value set by the user came from, by key (`max_iterations`,
    `train.lr`): "file" (the TOML) or "flag"; a key not in it has its default (`undo iterate --dry-run`).
    """
    origins = {} if origins is None else origins
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.name not in TABLES}
    values: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {t: {} for t in TABLES if t in {f.name for f in dataclasses.fields(config_cls)}}
    sources: list[tuple[str, dict[str, Any]]] = []
    if toml_path:
        sources.append((toml_path, read_toml(toml_path)))
    cli: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    for key, value in split_dotted(dotted):
        table, _, sub = key.partition(".")
        cli.setdefault(table, {})
        if not isinstance(cli[table], dict):
            raise UndoError(f"--{key}: '{table}' is not a stage table", hint=f"tables: {', '.join(TABLES)}")
        cli[table][sub] = value
    sources.append(("command line", cli))

    for source, data in sources:
        for key, value in data.items():
            if key in RENAMED and RENAMED[key] in fields:  # an older run.toml: same setting, today's name
                key = RENAMED[key]
            if key in tables:
                if not isinstance(value, dict):
                    raise UndoError(f"{source}: '{key}' must be a table of {stage_class(key).__name__} fields",
                                    hint=f"write a line with {key} in square brackets, then key = value lines")
                for sub, v in value.items():
                    tables[key][sub] = _check_stage_key(key, sub, v, source)
                    origins[f"{key}.{sub}"] = "flag" if source == "command line" else "file"
            elif key in ("teachers", "teacher_routes") and key in fields:  # a cascade (economy/cascade.py)
                values[key] = _check_cascade_key(key, value, source)
                origins[key] = "flag" if source == "command line" else "file"
            elif key in fields:
                values[key] = check_type(value, fields[key].type,
                                         f"{source}: {key}" if source != "command line" else flag(key))
                origins[key] = "flag" if source == "command line" else "file"
            else:
                known = list(fields) + list(tables)
                where = f"{source}: unknown key '{key}'" if source != "command line" else f"unknown option {flag(key)}"
                raise UndoError(where, hint=f"{_suggest(key, known)}known keys: {', '.join(known)}")
    if "teacher" not in values and values.get("teachers"):  # the first of the teachers is the teacher
        values["teacher"] = values["teachers"][0]["model"]
    missing = [name for name, f in fields.items()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in values]
    if missing:
        raise UndoError(f"missing {', '.join(flag(m) for m in missing)}",
                        hint="give them as flags or as keys in --config run.toml (see examples/run.toml)")
    return config_cls(**values, **tables)


def _check_cascade_key(key: str, value: Any, source: str) -> Any:
    """[[teachers]] (a list of tables, each a tier) or [teacher_routes] (route -> tier names), checked where they
    were read, so an error names the file, the table and the key."""
    from undo_cli.economy.cascade import tier_from_mapping

    if key == "teachers":
        if not isinstance(value, list):
            raise UndoError(f"{source}: teachers must be a list of tables",
                            hint='write each teacher as its own table: teachers in double square brackets, then model = "..."')
        for i, table in enumerate(value):
            tier_from_mapping(table, f"{source}: teachers[{i + 1}]")
        return value
    if not isinstance(value, dict):
        raise UndoError(f"{source}: teacher_routes must be a table",
                        hint='write a teacher_routes table (its name in square brackets), then lines such as "task:choice" = ["strong"]')
    for route, tiers in value.items():
        if not isinstance(tiers, (list, str)) or (isinstance(tiers, list) and not all(isinstance(t, str) for t in tiers)):
            raise UndoError(f"{source}: teacher_routes.{route} = {tiers!r}: expected a list of teacher names",
                            hint=f'e.g. "{route}" = ["strong"] (the names of the teachers tables)')
    return value


def _check_stage_key(table: str, key: str, value: Any, source: str) -> Any:
    cls = stage_class(table)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # No [brackets] in messages: the CLI prints them with rich markup, which would eat "[train]".
    where = f"{source}: {table}.{key}" if source != "command line" else f"--{table}.{key.replace('_', '-')}"
    if key in OWNED.get(table, {}):
        raise UndoError(f"{where}: set by `undo iterate` itself", hint=f"set {OWNED[table][key]} instead")
    if key not in fields:
        settable = [f for f in fields if f not in OWNED.get(table, {})]
        raise UndoError(f"{where}: {cls.__name__} has no field '{key}'",
                        hint=f"{_suggest(key, settable)}the {table} table accepts: {', '.join(settable)}")
    return check_type(value, fields[key].type, where)


def effective_settings(table: str, settings: dict[str, Any], loop_defaults: dict[str, Any]) -> dict[str, Any]:
    """A stage's settings as the loop will use them: dataclass defaults < the loop's (e.g. seed) < the table."""
    row: dict[str, Any] = {}
    for spec in describe(stage_class(table)):
        if spec.name in OWNED.get(table, {}):
            continue
        if spec.name in settings:
            row[spec.name] = settings[spec.name]
        elif spec.name in loop_defaults:
            row[spec.name] = loop_defaults[spec.name]
        elif not spec.required:
            row[spec.name] = spec.default
    return row
