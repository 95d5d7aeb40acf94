"""The JSONL artifact contract (see docs/artifacts.md) and its reader/writers."""

from undo_cli.records.io import (
    STDIO,
    AppendLog,
    atomic_write_text,
    check_output_path,
    honour_umask,
    is_stream,
    not_valid_json,
    iter_records,
    read_text,
    read_json,
    read_records,
    remove_stale_temps,
    sha256_file,
    write_json,
    text_lines,
    write_records,
)
from undo_cli.records.schema import ERROR_TYPES, SHAPES, TASKS, check_record

__all__ = [
    "STDIO", "AppendLog", "atomic_write_text", "check_output_path", "honour_umask", "is_stream", "iter_records", "not_valid_json", "read_json",
    "read_records", "read_text", "remove_stale_temps", "sha256_file", "text_lines", "write_json", "write_records", "ERROR_TYPES", "SHAPES", "TASKS", "check_record",
]
