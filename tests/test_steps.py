"""The step checker (undo_cli/steps.py): true chains, false steps, rounding, units, and text that is not arithmetic.

Every case is written by hand, plus one seeded random cross-check against values
computed here with Fraction from the numbers themselves (never from the text).
"""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from undo_cli import steps
from undo_cli.steps import StepCheck, check_steps, find_statements

ISSUE_EXAMPLE = ("6 bags with 4 cookies each make 6 * 4 = 24 cookies. After giving away 21, 24 - 21 = 12 cookies "
                 "are left. #### 28")

# (text, number of statements) — every statement true
TRUE = [
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72", 2),
    ("He has 3 + 4 + 5 = 12 apples.", 1),
    ("(3 + 4) * 2 = 14", 1),
    ("2(3 + 4) = 14 and (1 + 1)(2 + 2) = 8", 2),
    ("3 + 4 = 7 = 7 + 0", 1),                      # a chain where each = joins equal values
    ("a + b = c + d = e: 2 + 3 = 1 + 4 = 5", 1),
    ("6 * 4 = 24 - 21 = 3", 1),                    # a running chain: 6 * 4 = 24, then 24 - 21 = 3
    ("6 * 4 = 24 * 2 = 48 + 2 = 50", 1),
    ("Total cookies = 6 * 4 = 24.", 1),            # the words before the first number are not a side
    ("She needs 100-50-30-15 = 5 more.", 1),       # a dash chain that is no date
    ("1/3 = 0.33", 1),                             # rounding to the decimals written
    ("2/3 = 0.67", 1),
    ("10 / 4 = 2.5 and 7 / 2 = 3", 2),             # a tie rounds either way
    ("29 / 5 = 5 remainder 4", 1),                 # whole things: a quotient rounded down ...
    ("So 29 / 5 = 6 boxes are needed.", 1),        # ... or up
    ("5 + 3 = 8 (apples)", 1),                     # a parenthesis after the result is prose
    ("1000 / 3 ≈ 300", 1),                          # with ≈ an integer's trailing zeros are not significant
    ("The total is $1,250.00 + $250 = $1,500.00.", 1),
    ("12 cm + 3 cm = 15 cm", 1),
    ("4 boxes * 5 coins = 20 coins", 1),
    ("She earned 0.2 x 50 = $10.", 1),
    ("3 x 4 = 12 apples, 3x4=12 and 3 X 4 = 12", 3),
    ("20% of 50 = 10", 1),
    ("20 percent of 50 = 10", 1),
    ("50 * 20% = 10 and 0.2 * 50 = 10", 2),
    ("50 / 200 * 100 = 25% and 50 / 200 = 25%", 2),  # a lone percentage stands for p/100 or p
    ("100% - 20% = 80%", 1),
    ("3 × 4 = 12, 12 ÷ 4 = 3, 7 − 9 = −2, 3 · 4 = 12, 3 ⋅ 4 = 12, 8 ∕ 2 = 4", 6),  # non-ASCII operators
    ("1 - 4/3 = -0.33", 1),
    ("$3 \\times 4 = 12$ and $12 \\div 4 = 3$", 2),
    ("6 * 4 = **24** cookies", 1),                 # markdown bold is transparent
    ("(3 + 4 = 7)", 1),
    ("- 6 * 4 = 24\n- 24 - 21 = 3", 2),            # list bullets are not minus signs
    ("24 - 21 = 3 - that's all", 1),               # a prose dash after the result
    ("Step 1: 6 * 4 = 24 legs.\nStep 2: 24 + 2 = 26.\n#### 26", 2),
    ("1,250 + 250 = 1,500", 1),
    ("3 + 4 = 7 and 7 * 2 = 14", 2),               # "and" after a statement joins two statements
    # LaTeX and markdown as real teachers write them (Qwen2.5-Coder: "\\[ 6 \\times 7 = 42 \\]")
    ("$\\frac{18}{3} = 6$, and $6 + 3 = 9$. **Answer: 9**", 2),
    ("\\[ 6 \\times 7 = 42 \\]", 1),
    ("\\( 14 + 7 = 21 \\) pencils", 1),
    ("\\[\n\\frac{18}{3} = 6\n\\]", 1),
    ("$12 \\div 4 = 3$ and $3 \\cdot 4 = 12$", 2),
    ("\\dfrac{3}{4} = 0.75 and \\tfrac{1}{2} + \\frac{1}{4} = 0.75", 2),
    ("\\frac{18 + 6}{3} = 8", 1),
    ("1{,}000 + 250 = 1{,}250 and 1\\,000 - 1 = 999", 2),
    ("\\$5 + \\$3 = \\$8", 1),
    ("50 \\times 20\\% = 10", 1),
    ("1000 / 3 \\approx 333.3", 1),
    ("\\left(3 + 4\\right) \\times 2 = 14", 1),
    ("6 \\times 4 = \\boxed{24}", 1),
    ("14 \\text{ pencils} + 7 \\text{ pencils} = 21 \\text{ pencils}", 1),
    ("\\text{Total} = 6 \\times 4 = 24", 1),
    ("**14 + 7 = 21** pencils, so she has **21**.", 1),
]

