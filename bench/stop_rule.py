"""When each stopping rule would stop the demo's loop, what it paid the teacher by then, and what it kept.

    python bench/stop_rule.py                    # a fresh demo (seed 0) in a temp folder
    python bench/stop_rule.py --workdir /tmp/d   # reuse a demo folder's data and models (`undo demo --setup-only`)

What is fixed before any result was seen (this file was committed before its first run):

* The demo of seed 0: its data and models (`undo demo --setup-only --seed 0`), and one loop with
  examples/run.toml's settings except `--max-iterations 3 --patience 3`, so that every round runs
  whatever a rule would say (the loop stops early only when no validation error is left).
* Every iteration's student is then evaluated on the test split (`undo evaluate`, the loop's own
  evaluate settings), which no rule looks at.
* The rules are replayed on that one history (validation outcomes, paid teacher tokens per
  iteration), with run.toml's patience (1) and min_delta (0), the choice's defaults (alpha 0.05,
  min gain 0.02), and for `value` STOP_MIN_GAIN_PER_KTOK = 1.0 (a round must buy a point of
  validation accuracy per 1,000 paid teacher tokens): `patience` (the rule before), `paired`, `value`.
  The same decision code as the loop (loop/rounds.decide) on each prefix of the history: the first
  iteration after which it says stop.
* Reported per rule: the iteration it stops after, the paid teacher tokens through it, the student
  it keeps (the paired choice over the iterations it ran) and that student's test accuracy with a
  95% Wilson interval. One seed: an illustration of the rules on a real history, not evidence that
  one rule is better.

Output: a rich table on stderr, JSON in bench/results/stop_rule.json (with the git commit and the load).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from demo_folder import demo_folder, git_commit, undo  # noqa: E402  (bench/demo_folder.py)

RESULTS = REPO / "bench" / "results"
SEED, MAX_ITERATIONS = 0, 3
PATIENCE, MIN_DELTA, STOP_MIN_GAIN_PER_KTOK = 1, 0.0, 1.0
RULES = ("patience", "paired", "value")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", help="a demo folder to reuse or create (default: a temporary one)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with demo_folder(args.workdir, seed=SEED, prefix="undo-stop-") as workdir:
        measure(workdir, load_before)


def measure(workdir: Path, load_before: float) -> None:
    from undo_cli.loop.choose import ALPHA, MIN_GAIN, choose, read_outcomes
    from undo_cli.loop.rounds import decide
    from undo_cli.loop.layout import RunLayout
    from undo_cli.loop.run_state import wilson_interval
    from undo_cli.loop.usage import usage_by_iteration
    from undo_cli.prompts import bundled_dir

    data, models, run = workdir / "data", workdir / "models", workdir / "runs" / "stop-bench"
    resume = ["--resume"] if (run / "manifest.json").is_file() else []
    undo("iterate", "--config", bundled_dir("examples") / "run.toml", "--teacher", models / "teacher", "--student",
         models / "student", "--train-file", data / "train.jsonl", "--val-file", data / "val.jsonl", "--test-file",
         data / "test.jsonl", "--runs-dir", workdir / "runs", "--name", "stop-bench", "--seed", SEED,
         "--max-iterations", MAX_ITERATIONS, "--patience", MAX_ITERATIONS, *resume)
    layout = RunLayout(run)
    ks = layout.iterations()
    history = []
    for k in ks:
        metrics = json.loads(layout.metrics(k, "val").read_text())
        errors = sum(1 for line in layout.errors(k).read_text().splitlines() if line.strip())
        history.append({"accuracy": metrics["accuracy"], "errors": errors,
                        "outcomes": read_outcomes(layout.predictions(k, "val"))})
    paid = {r["iteration"]: r["paid"]["tokens"] for r in usage_by_iteration(run)["iterations"]}
    test = {}
    for k in ks:  # every student on test, which no rule reads
        out = workdir / "bench" / f"test_{k:02d}.jsonl"
        undo("evaluate", "--model", layout.student(k), "--input", data / "test.jsonl", "--output", out,
             "--metrics", out.with_suffix(".metrics.json"), "--max-tokens", "128", "--batch-size", "64", "--overwrite")
        m = json.loads(out.with_suffix(".metrics.json").read_text())
        test[k] = {"correct": m["correct"], "count": m["count"], "accuracy": m["accuracy"],
                   "ci95": [round(v, 4) for v in wilson_interval(m["correct"], m["count"])]}
    rules = {}
    for rule in RULES:
        config = SimpleNamespace(max_iterations=MAX_ITERATIONS, patience=PATIENCE, min_delta=MIN_DELTA,
                                 choose_alpha=ALPHA, choose_min_gain=MIN_GAIN, stop_rule=rule,
                                 stop_min_gain_per_ktok=STOP_MIN_GAIN_PER_KTOK)
        stop_after, reason = ks[-1], "ran out of iterations"
        for k in range(len(history)):
            _, why = decide(history[: k + 1], config, paid)
            if why:
                stop_after, reason = k, why
                break
        kept, _ = choose([h["outcomes"] for h in history[: stop_after + 1]], ALPHA, MIN_GAIN)
        rules[rule] = {"stops_after": stop_after, "reason": reason,
                       "paid_tokens": sum(paid.get(k, 0) for k in range(stop_after + 1)),
                       "kept_iteration": kept, "kept_test": test[kept]}
    commit = git_commit()
    report = {"commit": commit, "seed": SEED, "max_iterations": MAX_ITERATIONS, "patience": PATIENCE,
              "min_delta": MIN_DELTA, "stop_min_gain_per_ktok": STOP_MIN_GAIN_PER_KTOK, "alpha": ALPHA,
              "min_gain": MIN_GAIN, "val_accuracy": [h["accuracy"] for h in history], "paid_tokens": paid,
              "test": test, "rules": rules, "load_before": round(load_before, 2),
              "load_after": round(os.getloadavg()[0], 2)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stop_rule.json").write_text(json.dumps(report, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"stopping rules replayed on one demo loop (seed {SEED}), commit {commit[:10]}")
    for col in ("rule", "stops after", "paid teacher tokens", "kept", "its test accuracy (95% CI)", "why"):
        table.add_column(col, overflow="fold")
    for rule, r in rules.items():
        t = r["kept_test"]
        table.add_row(rule, str(r["stops_after"]), f"{r['paid_tokens']:,}", str(r["kept_iteration"]),
                      f"{t['correct']}/{t['count']} ({t['ci95'][0]:.2f}-{t['ci95'][1]:.2f})", r["reason"])
    console = Console(stderr=True)
    console.print(table)
    console.print(f"validation accuracy per iteration: {report['val_accuracy']}; paid tokens: {paid}; "
                  f"load {report['load_before']} -> {report['load_after']}")
    console.print(f"JSON: {RESULTS / 'stop_rule.json'}")


if __name__ == "__main__":
    main()
