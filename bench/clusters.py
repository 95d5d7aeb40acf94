"""Failure clusters: do TF-IDF or all-MiniLM-L6-v2 clusters find the kinds the problem generator knows, and at what cost?

    python bench/clusters.py                                   # examples/arithmetic.jsonl, k 8 and default, seeds 0-2
    python bench/clusters.py --data undo-demo/data/train.jsonl,undo-demo/data/val.jsonl --ks 6,12

`undo cluster` (undo_cli/clusters.py) groups questions so that `undo refine
--select clusters` can share its budget by kind of problem. Whether a cluster
*is* a kind can be measured where the kinds are known: the shipped problems are
generated from templates (examples/make_examples.py), and each carries
`meta.template`, the story's events (`buy+lose`, `packs`, `twice+get`, ...).
From it, four labellings:

* events      the template itself (e.g. `lose+packs`);
* operations  the set of operations it takes: add (buy, find, get), sub (give,
              lose, sell), packs (a product, then add), twice (a doubling) — what a
              student may lack as a skill;
* steps       one or two events;
* object      the story's object (apples, books, ...): not a skill, the surface.

For each method, k and seed: purity (the share of problems whose cluster's
majority label is theirs) and adjusted mutual information (AMI: 0 = chance,
1 = the labelling exactly), beside the **baseline measured in the same run**:
the same cluster sizes with the problems shuffled among them (mean purity of
20 shuffles), and the wall time of `clusters.build` (embedding: the first
build of each text set loads the model and encodes; later k and seeds reuse
the vectors, as the mean shows; the time is on this machine, with its load
average printed).

Settings fixed before the first run: the data (all 300 shipped problems: since the file grew to 600,
`--limit 300`, the default, keeps them), k in
{8 (the number of event kinds), default sqrt(n/2)}, seeds 0, 1, 2, min_size 3.
Added after the first run (commit ff4636f's script), which found both methods
clustering whole questions by their object (AMI 0.92-1.0) and by events at
chance (AMI <= 0.07): the `words` setting, `all` (the whole question, as in
the first run) or `once` (the words a question says once; clusters.said_once),
both run for both methods.

Output: a rich table on stderr, JSON in bench/results/clusters.json (with the commit).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))

OPERATION = {"buy": "add", "find": "add", "get": "add", "give": "sub", "lose": "sub", "sell": "sub",
             "packs": "packs", "twice": "twice"}


def labels(problem: dict) -> dict[str, str]:
    """The known kinds of one generated problem (examples/make_examples.py's meta)."""
    meta = problem.get("meta") or {}
    template = str(meta.get("template", "?"))
    events = template.split("+")
    words = problem["question"].split()
    return {"events": template,
            "operations": "+".join(sorted({OPERATION.get(e, e) for e in events})),
            "steps": str(len(events)),
            "object": words[3].rstrip(".") if len(words) > 3 else "?"}


def purity(assign: list[str], truth: list[str]) -> float:
    groups: dict[str, Counter] = {}
    for a, t in zip(assign, truth):
        groups.setdefault(a, Counter())[t] += 1
    return sum(c.most_common(1)[0][1] for c in groups.values()) / len(truth)


def shuffled_purity(assign: list[str], truth: list[str], rounds: int = 20) -> float:
    rng = random.Random(0)
    out = []
    for _ in range(rounds):
        t = list(truth)
        rng.shuffle(t)
        out.append(purity(assign, t))
    return sum(out) / len(out)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=300,
                        help="the first N problems (default 300: the shipped file's size when the settings were fixed; 0: all)")
    parser.add_argument("--data", default=str(REPO / "examples" / "arithmetic.jsonl"),
                        help="problem files with meta.template, comma-separated")
    parser.add_argument("--ks", default="8,default", help="k values ('default': sqrt(n/2))")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="tfidf,embedding")
    parser.add_argument("--words", default="all,once", help="clusters.WORDS values to run")
    parser.add_argument("--output", default=str(RESULTS / "clusters.json"))
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table
    from sklearn.metrics import adjusted_mutual_info_score

    from undo_cli.clusters import build, default_k

    problems = [json.loads(line) for path in args.data.split(",") for line in Path(path).read_text().splitlines()
                if line.strip()][:args.limit or None]
    known = {p["id"]: labels(p) for p in problems}
    kinds = list(next(iter(known.values())))
    ks = [default_k(len(problems)) if k == "default" else int(k) for k in args.ks.split(",")]
    rows = []
    for method, words in ((m, w) for m in args.methods.split(",") for w in args.words.split(",")):
        for k in dict.fromkeys(ks):
            for seed in (int(s) for s in args.seeds.split(",")):
                started = time.perf_counter()  # embedding: the first build of a text set encodes it (and loads)
                result = build(problems, method=method, k=k, min_size=3, seed=seed, words=words)
                seconds = time.perf_counter() - started
                ids = sorted(result["assign"])
                assign = [result["assign"][i] for i in ids]
                row = {"method": f"{method}/{words}", "k": k, "seed": seed, "seconds": round(seconds, 3),
                       "clusters": len(result["clusters"]),
                       "rest": next((c["size"] for c in result["clusters"] if c["id"] == "rest"), 0)}
                for kind in kinds:
                    truth = [known[i][kind] for i in ids]
                    row[kind] = {"purity": round(purity(assign, truth), 4),
                                 "baseline": round(shuffled_purity(assign, truth), 4),
                                 "ami": round(float(adjusted_mutual_info_score(truth, assign)), 4)}
                rows.append(row)
                print(f"{method}/{words} k={k} seed={seed}: {seconds:.1f} s", file=sys.stderr)

    load = os.getloadavg()
    table = Table(title=f"undo cluster vs the generator's kinds ({len(problems)} problems; purity / shuffled "
                        f"baseline / AMI; load {load[0]:.1f})", title_justify="left")
    for col in ("method", "k", "seed", "seconds", *kinds):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(r["method"], str(r["k"]), str(r["seed"]), f"{r['seconds']:.1f}",
                      *(f"{r[k]['purity']:.2f} / {r[k]['baseline']:.2f} / {r[k]['ami']:+.2f}" for k in kinds))
    Console(stderr=True, width=200).print(table)
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        summary[method] = {"seconds_mean": round(sum(r["seconds"] for r in mine) / len(mine), 3),
                           **{kind: {m: round(sum(r[kind][m] for r in mine) / len(mine), 4)
                                     for m in ("purity", "baseline", "ami")} for kind in kinds}}
    out = {"commit": commit(), "data": args.data, "problems": len(problems), "load_average": [round(x, 2) for x in load],
           "settings": {"ks": ks, "seeds": args.seeds, "min_size": 3}, "rows": rows, "mean_by_method": summary}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