# (text, the first false statement as written)
FALSE = [
    (ISSUE_EXAMPLE, "24 - 21 = 12"),
    ("6 * 4 = 24 - 21 = 12", "6 * 4 = 24 - 21 = 12"),
    ("5 + 3 = 9 + 1 = 10", "5 + 3 = 9 + 1 = 10"),  # the running reading needs 9 = 5 + 3
    ("2 + 2 = 4. 4 * 3 = 13. 13 - 1 = 12", "4 * 3 = 13"),
    ("2/3 = 0.66", "2/3 = 0.66"),                  # 0.666... rounds to 0.67
    ("1000 / 3 = 300", "1000 / 3 = 300"),          # with = an integer is exact to the unit
    ("3 * 4 = 12.5", "3 * 4 = 12.5"),
    ("29 / 5 = 4", "29 / 5 = 4"),                  # neither rounded down nor up
    ("2.5 + 1 = 3", "2.5 + 1 = 3"),                # a whole number is exact unless the side is a quotient
    ("2.6 + 1 = 4", "2.6 + 1 = 4"),
    ("3 + 7 / 2 = 6", "3 + 7 / 2 = 6"),            # a sum with a quotient in it is not a quotient
    ("24 - 21 = 4", "24 - 21 = 4"),                # a whole value is written exactly
    ("7 / 2 = 3.4", "7 / 2 = 3.4"),
    ("The total is $1,250.00 + $250 = $1,400.00.", "$1,250.00 + $250 = $1,400.00"),
    ("3 x 4 = 13 apples", "3 x 4 = 13"),
    ("20% of 50 = 12", "20% of 50 = 12"),
    ("50 * 20% = 1000", "50 * 20% = 1000"),
    ("3 × 4 = 12 and 12 ÷ 4 = 4", "12 ÷ 4 = 4"),
    ("7 − 9 = 2", "7 − 9 = 2"),
    ("10 - 3 = 7 and 7 * 2 = 15", "7 * 2 = 15"),
    ("2(3 + 4) = 10", "2(3 + 4) = 10"),
    ("She has 3 + 4 = 8 now", "3 + 4 = 8"),
    ("He met COVID-19 = 3 + 4 = 8 people", "3 + 4 = 8"),  # a name with a number is a word, not a side
    # LaTeX: the issue's example, whose first step is false (18 / 3 is 6), then false steps in each notation
    ("$\\frac{18}{3} = 9$, and $9 + 3 = 12$. **Answer: 12**", "\\frac{18}{3} = 9"),
    ("\\frac{1}{3} + 1 = 5", "\\frac{1}{3} + 1 = 5"),
    ("\\[ 6 \\times 7 = 43 \\]", "6 \\times 7 = 43"),
    ("\\( 14 + 7 = 22 \\)", "14 + 7 = 22"),
    ("$12 \\div 4 = 4$", "$12 \\div 4 = 4"),          # "$" before a digit reads as currency: a label
    ("\\dfrac{3}{4} = 0.25", "\\dfrac{3}{4} = 0.25"),
    ("1{,}000 + 250 = 1{,}260", "1{,}000 + 250 = 1{,}260"),
    ("\\$5 + \\$3 = \\$9", "\\$5 + \\$3 = \\$9"),
    ("6 \\times 4 = \\boxed{25}", "6 \\times 4 = \\boxed{25}"),
    ("**14 + 7 = 22**", "14 + 7 = 22"),
]

