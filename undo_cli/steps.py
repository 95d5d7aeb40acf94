"""Step checking: is every arithmetic statement in a rationale true?

    python -c "from undo_cli.steps import check_steps; print(check_steps('6 * 4 = 24. Then 24 - 21 = 12.'))"
    StepCheck(ok=False, first_false='24 - 21 = 12', statements=2, skipped=0)

`undo generate/refine --verify steps` (and `undo score --verify steps`) keep a
rationale only when its final answer is right (strict) *and* `check_steps` finds
no false statement in it (`undo_cli/scoring.py` joins the two). A teacher that
learnt the answers by heart but not the steps writes `6 * 4 = 24 ... 24 - 21 =
12 ... #### 28`; strict verification keeps it, this check does not.

Nothing here evaluates text as code. A small tokenizer recognises numbers,
operators and parentheses; a recursive-descent parser builds values over those
tokens with exact `fractions.Fraction` arithmetic. There is no eval, no sympy.

What is a statement
-------------------
A run of arithmetic text on one line, with at least one `=` (or `≈`) and at least
one operator, whose sides all parse: `6 * 4 = 24`, `3 + 4 + 5 = 12`,
`(3 + 4) * 2 = 14`, `a + b = c + d = e`, `Total = 6 * 4 = 24` (the words before
the first number are not a side: the statement is `6 * 4 = 24`).

* numbers: `1250`, `1,250` (thousands groups of exactly three digits),
  `1,250.00`, `0.5`, `.5`; ASCII digits only, at most `MAX_DIGITS` digits.
* operators: `+ - − – * × · ⋅ ∗ / ÷ ∕`, LaTeX `\\times \\cdot \\div`, and `x`/`X`
  only between two numbers (`3 x 4`, `3x4`); implicit multiplication only
  when glued: `2(3 + 4)`, `(1 + 1)(2 + 2)`.
* LaTeX and markdown as real teachers write them: `\\frac{a}{b}` (`\\dfrac`,
  `\\tfrac`) is `(a)/(b)` when a and b are plain arithmetic; `$ … $`, `\\( … \\)`,
  `\\[ … \\]` and `**bold**` are transparent; `\\boxed{…}`, `\\text{…}` show their
  contents; `\\left( \\right)` are parentheses; `\\$ \\% \\approx` are `$ % ≈`;
  `1{,}000` and `1\\,000` are thousands groups.
* fractions are divisions (`3/4 = 0.75`); a percentage `p%` (or `p percent`)
  is p/100 inside an expression: `20% of 50 = 10`, `50 * 20% = 10`,
  `0.2 * 50 = 10`. A side that is a lone percentage may stand for p/100 or for
  p, so `20% = 0.2` and `50 / 200 * 100 = 25%` are both true.
* currency before a number (`$ € £ ¥ ₹`) and up to two unit words after it
  (`12 cm`, `4 boxes * 5 coins = 20 coins`) are labels, not values.

Rounding: a side written as a single number with d decimals is true when the
other side, computed exactly, rounds to it: |exact - written| <= half a unit in
its last decimal place (`1/3 = 0.33`, `2/3 = 0.67`, `10 / 4 = 2.5`; at a tie
either rounding is accepted). A whole number written for a value that is not
whole may also be rounded down or up when it is a quotient, as word problems count whole things:
`29 / 5 = 5` (full boxes) and `29 / 5 = 6` (boxes needed) are true, `29 / 5 = 4`
is not; a whole value must be written exactly (`24 - 21 = 4` is false). With
`≈` an integer's trailing zeros are not significant (`1000 / 3 ≈ 300`).

Chains: `a = b = c` is true when each `=` joins equal values. Models also write
a *running* chain, each link continuing from the previous result:
`6 * 4 = 24 - 21 = 3` means `6 * 4 = 24` then `24 - 21 = 3`. A link whose side
does not equal the previous side but *starts* with a number that does, followed
by an operator, is read that way (and the chain goes on from that side's value).
So `6 * 4 = 24 - 21 = 3` is true and `6 * 4 = 24 - 21 = 12` is false.

What is not a statement (conservative: a correct rationale must not be rejected
for text we cannot read with certainty; such runs are counted in `skipped` when
they contain `=`):

* no `=`, or no operator: `room 101`, `in 2024`, `4 = 7`, `x = 5`.
* dates, phone numbers, versions, times and ratios: `2024-05-01`, `5/1/2024`,
  `05-01-24`, `555-123-4567`, `1.2.3`, `3:45`, `3:4` (a dash or slash chain of
  another shape is arithmetic: `100-50-30-15 = 5`); ordinals and compounds: `3rd`,
  `2-step`, `3-year-old`; numbers inside words: `R2-D2`, `COVID-19`, `A4`.
* list markers: `Step 3:`, `1.`, `1)`, a leading `- ` or `* ` bullet; a lone number
  after a word as the first side (`Step 3 = ...`, `room 101 = ...`: maybe a label).
* anything with a sign we do not model: powers and roots (`^ ** ² √`), factorials,
  comparisons (`< > ≤ ≥ ≠ ==`), `±`, other braces and LaTeX (`\\sqrt{9}`,
  `\\frac{x}{2}`, a fraction inside a fraction),
  letters used as variables (`2x + 3 = 7`, `n = 5`), scientific notation,
  non-ASCII digits, a decimal comma (`12,5`), multiplier words (`2 dozen`, `3 million`).
* mixed units of one kind in one statement (`2 hours + 30 minutes = 150 minutes`,
  `$1 + 50 cents`): a conversion is implied that we do not perform.
* a percentage added to or subtracted from a plain number (`50 + 10% = 55`):
  "10% of what" is ambiguous. Division by zero.
* a first side preceded by a connecting word (`the sum of 3 and 4 = 7`,
  `half of 10 + 2 = 7`): the words may be part of the left side.

Limits: only the first `MAX_CHARS` characters are read; at most `MAX_STATEMENTS`
statements are checked; a side with more than `MAX_SIDE_TOKENS` tokens, more than
`MAX_DEPTH` nested parentheses or a number over `MAX_DIGITS` digits is skipped.
Every operand is therefore short and the work is linear in the text: a hostile
string cannot make the check slow or large. Numbers written in words ("three")
are not read. Text may still contain a false claim this module cannot see.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["StepCheck", "Statement", "check_steps", "find_statements"]

MAX_CHARS = 100_000       # of a text; the rest is not read
MAX_STATEMENTS = 1_000    # checked per text
MAX_DIGITS = 40           # per number
MAX_SIDE_TOKENS = 200     # per side of an `=`
MAX_DEPTH = 20            # nested parentheses (and unary signs) per side
MAX_SIDES = 50            # sides per chain run


@dataclass(frozen=True)
class StepCheck:
    """The verdict on one text: `ok` unless some statement is false (no statement at all is ok)."""

    ok: bool
    first_false: str | None   # the first false statement, as written (at most 200 characters)
    statements: int           # arithmetic statements checked
    skipped: int = 0          # runs with `=` that were ambiguous and not checked (module docstring)


@dataclass(frozen=True)
class Statement:
    text: str    # as written
    true: bool


# --- tokens -----------------------------------------------------------------------------

NUM, OP, LP, RP, EQ, PCT, CUR, WORD, POISON, BREAK, MARKUP, UNIT = (
    "num", "op", "lp", "rp", "eq", "pct", "cur", "word", "poison", "break", "markup", "unit")

_PATTERNS = [
    ("bullet", r"^[ \t]*(?:[-*+•]|[0-9]{1,3}[.)])[ \t]+"),  # list markers: "- ", "* ", "1. ", "2) "
    ("nl", r"\n"),
    ("ws", r"[^\S\n]+"),
    # LaTeX as teachers write it: \frac{a}{b} is (a)/(b) when a and b are plain arithmetic; \boxed{..} and
    # \text{..} show their contents; \left( \right) are parentheses; \$ \% \approx are $ % ≈.
    ("frac", r"\\[dt]?frac[ \t]*\{(?P<numer>[^{}\n]*)\}[ \t]*\{(?P<denom>[^{}\n]*)\}"),
    ("wrap", r"\\(?:boxed|text|textbf|textrm|mathrm|mathbf|mbox)[ \t]*\{(?P<inner>[^{}\n]*)\}"),
    ("sizing", r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?=[()])"),
    ("latexcur", r"\\\$(?= ?(?:[0-9]|\.[0-9]))"),
    ("latexpct", r"\\%"),
    ("latexeq", r"\\approx(?![A-Za-z])"),
    ("latexop", r"\\(?:times|cdot|div)(?![A-Za-z])"),
    ("latex", r"\\[A-Za-z]+|\\."),
    # dates, phone numbers, versions, times, ratios: never arithmetic
    # (a dash or slash chain that is not shaped like a date or a phone number is arithmetic: 100-50-30-15)
    ("id", r"(?<![-/0-9])(?:[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}|[0-9]{1,2}[-/][0-9]{1,2}[-/][0-9]{2,4}|[0-9]{3}-[0-9]{3}-[0-9]{4}"
           r"|[0-9]{4}/[0-9]{1,2}/[0-9]{1,2})(?:[-/][0-9]+)*|[0-9]+(?:\.[0-9]+){2,}|[0-9]+(?::[0-9]+)+"),
    ("ordinal", r"[0-9]+(?:st|nd|rd|th)(?![^\W_])"),
    ("compound", r"[0-9]+(?:\.[0-9]+)?-[^\W\d_][^\W_]*(?:-[^\W_]+)*"),   # 2-step, 3-year-old
    # thousands groups: 1,250 and LaTeX's 1{,}250 and 1\,250
    ("num", r"[0-9]{1,3}(?:(?:,|\{,\}|\\,)[0-9]{3})+(?![0-9])(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]+)?|\.[0-9]+"),
    ("badcomma", r"(?<=[0-9]),(?=[0-9])"),  # a decimal comma (12,5) or a list (1,2,3): ambiguous
    ("xop", r"(?<=[0-9)%])[xX](?=[0-9(])|(?<=[0-9)%] )[xX](?= [0-9(($€£¥₹])"),
    ("word", r"[^\W\d_][^\W_]*(?:['’][^\W\d_]+)*(?:-[^\W_]+)*"),
    ("eq", r"==|!=|:=|=>|~=|=|≈|≃|≅|≠"),
    ("markup", r"\*\*|__|`"),
    ("op", r"[-+*/×÷−–·⋅∗∕]"),
    ("lp", r"\("),
    ("rp", r"\)"),
    ("pct", r"%"),
    # a currency sign before a number ("$" elsewhere is LaTeX math: "$6 + 3 = 9$." closes after a digit)
    ("cur", r"(?<![0-9])[$€£¥₹](?= ?(?:[0-9]|\.[0-9]))"),
    ("bang", r"(?<=[0-9)])!"),
    ("other", r"."),
]
_TOKEN = re.compile("|".join(f"(?P<{name}>{p})" for name, p in _PATTERNS), re.MULTILINE | re.DOTALL)

_OPS = {"+": "+", "-": "-", "−": "-", "–": "-", "*": "*", "×": "*", "·": "*", "⋅": "*", "∗": "*",
        "x": "*", "X": "*", "/": "/", "÷": "/", "∕": "/", "\\times": "*", "\\cdot": "*", "\\div": "/"}
_POISON_CHARS = set("^²³¹√∛∜π∞{}<>≤≥±∓|—")

# Words that, right before a number, may make it part of a worded left side ("the sum of 3 and 4 = 7").
_CONNECTIVES = frozenset("""and or plus minus times of by from to over than with into between less more half twice
    double triple thrice quarter third product sum difference quotient divided multiplied subtract subtracted add
    added multiply divide per x""".split())
# A number followed by these is scaled, not labelled: "2 dozen = 24" is true, "2 = 24" is not.
_MULTIPLIERS = frozenset("""dozen dozens hundred hundreds thousand thousands million millions billion billions
    trillion trillions score gross pair pairs couple half halves third thirds quarter quarters fourth fourths
    fifth fifths tenth tenths k bn mn""".split())
# Units that convert into one another: two of one family in a statement imply a conversion we do not do.
_FAMILIES = {
    "time": "second seconds sec secs minute minutes min mins hour hours hr hrs day days week weeks month months "
            "year years yr yrs",
    "length": "mm cm meter meters metre metres km inch inches foot feet ft yard yards yd mile miles mi",
    "mass": "mg gram grams kg kilogram kilograms pound lb lbs ounce ounces oz ton tons tonne tonnes",
    "volume": "ml milliliter milliliters liter liters litre litres gallon gallons quart quarts pint pints cup cups",
    "money": "dollar dollars cent cents penny pennies nickel nickels dime dimes euro euros $ € ¢",
    "temperature": "celsius fahrenheit kelvin",
}
_CANONICAL = {"$": "dollar", "€": "euro", "¢": "cent", "pennies": "penny", "feet": "foot", "sec": "second",
              "min": "minute", "hr": "hour", "yr": "year", "lb": "pound", "lbs": "pound"}
_FAMILY_OF = {u: fam for fam, units in _FAMILIES.items() for u in units.split()}


@dataclass
class _Tok:
    kind: str
    text: str
    start: int
    end: int


def _tokens(text: str, start: int = 0, end: int | None = None) -> list[_Tok]:
    """The significant tokens of text[start:end] (whitespace dropped), each classified (module docstring)."""
    out: list[_Tok] = []
    for m in _TOKEN.finditer(text, start, len(text) if end is None else end):
        name, s, e = m.lastgroup, m.start(), m.end()
        t = m.group()
        if name in ("ws", "sizing"):
            continue
        if name == "frac":
            out.extend(_fraction(text, m))
            continue
        if name == "wrap":  # \boxed{42}, \text{ apples}: their contents, in place
            inner = _tokens(text, m.start("inner"), m.end("inner"))
            if inner and not text[inner[-1].end:m.end("inner")].strip():
                inner[-1].end = e  # a statement quoted up to its last token ends with the closing brace
            out.extend(inner)
            continue
        if name in ("latexcur", "latexpct", "latexeq"):
            kind, shown = {"latexcur": (CUR, "$"), "latexpct": (PCT, "%"), "latexeq": (EQ, "≈")}[name]
            out.append(_Tok(kind, shown, s, e))
            continue
        if name in ("nl", "bullet"):
            kind = BREAK
        elif name in ("id", "ordinal", "compound"):
            kind = WORD
        elif name == "num":
            kind = NUM if sum(c.isdigit() for c in t) <= MAX_DIGITS else POISON
        elif name in ("xop", "latexop", "op"):
            kind = OP
        elif name in ("latex", "badcomma", "bang"):
            kind = POISON if t not in ("\\(", "\\)", "\\[", "\\]", "\\,", "\\ ") else BREAK
        elif name == "eq":
            kind = EQ if t in ("=", "≈", "≃", "≅") else POISON
        elif name == "word":
            kind = WORD
        elif name in ("lp", "rp", "pct", "cur", "markup"):
            kind = name
        elif t in _POISON_CHARS or unicodedata.category(t)[0] == "N" or unicodedata.category(t) == "Sm":
            kind = POISON  # a sign we do not model, or a digit that is not ASCII
        else:
            kind = BREAK
        out.append(_Tok(kind, t, s, e))
    return out


_FRACTION_PARTS = frozenset({"num", "op", "lp", "rp", "pct", "cur", "markup"})  # kinds a \frac's a and b may hold
_GROUPING = re.compile(r"\{,\}|\\,|,")  # thousands separators inside a number token


def _fraction(text: str, m: re.Match) -> list[_Tok]:
    """\frac{a}{b} as the tokens of (a)/(b), positioned in the text; one POISON token unless a and b are both
    plain arithmetic (numbers, operators, parentheses): \frac{x}{2} or a nested fraction is not read."""
    numer = _tokens(text, m.start("numer"), m.end("numer"))
    denom = _tokens(text, m.start("denom"), m.end("denom"))
    if not numer or not denom or any(t.kind not in _FRACTION_PARTS for t in numer + denom):
        return [_Tok(POISON, m.group(), m.start(), m.end())]
    a0, a1, b0, b1 = m.start("numer"), m.end("numer"), m.start("denom"), m.end("denom")
    return [_Tok(LP, "(", m.start(), a0), *numer, _Tok(RP, ")", a1, a1 + 1), _Tok(OP, "/", a1, b0),
            _Tok(LP, "(", b0 - 1, b0), *denom, _Tok(RP, ")", b1, m.end())]


# --- runs: maximal stretches of arithmetic on one line -----------------------------------

@dataclass
class _Run:
    toks: list[_Tok]
    before: _Tok | None  # the significant token just before the run (None at the start of the text)
    joined: bool         # `before` is one word right after an earlier statement ("... = 7 and 7 * 2 = 14")


def _runs(toks: list[_Tok]) -> list[_Run]:
    """Split the tokens into runs of arithmetic; words join a run only as units ("5 coins * 4")."""
    runs: list[_Run] = []
    cur: list[_Tok] = []
    before: _Tok | None = None
    after_eq, words = False, 0  # since the last run: did it have an `=`, and how many words followed

    def flush(at: _Tok | None) -> None:
        nonlocal cur, before, after_eq, words
        if any(t.kind == EQ for t in cur):
            # One word right after a statement joins two statements ("= 7 and 7 * 2 = 14"); after plain
            # numbers it may belong to a worded left side ("the sum of 3 and 4 = 7").
            runs.append(_Run(cur, before, after_eq and words <= 1))
        if cur:
            after_eq, words = any(t.kind == EQ for t in cur), 0
        words += at is not None and at.kind == WORD
        cur, before = [], at

    i, n = 0, len(toks)
    while i < n:
        t = toks[i]
        prev = cur[-1] if cur else None
        if t.kind == WORD and prev is not None and prev.kind == NUM and t.text.lower() == "percent":
            cur.append(_Tok(PCT, t.text, t.start, t.end))
        elif (t.kind == WORD and t.text.lower() == "of" and prev is not None and prev.kind == PCT
              and i + 1 < n and toks[i + 1].kind in (NUM, CUR, LP)):
            cur.append(_Tok(OP, "of", t.start, t.end))
        elif t.kind == WORD and prev is not None and prev.kind in (NUM, PCT):
            j = i
            while j < n and j - i < 2 and toks[j].kind == WORD:
                j += 1
            if j < n and toks[j].kind in (OP, EQ, RP):  # a unit inside an expression: "4 boxes * 5"
                cur.extend(_unit(w) for w in toks[i:j])
                i = j
                continue
            flush(t)
        elif t.kind == MARKUP:
            pass  # **bold**, `code`: transparent (but "2**3" leaves two numbers side by side: no parse)
        elif t.kind in (WORD, BREAK):
            flush(t)
        else:
            cur.append(t)
        i += 1
    flush(None)
    return runs


def _unit(w: _Tok) -> _Tok:
    word = w.text.lower()
    # A single letter (x, n, m), a multiplier (dozen) or letters with digits (e5) is not a label.
    if len(word) < 2 or word in _MULTIPLIERS or not word.isalpha():
        return _Tok(POISON, w.text, w.start, w.end)
    return _Tok(UNIT, w.text, w.start, w.end)


def _mixed_units(toks: list[_Tok]) -> bool:
    seen: dict[str, set[str]] = {}
    for t in toks:
        if t.kind in (UNIT, CUR):
            name = _CANONICAL.get(t.text.lower(), t.text.lower())
            for singular in (name[:-2], name[:-1]) if name.endswith("s") else ():
                if singular in _FAMILY_OF:
                    name = _CANONICAL.get(singular, singular)
                    break
            if name in _FAMILY_OF:
                seen.setdefault(_FAMILY_OF[name], set()).add(name)
    return any(len(units) > 1 for units in seen.values())


# --- values --------------------------------------------------------------------------------

class _Ambiguous(Exception):
    """The run can be read more than one way (or not at all safely): not a statement."""


@dataclass(frozen=True)
class _Lit:
    value: Fraction   # as used in arithmetic (a percentage already divided by 100)
    written: Fraction  # the number as written (p for p%)
    decimals: int
    trailing_zeros: int
    pct: bool


@dataclass(frozen=True)
class _Side:
    value: Fraction
    ops: int                 # binary operators in it
    literal: _Lit | None     # the side is one number (with its currency/unit/percent)
    lead: _Lit | None        # the side is `number op ...`: the number (for running chains)
    quotient: bool           # its last top-level operation is a division: `29 / 5` (whole-number rounding)
    start: int
    end: int


def _literal(tok: _Tok, pct: bool) -> _Lit:
    digits = _GROUPING.sub("", tok.text)
    decimals = len(digits.split(".", 1)[1]) if "." in digits else 0
    whole = digits.split(".", 1)[0].lstrip("0")
    zeros = len(whole) - len(whole.rstrip("0")) if whole and not decimals else 0
    written = Fraction(digits)
    return _Lit(written / 100 if pct else written, written, decimals, zeros, pct)


def _top_level_quotient(toks: list[_Tok]) -> bool:
    """Is the side a quotient at its top level (`29 / 5`, `7 * 2 / 4`), not a sum with one (`3 + 7 / 2`)?"""
    depth, last = 0, None
    for t in toks:
        depth += {LP: 1, RP: -1}.get(t.kind, 0)
        if depth == 0 and t.kind == OP and t.text != "of":
            if _OPS.get(t.text) in ("+", "-") and last is not None:  # a binary +/- (a leading sign is not)
                return False
            last = _OPS.get(t.text)
        elif depth == 0 and t.kind in (NUM, RP):
            last = last or "value"
    return last == "/"


class _Parser:
    """Recursive descent over one side's tokens: expr := term (+|- term)*, term := unary (*|/|of unary)*."""

    def __init__(self, toks: list[_Tok]):
        self.toks, self.i, self.depth, self.ops = toks, 0, 0, 0

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def side(self) -> _Side | None:
        if not self.toks or len(self.toks) > MAX_SIDE_TOKENS:
            return None
        try:
            value, is_pct, lit = self.expr()
        except _NoParse:
            return None
        if self.i != len(self.toks):
            return None
        lead = None
        first = self.toks[0] if self.toks[0].kind == NUM else (
            self.toks[1] if len(self.toks) > 1 and self.toks[0].kind == CUR and self.toks[1].kind == NUM else None)
        if lit is None and first is not None and self.ops:
            after = self.toks[self.toks.index(first) + 1:]
            after = [t for t in after if t.kind != UNIT]
            if after and after[0].kind == OP:
                lead = _literal(first, False)
        return _Side(value, self.ops, lit, lead, _top_level_quotient(self.toks), self.toks[0].start, self.toks[-1].end)

    def expr(self):
        value, is_pct, lit = self.term()
        while (t := self.peek()) is not None and t.kind == OP and _OPS.get(t.text) in ("+", "-"):
            self.i += 1
            self.ops += 1
            right, right_pct, _ = self.term()
            if is_pct != right_pct:  # 50 + 10%: of what?
                raise _Ambiguous
            value = value + right if _OPS[t.text] == "+" else value - right
            lit = None
        return value, is_pct, lit

    def term(self):
        value, is_pct, lit = self.unary()
        while (t := self.peek()) is not None and (
                (t.kind == OP and (t.text == "of" or _OPS.get(t.text) in ("*", "/"))) or self._implicit(t)):
            op = "*" if t.kind == LP else ("of" if t.text == "of" else _OPS[t.text])
            if t.kind != LP:
                self.i += 1
            if op == "of" and not is_pct:
                raise _NoParse
            self.ops += 1
            right, _, _ = self.unary()
            if op == "/":
                if right == 0:
                    raise _Ambiguous  # division by zero: not a statement we can judge
                value = value / right
            else:
                value = value * right
            is_pct, lit = False, None
        return value, is_pct, lit

    def _implicit(self, t: _Tok) -> bool:
        """2(3 + 4) and (1 + 1)(2 + 2): a '(' glued to a number or a ')' multiplies."""
        prev = self.toks[self.i - 1] if self.i else None
        return t.kind == LP and prev is not None and prev.kind in (NUM, RP) and prev.end == t.start

    def unary(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Ambiguous
        try:
            t = self.peek()
            if t is not None and t.kind == OP and _OPS.get(t.text) in ("+", "-"):
                self.i += 1
                value, is_pct, lit = self.unary()
                if _OPS[t.text] == "+":
                    return value, is_pct, lit
                neg = None if lit is None else _Lit(-lit.value, -lit.written, lit.decimals, lit.trailing_zeros, lit.pct)
                return -value, is_pct, neg
            return self.atom()
        finally:
            self.depth -= 1

    def atom(self):
        t = self.peek()
        if t is None:
            raise _NoParse
        if t.kind == LP:
            self.i += 1
            value, is_pct, _ = self.expr()
            if (close := self.peek()) is None or close.kind != RP:
                raise _NoParse
            self.i += 1
            self._units()
            return value, is_pct, None
        if t.kind == CUR:
            self.i += 1
            t = self.peek()
            if t is None or t.kind != NUM:
                raise _NoParse
        if t.kind != NUM:
            raise _NoParse
        self.i += 1
        pct = (p := self.peek()) is not None and p.kind == PCT
        if pct:
            self.i += 1
        self._units()
        lit = _literal(t, pct)
        return lit.value, pct, lit

    def _units(self) -> None:
        while (t := self.peek()) is not None and t.kind == UNIT:
            self.i += 1


class _NoParse(Exception):
    pass


# --- checking ----------------------------------------------------------------------------

def _tolerance(lit: _Lit, approx: bool) -> Fraction:
    """Half a unit in the last written place; with ≈ an integer's trailing zeros are not significant."""
    if approx and not lit.decimals:
        return Fraction(10 ** lit.trailing_zeros, 2)
    if not lit.decimals:  # a whole number is exact: `2.6 + 1 = 4` is false (a quotient may round: _whole_part)
        return Fraction(0)
    return Fraction(1, 2 * 10 ** lit.decimals)


_Reading = tuple[Fraction, Fraction, bool, bool]  # (value, tolerance, a whole number as written, a quotient)


def _lit_readings(lit: _Lit, approx: bool) -> list[_Reading]:
    """What a written number may stand for: a lone percentage is p/100 or p."""
    tol = _tolerance(lit, approx)
    if lit.pct:
        return [(lit.value, tol / 100, False, False), (lit.written, tol, False, False)]
    return [(lit.value, tol, not lit.decimals, False)]


def _readings(side: _Side, approx: bool) -> list[_Reading]:
    return _lit_readings(side.literal, approx) if side.literal is not None else [(side.value, Fraction(0), False, side.quotient)]


def _whole_part(whole: Fraction, value: Fraction) -> bool:
    """A whole number written for a quotient that is not whole, rounded down or up: 29 / 5 = 5 (full boxes) or 6."""
    return value.denominator != 1 and math.floor(value) <= whole <= math.ceil(value)


def _equal(a: list[_Reading], b: list[_Reading]) -> bool:
    return any(abs(x - y) <= max(tx, ty) or (wx and qy and _whole_part(x, y)) or (wy and qx and _whole_part(y, x))
               for x, tx, wx, qx in a for y, ty, wy, qy in b)


def _chain_true(sides: list[_Side], approx: list[bool]) -> bool:
    """Each link equal, or a running chain: `6 * 4 = 24 - 21 = 3` (module docstring)."""
    for k in range(1, len(sides)):
        prev, side, rough = sides[k - 1], sides[k], approx[k - 1]
        if _equal(_readings(prev, rough), _readings(side, rough)):
            continue
        lead = side.lead
        if lead is not None and _equal(_readings(prev, rough), _lit_readings(lead, rough)):
            continue
        return False
    return True


def _trim_parens(toks: list[_Tok], first: bool) -> list[_Tok]:
    """A first side starts after its last unmatched '(' and a last side ends before its first unmatched ')':
    "(3 + 4 = 7)" is the statement 3 + 4 = 7."""
    if first:
        depth, cut = 0, 0
        for k in range(len(toks) - 1, -1, -1):
            depth += {RP: 1, LP: -1}.get(toks[k].kind, 0)
            if depth < 0:
                cut = k + 1
                break
        return toks[cut:]
    depth = 0
    for k, t in enumerate(toks):
        depth += {LP: 1, RP: -1}.get(t.kind, 0)
        if depth < 0:
            return toks[:k]
    return toks


def _statements_in(run: _Run, text: str) -> list[Statement] | None:
    """The statements of one run; None when the run is ambiguous (module docstring)."""
    toks = run.toks
    if any(t.kind == POISON for t in toks) or _mixed_units(toks):
        return None
    parts: list[list[_Tok]] = [[]]
    approx: list[bool] = []
    for t in toks:
        if t.kind == EQ:
            parts.append([])
            approx.append(t.text != "=")
        else:
            parts[-1].append(t)
    if len(parts) > MAX_SIDES:
        return None
    parts[0] = _trim_parens(parts[0], first=True)
    parts[-1] = _trim_parens(parts[-1], first=False)
    # Prose after the result: "... = 5 - that's it", "... = 8 (apples)" end the last side at the number.
    while parts[-1] and (parts[-1][-1].kind == LP or (parts[-1][-1].kind == OP and _OPS.get(parts[-1][-1].text) == "-")):
        parts[-1] = parts[-1][:-1]
    try:
        sides = [_Parser(p).side() for p in parts]
    except _Ambiguous:
        return None
    before = run.before
    if sides[0] is not None and before is not None and before.kind == WORD and (
            (before.text.lower() in _CONNECTIVES and not run.joined) or parts[0][0].kind == OP):
        sides[0] = None  # "the sum of 3 and 4 = 7", "apples - 3 = ...": the left side is partly words
    if sides[0] is not None and sides[0].literal is not None and before is not None and before.kind == WORD:
        sides[0] = None  # "Step 3 = ...", "room 101 = ...": a lone number after a word may be a label
    found: list[Statement] = []
    chain: list[int] = []
    for k in range(len(sides) + 1):
        if k < len(sides) and sides[k] is not None:
            chain.append(k)
            continue
        if len(chain) >= 2 and sum(sides[c].ops for c in chain):
            chosen = [sides[c] for c in chain]
            links = [approx[c] for c in chain[:-1]]
            found.append(Statement(text[chosen[0].start: chosen[-1].end], _chain_true(chosen, links)))
        chain = []
    return found


def find_statements(text: str) -> tuple[list[Statement], int]:
    """(every arithmetic statement of `text`, in order; the number of ambiguous runs skipped)."""
    text = (text or "")[:MAX_CHARS]
    found: list[Statement] = []
    skipped = 0
    for start, end in _lines_with_equals(text):  # a statement never spans lines: read only those with an `=`
        for run in _runs(_tokens(text, start, end)):
            statements = _statements_in(run, text)
            if statements is None:
                skipped += 1
                continue
            found.extend(statements)
            if len(found) >= MAX_STATEMENTS:
                return found[:MAX_STATEMENTS], skipped
    return found, skipped


_EQUALS = re.compile(r"[=≈≃≅]|\\approx")


def _lines_with_equals(text: str):
    """(start, end) of every line of `text` holding an equals sign."""
    pos = 0
    for m in _EQUALS.finditer(text):
        if m.start() < pos:
            continue
        start = text.rfind("\n", 0, m.start()) + 1
        end = text.find("\n", m.start())
        end = len(text) if end < 0 else end
        yield start, end
        pos = end


def check_steps(text: str) -> StepCheck:
    """Whether every arithmetic statement in `text` is true; the first false one as written."""
    statements, skipped = find_statements(text)
    first = next((s.text for s in statements if not s.true), None)
    if first is not None and len(first) > 200:
        first = first[:197] + "..."
    return StepCheck(ok=first is None, first_false=first, statements=len(statements), skipped=skipped)
