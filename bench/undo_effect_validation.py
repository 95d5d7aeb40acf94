"""What the rounds did on validation, read from `bench/undo_effect.py --keep DIR`'s seed folders: a diagnostic.

    python bench/undo_effect.py --keep /tmp/effect                  # the bench, keeping each seed's folder
    python bench/undo_effect_validation.py /tmp/effect              # this table -> bench/results/undo_effect_validation.json

The bench's pre-set comparisons are on test. This reads what happened before the
choice, on validation, for the loop (the demo's run) and the random control:
per seed, the packs problems right at iteration 0, then for round 1 how many of
the round's refinements (its refine output's rows) were packs training
problems, the packs problems right after it, the change over all validation
problems with the paired test the loop's choice rule ran on it (gained / lost,
exact McNemar p, kept or not), and the best later round's change. It explains a
result; it is not one of the bench's comparisons, and its figures were not fixed
before the run.

Output: a rich table on stderr; JSON (with the commit of this checkout) in
bench/results/undo_effect_validation.json or --output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from undo_effect import RESULTS, _commit, _read, _write  # noqa: E402  (the bench's own reader, commit and atomic write)

ARMS = {"loop": "demo", "random": "random"}  # bench arm -> run name inside the seed's demo/runs/


def _run(seed_dir: Path, run_name: str) -> dict | None:
    """One run's validation story: per iteration, all and packs right; per round, what it refined; the choice."""
    demo = seed_dir / "demo"
    run = demo / "runs" / run_name
    if not (run / "summary.json").is_file():
        return None
    skill = {p["id"]: p["meta"]["skill"] for name in ("train", "val") for p in _read(demo / "data" / f"{name}.jsonl")}
    iterations = []
    for folder in sorted(run.glob("iter_[0-9][0-9]")):
        predictions = folder / "val" / "predictions.jsonl"
        if not predictions.is_file():
            continue
        rows = _read(predictions)
        packs = [r for r in rows if skill[r["id"]] == "packs"]
        entry = {"iteration": int(folder.name[-2:]), "right": sum(bool(r["correct"]) for r in rows), "n": len(rows),
                 "packs_right": sum(bool(r["correct"]) for r in packs), "packs_n": len(packs)}
        refined = folder / "refined.jsonl"
        if refined.is_file():
            targets = {r["problem_id"] for r in _read(refined)}
            entry["refined"] = len(targets)
            entry["refined_packs"] = sum(skill.get(t) == "packs" for t in targets)
        iterations.append(entry)
    summary = json.loads((run / "summary.json").read_text())
    return {"iterations": iterations, "choice": (summary.get("choice") or {}).get("tests", []),
            "best_iteration": summary.get("best_iteration")}


def collect(root: Path) -> list[dict]:
    seeds = sorted((p for p in root.glob("seed-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    out = []
    for seed_dir in seeds:
        arms = {arm: _run(seed_dir, name) for arm, name in ARMS.items()}
        if arms["loop"] is not None:
            out.append({"seed": int(seed_dir.name.split("-")[1]), "arms": {k: v for k, v in arms.items() if v}})
    return out


def _round1(run: dict) -> dict | None:
    its = run["iterations"]
    if len(its) < 2:
        return None
    test = next((t for t in run["choice"] if t["iteration"] == 1 and t["against"] == 0), None)
    return {"refined_packs": its[1].get("refined_packs"), "refined": its[1].get("refined"),
            "packs_right": its[1]["packs_right"], "packs_change": its[1]["packs_right"] - its[0]["packs_right"],
            "change": its[1]["right"] - its[0]["right"], "test": test}


def table(seeds: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="validation: what round 1 did (loop vs random), and what the choice kept")
    for col in ("seed", "n", "packs right, it. 0", "loop: packs refined", "packs right", "change (test)",
                "loop kept", "random: packs refined", "packs right", "change"):
        t.add_column(col, justify="right")
    totals = {"loop": [0, 0, 0, 0], "random": [0, 0, 0, 0]}  # refined packs, refined, packs change, change
    for s in seeds:
        loop, rnd = s["arms"]["loop"], s["arms"].get("random")
        first = loop["iterations"][0]
        cells = [str(s["seed"]), str(first["n"]), f"{first['packs_right']}/{first['packs_n']}"]
        for arm, run in (("loop", loop), ("random", rnd)):
            r1 = _round1(run) if run else None
            if r1 is None:
                cells += ["-", "-", "-"] + (["-"] if arm == "loop" else [])
                continue
            totals[arm][0] += r1["refined_packs"] or 0
            totals[arm][1] += r1["refined"] or 0
            totals[arm][2] += r1["packs_change"]
            totals[arm][3] += r1["change"]
            change = f"{r1['change']:+d}"
            if arm == "loop" and r1["test"]:
                change += f" (+{r1['test']['gained']}/-{r1['test']['lost']}, p = {r1['test']['p']:.3f})"
            cells += [f"{r1['refined_packs']} of {r1['refined']}", f"{r1['packs_right']}/{first['packs_n']}", change]
            if arm == "loop":
                cells.append(f"iteration {run['best_iteration']}")
        t.add_row(*cells)
    console = Console(stderr=True)
    console.print(t)
    for arm, (packs, refined, packs_change, change) in totals.items():
        console.print(f"{arm}, round 1 over {len(seeds)} seeds: {packs} of {refined} refinements on packs problems; "
                      f"packs right {packs_change:+d}; validation change {change:+d} problems")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="the folder given to bench/undo_effect.py --keep")
    parser.add_argument("--output", type=Path, default=RESULTS / "undo_effect_validation.json")
    args = parser.parse_args()
    seeds = collect(args.root)
    if not seeds:
        raise SystemExit(f"{args.root}: no seed-S folder with a finished loop run (bench/undo_effect.py --keep)")
    _write(args.output, {**_commit(), "root": str(args.root), "seeds": seeds})
    table(seeds)
    print(f"JSON: {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
