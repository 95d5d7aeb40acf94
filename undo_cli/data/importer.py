"""`undo data import`: turn a dataset into problems JSONL, one file per split.

    undo data import --preset gsm8k --output-dir data/                 # from the Hugging Face Hub
    undo data import gsm8k_train.jsonl --preset gsm8k --output-dir data/
    undo data import quiz.csv --question-field prompt --answer-field gold --output-dir data/ \\
        --split train=0.8,val=0.1,test=0.1 --seed 0 --limit 500

The source is a local .json/.jsonl/.csv/.parquet file, or a dataset on the
Hub (loaded with `datasets.load_dataset(name, --config, split=--source-split)`).
Each row becomes a problem record (records/schema.py, docs/artifacts.md):

    {"id": "gsm8k-17", "question": "...", "answer": "72", "task": "math", "meta": {...}, "source": "openai/gsm8k"}

Ids are stable: the dataset's own id when it has one, else
`<preset or file stem>-<row index>`. They do not depend on the split, so
re-importing with another seed or another --split keeps every id, and joins
across iterations keep working.

The split is seeded and deterministic: rows are shuffled with
`random.Random(seed)` and cut by the fractions (largest remainder, so the counts
always add up). Each split file lists its problems in source order, which is
what a person expects when they open it.

Every row is converted and validated before anything is written. A bad row
fails the whole import with `file:line: field 'x': ...` (exit 2) and no
output file appears; the split files are then written atomically.

`OUTPUT_DIR/import.json` records the import: its settings (every option that
decides which problem lands in which split, and the sha256 of the rows read)
and each split's count and sha256, so a run can tell whether it reads the
split it was made on (`undo iterate` keeps the hashes of the files it read in
its manifest and refuses a resume after they changed). Importing into a folder
that holds an import with other settings, or split files that no import
wrote, is refused, naming what differs; `--overwrite` replaces it. The same
import again writes the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from undo_cli.errors import RecordError, UndoError
from undo_cli.records.schema import TASKS

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
IMPORT_FILE = "import.json"  # OUTPUT_DIR/import.json: the import's settings and each split's hash
# The options that decide which problem lands in which split (with the rows read): what import.json compares.
SETTINGS = ("preset", "config", "source_split", "question_field", "answer_field", "choices_field", "id_field", "task",
            "split", "seed", "limit")


@dataclass
class DataImportConfig:
    """Everything `undo data import` needs."""

    source: str | None = field(default=None, metadata={"argument": True,
        "help": "A local .json/.jsonl/.csv/.parquet file, '-' (JSONL on stdin) or a Hugging Face dataset name "
                "(default: the preset's)."})
    output_dir: str = field(default="data", metadata={"short": "-o", "help": "Folder for <split>.jsonl files (created if needed)."})
    preset: str | None = field(default=None, metadata={
        "help": "Column layout of a known dataset: gsm8k, svamp, math, commonsense_qa, strategyqa, arc."})
    config: str | None = field(default=None, metadata={"help": "Hub dataset configuration (e.g. 'main' for gsm8k)."})
    source_split: str | None = field(default=None, metadata={"help": "Which split of the Hub dataset to read (default: train)."})
    question_field: str | None = field(default=None, metadata={"help": "Column with the question text."})
    answer_field: str | None = field(default=None, metadata={"help": "Column with the gold answer."})
    choices_field: str | None = field(default=None, metadata={"help": "Column with the options (makes the task 'choice')."})
    id_field: str | None = field(default=None, metadata={"help": "Column with a stable id (default: 'id' if present)."})
    task: str | None = field(default=None, metadata={"choices": TASKS, "help": "math, choice or exact (default: the preset's, else inferred)."})
    split: str = field(default="train=0.8,val=0.1,test=0.1", metadata={
        "help": "Output splits as name=fraction pairs that add up to 1; 'all=1' writes one file."})
    seed: int = field(default=0, metadata={"help": "Seed of the split shuffle: same seed, same split."})
    limit: int | None = field(default=None, metadata={"help": "Import only the first N rows of the source."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an import with other settings (or split files not written by `undo data import`) in "
                "--output-dir; without it that is refused, since runs made on the old split would read other "
                "problems."})

    def __post_init__(self) -> None:
        from undo_cli.data.presets import PRESETS

        if self.preset is not None and self.preset not in PRESETS:
            raise UndoError(f"--preset {self.preset}: unknown preset",
                            hint=f"use one of: {', '.join(PRESETS)}, or map columns with --question-field/--answer-field")
        from undo_cli.fields import check_choices

        check_choices(self)  # task
        if self.limit is not None and self.limit < 1:
            raise UndoError(f"--limit {self.limit}: must be at least 1", hint="leave --limit out to import every row")
        if self.source is None and self.preset is None:
            raise UndoError("nothing to import: give a file or dataset name, or a --preset",
                            hint="e.g. `undo data import --preset gsm8k` or `undo data import problems.jsonl`")
        self.splits = parse_split(self.split)


def parse_split(spec: str) -> list[tuple[str, float]]:
    """'train=0.8,val=0.1,test=0.1' -> [('train', 0.8), ...], checked."""
    parts = []
    for chunk in spec.split(","):
        name, eq, value = chunk.strip().partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not eq or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not 0 <= fraction <= 1:
            raise UndoError(f"--split {spec}: cannot read '{chunk.strip()}'",
                            hint="write name=fraction pairs, e.g. train=0.8,val=0.1,test=0.1 (or all=1)")
        parts.append((name, fraction))
    names = [n for n, _ in parts]
    if len(set(names)) != len(names):
        raise UndoError(f"--split {spec}: a split name appears twice")
    if abs(sum(f for _, f in parts) - 1) > 1e-6:
        raise UndoError(f"--split {spec}: fractions add up to {sum(f for _, f in parts):g}, not 1",
                        hint="e.g. train=0.8,val=0.1,test=0.1")
    return parts


def split_counts(n: int, splits: list[tuple[str, float]]) -> list[int]:
    """Rows per split, by largest remainder so they add up to n exactly."""
    raw = [n * f for _, f in splits]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))[: n - sum(counts)]:
        counts[i] += 1
    return counts


# --- reading sources -------------------------------------------------------------------
# Every row comes with its line number (None where a format has no lines) so an
# error can say exactly where to look.

Row = tuple[int | None, str, dict[str, Any]]  # (line, "line 12" / "row 12", row)


def _jsonl_lines(name: str, lines: Iterable[str]) -> Iterator[Row]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            from undo_cli.records import not_valid_json

            raise RecordError(name, lineno, not_valid_json(exc),
                              hint="each line must be one JSON object; fix or delete this line") from None
        if not isinstance(row, dict):
            raise RecordError(name, lineno, f"expected a JSON object, got {type(row).__name__}")
        yield lineno, f"line {lineno}", row


# Local files are read through records.text_lines: UTF-8 only (a Latin-1 file fails with
# file:line and an iconv hint), and the byte-order mark spreadsheet exports start with is dropped.

def _jsonl_rows(path: Path) -> Iterator[Row]:
    from undo_cli.records import text_lines

    yield from _jsonl_lines(str(path), text_lines(path))


def _json_rows(path: Path) -> Iterator[Row]:
    from undo_cli.records import read_text

    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines in a .json file (as `datasets` writes them)
            yield from _jsonl_rows(path)
            return
        raise RecordError(str(path), exc.lineno, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UndoError(f"{path}: expected a list of objects (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise UndoError(f"{path}: expected a list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise RecordError(str(path), None, f"item {i}: expected a JSON object, got {type(row).__name__}")
        yield None, f"item {i}", row


def _csv_rows(path: Path) -> Iterator[Row]:
    import csv

    from undo_cli.records import text_lines

    with contextlib.closing(text_lines(path)) as lines:
        reader = csv.DictReader(lines)
        if not reader.fieldnames:
            return
        for row in reader:
            line = reader.line_num
            if None in row or any(v is None for v in row.values()):
                raise RecordError(str(path), line, f"has a different number of columns than the header "
                                  f"({len(reader.fieldnames)}: {', '.join(reader.fieldnames)})")
            yield line, f"line {line}", dict(row)


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise UndoError(f"{path}: cannot read as parquet ({exc})", hint="check the file is a complete .parquet file") from None
    for i, row in enumerate(rows):
        yield None, f"row {i}", row


def _hub_rows(name: str, config: str | None, split: str) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name, unknown config/split: datasets raises many types
        raise UndoError(f"cannot load '{name}'" + (f" (config {config})" if config else "") + f", split '{split}' "
                        f"from the Hugging Face Hub: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                        hint="check the name, --config and --source-split and your network; or download the data "
                             "and import the local .jsonl/.csv/.parquet file") from None
    for i, row in enumerate(ds):
        yield None, f"row {i}", row


def open_source(config: DataImportConfig, preset) -> tuple[str, str, Iterator[Row]]:
    """(display name, id stem, rows) for a local file or a Hub dataset."""
    source = config.source or preset.hub
    if source == "-":  # JSONL on stdin, so an import can sit at the end of a pipeline
        import sys

        from undo_cli.records import text_lines

        return "<stdin>", preset.name if preset else "stdin", _jsonl_lines("<stdin>", text_lines("-"))
    path = Path(source)
    if path.is_file():
        readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
        if path.suffix.lower() not in readers:
            raise UndoError(f"{path}: unsupported file type '{path.suffix}'",
                            hint=f"use one of: {', '.join(LOCAL_SUFFIXES)}")
        return str(path), preset.name if preset else path.stem, readers[path.suffix.lower()](path)
    if path.suffix.lower() in LOCAL_SUFFIXES:
        raise UndoError(f"{path}: no such file", hint="check the path, or give a Hugging Face dataset name")
    hub_config = config.config if config.config is not None else (preset.config if preset and source == preset.hub else None)
    split = config.source_split or (preset.split if preset else "train")
    stem = preset.name if preset else re.sub(r"[^A-Za-z0-9_-]+", "_", source.rstrip("/").split("/")[-1])
    return source, stem, _hub_rows(source, hub_config, split)


# --- the stage -----------------------------------------------------------------------------

def convert_rows(config: DataImportConfig) -> tuple[str, list[dict[str, Any]]]:
    """Every source row as a validated problem record, in source order."""
    from undo_cli.data.presets import PRESETS, FieldProblem, Fields, generic
    from undo_cli.records.schema import check_record

    preset = PRESETS.get(config.preset) if config.preset else None
    base = preset.fields if preset else Fields()
    fields = Fields(
        question=config.question_field or base.question,
        answer=config.answer_field or base.answer,
        choices=config.choices_field or base.choices,
        id=config.id_field or base.id,
    )
    name, stem, rows = open_source(config, preset)
    convert = preset.convert if preset else generic(config.task)
    task = config.task or (preset.task if preset else None)

    problems: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for index, (line, where, row) in enumerate(rows):
        if config.limit is not None and index >= config.limit:
            break

        def fail(message: str, field: str | None = None) -> RecordError:
            # Files with lines say file:line; a parquet file, a JSON list or a Hub dataset say "row N".
            return RecordError(name if line is not None else f"{name} {where}", line, message, field=field,
                               hint="map the columns with --question-field/--answer-field/--choices-field/--id-field"
                                    + ("" if preset else ", or use a --preset"))

        try:
            problem = convert(row, fields)
        except FieldProblem as exc:
            raise fail(str(exc), exc.field) from None
        id_column = fields.id if fields.id and fields.id in row else ("id" if not fields.id and "id" in row else None)
        if config.id_field and config.id_field not in row:
            raise fail("missing (the row has: " + ", ".join(sorted(map(str, row))) + ")", config.id_field)
        rid = str(row[id_column]).strip() if id_column and row[id_column] not in (None, "") else f"{stem}-{index}"
        if rid in seen:
            raise fail(f"duplicate id '{rid}' (first seen at {seen[rid]})", id_column or "id")
        seen[rid] = where
        record = {"id": rid, "question": problem["question"], "answer": problem["answer"],
                  "task": task or problem.get("task") or "math"}
        if problem.get("choices"):
            record["choices"] = problem["choices"]
        if problem.get("meta"):
            record["meta"] = problem["meta"]
        record["source"] = name
        issue = check_record(record, "problem")
        if issue is not None:
            raise fail(issue)
        problems.append(record)
    if not problems:
        raise UndoError(f"{name}: no rows to import (the source is empty)",
                        hint="point `undo data import` at a file or dataset with at least one row")
    return name, problems


def run(config: DataImportConfig) -> dict[str, Any]:
    """Import, split and write; returns {source, problems, seed, splits: {name: {count, path}}}."""
    from rich.table import Table

    from undo_cli.console import console, warn
    from undo_cli.records import sha256_file, write_json, write_records

    from undo_cli.stages.options import same_file

    out = Path(config.output_dir)
    for folder in (out, *out.parents):  # `--output-dir ok.jsonl/data` too: refused before reading anything
        if folder.exists():
            if not folder.is_dir():
                raise UndoError(f"--output-dir {out}: {folder} is a file, not a folder",
                                hint="name a folder (it is created if needed)")
            break
    if config.source and config.source != "-":
        for split, _ in config.splits:  # the split files are written after reading: they would replace the source
            if same_file(str(out / f"{split}.jsonl"), config.source):
                raise UndoError(f"--output-dir {out}: split '{split}' would overwrite the source {config.source}",
                                hint="import into another folder, e.g. --output-dir data/imported")
    with console.status("reading and checking rows..."):
        name, problems = convert_rows(config)
    settings = import_settings(config, problems)
    _check_previous(out, config, settings)

    order = list(range(len(problems)))
    random.Random(config.seed).shuffle(order)
    counts = split_counts(len(problems), config.splits)
    summary: dict[str, Any] = {"source": name, "preset": config.preset, "problems": len(problems),
                               "seed": config.seed, "split": config.split, "settings": settings, "splits": {}}
    start = 0
    chosen: list[tuple[str, list[dict[str, Any]]]] = []
    for (split, _), count in zip(config.splits, counts):
        members = sorted(order[start: start + count])  # source order inside a split
        start += count
        chosen.append((split, [problems[i] for i in members]))
        if count == 0:
            warn(f"split '{split}' gets none of the {len(problems)} problems; use more data or a larger fraction")
    for split, members in chosen:
        path = out / f"{split}.jsonl"
        write_records(path, members)
        summary["splits"][split] = {"count": len(members), "path": str(path), "sha256": sha256_file(path)}
    for stale in _previous_splits(out) - set(summary["splits"]):  # --overwrite of an import with other split names
        (out / f"{stale}.jsonl").unlink(missing_ok=True)
    write_json(out / IMPORT_FILE, summary)

    table = Table(title=f"imported {len(problems)} problems from {name}", title_justify="left")
    for col in ("split", "problems", "file"):
        table.add_column(col, justify="right" if col == "problems" else "left")
    for split, row in summary["splits"].items():
        table.add_row(split, str(row["count"]), row["path"])
    console.print(table)
    return summary


def import_settings(config: DataImportConfig, problems: list[dict[str, Any]]) -> dict[str, Any]:
    """What identifies an import: the options that place problems in splits, and the rows read (their sha256,
    without `source`, so the same file read from another folder, or from the Hub, is the same import)."""
    import hashlib

    rows = hashlib.sha256()
    for p in problems:
        rows.update(json.dumps({k: v for k, v in p.items() if k != "source"}, sort_keys=True).encode() + b"\n")
    return {**{name: getattr(config, name) for name in SETTINGS}, "rows_sha256": rows.hexdigest()}


def _previous_splits(out: Path) -> set[str]:
    from undo_cli.records import read_json

    previous = out / IMPORT_FILE
    return set((read_json(previous).get("splits") or {})) if previous.is_file() else set()


def _check_previous(out: Path, config: DataImportConfig, settings: dict[str, Any]) -> None:
    """Refuse to replace an import with other settings, or split files no import wrote, without --overwrite."""
    from undo_cli.records import read_json

    if config.overwrite:
        return
    previous = out / IMPORT_FILE
    hint = ("--overwrite replaces it (runs made on the old split would then read other problems), or import into "
            "another --output-dir")
    if previous.is_file():
        old = read_json(previous)
        # An import.json of an older undo has no settings block: compare what it recorded.
        old_settings = old.get("settings") or {k: old.get(k) for k in ("seed", "split", "preset")}
        changed = ["the rows read differ (another source, or the source changed)" if k == "rows_sha256" else
                   f"{k} was {old_settings[k]!r}, now {settings[k]!r}"
                   for k in old_settings if k in settings and old_settings[k] != settings[k]]
        if changed:
            raise UndoError(f"--output-dir {out} holds an import with other settings: " + "; ".join(changed),
                            hint=hint)
        return
    found = [out / f"{split}.jsonl" for split, _ in config.splits if (out / f"{split}.jsonl").exists()]
    if found:
        raise UndoError(f"--output-dir {out}: {found[0]} exists and no `undo data import` wrote it "
                        f"(no {IMPORT_FILE} beside it)", hint=hint)
