"""When a generation stops: the real student with and without the end rules, on the same problems.

    python bench/stopping.py                                   # SmolLM2-135M-Instruct, first 20 arithmetic problems
    python bench/stopping.py --model DIR --limit 40

Fixed before the first run (issue 33): the student is $UNDO_REAL_STUDENT, else the hand-converted
/work/models/hf/smollm2-135m-instruct; the problems are the first `--limit` (20) of
examples/arithmetic.jsonl; greedy decoding, `--max-tokens 512`, the default batch size. Two variants,
each a real `undo evaluate` subprocess, run one after the other in this process's run:

* before — `--no-stop-at-answer --repetition-cut 0`: the model's eos and the token limit only
  (what every run did before the end rules existed);
* after  — the defaults: the end of the `#### <answer>` line, and the degenerate-repetition cut.

Per variant: correct (strict and flexible), truncated (finish_reason length or repetition), mean
completion tokens, finish reasons, wall time, and the load average (1 min) before and after, since
the machine is shared. Output: a table on stderr and bench/results/stopping.json with the git commit.
Greedy decoding makes the texts deterministic; only the times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DEFAULT_MODEL = "/work/models/hf/smollm2-135m-instruct"
VARIANTS = {"before": ["--no-stop-at-answer", "--repetition-cut", "0"], "after": []}


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def run_variant(name: str, flags: list[str], model: str, limit: int, folder: Path) -> dict:
    preds = folder / f"{name}.jsonl"
    command = ["undo", "evaluate", "--model", model, "--input", str(REPO / "examples" / "arithmetic.jsonl"),
               "--limit", str(limit), "--output", str(preds), "--max-tokens", "512", *flags]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    metrics = json.loads((folder / f"{name}.metrics.json").read_text())
    rows = [json.loads(line) for line in preds.read_text().splitlines() if line.strip()]
    tokens = [r["usage"]["completion_tokens"] for r in rows]
    finish: dict[str, int] = {}
    for r in rows:
        finish[str(r.get("finish_reason"))] = finish.get(str(r.get("finish_reason")), 0) + 1
    return {"variant": name, "command": " ".join(command[:1] + command[1:]), "n": len(rows),
            "correct_strict": metrics["correct_strict"], "correct_flexible": metrics["correct_flexible"],
            "truncated": metrics["truncated"], "repetition": metrics.get("repetition", 0),
            "mean_completion_tokens": round(sum(tokens) / max(1, len(tokens)), 1), "total_completion_tokens": sum(tokens),
            "finish_reasons": finish, "wall_s": round(wall, 1),
            "load_1min_before": round(load_before, 2), "load_1min_after": round(load_after, 2),
            "outputs": [{"id": r["id"], "answer": r["answer"], "predicted": r["predicted"], "correct": r["correct"],
                         "finish_reason": r["finish_reason"], "output": r["output"]} for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("UNDO_REAL_STUDENT") or DEFAULT_MODEL)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "stopping.json"))
    args = parser.parse_args()
    started_at = commit()  # the code the runs use, not what HEAD is when they end
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_variant(name, flags, args.model, args.limit, Path(tmp)) for name, flags in VARIANTS.items()]
    report = {"bench": "stopping", "commit": started_at, "model": args.model, "limit": args.limit,
              "cpus": os.cpu_count(), "python": sys.version.split()[0], "variants": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"when a generation stops: {args.model}, first {args.limit} of examples/arithmetic.jsonl")
    for col in ("variant", "correct strict", "correct flexible", "truncated", "of which repetition",
                "mean tokens", "wall s", "load 1 min (before/after)"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in results:
        table.add_row(r["variant"], f"{r['correct_strict']}/{r['n']}", f"{r['correct_flexible']}/{r['n']}",
                      str(r["truncated"]), str(r["repetition"]), f"{r['mean_completion_tokens']:.1f}",
                      f"{r['wall_s']:.1f}", f"{r['load_1min_before']:.2f} / {r['load_1min_after']:.2f}")
    Console(stderr=True).print(table)
    print(f"written {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
