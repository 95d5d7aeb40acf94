"""Regenerate the shipped example datasets, byte for byte.

    python examples/make_examples.py              # rewrites examples/arithmetic.jsonl and examples/choice.jsonl
    python examples/make_examples.py --out /tmp/x # somewhere else (the tests compare the bytes)

Two small datasets that `undo demo` and the tests use, generated from
templates so that anyone can see how they were made and rebuild them:

* arithmetic.jsonl — 300 multi-step word problems (2 or 3 steps of + - * on
  small integers), each with its gold `answer` and a worked solution in
  `meta.solution` ending in `#### <answer>`, the format our prompts ask for.
  The vocabulary and numbers are deliberately small: the offline demo trains a
  ~1M-parameter teacher on these in a minute or two, so they must be learnable.
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
# Each template draws its numbers, returns (question, solution lines, answer), or None when
# the draw gives a negative or awkward intermediate (then we draw again).

def buy_then_give(rng):
    (name, he, _), obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(3, 15), rng.randint(2, 12)
    c = rng.randint(1, a + b - 1)
    x, r = a + b, a + b - c
    q = f"{name} has {a} {obj}. {he.capitalize()} buys {b} more and then gives away {c}. How many {obj} does {name} have now?"
    steps = [f"{name} starts with {a} {obj}.", f"After buying {b} more, {he} has {a} + {b} = {x}.",
             f"After giving away {c}, {he} has {x} - {c} = {r}."]
    return q, steps, r


def bags_then_eat(rng):
    (name, he, _), obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(2, 6), rng.randint(2, 9)
    x = a * b
    c = rng.randint(1, x - 1)
    q = f"{name} buys {a} bags of {obj}. Each bag has {b} {obj}. {he.capitalize()} gives {c} of them to a friend. How many {obj} are left?"
    steps = [f"{a} bags with {b} {obj} each make {a} * {b} = {x} {obj}.",
             f"After giving away {c}, {x} - {c} = {x - c} {obj} are left."]
    return q, steps, x - c


def two_friends_then_find(rng):
    (name, _, _), (name2, _, _) = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    a, b, c = rng.randint(2, 15), rng.randint(2, 15), rng.randint(1, 9)
    x = a + b
    q = f"{name} has {a} {obj} and {name2} has {b} {obj}. They put them together and then find {c} more. How many {obj} do they have in total?"
    steps = [f"Together they have {a} + {b} = {x} {obj}.", f"After finding {c} more, they have {x} + {c} = {x + c} {obj}."]
    return q, steps, x + c


def boxes_plus_gift(rng):
    (name, _, him), (name2, _, _) = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    a, b, c = rng.randint(2, 6), rng.randint(2, 9), rng.randint(1, 12)
    x = a * b
    q = f"{name} has {a} boxes with {b} {obj} in each box. {name2} gives {him} {c} more {obj}. How many {obj} does {name} have?"
    steps = [f"{a} boxes with {b} {obj} each hold {a} * {b} = {x} {obj}.", f"With {c} more, {name} has {x} + {c} = {x + c} {obj}."]
    return q, steps, x + c


def packs_then_give(rng):
    (name, he, _), (name2, _, _) = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    a, b, c = rng.randint(2, 12), rng.randint(2, 5), rng.randint(2, 6)
    x = b * c
    y = a + x
    d = rng.randint(1, y - 1)
    q = (f"{name} has {a} {obj}. {he.capitalize()} buys {b} packs with {c} {obj} in each pack, "
         f"then gives {d} {obj} to {name2}. How many {obj} does {name} have now?")
    steps = [f"The packs hold {b} * {c} = {x} {obj}.", f"Now {name} has {a} + {x} = {y} {obj}.",
             f"After giving {d} to {name2}, {he} has {y} - {d} = {y - d} {obj}."]
    return q, steps, y - d


def shop_day(rng):
    obj = rng.choice(OBJECTS)
    a = rng.randint(12, 30)
    b = rng.randint(1, a // 2)
    c = rng.randint(1, a - b - 1)
    d = rng.randint(2, 15)
    x, y = a - b, a - b - c
    q = (f"A shop has {a} {obj}. It sells {b} in the morning and {c} in the afternoon, "
         f"then gets {d} new {obj}. How many {obj} does the shop have now?")
    steps = [f"After the morning, the shop has {a} - {b} = {x} {obj}.", f"After the afternoon, it has {x} - {c} = {y} {obj}.",
             f"With {d} new {obj}, it has {y} + {d} = {y + d} {obj}."]
    return q, steps, y + d


def more_and_fewer(rng):
    (name, _, _), (name2, _, _), (name3, _, _) = rng.sample(NAMES, 3)
    obj = rng.choice(OBJECTS)
    a, b = rng.randint(2, 10), rng.randint(1, 6)
    c = rng.randint(1, a + b - 1)
    x, y = a + b, a + b - c
    q = (f"{name} has {a} {obj}. {name2} has {b} more {obj} than {name}. {name3} has {c} fewer {obj} than {name2}. "
         f"How many {obj} does {name3} have?")
    steps = [f"{name2} has {a} + {b} = {x} {obj}.", f"{name3} has {x} - {c} = {y} {obj}."]
    return q, steps, y


def twice_then_spend(rng):
    (name, he, _), obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    x = a * 2
    y = x + b
    c = rng.randint(1, y - 1)
    q = (f"{name} has {a} {obj}. {he.capitalize()} gets twice as many from a friend, then finds {b} more "
         f"and loses {c}. How many {obj} does {name} have now?")
    steps = [f"Twice as many is {a} * 2 = {x} {obj}, so {he} has {a} + {x} = {a + x}.",
             f"After finding {b} more, {he} has {a + x} + {b} = {a + x + b}.",
             f"After losing {c}, {he} has {a + x + b} - {c} = {a + x + b - c} {obj}."]
    return q, steps, a + x + b - c


TWO_STEP = [buy_then_give, bags_then_eat, two_friends_then_find, boxes_plus_gift, more_and_fewer]
THREE_STEP = [packs_then_give, shop_day, twice_then_spend]


def arithmetic(n: int, rng: random.Random) -> list[dict]:
    out, seen = [], set()
    while len(out) < n:
        steps_wanted = 2 if len(out) % 2 == 0 else 3
        template = rng.choice(TWO_STEP if steps_wanted == 2 else THREE_STEP)
        question, steps, answer = template(rng)
        if question in seen or answer < 0:
            continue
        seen.add(question)
        solution = "\n".join(steps) + f"\n#### {answer}"
        out.append({"id": f"arith-{len(out):03d}", "question": question, "answer": str(answer), "task": "math",
                    "meta": {"solution": solution, "steps": len(steps), "template": template.__name__}})
    return out


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
    write_jsonl(args.out / "arithmetic.jsonl", arithmetic(300, random.Random(SEED)))
    write_jsonl(args.out / "choice.jsonl", choice(100, random.Random(SEED + 1)))
    print(f"wrote {args.out / 'arithmetic.jsonl'} and {args.out / 'choice.jsonl'}")


if __name__ == "__main__":
    main()
