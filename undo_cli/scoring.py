"""Answer extraction and verification: the one scorer every stage uses.

    undo score predictions.jsonl --output scored.jsonl      # the CLI over this module
    python -c "from undo_cli.scoring import score; print(score('So 3 + 4 = 7.\\n#### 7', '7'))"

Scoring happens in two steps, because they fail in different ways:

1. **Extract** the answer the model committed to (`extract_answer`). Models
   show their work, so the last number in the text is often an intermediate
   result. We look for an explicit final answer first, in this order:
   a `#### <answer>` line (the format our prompts ask for; exactly four hashes:
   a longer run such as the `############` lines SmolLM2 loops on is no marker, nor
   is a markdown heading `#### Step 1:` or the placeholder `#### <answer>` quoted
   back), `\\boxed{...}`, then "the answer is ..." / "Answer: ..." / "Final
   answer: ...", then the one bold number on the last line ("So Lily has **21**
   pencils.", the way chat models mark a result). Before any
   of that we cut the text where the model starts a new "Question:" — small
   models ramble on into made-up problems, and their numbers must not count.
   Two extractions, as lm-evaluation-harness does for GSM8K ("strict-match"
   and "flexible-extract"):
   * `strict`: only that explicit final answer; text without one has no answer.
     Teacher rationales are verified this way by default (`undo generate`,
     `undo refine`: `--verify strict`), so malformed text whose last number
     happens to be right is never kept as a worked solution.
   * `flexible`: when no explicit answer is present, fall back to the last
     number (or LaTeX expression; the last line for choice/exact tasks).
     `undo evaluate` reports the accuracy of both.
   * `steps` (a verification mode, not a third extraction): `strict`, and
     every arithmetic statement in the text is true (`undo_cli/steps.py`, the
     `--verify steps` of `undo generate`, `undo refine`, `undo score` and
     `undo iterate`): `6 * 4 = 24 ... 24 - 21 = 12 ... #### 28` has the right
     answer and a false step, and does not verify.
2. **Verify** it against the gold answer for the task:
   * `math`: mathematically, with Hugging Face's `math-verify` (sympy +
     latex2sympy), so `1,250.00` = `1250`, `1/2` = `0.5`, `\\frac{3}{4}` = `0.75`,
     `\\sqrt{8}` = `2\\sqrt{2}`, and `25%` matches `25` or `0.25` the way
     the dataset means it. Plain numbers take an exact fast path (fractions).
   * `choice`: a letter (`B`, `(b)`, `option B`) or the option's text, both
     resolved to the option's position and compared with the gold's.
   * `exact`: normalised strings (case, punctuation, articles; true/false
     read as yes/no).

Why a text does not verify is its `reason`: `no_answer` (nothing extracted),
`wrong_answer`, or `false_step` (mode `steps`; `step_error` quotes the first
false statement as written). The stages record it as `reject_reason`.

Nothing here evaluates model text as code: math-verify parses with sympy's
LaTeX/expression *parsers*, and we never call `eval`.

Thread safety: math-verify's timeouts use `signal.alarm`, which only works in
the main thread. We pass timeouts only when running in the main thread and
otherwise rely on our own guard (`_too_costly`) that refuses to hand sympy
expressions that could take long (power towers, huge factorials, very long
spans), comparing those as plain strings instead.
"""

from __future__ import annotations

import functools
import re
import string
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

TASKS = ("math", "choice", "exact")
EXTRACTIONS = ("strict", "flexible")  # the two extractions (module docstring)
VERIFY = (*EXTRACTIONS, "steps")      # what `score` accepts: an extraction, or strict + true steps
REASONS = ("no_answer", "wrong_answer", "false_step")  # why a text does not verify, in the order checked


@dataclass(frozen=True)
class Score:
    predicted: str | None  # the extracted answer (None = nothing extracted)
    correct: bool
    # Why not (REASONS; None when correct) and, for false_step, the statement: derived from the two above
    # and the text, so two Scores with the same reading compare equal.
    reason: str | None = field(default=None, compare=False)
    step_error: str | None = field(default=None, compare=False)


# --- step 0: where the model's answer ends ------------------------------------------

# A new turn or a new problem: everything after it is the model talking to itself.
# At the start of a line any of these labels counts; inside a line only a capitalised "Question:"
# after some text ("... The answer is 14. Question: A farmer ..."), so that "restate the problem: ..."
# in the middle of a rationale does not cut it short.
_NEW_QUESTION = re.compile(r"(?:^|\n)[ \t]*(?:\*\*)?(?i:question|problem|human|user|q)[ \t]*\d*[ \t]*(?:\*\*)?[ \t]*:"
                           r"|(?<=\S)[ \t]+(?:\*\*)?Question[ \t]*\d*[ \t]*(?:\*\*)?[ \t]*:")


