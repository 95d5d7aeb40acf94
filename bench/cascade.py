"""Strong-teacher tokens a teacher cascade saves, on the demo, against the strong teacher alone (same run).

    python bench/cascade.py                    # a fresh `undo demo --setup-only` in a temp folder, both arms
    python bench/cascade.py --workdir /tmp/d   # reuse (or keep) a demo folder: its data and models

What is fixed before any result was seen (this file was committed before its first run):

* The demo of seed 0 (`undo demo --setup-only --seed 0`): its training split (data/train.jsonl),
  its untrained student base (models/student, a copy of examples/student-base) as the cheap
  teacher, and the teacher the demo trains from it (models/teacher) as the strong one.
* Both arms are `undo generate` over every training problem with examples/run.toml's generate
  settings (prompt demo-generate, max_tokens 128, greedy, n 1, --verify steps: the default)
  and `--no-cache` (every answer paid for, so tokens are comparable):
  - baseline: `--teacher models/teacher` (the strong teacher alone);
  - cascade:  `--teacher models/student --cascade models/teacher,name=strong`.
  Both run in this process's machine one after the other, baseline first.
* Reported: per arm, the verified share (problems with a kept rationale / problems, 95% Wilson
  interval) and the paid tokens per teacher (the output's ledger, `<stem>.usage.json`); the
  saving = 1 - (the strong teacher's paid tokens in the cascade) / (its paid tokens alone), with
  a 95% interval from a paired bootstrap over problems (BOOTSTRAP resamples with replacement,
  random.Random(BOOTSTRAP_SEED), percentile), each problem's strong tokens read from the records
  (baseline: `usage`; cascade: `lineage.cascade`). Whether the verified shares are equal is said,
  not assumed: with greedy decoding a row the strong teacher verifies alone it verifies in the
  cascade too, so the cascade's share can only be the same or higher.
* Whatever it shows is reported, a saving of zero included (the cheap teacher may verify nothing).

Output: a rich table on stderr, JSON in bench/results/cascade.json (with the git commit and the load).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from demo_folder import demo_folder, git_commit, undo  # noqa: E402  (bench/demo_folder.py)

RESULTS = REPO / "bench" / "results"
SEED = 0
BOOTSTRAP, BOOTSTRAP_SEED = 2000, 0
GENERATE = ["--prompt", "demo-generate", "--max-tokens", "128", "--batch-size", "64", "--no-cache"]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _arm(workdir: Path, name: str, teacher_args: list[str]) -> dict:
    out = workdir / "bench" / f"{name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    undo("generate", *teacher_args, "--input", workdir / "data" / "train.jsonl", "--output", out, "--overwrite",
         *GENERATE)
    wall = time.perf_counter() - started
    kept, rejected = _read(out), _read(out.with_name(f"{name}.rejected.jsonl"))
    ledger = json.loads(out.with_name(f"{name}.usage.json").read_text())
    return {"kept": kept, "rejected": rejected, "ledger": ledger, "wall_s": round(wall, 1)}


def _strong_tokens(records: list[dict], strong: str | None) -> dict[str, int]:
    """problem id -> the strong teacher's paid tokens for it (strong None: the record's own usage, a lone teacher)."""
    out: dict[str, int] = {}
    for r in records:
        if strong is None:
            u = r.get("usage") or {}
            out[r["problem_id"]] = out.get(r["problem_id"], 0) + u.get("prompt_tokens", 0) + u.get("completion_tokens", 0)
        else:
            out[r["problem_id"]] = sum(a["tokens"] for a in r["lineage"]["cascade"] if a["teacher"] == strong)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", help="a demo folder to reuse or create (default: a temporary one)")
    args = parser.parse_args()
    load_before, started = os.getloadavg()[0], time.perf_counter()
    with demo_folder(args.workdir, seed=SEED, prefix="undo-cascade-") as workdir:
        measure(workdir, time.perf_counter() - started, load_before)


def measure(workdir: Path, setup_s: float, load_before: float) -> None:
    from undo_cli.loop.run_state import wilson_interval

    cheap, strong = workdir / "models" / "student", workdir / "models" / "teacher"
    problems = _read(workdir / "data" / "train.jsonl")
    base = _arm(workdir, "baseline", ["--teacher", strong])
    casc = _arm(workdir, "cascade", ["--teacher", cheap, "--cascade", f"{strong},name=strong"])

    ids = [p["id"] for p in problems]
    arms = {}
    for name, arm in (("baseline", base), ("cascade", casc)):
        verified = {r["problem_id"] for r in arm["kept"]}
        low, high = wilson_interval(len(verified), len(ids))
        by = arm["ledger"]["by_backend"]
        arms[name] = {"verified": len(verified), "problems": len(ids), "verified_share": round(len(verified) / len(ids), 4),
                      "ci95": [round(low, 4), round(high, 4)], "paid_tokens": arm["ledger"]["paid"]["tokens"],
                      "paid_by_teacher": {k: v["paid"]["tokens"] for k, v in by.items()}, "wall_s": arm["wall_s"]}
    strong_alone = arms["baseline"]["paid_tokens"]
    strong_cascade = arms["cascade"]["paid_by_teacher"].get("strong", 0)
    per_base = _strong_tokens(base["kept"] + base["rejected"], None)
    per_casc = _strong_tokens(casc["kept"] + casc["rejected"], "strong")
    rng = random.Random(BOOTSTRAP_SEED)
    savings = []
    for _ in range(BOOTSTRAP):
        sample = [rng.choice(ids) for _ in ids]
        alone = sum(per_base.get(i, 0) for i in sample)
        savings.append(1 - sum(per_casc.get(i, 0) for i in sample) / alone if alone else 0.0)
    savings.sort()
    saving = 1 - strong_cascade / strong_alone if strong_alone else 0.0
    first_tier = {r["problem_id"] for r in casc["kept"] if r["lineage"]["teacher"]["id"] != "strong"}
    both = {r["problem_id"] for r in base["kept"]} & {r["problem_id"] for r in casc["kept"]}
    example = next((r for r in casc["kept"] if len(r["lineage"]["cascade"]) > 1), casc["kept"][0] if casc["kept"] else None)
    commit = git_commit()
    report = {
        "commit": commit, "seed": SEED, "setup_s": round(setup_s, 1), "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2), "generate_flags": GENERATE,
        "cheap": "models/student (the untrained student base)", "strong": "models/teacher (the demo's trained teacher)",
        "arms": arms, "rows_verified_by_the_cheap_teacher": len(first_tier),
        "rows_verified_in_both_arms": len(both),
        "equal_verified_share": arms["baseline"]["verified"] == arms["cascade"]["verified"],
        "strong_tokens_alone": strong_alone, "strong_tokens_in_cascade": strong_cascade,
        "strong_tokens_saved": strong_alone - strong_cascade, "saving": round(saving, 4),
        "saving_ci95": [round(savings[int(0.025 * BOOTSTRAP)], 4), round(savings[int(0.975 * BOOTSTRAP) - 1], 4)],
        "bootstrap": {"resamples": BOOTSTRAP, "seed": BOOTSTRAP_SEED, "unit": "fraction of the strong teacher's paid tokens"},
        "example_lineage": example["lineage"] if example else None,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cascade.json").write_text(json.dumps(report, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"teacher cascade on the demo (seed {SEED}, {len(ids)} training problems), commit {commit[:10]}")
    for col in ("arm", "verified (95% CI)", "strong tokens paid", "cheap tokens paid", "all tokens paid", "wall s"):
        table.add_column(col)
    for name, a in arms.items():
        strong_paid = a["paid_tokens"] if name == "baseline" else a["paid_by_teacher"].get("strong", 0)
        cheap_paid = 0 if name == "baseline" else a["paid_by_teacher"].get(str(cheap), 0)
        table.add_row(name, f"{a['verified']}/{a['problems']} ({a['ci95'][0]:.2f}-{a['ci95'][1]:.2f})",
                      f"{strong_paid:,}", f"{cheap_paid:,}", f"{a['paid_tokens']:,}", f"{a['wall_s']}")
    console = Console(stderr=True)
    console.print(table)
    console.print(f"strong-teacher tokens saved: {report['strong_tokens_saved']:,} ({saving:.1%}, 95% CI "
                  f"{report['saving_ci95'][0]:.1%} to {report['saving_ci95'][1]:.1%}); the cheap teacher verified "
                  f"{len(first_tier)} rows; equal verified share: {report['equal_verified_share']}; "
                  f"load {report['load_before']} -> {report['load_after']}")
    console.print(f"JSON: {RESULTS / 'cascade.json'}")


if __name__ == "__main__":
    main()
