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


# --- training data in the shapes people bring ------------------------------------------------------------

TRAINING_SHAPES = ("rationale", "problem + --rationale-field", "messages", "prompt/completion")


def _dotted(record: dict[str, Any], key: str) -> Any:
    """record['meta']['solution'] for 'meta.solution'; a KeyError names the part that is missing."""
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(part)
        value = value[part]
    return value


def _messages_ok(messages: Any) -> bool:
    return isinstance(messages, list) and bool(messages) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)


def to_rationale(raw: Any, index: int, *, rationale_field: str | None = None) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """One line of training data -> (rationale record, None, None), or (None, problem, field).

    Accepted shapes (docs/artifacts.md, "training data"):
      a rationale (`undo generate`): `problem_id` may be left out, it defaults to `id`;
      a problem whose worked solution sits in the field `rationale_field` (dotted: `meta.solution`);
      {"messages": [..., {"role": "assistant", "content": ...}]}: the last assistant turn is learned,
        the turns before it are the prompt, as written;
      {"prompt": ..., "completion": ...}: text (the prompt becomes the user turn) or lists of messages.
    Records without an `id` get `row-<n>` (their position in the file).
    """
    if not isinstance(raw, dict):
        return None, f"expected a JSON object, got {type(raw).__name__}", None
    record = dict(raw)
    rid = record.get("id") if isinstance(record.get("id"), str) and record.get("id") else f"row-{index + 1}"
    if rationale_field is not None:
        try:
            solution = _dotted(record, rationale_field)
        except KeyError as exc:
            return None, f"missing (no '{exc.args[0]}' in this record)", rationale_field
        if not isinstance(solution, str):
            return None, f"expected text, got {type(solution).__name__}", rationale_field
        record.update(id=rid, rationale=solution)
        record.setdefault("problem_id", rid)
        return record, None, None
    if "rationale" not in record and "messages" in record:
        messages = record["messages"]
        if not _messages_ok(messages):
            return None, "expected a non-empty list of {\"role\", \"content\"} messages", "messages"
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            return None, "the last message must be the assistant's answer, after at least one prompt turn", "messages"
        prompt = messages[:-1]
        question = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), prompt[-1]["content"])
        out = {k: v for k, v in record.items() if k != "messages"}
        out.update(id=rid, problem_id=record.get("problem_id") or rid, question=question,
                   answer=record.get("answer", ""), rationale=messages[-1]["content"], prompt_messages=prompt)
        return out, None, None
    if "rationale" not in record and "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str):
            prompt_messages = [{"role": "user", "content": prompt}]
        elif _messages_ok(prompt):
            prompt_messages = prompt
        else:
            return None, "expected text or a list of {\"role\", \"content\"} messages", "prompt"
        if _messages_ok(completion):
            completion = "".join(m["content"] for m in completion if m["role"] == "assistant")
        if not isinstance(completion, str):
            return None, "expected text or a list of assistant messages", "completion"
        question = next((m["content"] for m in reversed(prompt_messages) if m["role"] == "user"),
                        prompt_messages[-1]["content"])
        out = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
        out.update(id=rid, problem_id=record.get("problem_id") or rid, question=question,
                   answer=record.get("answer", ""), rationale=completion, prompt_messages=prompt_messages)
        return out, None, None
    if "problem_id" not in record and isinstance(record.get("id"), str):
        record["problem_id"] = record["id"]  # a rationale from another tool: one sample per problem
    return record, None, None


def read_training_records(path: str, rationale_field: str | None = None) -> list[dict[str, Any]]:
    """Training data in any accepted shape (`to_rationale`), as validated rationale records.

    Errors name the file, the line and the field, and say which shapes are accepted.
    """
    from undo_cli.records.io import iter_records
    from undo_cli.records.schema import check_record

    lines = record_lines(path)
    name = display_name(path)
    hint = ("training data is one of: rationale lines from `undo generate` (id, question, answer, rationale); "
            "problems with a worked solution (--rationale-field meta.solution); {\"messages\": [...]}; "
            "{\"prompt\": ..., \"completion\": ...} (docs/artifacts.md, 'training data')")
    records: list[dict[str, Any]] = []
    seen: dict[str, int | None] = {}
    for i, raw in enumerate(iter_records(path)):
        line = lines[i] if lines and i < len(lines) else None
        record, problem, field_name = to_rationale(raw, i, rationale_field=rationale_field)
        if record is None:
            raise RecordError(name, line, problem or "not usable", field=field_name, hint=hint)
        if "rationale" not in record and rationale_field is None:
            guess = "meta.solution" if isinstance(record.get("meta"), dict) and "solution" in record["meta"] else None
            raise RecordError(name, line, "missing: this line has no worked solution to learn (a problem?)",
                              field="rationale",
                              hint=(f"its solution is in meta.solution: add --rationale-field {guess}" if guess else
                                    "name the field that holds the worked solution, e.g. --rationale-field "
                                    "meta.solution, or generate rationales with `undo generate`") + "; " + hint)
        problem = check_record(record, "rationale")
        if problem is not None:
            raise RecordError(name, line, problem, hint=hint)
        if record["id"] in seen:
            raise RecordError(name, line, f"duplicate id '{record['id']}' (first seen on line {seen[record['id']]})",
                              field="id", hint="ids must be unique within a file; de-duplicate or re-number them")
        seen[record["id"]] = line
        records.append(record)
    return records