def _answer_region(text: str) -> str:
    """The text up to where the model starts a new question (a leading restated question is kept)."""
    stripped = text.lstrip()
    offset = len(text) - len(stripped)
    start = 0
    first = _NEW_QUESTION.match(stripped)
    if first:  # the output opens by restating the question: keep it, cut at the *next* one
        start = first.end()
    cut = _NEW_QUESTION.search(stripped, start)
    return text[: offset + cut.start()] if cut else text


# --- step 1: find the explicit final answer -------------------------------------------

# Exactly four: a run of more ("############", a markdown rule some models loop on) is not an answer marker.
_HASHES = re.compile(r"(?<!#)####(?!#)\s*(.*)")
_ANSWER_PHRASE = re.compile(
    r"\b(?:final\s+answer|the\s+(?:correct\s+)?answer|answer)\s*(?:\*\*)?\s*(?:is|:|=)\s*(?:\*\*)?\s*:?[ \t]*(.*)",
    re.IGNORECASE)


def boxed_contents(text: str) -> list[str]:
    r"""The contents of every \boxed{...} / \fbox{...}, with nested braces balanced."""
    found = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append(text[m.end(): i - 1])
    return found


def _line_after(text: str, start: int, rest: str) -> str:
    """`rest` of a marker's line, or the next non-empty line when the marker ends its line."""
    if rest.strip():
        return rest
    for line in text[start:].splitlines()[1:]:
        if line.strip():
            return line
    return ""


# Markdown headings also start with '####' ("#### Step 1: add the apples"); they are not answers.
# Qwen2.5-Coder also writes "#### First Step: Start with ..." and "#### Final Step: ..." (bench/real_models.py).
_HEADING = re.compile(r"^(?:(?:first|second|third|fourth|fifth|next|final|last)\s+)?(?:step|part|stage|case)\s*\w*\s*[:.)-]"
                      r"|^(?:step|part)\s+\d+\b|.*:\s*$", re.IGNORECASE)


def _hash_answers(text: str):
    """(answer text, where its line ends) of every `#### <answer>` line, in order.

    Not answers: markdown headings ("#### Step 1: ..."), a bare "####" with nothing after it, and the
    prompt's own placeholder quoted back ('the line "#### <answer>" ...'). Tags around an answer are
    dropped: Qwen2.5-Coder writes "#### <answer>31 eggs</answer>"."""
    for m in _HASHES.finditer(text):
        rest = m.group(1)
        tagged = _TAGGED.match(rest)
        if tagged:
            rest = tagged.group(1)
            if not rest[:1].isalnum() and rest[:1] not in "$-−\\(.":  # '<answer>" is a shortcut': the placeholder
                continue
        if not rest.strip() or _HEADING.match(rest.strip()):
            continue
        yield rest, m.end()


_TAGGED = re.compile(r"\s*<answer>\s*(.*?)\s*(?:</answer>.*)?$")


def answer_line_end(text: str, complete: bool = False) -> int | None:
    """Where the line holding the explicit `#### <answer>` ends (the index of its newline), or None.

    The end of a generation that was asked for "a final line #### <answer>" (`--stop-at-answer`): what
    follows is, by the prompt's own terms, not part of the answer. With `complete`, a line still being
    written (no newline after it yet) does not count: the answer may have more digits to come."""
    for _, end in _hash_answers(text):
        return None if complete and end >= len(text) else end
    return None


def _explicit_span(text: str) -> str | None:
    """The raw text of an explicit final answer, or None when the model gave none."""
    for rest, _ in _hash_answers(text):  # our format; the first one is the committed answer
        boxed = boxed_contents(rest)
        return boxed[-1] if boxed else rest
    boxed = boxed_contents(text)
    if boxed:
        return boxed[-1]
    matches = list(_ANSWER_PHRASE.finditer(text))
    if matches:
        m = matches[-1]
        return _line_after(text, m.start(), m.group(1))
    return _bold_last_line(text)


# Markdown bold around a number, "**21**", "**$5**", "**21 pencils**": the way chat models mark a result.
_BOLD_NUMBER = re.compile(r"\*\*([^*\n]{0,40}?\d[^*\n]{0,40}?)\*\*")


