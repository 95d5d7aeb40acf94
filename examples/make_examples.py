"""Regenerate the shipped example datasets, byte for byte.

    python examples/make_examples.py              # rewrites examples/arithmetic.jsonl and examples/choice.jsonl
    python examples/make_examples.py --out /tmp/x # somewhere else (the tests compare the bytes)

Two small datasets that `undo demo` and the tests use, generated from
templates so that anyone can see how they were made and rebuild them:

* arithmetic.jsonl — 600 word problems: a story of 1 or 2 events (+ - * on
  small integers), each with its gold `answer`, a worked solution with one
  line per event and every product written out in `meta.solution`, and a brief
  one in `meta.brief` that skips the product of a packs event ("After buying 3
  packs of 4, he has 5 + 12 = 17 apples."), both ending in `#### <answer>`,
  the format our prompts ask for; `meta.skill` is "packs" for a story with a
  packs event (the kind the demo's student base never saw), else "basic".
  The vocabulary and numbers are deliberately small (every number at most 20):
  the offline demo's models have about a million parameters.
* choice.jsonl — 100 multiple-choice problems (task "choice", 4 or 5 options,
  gold answer as a letter) about comparing and computing small numbers.

Everything comes from `random.Random(SEED)`; nothing depends on the machine,
the date or the Python hash seed, so the output is identical everywhere. Only
the standard library is used, so this runs without installing `undo`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240611
HERE = Path(__file__).resolve().parent

NAMES = [("Sam", "he", "him"), ("Mia", "she", "her"), ("Tom", "he", "him"), ("Ana", "she", "her"),
         ("Ben", "he", "him"), ("Lily", "she", "her"), ("Max", "he", "him"), ("Zoe", "she", "her")]
OBJECTS = ["apples", "books", "coins", "marbles", "pencils", "cookies", "eggs", "stickers"]
LETTERS = "ABCDE"


# --- arithmetic word problems ------------------------------------------------------------
# A problem is a story: "NAME has A OBJ." then 1 or 2 events, each one operation on what
# NAME has (or two, for packs and twice: count, then add), then the question. Its worked
# solution (`meta.solution`) writes one line per event, every product written out. Its brief
# solution (`meta.brief`, the demo teacher's first-draft style) is the same line for line,
# except on a packs event, where it skips the product: "After buying 3 packs of 4, he has
# 5 + 12 = 17 apples." (true, but the 3 * 4 = 12 it rests on is not shown). The demo's
# student base never saw a packs story (SKILL, left out of its pretraining text) but learnt
# the worked line's pattern in other words (PATTERN), so the brief line is the one it cannot
# follow and the worked line the one it can.

MAX_TOTAL = 20  # every number in a story and its solutions is at most this: few facts, learnt well by 1M parameters
SKILL = "packs"  # the kind of problem the demo's student base was never shown (pretraining_problems leaves it out)


def _event(rng, kind, have, name, he, him, obj):
    """One event: (sentence, brief line, worked line, new total) or None when a draw leaves the range."""
    other = rng.choice([n for n, _, _ in NAMES if n != name])
    if kind in ("buy", "find", "get"):
        b = rng.randint(2, 8)
        sentence = {"buy": f"{he.capitalize()} buys {b} more.", "find": f"{he.capitalize()} finds {b} more.",
                    "get": f"{other} gives {him} {b} more."}[kind]
        gerund = {"buy": f"buying {b} more", "find": f"finding {b} more", "get": f"getting {b} from {other}"}[kind]
        line = f"After {gerund}, {he} has {have} + {b} = {have + b} {obj}."
        return sentence, line, line, have + b
    if kind in ("give", "lose", "sell"):
        if have < 3:
            return None
        b = rng.randint(1, have - 1)
        sentence = {"give": f"{he.capitalize()} gives {b} to {other}.", "lose": f"{he.capitalize()} loses {b}.",
                    "sell": f"{he.capitalize()} sells {b}."}[kind]
        gerund = {"give": f"giving {b} to {other}", "lose": f"losing {b}", "sell": f"selling {b}"}[kind]
        line = f"After {gerund}, {he} has {have} - {b} = {have - b} {obj}."
        return sentence, line, line, have - b
    if kind == "packs":
        b, c = rng.randint(2, 4), rng.randint(2, 5)
        return (f"{he.capitalize()} buys {b} packs with {c} {obj} in each pack.",
                f"After buying {b} packs of {c}, {he} has {have} + {b * c} = {have + b * c} {obj}.",
                f"The packs hold {b} * {c} = {b * c} {obj}, so {he} has {have} + {b * c} = {have + b * c} {obj}.",
                have + b * c)
    if kind == "crates":  # pretraining only (PATTERN): the packs line's pattern, in other words
        b, c = rng.randint(2, 4), rng.randint(2, 5)
        box, one = rng.choice(CONTAINERS)
        return (f"{he.capitalize()} buys {b} {box} with {c} {obj} in each {one}.", None,
                f"The {box} hold {b} * {c} = {b * c} {obj}, so {he} has {have} + {b * c} = {have + b * c} {obj}.",
                have + b * c)
    if kind == "twice":  # only as the first event
        line = (f"Twice {have} is {have} * 2 = {2 * have}, so {he} has {have} + {2 * have} = {3 * have} {obj}.")
        return f"{other} gives {him} twice as many as {he} has.", line, line, 3 * have
    raise ValueError(kind)


EVENTS = ("buy", "find", "get", "give", "lose", "sell", "packs")
CONTAINERS = (("crates", "crate"), ("boxes", "box"), ("bags", "bag"), ("jars", "jar"), ("trays", "tray"))  # PATTERN's words: never "packs"


def event_story(rng, events: int, kinds: tuple[str, ...] = EVENTS) -> dict | None:
    """A story of `events` events drawn from `kinds` with its question, solutions and answer; None when a draw
    leaves the range."""
    (name, he, him), obj = rng.choice(NAMES), rng.choice(OBJECTS)
    have = rng.randint(2, 10)
    question, lines, brief = [f"{name} has {have} {obj}."], [], []
    drawn_kinds = [rng.choice(kinds + ("twice",))] + [rng.choice(kinds) for _ in range(events - 1)]
    if drawn_kinds[0] == "twice" and 3 * have > MAX_TOTAL:
        return None
    for kind in drawn_kinds:
        drawn = _event(rng, kind, have, name, he, him, obj)
        if drawn is None:
            return None
        sentence, short, line, new = drawn
        if new > MAX_TOTAL:
            return None
        question.append(sentence)
        lines.append(line)
        brief.append(short)
        have = new
    question.append(f"How many {obj} does {name} have now?")
    return {"question": " ".join(question), "steps": lines, "brief": brief, "answer": have,
            "events": "+".join(drawn_kinds)}


def arithmetic(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[dict]:
    """`n` problems, alternately of 1 and 2 events, each with its worked and brief solutions; none in `exclude`."""
    out, seen = [], set(exclude)
    while len(out) < n:
        drawn = event_story(rng, 1 if len(out) % 2 == 0 else 2)
        if drawn is None or drawn["question"] in seen:
            continue
        seen.add(drawn["question"])
        answer = drawn["answer"]
        out.append({"id": f"arith-{len(out):03d}", "question": drawn["question"], "answer": str(answer),
                    "task": "math",
                    "meta": {"solution": "\n".join(drawn["steps"]) + f"\n#### {answer}",
                             "brief": "\n".join(drawn["brief"]) + f"\n#### {answer}",
                             "skill": SKILL if SKILL in drawn["events"].split("+") else "basic",
                             "steps": len(drawn["steps"]), "template": drawn["events"]}})
    return out


# --- the demo student's pretraining text ---------------------------------------------------
# examples/pretrain_student.py pretrains the demo's student base on these: every fact
# `a op b = c` of small numbers, and worked solutions of stories of one or two events, one
# line per event, of every kind but SKILL (PRETRAINING_PROBLEMS draws from
# random.Random(PRETRAINING_SEED)), then PATTERN_PROBLEMS stories with a PATTERN event: the
# packs sentence with another container word, worked as the packs line is ("The crates hold
# 3 * 4 = 12 apples, so he has 5 + 12 = 17 apples."). So the student can follow worked lines,
# knows the products and the multiply-then-add line, but has never seen a packs story. The shipped problems leave out every question
# of that pretraining text (and of the 100 held-out stories it is checked on), so no shipped
# question was seen in pretraining.

PRETRAINING_SEED = 0
PRETRAINING_PROBLEMS = 6000
PRETRAINING_EVENTS = tuple(k for k in EVENTS if k != SKILL)
PATTERN = "crates"  # the pretraining-only event of the packs line's pattern (pattern_problems)
PATTERN_PROBLEMS = 3000


def arithmetic_facts(top: int = MAX_TOTAL) -> list[str]:
    """Every `a + b = c` and `a - b = c` with numbers up to `top`, and `a * b = c` up to 9 x 9."""
    facts = [f"{a} + {b} = {a + b}" for a in range(top + 1) for b in range(top + 1 - a)]
    facts += [f"{a} - {b} = {a - b}" for a in range(top + 1) for b in range(a + 1)]
    return facts + [f"{a} * {b} = {a * b}" for a in range(10) for b in range(10)]


def pretraining_problems(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[dict]:
    """`n` worked stories of 1 or 2 events, none of kind SKILL: {"question", "solution"}; none whose question is in
    `exclude`."""
    out, seen = [], set(exclude)
    while len(out) < n:
        drawn = event_story(rng, 1 + len(out) % 2, PRETRAINING_EVENTS)
        if drawn is None or drawn["question"] in seen:
            continue
        seen.add(drawn["question"])
        out.append({"question": drawn["question"], "solution": "\n".join(drawn["steps"]) + f"\n#### {drawn['answer']}"})
    return out


def pattern_problems(n: int, rng: random.Random) -> list[dict]:
    """`n` worked stories of 1 or 2 events with at least one PATTERN event ("He gets 3 crates of 4 apples."): the
    packs line's multiply-then-add, worded otherwise, so that a worked packs line maps onto a known pattern while a
    brief one (the product done silently) does not. {"question", "solution"}; never a packs story."""
    out, seen = [], set()
    while len(out) < n:
        drawn = event_story(rng, 1 + len(out) % 2, PRETRAINING_EVENTS + (PATTERN,))
        if drawn is None or PATTERN not in drawn["events"].split("+") or drawn["question"] in seen:
            continue
        seen.add(drawn["question"])
        out.append({"question": drawn["question"], "solution": "\n".join(drawn["steps"]) + f"\n#### {drawn['answer']}"})
    return out


def pretraining_questions() -> set[str]:
    """Every question of the student base's pretraining text and of its held-out check (examples/pretrain_student.py)."""
    problems = pretraining_problems(PRETRAINING_PROBLEMS, random.Random(PRETRAINING_SEED))
    held_out = pretraining_problems(100, random.Random(PRETRAINING_SEED + 1), exclude={p["question"] for p in problems})
    pattern = pattern_problems(PATTERN_PROBLEMS, random.Random(PRETRAINING_SEED + 3))
    return {p["question"] for p in problems + held_out + pattern}