# Text with numbers that is not an arithmetic statement, or that is too ambiguous to judge: never rejected.
NOT_STATEMENTS = [
    "On 2024-05-01 she had 12 apples.",
    "2024-05-01 = 3", "5/1/2024 = 2", "05-01-24 = 7", "Call 555-123-4567 = 1",
    "This is a 2-step problem: 2-step = 5 - 1",
    "Step 3: add them up.", "Step 3 = 4 + 4",
    "She lives in room 101 = 100 + 2 of the hotel",  # "room 101 = ..." has no operator on its left
    "In 2024 the price rose; 2024 = 2025",
    "He met R2-D2 and COVID-19 = 7 people",           # names with numbers are words
    "x = 5", "n = 3 + 4 = 8"[:5], "2x + 3 = 8", "y = 2n + 1 = 8",
    "The meeting is at 3:45 + 1 = 5:45",
    "the sum of 3 and 4 + 1 = 9", "half of 10 + 2 = 8",   # worded left sides
    "2 hours + 30 minutes = 150 minutes", "$1 + 50 cents = 2",  # a unit conversion is implied
    "50 + 10% = 56",                                  # 10% of what?
    "2 dozen = 25", "3 million + 1 = 5",
    "2^3 + 1 = 10", "2**3 + 1 = 10", "3² = 10", "√9 + 1 = 5", "5! = 100", "\\frac{x}{3} + 1 = 5",
    "\\frac{\\frac{1}{2}}{3} = 7", "\\frac12 + 1 = 5", "\\sqrt{9} + 1 = 5",  # LaTeX we do not read
    "3 + 4 = 8 > 5", "3 ± 1 = 2",
    "12,5 + 1 = 14,5",                                # a decimal comma
    "٣ + 4 = 8",                                      # a digit that is not ASCII
    "1e5 + 1 = 3",
    "5 / 0 = 0",
    "1 1/2 + 1 = 3",                                  # a mixed number: two numbers side by side
    "Step 2 (3 + 4) = 8",
    "He scored 3rd = 5 - 1",
]


@pytest.mark.parametrize("text,count", TRUE)
def test_true_statements_pass(text, count):
    result = check_steps(text)
    assert result == StepCheck(ok=True, first_false=None, statements=count, skipped=result.skipped), text
    assert all(s.true for s in find_statements(text)[0])


@pytest.mark.parametrize("text,first", FALSE)
def test_false_statements_are_named(text, first):
    result = check_steps(text)
    assert result.ok is False and result.first_false == first, text
    assert result.statements >= 1


def test_issue_example_false_middle_step_right_final_answer():
    """The issue's rationale: its final answer (28) is right, its middle step is not."""
    result = check_steps(ISSUE_EXAMPLE)
    assert result == StepCheck(ok=False, first_false="24 - 21 = 12", statements=2, skipped=0)
    found, _ = find_statements(ISSUE_EXAMPLE)
    assert [(s.text, s.true) for s in found] == [("6 * 4 = 24", True), ("24 - 21 = 12", False)]


@pytest.mark.parametrize("text", NOT_STATEMENTS)
def test_text_that_is_not_a_statement_is_never_rejected(text):
    result = check_steps(text)
    assert result.ok and result.first_false is None, (text, find_statements(text))


def test_numbers_that_are_not_equations_are_not_counted():
    for text in ("On 2024-05-01, a 2-step recipe for room 101 in 2024. Step 3: wait until 3:45.",
                 "Call 555-123-4567. R2-D2 was 3rd.", "1. First item\n2. Second item", ""):
        assert check_steps(text) == StepCheck(ok=True, first_false=None, statements=0, skipped=0), text


def test_ambiguous_runs_are_counted_as_skipped():
    assert check_steps("2 hours + 30 minutes = 150 minutes").skipped == 1
    assert check_steps("50 + 10% = 55").skipped == 1
    assert check_steps("2x + 3 = 7").skipped == 1
    assert check_steps("6 * 4 = 24").skipped == 0


def test_mixed_true_and_skipped_text():
    text = "2x + 3 = 7, so x = 2. Then 2 * 2 = 4 and 4 + 3 = 7.\n#### 2"
    assert check_steps(text) == StepCheck(ok=True, first_false=None, statements=2, skipped=1)