def _bold_last_line(text: str) -> str | None:
    """The one bold number on the last non-empty line ("So Lily has **21** pencils."), or None.

    Only the last line, and only when it bolds exactly one number: a bold step title ("**Step 2:**") or two
    bold numbers ("**3** boxes of **4**") commit to nothing."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    found = [m.group(1) for m in _BOLD_NUMBER.finditer(lines[-1])]
    if len(found) != 1 or _HEADING.match(found[0].strip()) or re.match(r"(?i)\s*(?:step|part)\b", found[0]):
        return None
    return found[0]


# --- step 2: turn a span into an answer, per task ---------------------------------------

_NUMBER = r"[-−]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+(?:\.\d+)?)?\s?%?"
_NUMBER_RE = re.compile(rf"(?<![\w.]){_NUMBER}")
_LATEX_ENV = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_BARE_FRACTION = re.compile(r"\\[dt]?frac\s*\{[^{}]*\}\s*\{[^{}]*\}")
_PLAIN_NUMBER = re.compile(r"^[-−]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?$")


def _clean_number(token: str) -> str:
    return token.replace("−", "-").replace("$", "").replace(",", "").replace(" ", "")


def _math_from_span(span: str) -> str | None:
    span = span.strip().replace("**", "")
    envs = [next(g for g in m.groups() if g is not None) for m in _LATEX_ENV.finditer(span)]
    if envs:
        span = envs[-1]
    span = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", span)
    span = span.replace("\\$", "$").replace("\\%", "%").replace("\\!", "").replace("\\,", "").replace("{,}", ",")
    if "=" in span:  # "3 + 4 = 7": the answer is the right-hand side
        span = span.rsplit("=", 1)[1]
    span = span.strip().rstrip(".;:!").strip()
    if "\\" in span or "^" in span or "{" in span:
        return span or None  # LaTeX: hand the whole expression to math-verify
    m = _NUMBER_RE.search(span)
    if m:
        return _clean_number(m.group(0))
    return span or None


def _last_math(text: str) -> str | None:
    """The fallback: the last number or LaTeX expression in the text, whichever comes last."""
    candidates = [(m.end(), _clean_number(m.group(0))) for m in _NUMBER_RE.finditer(text)]
    candidates += [(m.end(), _math_from_span(m.group(0))) for m in _LATEX_ENV.finditer(text)]
    candidates += [(m.end(), m.group(0)) for m in _BARE_FRACTION.finditer(text)]  # \frac{3}{4} outside $...$
    candidates = [c for c in candidates if c[1]]
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


_LETTER_SPAN = re.compile(r"^\(?([A-Za-z])\)?(?:[.):,]|\s|$)")
# "option B", "choice (c)": a bare lowercase letter after these words is too often a word ("answer a question").
_LETTER_WORD = re.compile(r"\b(?i:option|choice|answer|letter)\s*(?i:is\s*)?:?\s*(?:\(([A-Za-z])\)|([A-Z]))(?![\w'])")
_LETTER_PAREN = re.compile(r"\(([A-Za-z])\)")


def _letter(m: re.Match | None) -> str | None:
    return None if m is None else next(g for g in m.groups() if g is not None).upper()


def _is_word(span: str, m: re.Match) -> bool:
    """'A dog', 'I think': the one-letter words a/I, not an option letter."""
    return m.group(1).lower() in ("a", "i") and "(" not in m.group(0) and bool(re.match(r"\s+\w", span[m.end(1):]))


def _letters(choices: list[str] | None) -> str:
    return string.ascii_uppercase[: len(choices)] if choices else "ABCDE"


def _choice_from_span(span: str, choices: list[str] | None) -> str | None:
    """A letter from 'B', '(b)', 'B. Paris', 'option B', or the option's text."""
    span = span.strip().replace("**", "").strip("$ ")
    letters = _letters(choices)
    m = _LETTER_SPAN.match(span)
    if m and m.group(1).upper() in letters and not _is_word(span, m):
        return m.group(1).upper()
    letter = _letter(_LETTER_WORD.search(span))
    if letter is not None and letter in letters:
        return letter
    if choices:
        norm = normalize_text(span)
        for i, option in enumerate(choices):
            if normalize_text(str(option)) == norm:
                return letters[i]
        # the option's text inside a sentence ("it is a dog"): the longest option found wins,
        # so "13" is not read as "3"
        found = [(len(normalize_text(str(o))), i) for i, o in enumerate(choices)
                 if normalize_text(str(o)) and re.search(rf"(?<!\w){re.escape(normalize_text(str(o)))}(?!\w)", norm)]
        if found:
            return letters[max(found)[1]]
    return None


