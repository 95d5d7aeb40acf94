"""Build the demo's student base: a tiny Llama pretrained on arithmetic facts and on other kinds of word problem.

    python examples/pretrain_student.py                            # rewrites examples/student-base/
    python examples/pretrain_student.py --out /tmp/base --steps 500  # a quick, weaker one elsewhere
    python examples/pretrain_student.py --start examples/student-base --out /tmp/b  # phase 2 only, on a phase-1 base

`undo demo` starts from this model, as a real UNDO run starts from a pretrained
student: it is built once, here, and shipped (about 4 MB), because the skills
below take longer to learn than the demo's few minutes: 1,600 steps of 8 x 128
tokens, 221 s of CPU (22 minutes of wall time on 2 cores shared with other
jobs, load average about 15), after which it writes the whole worked solution
of 87 of 100 fresh stories of its pretraining kinds; then a second phase of
1,200 steps (178 s of CPU) on the packs line's *pattern* in other words
(pretraining.json has what each reached).

What it is taught (the text comes from examples/make_examples.py):

* every fact `a + b = c` and `a - b = c` with numbers up to 20, and `a * b = c`
  up to 9 x 9 (`arithmetic_facts`), the loss on `c` only;
* worked solutions of stories of one or two events (`pretraining_problems`:
  the sentences of the shipped problems, fresh numbers and names; the shipped
  problems leave out every one of these questions), one line per event, shown
  as `undo train` shows a rationale (the student chat template,
  prompts/student.jinja), the loss on the solution only; every kind of event
  but one: **no packs story** ("He buys 3 packs with 4 apples in each pack.");
* then (phase 2, continued from phase 1's weights at lr 1e-3) 3,000 worked
  stories with a *crates* event, the packs sentence with other words ("He
  buys 3 crates with 4 apples in each crate." -> "The crates hold 3 * 4 = 12
  apples, so he has 5 + 12 = 17 apples.", crates/boxes/bags/jars/trays:
  `pattern_problems`), mixed with 1,500 phase-1 stories and every other fact.

So it knows the products as facts, follows worked lines and knows the
multiply-then-add line of a container story, but it has never seen a packs
event: a *worked* packs line maps onto a pattern it knows, a *brief* one (the
product done silently) does not. That is the demo's weakness to find
(undo_cli/stages/demo.py). Phase 2 continues from phase 1 because one run
from scratch with the crates stories in it learnt neither to copy the object
nor the running count (3 and 8 of 100 fresh stories right, two tries).

The tokenizer is a byte-level BPE trained on that text and on the prompt
templates (numbers 0-99 are single tokens, and start from embeddings that
encode their value: tiny.number_embeddings). Written to --out: the model and
tokenizer folder, plus pretraining.json with the recipe and what the model
reached (facts right; problems of the pretraining kinds right, on fresh draws).
Deterministic for a given --seed on one thread.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_examples  # noqa: E402  (the problem generators, beside this file)

SIZE = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 384}
VOCAB = 1024


def examples(tokenizer, facts: list[str], problems: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels): a fact learns its result, a problem its solution after the student prompt."""
    from undo_cli.prompts import encode_example, student_messages

    out = []
    for fact in facts:
        left, right = fact.rsplit(" = ", 1)
        a = tokenizer(left + " =", add_special_tokens=False)["input_ids"]
        b = tokenizer(" " + right + "\n", add_special_tokens=False)["input_ids"]
        out.append((a + b, [-100] * len(a) + b))
    for p in problems:
        out.append(encode_example(tokenizer, student_messages({"question": p["question"]}), p["solution"]))
    return out