# --- multiple choice ---------------------------------------------------------------------

def _options(rng, correct: int, spread: int, k: int) -> list[int]:
    opts = {correct}
    while len(opts) < k:
        cand = correct + rng.choice([d for d in range(-spread, spread + 1) if d])
        if cand >= 0:
            opts.add(cand)
    opts = sorted(opts)
    rng.shuffle(opts)
    return opts


def largest(rng):
    k = rng.choice([4, 5])
    nums = rng.sample(range(1, 60), k)
    best = max(nums)
    return ("Which number is the largest?", nums, best,
            f"The numbers are {', '.join(map(str, nums))}. The largest is {best}.")


def smallest(rng):
    k = rng.choice([4, 5])
    nums = rng.sample(range(1, 60), k)
    low = min(nums)
    return ("Which number is the smallest?", nums, low,
            f"The numbers are {', '.join(map(str, nums))}. The smallest is {low}.")


def sum_of(rng):
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    return (f"What is {a} + {b}?", _options(rng, a + b, 3, rng.choice([4, 5])), a + b, f"{a} + {b} = {a + b}.")


def product_of(rng):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return (f"What is {a} * {b}?", _options(rng, a * b, 4, 4), a * b, f"{a} * {b} = {a * b}.")


def story(rng):
    (name, he, _), obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a = rng.randint(4, 15)
    b = rng.randint(2, a - 1)
    return (f"{name} has {a} {obj} and gives away {b}. How many {obj} does {he} have left?",
            _options(rng, a - b, 3, 4), a - b,
            f"{name} has {a} - {b} = {a - b} {obj} left.")


CHOICE_TEMPLATES = [largest, smallest, sum_of, product_of, story]


def choice(n: int, rng: random.Random) -> list[dict]:
    out, seen = [], set()
    while len(out) < n:
        template = CHOICE_TEMPLATES[len(out) % len(CHOICE_TEMPLATES)]
        question, options, correct, work = template(rng)
        key = (question, tuple(options))
        if key in seen:
            continue
        seen.add(key)
        letter = LETTERS[options.index(correct)]
        out.append({"id": f"choice-{len(out):03d}", "question": question, "answer": letter, "task": "choice",
                    "choices": [str(o) for o in options],
                    "meta": {"solution": f"{work} That is option {letter}.\n#### {letter}", "template": template.__name__}})
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_bytes(text.encode("utf-8"))  # bytes: no platform newline translation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: examples/)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "arithmetic.jsonl", arithmetic(600, random.Random(SEED), exclude=pretraining_questions()))
    write_jsonl(args.out / "choice.jsonl", choice(100, random.Random(SEED + 1)))
    print(f"wrote {args.out / 'arithmetic.jsonl'} and {args.out / 'choice.jsonl'}")


if __name__ == "__main__":
    main()