def _choice_fallback(text: str, choices: list[str] | None) -> str | None:
    letters = _letters(choices)
    hits = [m for m in [*_LETTER_WORD.finditer(text), *_LETTER_PAREN.finditer(text)] if (_letter(m) or "?") in letters]
    if hits:
        return _letter(max(hits, key=lambda m: m.end()))
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return _choice_from_span(lines[-1], choices) if lines else None


_BOOLEAN = {"yes": "yes", "true": "yes", "correct": "yes", "no": "no", "false": "no", "incorrect": "no"}


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation, articles and extra spaces: 'The Eiffel Tower.' -> 'eiffel tower'."""
    text = text.lower().replace("**", "").replace("'", "").replace("’", "")  # "don't" -> "dont"
    text = "".join(" " if ch in string.punctuation else ch for ch in text)
    words = [w for w in text.split() if w not in ("a", "an", "the")]
    return " ".join(words)


def _exact_from_span(span: str) -> str | None:
    norm = normalize_text(span)
    if not norm:
        return None
    first = norm.split()[0]
    return _BOOLEAN.get(first, norm)


def _exact_fallback(text: str) -> str | None:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    last = normalize_text(lines[-1])
    words = [w for w in last.split() if w in _BOOLEAN]
    if words and _BOOLEAN.get(last.split()[0]) is None:
        return _BOOLEAN[words[-1]]  # "So Paris is not in Spain, no." -> "no"
    return _exact_from_span(lines[-1])


def extract_answer(text: str, task: str = "math", choices: list[str] | None = None,
                   mode: str = "flexible") -> str | None:
    """The answer a model's output commits to, or None when it commits to nothing.

    mode: "strict" reads only an explicit final answer (`#### x`, `\\boxed{x}`, "the answer is x");
    "flexible" falls back to the last number / line when there is none.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}' (use one of: {', '.join(TASKS)})")
    if mode not in EXTRACTIONS:
        raise ValueError(f"unknown extraction mode '{mode}' (use one of: {', '.join(EXTRACTIONS)})")
    if not text or not text.strip():
        return None
    region = _answer_region(text)
    span = _explicit_span(region)
    if span is None and mode == "strict":
        return None
    if task == "math":
        return _math_from_span(span) if span is not None else _last_math(region)
    if task == "choice":
        return _choice_from_span(span, choices) if span is not None else _choice_fallback(region, choices)
    return _exact_from_span(span) if span is not None else _exact_fallback(region)


# --- verification -------------------------------------------------------------------

def _gold_choice(answer: str, choices: list[str] | None) -> str | None:
    """The gold answer as a letter: 'B', '(B)' or the option's own text."""
    letters = _letters(choices)
    a = answer.strip()
    m = re.fullmatch(r"\(?([A-Za-z])\)?\.?", a)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    if choices:
        for i, option in enumerate(choices):
            if normalize_text(str(option)) == normalize_text(a):
                return letters[i]
    return None


def _too_costly(expr: str) -> bool:
    """Expressions sympy could spend minutes on (power towers, 9999!); compared as strings instead."""
    return (len(expr) > 300 or expr.count("^") > 3 or "**" in expr
            or re.search(r"\^\s*\{?\s*[\d.]{4,}", expr) is not None  # 2^{10000}
            or re.search(r"\^\s*(?:\{[^{}]*|[\w.]+\s*)\^", expr) is not None  # towers: 9^{9^{9}}, 9^9^9
            or re.search(r"\d{3,}\s*!", expr) is not None)


def _as_latex(expr: str) -> str:
    """Wrap a bare LaTeX expression in $...$ so math-verify reads all of it (not just '2' of '2\\sqrt{2}')."""
    return f"${expr}$" if ("\\" in expr or "^" in expr or "{" in expr) and "$" not in expr else expr


def _timeout() -> int | None:
    # signal.alarm (math-verify's timeout) only works in the main thread.
    return 5 if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=65536)
def _parse(expr: str) -> tuple:
    from math_verify import parse

    return tuple(parse(_as_latex(expr), parsing_timeout=_timeout()))


