"""Regenerate the shipped example datasets, byte for byte.

    python examples/make_examples.py              # rewrites examples/arithmetic.jsonl and examples/choice.jsonl
    python examples/make_examples.py --out /tmp/x # somewhere else (the tests compare the bytes)

Two small datasets that `undo demo` and the tests use, generated from
templates so that anyone can see how they were made and rebuild them:

* arithmetic.jsonl — 300 word problems: a story of 2 or 3 events (+ - * on
  small integers), each with its gold `answer`, a worked solution with one
  operation per line in `meta.solution` and a brief one in `meta.brief` (on a
  three-event story its last line does two operations), both ending in
  `#### <answer>`, the format our prompts ask for; `meta.trap` names the steps.
  The vocabulary and numbers are deliberately small (every number below 45):
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
# A problem is a story: "NAME has A OBJ." then 2 or 3 events, each one operation on what
# NAME has (or two, for packs and twice: count, then add), then the question. Its worked
# solution (`meta.solution`) writes one line per event; its brief solution (`meta.brief`,
# the demo teacher's first-draft style) is the same for two events but does the last two
# events of a three-event story in ONE line: "After buying 5 more and losing 2, he has
# 12 + 5 - 2 = 15 apples." (a true statement, but two operations at once).

MAX_TOTAL = 45  # every number in a story and its solutions stays below this (and below 100: one token each)


def _event(rng, kind, have, name, he, him, obj):
    """One event: (sentence, gerund for a merged line, term in a merged line, explicit line, new total) or None."""
    other = rng.choice([n for n, _, _ in NAMES if n != name])
    if kind in ("buy", "find", "get"):
        b = rng.randint(2, 12)
        sentence = {"buy": f"{he.capitalize()} buys {b} more.", "find": f"{he.capitalize()} finds {b} more.",
                    "get": f"{other} gives {him} {b} more."}[kind]
        gerund = {"buy": f"buying {b} more", "find": f"finding {b} more", "get": f"getting {b} from {other}"}[kind]
        return sentence, gerund, f"+ {b}", f"After {gerund}, {he} has {have} + {b} = {have + b} {obj}.", have + b
    if kind in ("give", "lose", "sell"):
        if have < 3:
            return None
        b = rng.randint(1, have - 1)
        sentence = {"give": f"{he.capitalize()} gives {b} to {other}.", "lose": f"{he.capitalize()} loses {b}.",
                    "sell": f"{he.capitalize()} sells {b}."}[kind]
        gerund = {"give": f"giving {b} to {other}", "lose": f"losing {b}", "sell": f"selling {b}"}[kind]
        return sentence, gerund, f"- {b}", f"After {gerund}, {he} has {have} - {b} = {have - b} {obj}.", have - b
    if kind == "packs":
        b, c = rng.randint(2, 5), rng.randint(2, 6)
        return (f"{he.capitalize()} buys {b} packs with {c} {obj} in each pack.", f"buying {b} packs of {c}",
                f"+ {b} * {c}", f"The packs hold {b} * {c} = {b * c} {obj}, so {he} has {have} + {b * c} = "
                f"{have + b * c} {obj}.", have + b * c)
    if kind == "twice":  # only as the first event: a merged line could not name the total it doubles
        return (f"{other} gives {him} twice as many as {he} has.", f"getting twice as many from {other}",
                f"+ {have} * 2", f"Twice {have} is {have} * 2 = {2 * have}, so {he} has {have} + {2 * have} = "
                f"{3 * have} {obj}.", 3 * have)
    raise ValueError(kind)


EVENTS = ("buy", "find", "get", "give", "lose", "sell", "packs")


def event_story(rng, events: int) -> dict | None:
    """A story of `events` events with its question, solutions and answer; None when a draw leaves the range."""
    (name, he, him), obj = rng.choice(NAMES), rng.choice(OBJECTS)
    have = rng.randint(2, 15)
    question, lines, merged = [f"{name} has {have} {obj}."], [], []
    kinds = [rng.choice(EVENTS + ("twice",))] + [rng.choice(EVENTS) for _ in range(events - 1)]
    if kinds[0] == "twice" and have > 12:
        return None
    start = have
    for kind in kinds:
        drawn = _event(rng, kind, have, name, he, him, obj)
        if drawn is None:
            return None
        sentence, gerund, term, line, new = drawn
        if new > MAX_TOTAL:
            return None
        question.append(sentence)
        lines.append(line)
        merged.append((gerund, term, have, new))
        have = new
    question.append(f"How many {obj} does {name} have now?")
    brief = list(lines)
    if events >= 2:  # the last two events in one line: two operations at once
        (g2, t2, before, _), (g3, t3, _, after) = merged[-2], merged[-1]
        brief = lines[:-2] + [f"After {g2} and {g3}, {he} has {before} {t2} {t3} = {after} {obj}."]
    trap = "One operation per line: " + ", then ".join(g for g, _, _, _ in merged) + "."
    return {"question": " ".join(question), "steps": lines, "brief": brief, "answer": have, "trap": trap,
            "events": "+".join(kinds), "start": start}


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
                             "brief": "\n".join(drawn["brief"]) + f"\n#### {answer}", "trap": drawn["trap"],
                             "steps": len(drawn["steps"]), "template": drawn["events"]}})
    return out


# --- the demo student's pretraining text ---------------------------------------------------
# examples/pretrain_student.py pretrains the demo's student base on these: every fact
# `a op b = c` of small numbers, and worked solutions of stories of one or two events, one
# line per event (PRETRAINING_PROBLEMS draws from random.Random(PRETRAINING_SEED)). So the
# student can follow one operation per line; it has never seen a line with two operations.
# The shipped problems leave out every question of that pretraining text (and of the 100
# held-out stories it is checked on), so no shipped question was seen in pretraining.

PRETRAINING_SEED = 0
PRETRAINING_PROBLEMS = 6000


def arithmetic_facts(top: int = 50) -> list[str]:
    """Every `a + b = c` and `a - b = c` with numbers up to `top`, and `a * b = c` up to 9 x 9 and 15 x 2."""
    facts = [f"{a} + {b} = {a + b}" for a in range(top + 1) for b in range(top + 1 - a)]
    facts += [f"{a} - {b} = {a - b}" for a in range(top + 1) for b in range(a + 1)]
    facts += [f"{a} * {b} = {a * b}" for a in range(10) for b in range(10)]
    return facts + [f"{a} * 2 = {2 * a}" for a in range(10, 16)]


def pretraining_problems(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[dict]:
    """`n` worked stories of 1 or 2 events: {"question", "solution"}; none whose question is in `exclude`."""
    out, seen = [], set(exclude)
    while len(out) < n:
        drawn = event_story(rng, 1 + len(out) % 2)
        if drawn is None or drawn["question"] in seen:
            continue
        seen.add(drawn["question"])
        out.append({"question": drawn["question"], "solution": "\n".join(drawn["steps"]) + f"\n#### {drawn['answer']}"})
    return out


def pretraining_questions() -> set[str]:
    """Every question of the student base's pretraining text and of its held-out check (examples/pretrain_student.py)."""
    problems = pretraining_problems(PRETRAINING_PROBLEMS, random.Random(PRETRAINING_SEED))
    held_out = pretraining_problems(100, random.Random(PRETRAINING_SEED + 1), exclude={p["question"] for p in problems})
    return {p["question"] for p in problems + held_out}


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
    write_jsonl(args.out / "arithmetic.jsonl", arithmetic(300, random.Random(SEED), exclude=pretraining_questions()))
    write_jsonl(args.out / "choice.jsonl", choice(100, random.Random(SEED + 1)))
    print(f"wrote {args.out / 'arithmetic.jsonl'} and {args.out / 'choice.jsonl'}")


if __name__ == "__main__":
    main()
