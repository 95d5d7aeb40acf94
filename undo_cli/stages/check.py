"""Before hours are spent: what will work with this teacher and this student, and what will not.

    undo check --teacher Qwen/Qwen2.5-7B-Instruct --student meta-llama/Llama-3.2-1B-Instruct --data data/train.jsonl
    undo check --teacher T --teacher-url http://127.0.0.1:8000/v1 --student S --teacher-top-k 20 --format json
    undo check --teacher T --student S --objective fkl          # would this objective work? exit 2 + the fix if not

Loads tokenizers and model configs only, never weights, and says, one line per
check (a table on stderr, or `--format json` on stdout):

* tokenizers: identical, same vocabulary size but different, or different, token
  by token (vocabulary, special tokens, and the data's own text tokenised by
  both); the shared vocabulary; which white-box objectives therefore apply
  (exact-vocabulary fkl ... tvd only for identical tokenizers; uld, gold, sft for any);
* chat templates: present or not, and what the same messages render to for each;
* context: the longest generate and refine prompt of the data (+ --max-tokens) against
  the teacher's context length, the longest student prompt + rationale against the
  student's (and against --max-length), and for a white-box teacher the sequence it scores;
* a served teacher (`--teacher-url`): reachable, serving the model, `prompt_logprobs`
  returned with token ids, the server's `--max-logprobs` cap against `--teacher-top-k`,
  its `/tokenize` endpoint and what it says about the tokenizer, and one generation
  through it.

Exit 0 when everything asked would work; 2, with the fix of each thing that would
fail, otherwise. `undo iterate` runs the same checks (`preflight`) before iteration 0.
The refine prompt is an estimate: the template with each problem, its rationale as
the teacher's earlier solution, and the data's longest rationale as the student's
attempt and as each of the `--k` similar failures' (the template cuts those at 1500
and 600 characters).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from undo_cli.errors import RecordError, UndoError
from undo_cli.objectives.options import AUTO_EXACT, CROSS_KINDS, KINDS, OBJECTIVES
from undo_cli.prompts import STUDENT_TEMPLATE

FORMATS = ("table", "json")
SAMPLE = {"id": "check", "question": "Sam has 3 apples and buys 4 more. How many apples does Sam have?",
          "answer": "7", "rationale": "Sam starts with 3 apples and buys 4 more: 3 + 4 = 7.\n#### 7"}


@dataclass
class CheckConfig:
    """Everything `undo check` needs (each field one flag)."""

    teacher: str = field(metadata={"help": "The teacher: a model folder, a hub name, a .gguf file, or the model name on the server."})
    student: str = field(metadata={"help": "The student: a model folder, a hub name or a .gguf file."})
    teacher_url: str | None = field(default=None, metadata={
        "help": "A served teacher (vLLM's OpenAI server, e.g. http://127.0.0.1:8000/v1): checked as `undo train "
                "--teacher-url` and `undo generate --backend openai` use it."})
    data: str | None = field(default=None, metadata={
        "help": "Problems or rationales JSONL whose prompts and text are checked (default: one sample problem)."})
    format: str = field(default="table", metadata={"choices": FORMATS,
                                                   "help": "table (stderr) or json (one object on stdout)."})
    objective: str | None = field(default=None, metadata={"choices": OBJECTIVES, "help": (
        "The white-box objective you mean to train with: exit 2 if it cannot work with these tokenizers "
        "(default: only list which apply).")})
    teacher_top_k: int = field(default=20, metadata={"help": "As `undo train --teacher-top-k`: K log-probs per token "
                                                             "the served teacher must return."})
    max_tokens: int = field(default=512, metadata={"help": "The generation budget of generate/refine (context check)."})
    max_length: int = field(default=1024, metadata={"help": "As `undo train --max-length` (context check)."})
    prompt: str = field(default="generate", metadata={"help": "The generate prompt template."})
    refine_prompt: str = field(default="refine", metadata={"help": "The refine prompt template."})
    template: str = field(default=STUDENT_TEMPLATE, metadata={"help": "The student prompt template."})
    k: int = field(default=3, metadata={"help": "Similar failures in the refine prompt (as `undo refine --k`)."})
    teacher_api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "NAME of the environment variable with the served teacher's API key (none needed on loopback)."})
    timeout: float = field(default=60.0, metadata={"help": "Seconds per request to the served teacher."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow tokenizers that ship their own Python code (only for sources you trust)."})

    def __post_init__(self) -> None:
        from undo_cli.errors import SettingError
        from undo_cli.fields import check_choices

        check_choices(self)  # format, objective
        for name in ("teacher_top_k", "max_tokens", "max_length"):
            if getattr(self, name) < 1:
                raise SettingError(name, getattr(self, name), "must be at least 1")


@dataclass
class Check:
    section: str
    name: str
    status: str            # ok | warn | fail | info
    detail: str
    fix: str | None = None


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    asked: str | None = None  # the objective the user means to train with, if said

    def add(self, section: str, name: str, status: str, detail: str, fix: str | None = None) -> None:
        self.checks.append(Check(section, name, status, detail, fix))

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_json(self) -> dict[str, Any]:
        return {"ok": not self.failures, "checks": [asdict(c) for c in self.checks], **self.facts}


# --- models: tokenizers and context lengths -------------------------------------------------

def _tokenizer(name: str, trust: bool):
    from undo_cli.models import load_pretrained

    return load_pretrained("tokenizer", name, trust_remote_code=trust)


def context_length(name: str, tokenizer, trust: bool) -> int | None:
    """The model's context length from its config (no weights), else the tokenizer's model_max_length."""
    try:
        from transformers import AutoConfig

        from undo_cli.gguf_models import local_model

        config = AutoConfig.from_pretrained(local_model(name), trust_remote_code=trust)
        from undo_cli.backends.context import CONFIG_KEYS  # the keys refine's context check reads too

        for key in CONFIG_KEYS:
            value = getattr(config, key, None) or getattr(getattr(config, "text_config", None), key, None)
            if isinstance(value, int) and value > 0:
                return value
    except Exception:
        pass
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**8 else None


def load_models(config, report: Report) -> tuple[Any, Any]:
    """(student tokenizer, teacher tokenizer or None); what loaded goes into the report."""
    student = _tokenizer(config.student, config.trust_remote_code)  # the student must load: an error otherwise
    report.add("models", "student tokenizer", "ok", f"{config.student}: {len(student)} tokens")
    try:
        teacher = _tokenizer(config.teacher, config.trust_remote_code)
        report.add("models", "teacher tokenizer", "ok", f"{config.teacher}: {len(teacher)} tokens")
    except UndoError as exc:
        teacher = None
        if getattr(config, "teacher_url", None) or getattr(config, "remote_teacher", False):
            report.add("models", "teacher tokenizer", "warn", f"{config.teacher} does not load here ({exc.message}): "
                       "compared through the server only; cross-tokenizer objectives need it here",
                       "pass as --teacher a hub name or folder whose tokenizer loads here")
        else:
            report.add("models", "teacher tokenizer", "fail", exc.message, exc.hint)
    return student, teacher


# --- tokenizers and the objectives they allow ----------------------------------------------------

def check_tokenizers(config, report: Report, student, teacher, texts: list[str]) -> str | None:
    """The relation of the two tokenizers (None when the teacher's is not here) and the objectives that apply."""
    from undo_cli.tokenization import compare

    if teacher is None:
        return None
    c = compare(teacher, student, texts)
    detail = c.relation + (f": {c.difference}" if c.difference else "")
    detail += f"; the data's text: {c.texts_same_ids}/{c.texts} texts tokenised into the same ids"
    report.add("tokenizers", "tokenizers", "ok" if c.relation == "identical" else "info", detail)
    specials = "same bos/eos/pad" if not c.special_differences else "; ".join(c.special_differences)
    report.add("tokenizers", "special tokens", "ok" if not c.special_differences else "info", specials)
    report.add("tokenizers", "shared vocabulary", "info",
               f"{c.shared} tokens spell the same bytes in both ({c.shared / max(c.student_size, 1):.0%} of the "
               "student's vocabulary)")
    applies = ["sft", *KINDS, *CROSS_KINDS] if c.relation == "identical" else ["sft", *CROSS_KINDS]
    auto = AUTO_EXACT if c.relation == "identical" else "gold or uld (by the shared share of the data's tokens)"
    report.facts["tokenizers"] = c.to_json()
    report.facts["objectives"] = applies
    report.add("tokenizers", "objectives that apply", "ok", f"{', '.join(applies)}; auto -> {auto}")
    asked = getattr(config, "objective", None)
    if asked in KINDS and c.relation != "identical":
        report.add("tokenizers", f"--objective {asked}", "fail",
                   f"{asked} compares probabilities token id by token id, but the tokenizers are {c.relation}",
                   "use --objective uld or gold (cross-tokenizer), auto, or sft")
    return c.relation


# --- chat templates ------------------------------------------------------------------------------

def check_templates(report: Report, student, teacher, messages: list[dict[str, str]]) -> None:
    from undo_cli.prompts import chat_prompt

    rendered = {}
    for role, tok in (("student", student), ("teacher", teacher)):
        if tok is None:
            continue
        has = bool(getattr(tok, "chat_template", None))
        text = chat_prompt(tok, messages)
        rendered[role] = text
        report.add("chat templates", f"{role} chat template", "ok" if has else "warn",
                   (f"renders the student prompt as {text[:160]!r}" + ("..." if len(text) > 160 else "")) if has else
                   "none: prompts are plain text, blank-line separated (a base model)",
                   None if has else "use an instruct/chat model, or expect plain-text prompts")
    report.facts["rendered"] = rendered


# --- context lengths -----------------------------------------------------------------------------

def _messages_of(records, template: str, kind: str, k: int, refine_template: str, generate_template: str):
    """The rendered messages of every record for one prompt kind: generate, refine (estimate), student."""
    from undo_cli.prompts import load_template, problem_variables, refine_variables, render_messages, student_messages

    if kind == "student":  # training data may carry its own prompt (`prompt_messages`), as `undo train` reads it
        return [r.get("prompt_messages") or student_messages(r, template) for r in records]
    longest = max((r.get("rationale") or "" for r in records), key=len, default="")
    tmpl = load_template(generate_template if kind == "generate" else refine_template)
    out = []
    for r in records:
        if kind == "generate":
            out.append(render_messages(tmpl, **problem_variables(r), examples=[]))
        else:
            failure = {"question": r["question"], "answer": r["answer"], "output": longest, "predicted": None,
                       "error_type": "wrong_answer", "id": r["id"]}
            out.append(render_messages(tmpl, **refine_variables(r, failure, [failure] * k,
                                                                [r.get("rationale") or longest], cluster="c00")))
    return out


def _longest(tok, messages_list, responses=None) -> tuple[int, int]:
    """(tokens, index) of the longest prompt (+ response) as the model is given it."""
    from undo_cli.prompts import encode_example, encode_prompt

    best = (0, 0)
    for i, messages in enumerate(messages_list):
        if responses is None:
            n = len(encode_prompt(tok, messages))
        else:
            n = len(encode_example(tok, messages, responses[i])[0])
        best = max(best, (n, i))
    return best


def _fits(report, name, tokens, limit, who, what, fix, *, fail: bool = True):
    if limit is None:
        report.add("context", name, "info", f"{tokens} tokens; {who}'s context length is unknown")
    elif tokens > limit:
        report.add("context", name, "fail" if fail else "warn", f"{tokens} tokens {what} > {who}'s {limit}", fix)
    else:
        report.add("context", name, "ok", f"{tokens} tokens {what} <= {who}'s {limit}")


def _budget(config, kind: str) -> int:
    """The generation budget of `kind` (iterate's tables may differ per stage; `undo check` has one)."""
    return getattr(config, f"{kind}_max_tokens", None) or config.max_tokens


def check_context(config, report: Report, student, teacher, records, limits: dict[str, int | None],
                  scores_teacher: bool) -> None:
    """The longest generate / refine / student prompt of the data against each model's context."""
    c = config
    if teacher is not None:
        for kind, template in (("generate", c.prompt), ("refine", c.refine_prompt)):
            n, i = _longest(teacher, _messages_of(records, c.template, kind, c.k, c.refine_prompt, c.prompt))
            budget = _budget(c, kind)
            name = f"{kind} prompt + --max-tokens" + (" (an estimate)" if kind == "refine" else "")
            _fits(report, name, n + budget, limits["teacher"], "the teacher",
                  f"({n} prompt, longest: record {records[i]['id']!r}, + {budget})",
                  f"lower --max-tokens, shorten the {template} template, or use a teacher with a longer context",
                  fail=kind == "generate")
    student_messages = _messages_of(records, c.template, "student", c.k, c.refine_prompt, c.prompt)
    responses = [r.get("rationale") or "" for r in records]
    n, i = _longest(student, student_messages, responses)
    if any(responses):
        _fits(report, "student prompt + rationale", n, limits["student"], "the student",
              f"(longest: record {records[i]['id']!r})", "shorten the rationales or the student template")
    if n > c.max_length:
        report.add("context", "student prompt + rationale vs --max-length", "warn",
                   f"{n} tokens > --max-length {c.max_length}: `undo train` truncates such rationales (counted)",
                   f"raise --max-length to {n}")
    answer = getattr(c, "student_max_tokens", None)
    if answer:
        n, i = _longest(student, student_messages)
        _fits(report, "student prompt + evaluate's --max-tokens", n + answer, limits["student"], "the student",
              f"({n} prompt, record {records[i]['id']!r}, + {answer})", "lower evaluate's max_tokens")
    if scores_teacher and teacher is not None:
        n, i = _longest(teacher, student_messages, responses)
        _fits(report, "the teacher scores the student's prompt + rationale", n, limits["teacher"], "the teacher",
              f"(the student's messages in the teacher's chat template, record {records[i]['id']!r})",
              "lower --max-length, or raise the server's --max-model-len")


# --- a served teacher ------------------------------------------------------------------------------

def _cap(message: str) -> int | None:
    """The server's --max-logprobs from its refusal ('... greater than max allowed: 5' and similar)."""
    found = re.findall(r"(?:max(?:imum)?[ _-]*(?:allowed|logprobs)[^0-9-]{0,20})(-?\d+)", message, re.IGNORECASE)
    return int(found[-1]) if found else None


def check_served(config, report: Report, student, teacher) -> int | None:
    """Reachable, the model, prompt_logprobs with ids, the --max-logprobs cap, /tokenize, one generation.
    Returns the server's context length when it says."""
    from undo_cli.training.served_teacher import ServedTeacher

    try:
        served = ServedTeacher(config.teacher_url, config.teacher, top_k=config.teacher_top_k,
                               api_key_env=config.teacher_api_key_env, timeout=config.timeout, max_retries=1)
    except UndoError as exc:
        report.add("served teacher", "API key", "fail", exc.message, exc.hint)
        return None
    try:
        try:
            served.probe()
        except UndoError as exc:
            report.add("served teacher", "reachable, serves --teacher", "fail", exc.message, exc.hint)
            return None
        report.add("served teacher", "reachable, serves --teacher", "ok",
                   f"{served.where} serves {', '.join(served.served)} (context {served.max_model_len})")
        _check_scoring(config, report, served, teacher or student)
        _check_tokenize(report, served, student, teacher)
        _check_generation(config, report)
        return served.max_model_len
    finally:
        served.close()


def _check_scoring(config, report: Report, served, tokenizer) -> None:
    ids = tokenizer("Sam has 3 apples.", add_special_tokens=False)["input_ids"]
    k = config.teacher_top_k
    try:
        rows = served.score([ids])[0]
    except UndoError as exc:
        cap = _cap(exc.message)
        if "logprobs" in exc.message:
            have = f"the server allows {cap}" if cap is not None else "the server allows fewer"
            report.add("served teacher", f"prompt_logprobs, K = --teacher-top-k {k}", "fail",
                       f"{have}: {exc.message}",
                       f"restart the server with --max-logprobs {k} (or -1), or pass --teacher-top-k "
                       f"{cap if cap is not None and cap > 0 else 'N'} (its cap)")
        else:
            report.add("served teacher", "prompt_logprobs", "fail", exc.message, exc.hint)
        return
    widths = [len(r) for r in rows[1:] if r]
    with_ids = all(isinstance(t, int) for r in rows[1:] if r for t in r)
    report.add("served teacher", f"prompt_logprobs, K = --teacher-top-k {k}",
               "ok" if with_ids and widths and min(widths) >= min(k, len(tokenizer)) else "fail",
               f"token ids with {min(widths, default=0)}-{max(widths, default=0)} log-probs per position "
               f"(the top {k} and the token itself)", "serve the teacher with vLLM's OpenAI server")


def _check_tokenize(report: Report, served, student, teacher) -> None:
    which = teacher if teacher is not None else student
    whose = "the teacher's (loaded here)" if teacher is not None else "the student's"
    try:
        served.check_tokenizer(which, whose=whose)
        report.add("served teacher", "/tokenize", "ok", f"answers; the server's tokenizer is {whose} token by token")
    except UndoError as exc:
        exact = getattr(report, "asked", None) in KINDS  # an exact objective needs the student's tokenizer there
        status = "fail" if "/tokenize" in exc.message or "reach" in exc.message or teacher is not None or exact \
            else "info"
        report.add("served teacher", "/tokenize", status, exc.message, exc.hint)


def _check_generation(config, report: Report) -> None:
    from undo_cli.backends import BackendConfig, SamplingConfig, open_backend

    try:
        with open_backend(BackendConfig(backend="openai", model=config.teacher, base_url=[config.teacher_url],
                                        api_key_env=config.teacher_api_key_env, request_timeout=config.timeout,
                                        max_retries=1)) as backend:
            out = backend.generate([[{"role": "user", "content": SAMPLE["question"]}]],
                                   SamplingConfig(max_tokens=8))[0][0]
        report.add("served teacher", "generate through it", "ok", f"one chat completion: {out.text[:60]!r}")
    except UndoError as exc:
        report.add("served teacher", "generate through it", "fail", exc.message, exc.hint)


# --- the command -------------------------------------------------------------------------------------

def read_data(path: str | None) -> list[dict[str, Any]]:
    """Problems or rationales (any training-data shape); one sample problem without --data."""
    if path is None:
        return [dict(SAMPLE)]
    from undo_cli.records import read_records

    try:
        return read_records(path, "problem")
    except RecordError:
        from undo_cli.training.data import read_training_records

        return read_training_records(path)


def checks(config, records: list[dict[str, Any]], *, scores_teacher: bool = False) -> Report:
    """Every check for `config` (a CheckConfig, or iterate's view of one) on `records`; nothing printed."""
    report = Report()
    report.asked = getattr(config, "objective", None)
    student, teacher = load_models(config, report)
    texts = [t for r in records[:200] for t in (r["question"], r.get("rationale") or "") if t]
    check_tokenizers(config, report, student, teacher, texts)
    from undo_cli.prompts import student_messages

    check_templates(report, student, teacher, student_messages(records[0], config.template))
    limits = {"student": context_length(config.student, student, config.trust_remote_code),
              "teacher": context_length(config.teacher, teacher, config.trust_remote_code) if teacher else None}
    if getattr(config, "teacher_url", None):
        served_len = check_served(config, report, student, teacher)
        limits["teacher"] = served_len or limits["teacher"]
        scores_teacher = True
    report.facts["context_lengths"] = limits
    check_context(config, report, student, teacher, records, limits,
                  scores_teacher or getattr(config, "objective", None) not in (None, "sft"))
    return report


def print_report(report: Report, title: str) -> None:
    from rich.table import Table

    from undo_cli.console import console

    colours = {"ok": "green", "warn": "yellow", "fail": "bold red", "info": "cyan"}
    table = Table(title=title, title_justify="left")
    for col in ("check", "", "detail"):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        detail = c.detail + (f"\nfix: {c.fix}" if c.fix and c.status in ("fail", "warn") else "")
        table.add_row(f"{c.section}: {c.name}", f"[{colours[c.status]}]{c.status}[/]", detail)
    console.print(table)


def fail_if_needed(report: Report, what: str) -> None:
    failures = report.failures
    if failures:
        raise UndoError(f"{what}: {len(failures)} check(s) would fail: " + "; ".join(
            f"{c.section}: {c.name} ({c.detail})" for c in failures),
            hint="; ".join(dict.fromkeys(c.fix for c in failures if c.fix)) or None)


def run(config: CheckConfig) -> dict[str, Any]:
    """Run every check; a table on stderr or JSON on stdout; exit 2 (UndoError) if anything would fail."""
    records = read_data(config.data)
    if not records:
        raise UndoError(f"--data {config.data}: no records", hint="pass problems or rationales JSONL")
    report = checks(config, records)
    if config.format == "json":
        import sys

        sys.stdout.write(json.dumps(report.to_json(), ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        print_report(report, f"undo check: teacher {config.teacher}, student {config.student}")
    fail_if_needed(report, "undo check")
    # Whether `undo train --data` takes the data as it is (rationales, chat or prompt/completion lines), or
    # they are problems the teacher answers first: the next command differs (guidance.py).
    return {**report.to_json(), "trainable": config.data is not None and bool(records[0].get("rationale"))}


# --- before `undo iterate`'s iteration 0 ----------------------------------------------------------

def preflight(config) -> Report:
    """The same checks for an `undo iterate` run (an IterateConfig), on its train problems, before anything runs.

    Tokenizers and configs only (no weights), so it stays fast on any model; a teacher behind an OpenAI server
    whose tokenizer does not load here is compared through the server only (or not at all). Prints the table
    and raises UndoError (exit 2) when a check fails; otherwise one line.
    """
    from types import SimpleNamespace

    from undo_cli.backends import SERVED
    from undo_cli.console import console
    from undo_cli.records import read_records

    train, generate, refine = config.settings("train"), config.settings("generate"), config.settings("refine")
    evaluate = config.settings("evaluate")
    white_box = train.get("objective", "sft") != "sft" or train.get("method", "sft") != "sft"
    view = SimpleNamespace(  # the white-box teacher of [train] when there is one (the served model name with a URL)
        teacher=train.get("teacher") if white_box and train.get("teacher") else config.teacher,
        student=config.student, teacher_url=train.get("teacher_url"),
        remote_teacher=config.teacher_backend in SERVED, objective=train.get("objective"),
        teacher_top_k=train.get("teacher_top_k", 20), max_tokens=generate.get("max_tokens", 512),
        generate_max_tokens=generate.get("max_tokens", 512), refine_max_tokens=refine.get("max_tokens", 512),
        student_max_tokens=evaluate.get("max_tokens", 512), max_length=train.get("max_length", 1024),
        prompt=generate.get("prompt", "generate"), refine_prompt=refine.get("prompt", "refine"),
        template=train.get("template", STUDENT_TEMPLATE), k=refine.get("k", 3),
        teacher_api_key_env=train.get("teacher_api_key_env", "OPENAI_API_KEY"), timeout=60.0,
        trust_remote_code=config.trust_remote_code)
    report = checks(view, read_records(config.train_file, "problem"))
    if report.failures:
        print_report(report, f"undo iterate: checks before iteration 0 ({config.teacher} -> {config.student})")
        fail_if_needed(report, "undo iterate")
    tokenizers = (report.facts.get("tokenizers") or {}).get("relation", "not compared")
    warnings = sum(c.status == "warn" for c in report.checks)
    console.print(f"checked before iteration 0: tokenizers {tokenizers}; chat templates and context lengths fit"
                  + (f" ({warnings} warning(s): `undo check` shows them)" if warnings else ""), soft_wrap=True)
    return report