@functools.lru_cache(maxsize=1)
def _quiet_math_verify() -> None:
    # math-verify logs a warning when timeouts are off (we handle that ourselves, see _too_costly).
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _plain_fraction(expr: str) -> Fraction | None:
    cleaned = _clean_number(expr)
    if not _PLAIN_NUMBER.match(cleaned):
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def math_equal(gold: str, predicted: str) -> bool:
    """Whether `predicted` equals the gold answer mathematically."""
    g, p = _plain_fraction(gold), _plain_fraction(predicted)
    if g is not None and p is not None:  # the common case, exact and fast: 1,250.00 == 1250
        return g == p
    if _too_costly(gold) or _too_costly(predicted):
        return normalize_text(gold) == normalize_text(predicted)
    from math_verify import verify

    _quiet_math_verify()
    gold_parsed, pred_parsed = _parse(_gold_math(gold)), _parse(predicted)
    if not gold_parsed or not pred_parsed:
        return gold.strip() == predicted.strip()
    return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=_timeout()))


@functools.lru_cache(maxsize=65536)
def _gold_math(answer: str) -> str:
    """A gold answer as written in the dataset, reduced to its expression (GSM8K's '#### 72' or MATH's boxed)."""
    span = _explicit_span(answer)
    return (_math_from_span(span) if span is not None else _math_from_span(answer)) or answer.strip()


def _answer_matches(predicted: str, answer: str, task: str, choices: list[str] | None) -> bool:
    if task == "math":
        return math_equal(answer, predicted)
    if task == "choice":
        gold = _gold_choice(answer, choices)
        if gold is None:
            return normalize_text(answer) == normalize_text(predicted)
        return predicted == gold
    return predicted == (_exact_from_span(answer) or "")


def score(output: str, answer: str, task: str = "math", choices: list[str] | None = None,
          mode: str = "flexible") -> Score:
    """Extract the answer from `output` and check it against `answer`; `mode` is one of VERIFY.

    strict / flexible: the extraction (see extract_answer). steps: strict, and then every arithmetic
    statement of the whole output must be true (undo_cli/steps.py): the whole text, because a kept
    rationale is trained on whole, rambling included.
    """
    if mode not in VERIFY:
        raise ValueError(f"unknown verification mode '{mode}' (use one of: {', '.join(VERIFY)})")
    predicted = extract_answer(output, task, choices, "strict" if mode == "steps" else mode)
    if predicted is None:
        return Score(None, False, "no_answer")
    if not _answer_matches(predicted, str(answer), task, choices):
        return Score(predicted, False, "wrong_answer")
    if mode == "steps":
        from undo_cli.steps import check_steps

        check = check_steps(output)
        if not check.ok:
            return Score(predicted, False, "false_step", check.first_false)
    return Score(predicted, True)


def verdict_fields(result: Score) -> dict[str, Any]:
    """What a record says about why it does (not) verify: `reject_reason` (null when it does), `step_error`."""
    return {"reject_reason": result.reason, **({"step_error": result.step_error} if result.step_error else {})}


def reject_reason(record: dict[str, Any]) -> str | None:
    """A scored record's reason, also for records written before `reject_reason` existed (no false_step then)."""
    if record.get("correct"):
        return None
    if record.get("reject_reason") in REASONS:
        return record["reject_reason"]
    return "no_answer" if record.get("predicted") is None else "wrong_answer"


def count_reasons(records) -> dict[str, int]:
    """Scored records that did not verify, by reason (scoring.REASONS, plus any other a stage records)."""
    counts = dict.fromkeys(REASONS, 0)
    for r in records:
        if "correct" in r and not r["correct"]:
            reason = reject_reason(r)
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def reasons_text(counts: dict[str, int]) -> str:
    """`count_reasons` for people: "no answer 1, wrong answer 2, false step 0"."""
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items())


def score_record(record: dict[str, Any], task: str | None = None, mode: str = "flexible") -> dict[str, Any]:
    """The record with `predicted`, `correct` and `reject_reason` (+ `step_error`) added
    (task: argument > record['task'] > 'math')."""
    task = task or record.get("task") or "math"
    text = record["output"] if "output" in record else record.get("rationale")  # a rationale file scores too
    result = score(text or "", str(record["answer"]), task, record.get("choices"), mode)
    kept = {k: v for k, v in record.items() if k != "step_error"}  # a re-score replaces an earlier verdict
    return {**kept, "predicted": result.predicted, "correct": result.correct, **verdict_fields(result)}


def score_both(output: str, answer: str, task: str = "math", choices: list[str] | None = None) -> dict[str, Score]:
    """{"strict": Score, "flexible": Score}: both extractions of one output (what `undo evaluate` reports)."""
    strict = score(output, answer, task, choices, "strict")
    if strict.predicted is not None:  # an explicit answer: flexible extraction reads the very same one
        return {"strict": strict, "flexible": strict}
    return {"strict": strict, "flexible": score(output, answer, task, choices, "flexible")}
