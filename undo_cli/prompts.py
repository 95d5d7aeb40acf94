"""Prompt templates and the one chat formatting shared by training and inference.

Templates are Jinja2 files in `prompts/` with up to two blocks, `system` and
`user`; `render_messages` turns one into chat messages. We use Jinja2 (rather
than str.format) because prompts need loops (few-shot examples, similar
failures) and conditionals (choices or not), and a sandboxed environment with
StrictUndefined so a typo in a template is an error, not a silent empty string.

The student must see *exactly* the same text at training and at evaluation, or
distillation silently teaches it a format it never meets. `student_messages` +
`chat_prompt` build that text for both `undo train` and `undo evaluate`; the
`hf` backend, the trainer and the on-policy sampler all call `chat_prompt`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError

Message = dict[str, str]

# Where the templates live: the top-level prompts/ of a source checkout, or the
# copy bundled into the wheel (see pyproject's force-include).
_PACKAGE_DIR = Path(__file__).resolve().parent


def bundled_dir(name: str) -> Path:
    """The shipped `prompts/` or `examples/` folder, installed or in a checkout."""
    for candidate in (_PACKAGE_DIR / "_bundled" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise UndoError(f"cannot find the bundled '{name}/' folder next to {_PACKAGE_DIR}",
                    hint="reinstall undo-cli (pip install --force-reinstall undo-cli)")


PROMPTS_DIR_ENV = "UNDO_PROMPTS_DIR"


def prompts_dir() -> Path:
    override = os.environ.get(PROMPTS_DIR_ENV)
    return Path(override) if override else bundled_dir("prompts")


@functools.lru_cache(maxsize=None)
def _environment(folder: str):
    from jinja2 import FileSystemLoader, StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(
        loader=FileSystemLoader(folder),
        undefined=StrictUndefined,
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def template_file(name_or_path: str) -> Path:
    """The .jinja file a template name (`generate` -> prompts/generate.jinja) or path means."""
    p = Path(name_or_path)
    if p.suffix and p.exists():
        return p.resolve()
    folder = prompts_dir()
    name = name_or_path if name_or_path.endswith(".jinja") else f"{name_or_path}.jinja"
    if not (folder / name).exists():
        known = sorted(f.stem for f in folder.glob("*.jinja"))
        raise UndoError(f"unknown prompt template '{name_or_path}'",
                        hint=f"use a file path or one of: {', '.join(known)}")
    return folder / name


def load_template(name_or_path: str):
    """A template by name (`generate` -> prompts/generate.jinja) or by file path."""
    from jinja2 import TemplateError

    path = template_file(name_or_path)
    env, name = _environment(str(path.parent)), path.name
    try:
        return env.get_template(name)
    except TemplateError as exc:
        raise UndoError(f"prompt template {name_or_path}: {exc}") from None


def template_name(name_or_path: str) -> str:
    """A short name for provenance fields: `generate`, or the file's stem."""
    return Path(name_or_path).stem if name_or_path.endswith(".jinja") else name_or_path


def render_messages(template, **variables: Any) -> list[Message]:
    """Render a template's `system` and `user` blocks into chat messages."""
    from jinja2 import TemplateError

    try:
        ctx = template.new_context(variables)
        messages = []
        for role in ("system", "user"):
            if role in template.blocks:
                text = "".join(template.blocks[role](ctx)).strip()
                if text:
                    messages.append({"role": role, "content": text})
        if not messages:  # a template without blocks is one user message
            messages.append({"role": "user", "content": template.render(**variables).strip()})
    except TemplateError as exc:
        raise UndoError(f"prompt template {template.name}: {exc}",
                        hint="every variable the template uses must be provided; see prompts/README.md") from None
    return messages


def problem_variables(problem: dict[str, Any]) -> dict[str, Any]:
    """What every template may use about a problem."""
    choices = problem.get("choices") or []
    return {
        "question": problem["question"],
        "answer": problem.get("answer", ""),
        "task": problem.get("task") or "math",
        "choices": choices,
        "lettered_choices": [(chr(ord("A") + i), c) for i, c in enumerate(choices)],
    }