def accuracy(model, tokenizer, facts: list[str], problems: list[dict]) -> dict:
    """Greedy answers: facts whose result is right, problems whose whole solution is right."""
    import torch

    from undo_cli.prompts import encode_prompt, student_messages

    right_facts = right_problems = 0
    with torch.no_grad():
        for fact in facts:
            left, right = fact.rsplit(" = ", 1)
            x = torch.tensor([tokenizer(left + " =", add_special_tokens=False)["input_ids"]])
            y = model.generate(x, max_new_tokens=2, do_sample=False)
            right_facts += tokenizer.decode(y[0, x.shape[1]:]).split()[:1] == [right]
        for p in problems:
            x = torch.tensor([encode_prompt(tokenizer, student_messages({"question": p["question"]}))])
            y = model.generate(x, max_new_tokens=80, do_sample=False)
            right_problems += tokenizer.decode(y[0, x.shape[1]:], skip_special_tokens=True).strip() == p["solution"]
    return {"facts": right_facts / len(facts) if facts else None, "problems": right_problems / len(problems),
            "n_facts": len(facts), "n_problems": len(problems)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "student-base")
    parser.add_argument("--steps", type=int, default=1600, help="optimizer steps of 8 x 128 tokens")
    parser.add_argument("--problems", type=int, default=6000, help="worked problems of the pretraining kinds")
    parser.add_argument("--pattern-steps", type=int, default=1200,
                        help="steps of the second phase: the packs line's pattern in other words (crates stories)")
    parser.add_argument("--start", type=Path, default=None,
                        help="skip the first phase: continue from this base (what the first phase wrote)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from undo_cli.prompts import bundled_dir
    from undo_cli.tiny import build_tiny_model, number_embeddings, pretrain, train_tokenizer

    torch.set_num_threads(1)  # deterministic, and fast enough for a model this size
    rng = random.Random(args.seed)
    facts = make_examples.arithmetic_facts()
    shipped = {json.loads(line)["question"] for line in (HERE / "arithmetic.jsonl").read_text().splitlines() if line}
    problems = make_examples.pretraining_problems(args.problems, rng, exclude=shipped)
    seen = shipped | {p["question"] for p in problems}
    held_out = make_examples.pretraining_problems(100, random.Random(args.seed + 1), exclude=seen)
    pattern = make_examples.pattern_problems(make_examples.PATTERN_PROBLEMS, random.Random(args.seed + 3))
    templates = [p.read_text(encoding="utf-8") for p in sorted(bundled_dir("prompts").glob("*.jinja"))]
    corpus = [p["question"] + "\n" + p["solution"] for p in problems[:1500]] + facts[::5] + templates * 5
    corpus += [" ".join(str(i) for i in range(100))] * 20  # every number below 100 becomes one token
    tokenizer = train_tokenizer(corpus, vocab_size=VOCAB)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    started, cpu = time.time(), time.process_time()
    report = lambda step, loss: print(f"step {step} loss {loss:.3f} ({time.time() - started:.0f} s)",  # noqa: E731
                                      file=sys.stderr)
    if args.start is None:  # phase 1: facts and the stories of every kind but packs
        build_tiny_model(args.out, tokenizer=tokenizer, seed=args.seed, **SIZE)
        model = AutoModelForCausalLM.from_pretrained(args.out)
        numbers = number_embeddings(model, tokenizer)
        losses = pretrain(model, examples(tokenizer, facts, problems), steps=args.steps, seed=args.seed, report=report)
        model.save_pretrained(args.out)
    else:
        import shutil

        shutil.copytree(args.start, args.out, dirs_exist_ok=True)
        numbers = json.loads((args.start / "pretraining.json").read_text())["number_tokens_with_value_embeddings"]
        losses = []
    # Phase 2, continued from phase 1's saved weights: the packs line's pattern in other words (crates, boxes ...:
    # "The crates hold 3 * 4 = 12 apples, so he has 5 + 12 = 17 apples."), mixed with stories of phase 1 and every
    # other fact. In one run from scratch the crates stories kept the model from learning to copy the object and
    # the running count (3 and 8 of 100 fresh stories right, two tries); continued from a base that copies, it
    # keeps most of it (79 of 100) and learns the pattern (73 of 98 fresh crates stories).
    model = AutoModelForCausalLM.from_pretrained(args.out)
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    mix = random.Random(args.seed).sample(problems, 1500) + pattern
    losses += pretrain(model, examples(tokenizer, facts[::2], mix), steps=args.pattern_steps, lr=1e-3,
                       seed=args.seed + 1, report=report)
    model.save_pretrained(args.out)
    fresh_pattern = make_examples.pattern_problems(100, random.Random(args.seed + 4))
    fresh_pattern = [p for p in fresh_pattern if p["question"] not in {q["question"] for q in pattern}]
    reached = accuracy(model, tokenizer, random.Random(args.seed + 2).sample(facts, 300), held_out)
    reached["pattern_problems"] = accuracy(model, tokenizer, [], fresh_pattern)["problems"]
    reached["n_pattern_problems"] = len(fresh_pattern)
    recipe = {"size": SIZE, "vocab": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()),
              "steps": args.steps, "batch": "8 x 128 tokens", "lr": 3e-3, "seed": args.seed, "facts": len(facts),
              "problems": len(problems), "events": "1 or 2 per story",
              "pattern": {"steps": args.pattern_steps, "lr": 1e-3, "seed": args.seed + 1, "problems": len(pattern),
                          "mixed_with": "1,500 of the phase-1 stories and every other fact"},
              "number_tokens_with_value_embeddings": numbers, "final_loss": sum(losses[-100:]) / 100,
              "reached": reached, "wall_s": round(time.time() - started), "cpu_s": round(time.process_time() - cpu)}
    (args.out / "pretraining.json").write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(reached), file=sys.stderr)


if __name__ == "__main__":
    main()