# Each limit of the reader, as (name, text of size n): at n below the limit the false statement in it is read,
# above it the text is not a statement at all (so a number, a nesting, a side or a chain cannot grow unbounded).
LIMITS = [
    ("MAX_DIGITS", lambda n: "9" * n + " + 1 = 2"),
    ("MAX_DEPTH", lambda n: "(" * n + "1 + 1" + ")" * n + " = 3"),
    ("MAX_SIDE_TOKENS", lambda n: "1 + " * (n // 2) + "1 = 1"),
    ("MAX_SIDES", lambda n: "1 + 1 = " + "2 = " * (n - 2) + "3"),
]


@pytest.mark.parametrize("limit,text", LIMITS, ids=[name for name, _ in LIMITS])
def test_each_limit_is_where_reading_stops(limit, text):
    bound = getattr(steps, limit)
    under, over = check_steps(text(bound - 1)), check_steps(text(bound + 1))
    assert (under.ok, under.statements) == (False, 1), under  # the false step is read below the limit
    assert (over.ok, over.statements) == (True, 0), over      # and past it the text is not a statement


# Far past every limit, yet within MAX_CHARS (so the reader reads all of it, not only a cut prefix).
@pytest.mark.parametrize("hostile", [
    "9" * 90_000 + " + 1 = 2",                              # a number far over MAX_DIGITS
    "(" * 45_000 + "1" + ")" * 45_000 + " = 1",             # nesting far over MAX_DEPTH
    "1+" * 45_000 + "1 = 3",                                # a side far over MAX_SIDE_TOKENS
    "1 = " * 24_000 + "1 + 1",                              # a chain far over MAX_SIDES
    "=" * 99_000, "\n" * 99_000, "*" * 99_000, "-" * 99_000, "(1/3)" * 19_000,
])
def test_hostile_input_is_bounded(hostile):
    """Huge or deeply nested input neither recurses deeply nor builds huge numbers: it is simply not a statement.

    Checked with a recursion limit of 150 frames above this test's own (a recursive descent into 45,000
    parentheses would hit it) and Python's limit on converting digits to an int at its lowest (640 digits:
    an int built from the 90,000 nines would raise)."""
    import inspect
    import sys

    assert len(hostile) < steps.MAX_CHARS
    saved_depth, saved_digits = sys.getrecursionlimit(), sys.get_int_max_str_digits()
    sys.setrecursionlimit(len(inspect.stack(0)) + 150)
    sys.set_int_max_str_digits(640)
    try:
        result = check_steps(hostile)
    finally:
        sys.setrecursionlimit(saved_depth)
        sys.set_int_max_str_digits(saved_digits)
    assert result.ok and result.statements == 0 and result.first_false is None, result


def test_long_text_is_cut_and_statement_count_is_capped():
    result = check_steps("3 * 4 = 12. " * 50_000)
    assert result.ok and result.statements == steps.MAX_STATEMENTS
    late_error = "3 * 4 = 12. " * ((steps.MAX_CHARS // 12) + 10) + "2 + 2 = 5"
    assert check_steps(late_error).ok  # beyond MAX_CHARS: not read (a documented limit)


def test_big_but_allowed_numbers_stay_exact():
    a, b = "1" * 19, "9" * 19
    product = int(a) * int(b)
    assert check_steps(f"{a} * {b} = {product}").ok
    assert not check_steps(f"{a} * {b} = {product + 1}").ok


def test_first_false_is_quoted_briefly():
    long_chain = " + ".join(["1"] * 90) + " = 7"
    result = check_steps(long_chain)
    assert not result.ok and len(result.first_false) <= 200 and result.first_false.endswith("...")


def test_seeded_random_expressions_against_fraction_arithmetic():
    """a op b (op c) = result, written as a model would, against Fraction arithmetic done here on the numbers."""
    rng = random.Random(20)
    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y, "×": lambda x, y: x * y}
    for _ in range(300):
        a, b, c = (rng.randint(0, 999) for _ in range(3))
        o1, o2 = rng.choice(list(ops)), rng.choice(list(ops))
        # precedence: * and × bind tighter than + and -
        if o2 in "*×" and o1 in "+-":
            value = ops[o1](Fraction(a), ops[o2](Fraction(b), Fraction(c)))
        else:
            value = ops[o2](ops[o1](Fraction(a), Fraction(b)), Fraction(c))
        shown = f"{int(value):,}" if rng.random() < 0.5 else str(int(value))
        text = f"So {a} {o1} {b} {o2} {c} = {shown} items."
        assert check_steps(text).ok, text
        wrong = f"So {a} {o1} {b} {o2} {c} = {int(value) + rng.choice([-10, -1, 1, 7])} items."
        assert check_steps(wrong).first_false is not None, wrong


def test_code_looking_text_is_only_text(tmp_path):
    """Nothing is evaluated: code around arithmetic is words and brackets; only the arithmetic is read.

    The payload creates a file if anything evaluates it (eval, exec, sympy's parse_expr), and the file must not
    exist afterwards."""
    marker = tmp_path / "evaluated"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    for text in (f"{payload} = 1 + 1", f"1 + 1 = {payload}", f"2 * ({payload}) = 4", payload):
        assert check_steps(text).ok, text
        find_statements(text)
    assert not marker.exists()
    assert check_steps("eval(2 + 2 = 5)").first_false == "2 + 2 = 5"