def refine_variables(target: dict[str, Any], failure: dict[str, Any], similar: list[dict[str, Any]],
                     previous: list[str], cluster: str | None = None) -> dict[str, Any]:
    """Everything a refine template receives (prompts/README.md): the target problem, the failure that chose it,
    the similar failures shown beside it, the teacher's earlier rationales, the target's failure cluster.

    One definition for `undo refine`, `undo check`'s context estimate and the demo teacher's training prompts.
    """
    def view(e: dict[str, Any]) -> dict[str, Any]:  # no usage, model names or other noise
        return {"id": e.get("id"), "question": e["question"], "answer": e.get("answer"), "output": e.get("output"),
                "predicted": e.get("predicted"), "error_type": e.get("error_type")}

    return {**problem_variables(target), "previous_rationales": previous, "student_output": failure.get("output"),
            "student_question": failure["question"], "student_predicted": failure.get("predicted"),
            "error_type": failure.get("error_type"), "similar_failures": [view(e) for e in similar],
            "failures": [view(e) for e in [failure, *similar]], "cluster": cluster}


STUDENT_TEMPLATE = "student"


def student_messages(problem: dict[str, Any], template: str = STUDENT_TEMPLATE) -> list[Message]:
    """The messages the student sees for a problem, in training and in evaluation alike."""
    return render_messages(load_template(template), **problem_variables(problem))


# --- the prompt format a trained model learnt (written by `undo train`, read by `undo evaluate`) -----------

TRAINING_FORMAT = "undo_training.json"  # in the model folder `undo train` writes


def prompt_format(records: list[dict[str, Any]], template: str) -> dict[str, Any]:
    """What prompt a model trained on `records` learnt to answer, as `undo train` records it.

    {"kind": "template", "template": T}: every record was shown through the student template T;
    {"kind": "question", "system": S}: every prompt was the question alone as the user turn (after the
        same system message S, or none): `{"messages"}` or `{"prompt", "completion"}` data;
    {"kind": "own", "example": [...]}: prompts of their own, which no template rebuilds for a new question;
    {"kind": "mixed", ...}: some records of each.
    """
    own = [r.get("prompt_messages") for r in records]
    if not any(own):
        return {"kind": "template", "template": template}
    if not all(own):
        return {"kind": "mixed", "template": template, "example": next(m for m in own if m)}
    systems = set()
    for record, messages in zip(records, own):
        *head, last = messages
        if last["role"] != "user" or last["content"] != record.get("question") or len(head) > 1 or \
                (head and head[0]["role"] != "system"):
            return {"kind": "own", "example": own[0]}
        systems.add(head[0]["content"] if head else None)
    if len(systems) > 1:
        return {"kind": "own", "example": own[0]}
    return {"kind": "question", "system": systems.pop()}


def question_messages(problem: dict[str, Any], system: str | None = None) -> list[Message]:
    """The question alone as the user turn (after `system`): the `question` prompt format."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": problem["question"]}]


def read_training_format(folder: str | None) -> dict[str, Any] | None:
    """The prompt format recorded in a model (or adapter) folder by `undo train`; None when there is none."""
    import json

    path = Path(folder) / TRAINING_FORMAT if folder else None
    if path is None or not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("prompt")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, dict) and recorded.get("kind") else None


def chat_prompt(tokenizer, messages: list[Message]) -> str:
    """The exact prompt text a model is given: its chat template, or a plain fallback.

    Ends where the model's answer begins (add_generation_prompt=True).
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # A base model without a chat template: plain text, blank-line separated.
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


def chat_response_suffix(tokenizer, messages: list[Message], response: str) -> str:
    """The text that follows `chat_prompt(messages)` when the assistant says `response`.

    With a chat template this includes the template's end-of-turn marker, so the
    student learns to stop. Without one, the eos token closes the response.
    """
    prompt = chat_prompt(tokenizer, messages)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(prompt):
            return full[len(prompt):]
    eos = tokenizer.eos_token or ""
    return response + eos


def encode_prompt(tokenizer, messages: list[Message]) -> list[int]:
    """The prompt's token ids, exactly as training sees them (the `hf` backend generates from these)."""
    prompt_ids = tokenizer(chat_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        if not prompt_ids or prompt_ids[0] != tokenizer.bos_token_id:
            prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    return prompt_ids


def encode_example(tokenizer, messages: list[Message], response: str) -> tuple[list[int], list[int]]:
    """Token ids and labels for one training example: the prompt is masked (-100).

    Prompt and response are tokenised separately and concatenated, so the
    prompt ids are exactly those `chat_prompt` gives the model at inference.
    """
    prompt_ids = encode_prompt(tokenizer, messages)
    response_ids = tokenizer(chat_response_suffix(tokenizer, messages, response), add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + list(response_ids)
