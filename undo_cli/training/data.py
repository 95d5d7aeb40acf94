"""Rationale records -> training examples, with the checks a person needs.

Each record becomes `prompts.encode_example(tokenizer, student_messages(record),
record["rationale"])`: the prompt exactly as `undo evaluate` will show it to the
student (masked with -100), followed by the rationale and the chat template's
end-of-turn marker (so the student learns to stop).

A record may instead carry its own prompt as chat messages in
`prompt_messages` ([{"role": "system"|"user"|..., "content": "..."}]): then
that is the prompt, not the student template. This is how a model is taught a
prompt format other than the student's, e.g. `undo demo` training its tiny
teacher on the generate and refine prompts it will be given.

Too long for --max-length, decided here once:

* a rationale that does not fit is TRUNCATED from the right (the prompt stays
  whole, because the prompt must match evaluation) and counted in the summary
  as `truncated_examples`; the student still learns its beginning;
* a prompt that alone fills --max-length would leave no response token to learn
  from, so that example is SKIPPED with a warning naming its line and counted as
  `skipped_examples`; if every example is skipped, that is an error;
* an empty (whitespace-only) rationale would teach the student to say nothing:
  it is skipped with a warning and counted as `empty_rationales_skipped`, and
  only a file where every rationale is empty is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.console import warn
from undo_cli.errors import RecordError, UndoError
from undo_cli.records.io import STDIO, display_name


@dataclass
class EncodeStats:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    skipped: int = 0
    empty: int = 0  # records with a whitespace-only rationale, skipped (check_rationales warned)
    prompt_tokens: int = 0
    response_tokens: int = 0
    longest: int = 0
    truncated_lines: list[int | None] = field(default_factory=list)
    skipped_lines: list[int | None] = field(default_factory=list)
    record_index: list[int] = field(default_factory=list)  # examples[j] comes from records[record_index[j]]


def record_lines(path: str) -> list[int] | None:
    """Line numbers of the non-blank lines of `path` (the i-th record is on the i-th); None for stdin."""
    if str(path) == STDIO or not Path(path).is_file():
        return None
    from undo_cli.records import text_lines

    return [n for n, line in enumerate(text_lines(path), start=1) if line.strip()]


def check_rationales(records: list[dict[str, Any]], path: str) -> int:
    """Count (and warn about) empty rationales: `encode_records` skips them; they would teach the student to say nothing.

    Only a file with no non-empty rationale at all is refused. Returns the number of empty ones.
    """
    empty = [i for i, record in enumerate(records) if not record["rationale"].strip()]
    if empty:
        lines = record_lines(path)
        where = ", ".join(f"line {lines[i]}" if lines else f"record {i + 1}" for i in empty[:5])
        if len(empty) == len(records):
            raise RecordError(display_name(path), lines[empty[0]] if lines else None,
                              f"every rationale is empty ({len(empty)} of {len(records)})", field="rationale",
                              hint="regenerate them with `undo generate`")
        warn(f"{display_name(path)}: skipping {len(empty)} of {len(records)} records with an empty rationale "
             f"({where}{', ...' if len(empty) > 5 else ''}); they are counted in train_summary.json")
    wrong = sum(1 for r in records if r.get("correct") is False)
    if wrong:
        warn(f"{display_name(path)}: {wrong} of {len(records)} rationales are marked correct=false; training on them "
             "anyway (generate with --keep correct to leave them out)")
    return len(empty)


def fingerprint(records: list[dict[str, Any]]) -> str:
    """A hash of the training data as read (works for stdin too): a resumed run must see the same data."""
    h = hashlib.sha256()
    for record in records:
        h.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def encode_records(records: list[dict[str, Any]], tokenizer, *, max_length: int, template: str,
                   path: str) -> tuple[list[dict[str, list[int]]], EncodeStats]:
    """Token ids + labels for every record that leaves at least one response token within max_length."""
    from undo_cli.prompts import encode_example, student_messages

    lines = record_lines(path)
    stats = EncodeStats(records=len(records))
    examples: list[dict[str, list[int]]] = []
    for i, record in enumerate(records):
        line = lines[i] if lines else None
        if not record["rationale"].strip():
            stats.empty += 1
            continue
        messages = record.get("prompt_messages")
        if messages is None:
            messages = student_messages(record, template)
        elif not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise RecordError(display_name(path), line, "expected a non-empty list of {\"role\", \"content\"} "
                              "messages", field="prompt_messages",
                              hint="leave the field out to use the student template")
        ids, labels = encode_example(tokenizer, messages, record["rationale"])
        n_prompt = next((j for j, lab in enumerate(labels) if lab != -100), len(labels))
        if n_prompt >= max_length:
            stats.skipped += 1
            stats.skipped_lines.append(line)
            continue
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            stats.truncated += 1
            stats.truncated_lines.append(line)
        examples.append({"input_ids": ids, "labels": labels})
        stats.record_index.append(i)
        stats.prompt_tokens += n_prompt
        stats.response_tokens += len(ids) - n_prompt
        stats.longest = max(stats.longest, len(ids))
    stats.examples = len(examples)
    name = display_name(path)
    if stats.skipped:
        where = ", ".join(f"line {n}" for n in stats.skipped_lines[:5] if n) or "stdin"
        if not examples:
            raise UndoError(f"{name}: every prompt is at least --max-length {max_length} tokens long, "
                            "so no example has a response token left to learn from",
                            hint="raise --max-length (the longest prompts need more) or shorten the questions")
        warn(f"{name}: skipped {stats.skipped} example(s) whose prompt alone fills --max-length {max_length} "
             f"({where}{', ...' if stats.skipped > 5 else ''}); raise --max-length to keep them")
    if stats.truncated:
        where = ", ".join(f"line {n}" for n in stats.truncated_lines[:5] if n) or "stdin"
        warn(f"{name}: truncated {stats.truncated} rationale(s) to --max-length {max_length} tokens "
             f"({where}{', ...' if stats.truncated > 5 else ''}); they lose their final answer line")
    return examples, stats
