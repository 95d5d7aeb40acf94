"""Run folders written the way `undo iterate` lays them out (loop/layout.py), without training anything.

    write_run(tmp_path / "runs" / "synthetic", val=60, test=40, iterations=4, refinements=25)

For the report's tests (tests/test_report_html.py, tests/test_diff.py) and its
benchmark at scale (bench/report_html.py: 10k validation problems, 20
iterations). Everything is seeded and every file has the shape the stages
write (docs/artifacts.md): predictions with `correct`, `predicted`,
`finish_reason`; errors made by collect-errors' own `collect`; refined
records with a `refinement` object (informed_by the previous iteration's
errors, verified with `previous_rationale` or kept-previous with the rejected
attempt, cached, usage) and a `lineage` (a two-teacher cascade); metrics; train summaries; a manifest whose
best_iteration follows the loop's rule. `hostile=True` puts HTML and script
text into questions, outputs, rationales and an id, as model output may hold;
`extra` adds fields to each `refinement` (what another verification mode
writes, e.g. a rejection reason). A refinement rewrites the previous rationale
completely with probability `rewrite`, else it keeps most of it (a warning
first, one sentence changed), as the demo teacher's refinements do.

The text is made of short arithmetic sentences with random names and numbers,
so that it compresses about as real rationales do, not like one repeated line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

NAMES = ["Ana", "Ben", "Mia", "Sam", "Zoe", "Tom", "Lily", "Max", "Ravi", "Chen", "Olu", "Ines"]
THINGS = ["books", "apples", "marbles", "stickers", "coins", "pencils", "eggs", "cookies", "cards", "shells"]
HOSTILE = ["<script>alert(1)</script>", "</script><script>alert(2)</script>", "<img src=x onerror=alert(3)>",
           "<!-- <script>", "&amp; &lt;b&gt;", "\u2028 line separator"]


def sentence(rng: random.Random) -> str:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    op, value = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
    who, what = rng.choice(NAMES), rng.choice(THINGS)
    return rng.choice([f"{who} has {a} {what} and gets {b} more, so {a} {op} {b} = {value} {what}.",
                       f"Then {a} {op} {b} = {value}, which is how many {what} {who} keeps.",
                       f"Each of the {b} boxes holds {a} {what}: {a} {op} {b} = {value}.",
                       f"After that {who} counts {value} {what} in total."])


def text(rng: random.Random, chars: int, answer: str) -> str:
    out: list[str] = []
    while sum(len(s) + 1 for s in out) < chars:
        out.append(sentence(rng))
    return "\n".join(out) + f"\n#### {answer}"


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def _problems(prefix: str, n: int, rng: random.Random, hostile: bool) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        q = f"{rng.choice(NAMES)} has {rng.randint(2, 90)} {rng.choice(THINGS)}. " + sentence(rng) + " How many now?"
        if hostile and i % 7 == 0:
            q += " " + HOSTILE[(i // 7) % len(HOSTILE)]
        out.append({"id": f"{prefix}-{i:05d}" + ("<b>" if hostile and i == 1 else ""), "question": q,
                    "answer": str(rng.randint(1, 200)), "task": "math"})
    return out


def _predictions(problems, right: list[bool], rng: random.Random, chars: int, hostile: bool, k: int) -> list[dict]:
    out = []
    for i, (p, ok) in enumerate(zip(problems, right)):
        kind = None if ok else rng.choice(["wrong_answer"] * 8 + ["no_answer", "truncated"])
        predicted = p["answer"] if ok else None if kind == "no_answer" else str(int(p["answer"]) + rng.randint(1, 9))
        body = text(rng, chars, predicted or "")
        if kind == "no_answer":
            body = body.rsplit("####", 1)[0].rstrip()
        if hostile and i % 5 == k % 5:
            body = HOSTILE[(i + k) % len(HOSTILE)] + "\n" + body
        out.append({**p, "output": body, "predicted": predicted, "correct": ok, "verify": "strict",
                    "finish_reason": "length" if kind == "truncated" else "stop", "model": f"iter_{k:02d}/student",
                    "usage": {"prompt_tokens": 60, "completion_tokens": len(body) // 4}})
    return out


def _metrics(predictions: list[dict]) -> dict[str, Any]:
    correct = sum(p["correct"] for p in predictions)
    return {"verify": "strict", "accuracy": correct / len(predictions), "correct": correct, "count": len(predictions),
            "no_answer": sum(p["predicted"] is None for p in predictions),
            "truncated": sum(p["finish_reason"] == "length" for p in predictions)}


def _edited(previous: str, rng: random.Random) -> str:
    """A refinement that keeps most of the previous rationale: a warning first, one sentence rewritten."""
    lines = previous.split("\n")
    j = rng.randrange(max(1, len(lines) - 1))
    lines[j] = sentence(rng)
    return f"Watch out: {rng.choice(['multiply first', 'subtract what is given', 'add both amounts'])}.\n" + \
        "\n".join(lines)


def _refined(k: int, targets: list[dict], errors: list[dict], rng: random.Random, n: int, chars: int,
             hostile: bool, extra: dict[str, Any], rewrite: float) -> list[dict]:
    out = []
    for j, target in enumerate(rng.sample(targets, min(n, len(targets)))):
        failure = errors[j % len(errors)] if errors else None
        informed = [failure["id"]] + [e["id"] for e in rng.sample(errors, min(1, len(errors)))] if failure else []
        verified = rng.random() < 0.6
        new = text(rng, chars, target["answer"]) if rng.random() < rewrite else _edited(target["rationale"], rng)
        if hostile and j % 4 == 0:
            new = HOSTILE[j % len(HOSTILE)] + " " + new
        refinement = {"informed_by": list(dict.fromkeys(informed)), "iteration": k, "template": "refine",
                      "verified": verified, "kept_previous": not verified,
                      "error_type": failure["error_type"] if failure else "wrong_answer",
                      "similarity": round(rng.random(), 4), "attempts": 1, "teacher": "teacher", "backend": "hf",
                      "usage": {"prompt_tokens": 400 + j, "completion_tokens": len(new) // 4}, **extra}
        record = {**target, "cached": rng.random() < 0.3, "iteration": k,
                  "lineage": _lineage(k, target, refinement, hostile and j % 4 == 0)}
        if verified:
            refinement["previous_rationale"] = target["rationale"]
            record["rationale"] = new
        else:
            refinement.update(rejected_rationale=new, rejected_predicted=str(rng.randint(1, 99)),
                              rejected_finish_reason="stop")
        out.append({**record, "refinement": refinement})
    return out


def _lineage(k: int, target: dict, refinement: dict, hostile: bool) -> dict[str, Any]:
    """A record's `lineage` as a two-teacher cascade writes it (stages/lineage.py); no draw from the run's rng."""
    verdict = "verified" if refinement["verified"] else "false_step"
    cheap = "<b>cheap</b>" if hostile else "cheap"  # a teacher's name is user text too
    tokens = refinement["usage"]["prompt_tokens"] + refinement["usage"]["completion_tokens"]
    return {"teacher": {"id": "strong", "model": "models/strong", "backend": "hf", "hash": "3f2a00c1d2e3f405",
                        "hash_of": "files"},
            "template": {"name": "refine", "hash": "9c1e00aa11bb22cc"},
            "sampling": {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 128, "seed": 0}, "iteration": k,
            "parent": {"id": target["id"], "iteration": 0, "rationale_hash": "77b0aa11bb22cc33"},
            "failure_cluster": None, "informed_by": refinement["informed_by"],
            "cascade": [{"teacher": cheap, "tokens": tokens, "cost": None, "verdict": "wrong_answer", "cached": False},
                        {"teacher": "strong", "tokens": tokens, "cost": 0.0012, "verdict": verdict, "cached": False}],
            "cascade_verified": refinement["verified"], "cached": False}


def _correctness(n: int, iterations: int, rng: random.Random) -> list[list[bool]]:
    """Per iteration, per problem: right or not; most problems keep their state, some flip (seeded)."""
    ability = [rng.random() for _ in range(n)]
    out = [[a < 0.35 for a in ability]]
    for k in range(1, iterations):
        p = 0.45 + 0.1 * k + 0.03 * rng.uniform(-1, 1)  # a rise, as a run that helps (one a paired test keeps)
        out.append([prev if rng.random() < 0.7 else rng.random() < p for prev in out[-1]])
    return out


def write_run(root: Path, *, val: int = 60, test: int = 40, train: int = 80, iterations: int = 4,
              refinements: int = 25, chars: int = 160, seed: int = 0, hostile: bool = False,
              extra: dict[str, Any] | None = None, manifest: bool = True, rewrite: float = 0.5,
              clusters: int = 0) -> dict[str, Any]:
    """Write the run; returns what a test compares against (best iteration, ids of refined records, and with
    `clusters` > 0 the assignment of clusters.json: train and val problems dealt into that many clusters)."""
    rng = random.Random(seed)
    val_p, test_p = _problems("val", val, rng, hostile), _problems("test", test, rng, hostile)
    train_p = _problems("train", train, rng, hostile)
    rationales = [{**p, "id": f"{p['id']}#0", "problem_id": p["id"], "rationale": text(rng, chars, p["answer"]),
                   "predicted": p["answer"], "correct": True, "teacher": "teacher", "iteration": 0}
                  for p in train_p]
    assign: dict[str, str] = {}
    if clusters:
        crng = random.Random(seed + 1)
        assign = {p["id"]: f"c{crng.randrange(clusters):02d}" for p in train_p + val_p}
        sizes = {c: list(assign.values()).count(c) for c in sorted(set(assign.values()))}
        _json(root / "clusters.json", {"format": 1, "method": "tfidf", "words": "once", "k": clusters,
                                       "clusters": [{"id": c, "size": n, "label": f"words of {c}"}
                                                    for c, n in sizes.items()], "assign": assign})
        extra = {**(extra or {}), "select": "clusters"}
    _jsonl(root / "iter_00" / "rationales.jsonl", rationales)
    right = _correctness(val, iterations, rng)
    accuracies, refined_ids, outcomes = [], {}, []
    errors: list[dict] = []
    from undo_cli.stages.collect_errors import collect

    for k in range(iterations):
        d = root / f"iter_{k:02d}"
        if k:
            refined = _refined(k, rationales, errors, rng, refinements, chars, hostile, extra or {}, rewrite)
            for r in refined if assign else []:
                r["refinement"]["cluster"] = assign[r["problem_id"]]
            _jsonl(d / "refined.jsonl", refined)
            refined_ids[k] = [r["id"] for r in refined]
        _json(d / "student" / "train_summary.json", {"final_loss": 1.0 / (k + 1), "steps": 10})
        preds = _predictions(val_p, right[k], rng, chars, hostile, k)
        _jsonl(d / "val" / "predictions.jsonl", preds)
        _json(d / "val" / "predictions.metrics.json", _metrics(preds))
        errors = collect([dict(p) for p in preds])
        _jsonl(d / "errors.jsonl", errors)
        accuracies.append(_metrics(preds)["accuracy"])
        outcomes.append({p["id"]: bool(p["correct"]) for p in preds})
    from undo_cli.loop.choose import choose

    best = choose(outcomes)[0]  # the loop's rule (rounds.decide)
    for k in sorted({0, best}):
        preds = _predictions(test_p, [rng.random() < accuracies[k] for _ in test_p], rng, chars, hostile, k)
        _jsonl(root / f"iter_{k:02d}" / "test" / "predictions.jsonl", preds)
        _json(root / f"iter_{k:02d}" / "test" / "predictions.metrics.json", _metrics(preds))
    if manifest:
        stages = {f"iter_{k:02d}/{s}": {"status": "done", "seconds": 1.0} for k in range(iterations)
                  for s in (["generate"] if k == 0 else ["refine", "mix"]) + ["train", "evaluate", "collect_errors"]}
        _json(root / "manifest.json", {"name": root.name, "status": "done", "best_iteration": best,
                                       "iterations_done": iterations, "stop_reason": f"reached max_iterations "
                                       f"({iterations - 1})", "config": {"teacher": "teacher", "student": "student",
                                       "max_iterations": iterations - 1, "refine": {"k": 1}}, "stages": stages})
    return {"best": best, "refined_ids": refined_ids, "accuracies": accuracies, "assign": assign}
