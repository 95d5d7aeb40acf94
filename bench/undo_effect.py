"""The UNDO effect, measured: `undo demo`'s loop on 5 seeds fixed in advance, best student vs one-shot on test.

    python bench/undo_effect.py                      # the 5 seeds below, each a fresh `undo demo`, in a temp folder
    python bench/undo_effect.py --keep /tmp/effect   # keep every seed's demo folder (runs, predictions, models)
    python bench/undo_effect.py --seeds 100 101      # other seeds: a design check, never the reported result

What is fixed before any result was seen (this file was committed before its first run):

* SEEDS = 0, 1, 2, 3, 4: each seed is a whole `undo demo --seed S` from an empty
  folder, exactly as a user runs it (its own split of examples/arithmetic.jsonl, its own
  teacher trained by `undo train`, its own loop); nothing is shared between seeds but
  the shipped files (problems, the pretrained student base).
* The comparison: on the test split, which no decision of the loop looks at, the
  student of the best iteration (chosen on validation) against the one-shot student
  (iteration 0). When the loop keeps iteration 0 the gain of that seed is 0.
* Per seed: both accuracies with n and 95% Wilson intervals.
* The pooled gain: the mean over all (seed, test problem) pairs of best-correct minus
  one-shot-correct, with a 95% interval from a paired bootstrap over those pairs
  (BOOTSTRAP resamples of the pooled pairs with replacement, percentile interval,
  random.Random(BOOTSTRAP_SEED)). Chosen before running; the per-seed gains and their
  mean are printed too, for reading, not as the test. Added after the first run, for
  reading: the same mean with a t interval over seeds (`seed_level`), which also holds
  the seed-to-seed variation that the pooled bootstrap over problems leaves out.
* The target was a pooled interval that excludes zero. Whatever it shows is reported.

How the demo was designed without looking at this bench: every choice of teacher,
student and data (examples/make_examples.py, examples/pretrain_student.py,
undo_cli/stages/demo.py, examples/run.toml) was tried on seeds 100 and above and
judged on *validation* accuracy only; the test split of seeds 0-4 was first
read by this script.

Also measured per seed, from the run folder: how many of the refinements the loop
used (verified, mixed into the training data) have only true arithmetic steps
(`undo_cli.steps.check_steps`; with --verify steps, all of them by construction), the
refinement targets refused although a sample had the right final answer (what --verify
strict would have used, false steps and all), the one-shot rationales with only true
steps, and the demo's wall time, CPU time and peak RSS (os.wait4).

Output: a rich table on stderr, JSON in bench/results/undo_effect.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SEEDS = (0, 1, 2, 3, 4)  # fixed before the first run; design work used seeds >= 100
BOOTSTRAP = 10_000
BOOTSTRAP_SEED = 20240611


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(diffs: list[int], resamples: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile interval of the mean of paired differences (each -1, 0 or 1), resampling the pairs."""
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return (means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1])


# 97.5% quantiles of Student's t by degrees of freedom (the seed-level interval over a few seeds).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def seed_level(gains: list[float]) -> dict:
    """Mean of per-seed gains with a 95% t interval: seeds as the unit, so it also holds the seed-to-seed
    variation (each seed's own split, teacher and stopping) that the pooled bootstrap over problems does not."""
    k = len(gains)
    mean = sum(gains) / k
    if k < 2:
        return {"mean": mean, "ci95": None, "k": k}
    sd = math.sqrt(sum((g - mean) ** 2 for g in gains) / (k - 1))
    half = T975.get(k - 1, 1.96) * sd / math.sqrt(k)
    return {"mean": mean, "ci95": (mean - half, mean + half), "k": k, "method": "mean of per-seed gains, t interval"}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def refinement_steps(run: Path) -> dict:
    """The refinements the loop used (verified, not the kept previous rationale) and how many have only true steps;
    and the targets whose every sample was refused though one had the right final answer: a final-answer-only
    check (--verify strict) would have used it, false step and all."""
    from undo_cli.scoring import score
    from undo_cli.steps import check_steps

    used = true = strict_would_use_false = 0
    for refined in sorted(run.glob("iter_*/refined.jsonl")):
        for record in _read(refined):
            info = record.get("refinement") or {}
            if info.get("kept_previous") or not info.get("verified", True):
                samples = [info.get("rejected_rationale") or ""] + list(info.get("more_rejected") or [])
                strict_would_use_false += any(score(t, record["answer"], "math", mode="strict").correct
                                              for t in samples)
                continue
            used += 1
            true += check_steps(record["rationale"]).ok
    generated = _read(run / "iter_00" / "rationales.jsonl")
    return {"used": used, "true_steps": true, "share": (true / used) if used else None,
            "refused_false_step": strict_would_use_false,
            "one_shot_rationales": len(generated),
            "one_shot_true_steps": sum(check_steps(r["rationale"]).ok for r in generated)}


def _demo(seed: int, workdir: Path) -> tuple[float, float, float]:
    """`undo demo --seed S` in a fresh process, as a user runs it: (wall s, CPU s, peak RSS GB) via os.wait4."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "120"})
    workdir.parent.mkdir(parents=True, exist_ok=True)
    log = workdir.parent / f"{workdir.name}.log"
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "undo_cli", "demo", "--workdir", str(workdir), "--seed",
                                 str(seed)], stdout=out, stderr=out, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"undo demo --seed {seed} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20


def one_seed(seed: int, workdir: Path) -> dict:
    """One seed's demo; its test results, paired per problem, and its cost."""
    wall, cpu, rss = _demo(seed, workdir)
    from undo_cli.loop.layout import RunLayout

    run = workdir / "runs" / "demo"
    layout = RunLayout(run)
    summary = json.loads(layout.summary.read_text())
    best = summary["best_iteration"]
    one_shot = {r["id"]: bool(r["correct"]) for r in _read(layout.predictions(0, "test"))}
    chosen = {r["id"]: bool(r["correct"]) for r in _read(layout.predictions(best, "test"))}
    if set(one_shot) != set(chosen):
        raise SystemExit(f"seed {seed}: the two test prediction files cover different problems")
    diffs = [int(chosen[i]) - int(one_shot[i]) for i in sorted(one_shot)]
    n, a, b = len(diffs), sum(one_shot.values()), sum(chosen.values())
    return {"seed": seed, "n": n, "best_iteration": best, "iterations": len(summary.get("iterations") or []),
            "one_shot": {"correct": a, "accuracy": a / n, "ci95": wilson(a, n)},
            "best": {"correct": b, "accuracy": b / n, "ci95": wilson(b, n)},
            "gain": (b - a) / n, "diffs": diffs, "refinements": refinement_steps(run),
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_gb": round(rss, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--keep", type=Path, default=None, help="keep each seed's demo folder here (seed-S/)")
    parser.add_argument("--summarize", type=Path, default=None,
                        help="only print the table of an earlier run's JSON (and add what it lacks), running nothing")
    args = parser.parse_args()
    if args.summarize:
        report = json.loads(args.summarize.read_text())
        report["pooled"]["seed_level"] = seed_level([s["gain"] for s in report["seeds"]])
        args.summarize.write_text(json.dumps(report, indent=2) + "\n")
        _table(report, args.summarize)
        return

    load = [round(os.getloadavg()[0], 2)]
    with tempfile.TemporaryDirectory(prefix="undo-effect-") as tmp:
        root = args.keep or Path(tmp)
        seeds = []
        for seed in args.seeds:
            folder = root / f"seed-{seed}"
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            seeds.append(one_seed(seed, folder))
            load.append(round(os.getloadavg()[0], 2))
            print(f"seed {seed}: one-shot {seeds[-1]['one_shot']['correct']}/{seeds[-1]['n']}, best "
                  f"{seeds[-1]['best']['correct']}/{seeds[-1]['n']} (iteration {seeds[-1]['best_iteration']})",
                  file=sys.stderr, flush=True)

    pooled = [d for s in seeds for d in s["diffs"]]
    gains = [s["gain"] for s in seeds]
    refinements = {k: sum(s["refinements"][k] for s in seeds)
                   for k in ("used", "true_steps", "refused_false_step", "one_shot_rationales", "one_shot_true_steps")}
    report = {
        "seeds": [{k: v for k, v in s.items() if k != "diffs"} for s in seeds],
        "pooled": {"n": len(pooled), "gain": sum(pooled) / len(pooled), "ci95": paired_bootstrap(pooled),
                   "method": f"paired bootstrap over (seed, test problem) pairs, {BOOTSTRAP} resamples, percentile",
                   "one_shot_accuracy": sum(s["one_shot"]["correct"] for s in seeds) / len(pooled),
                   "best_accuracy": sum(s["best"]["correct"] for s in seeds) / len(pooled),
                   "mean_of_seed_gains": sum(gains) / len(gains), "seed_level": seed_level(gains)},
        "refinements": {**refinements, "share_true": (refinements["true_steps"] / refinements["used"])
                        if refinements["used"] else None},
        "reported_seeds": list(SEEDS), "ran_seeds": args.seeds, "load_avg": load, "cpus": os.cpu_count(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "undo_effect.json").write_text(json.dumps(report, indent=2) + "\n")
    _table(report, RESULTS / "undo_effect.json")


def _table(report: dict, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    ci = lambda c: f"{100 * c[0]:.1f}-{100 * c[1]:.1f}"  # noqa: E731
    table = Table(title="UNDO vs one-shot distillation on test (undo demo, each seed from scratch)")
    for col in ("seed", "n", "one-shot", "95% CI", "best (iter)", "95% CI", "gain", "refinements true steps",
                "wall s", "CPU s", "peak GB"):
        table.add_column(col, justify="right")
    for s in report["seeds"]:
        r = s["refinements"]
        table.add_row(str(s["seed"]), str(s["n"]), pct(s["one_shot"]["accuracy"]), ci(s["one_shot"]["ci95"]),
                      f"{pct(s['best']['accuracy'])} ({s['best_iteration']})", ci(s["best"]["ci95"]),
                      f"{100 * s['gain']:+.1f}", f"{r['true_steps']}/{r['used']}", f"{s['wall_s']:.0f}",
                      f"{s['cpu_s']:.0f}", f"{s['peak_rss_gb']:.2f}")
    p, r = report["pooled"], report["refinements"]
    table.add_row("pooled", str(p["n"]), pct(p["one_shot_accuracy"]), "", pct(p["best_accuracy"]), "",
                  f"{100 * p['gain']:+.1f}", f"{r['true_steps']}/{r['used']}", "", "", "", end_section=True)
    console = Console(stderr=True)
    console.print(table)
    console.print(f"pooled gain {100 * p['gain']:+.1f} points, 95% CI {100 * p['ci95'][0]:+.1f} to "
                  f"{100 * p['ci95'][1]:+.1f} ({p['method']}); mean of per-seed gains "
                  f"{100 * p['mean_of_seed_gains']:+.1f}; load average {report['load_avg']}")
    console.print(f"refinement targets refused for a false step with the right final answer (--verify strict would "
                  f"have used them): {r['refused_false_step']}; one-shot rationales with only true steps: "
                  f"{r['one_shot_true_steps']}/{r['one_shot_rationales']}")
    level = p.get("seed_level") or {}
    if level.get("ci95"):
        console.print(f"seed level (seeds as the unit, for reading): mean gain {100 * level['mean']:+.1f} points, "
                      f"95% t interval {100 * level['ci95'][0]:+.1f} to {100 * level['ci95'][1]:+.1f} over "
                      f"{level['k']} seeds")
    console.print(f"JSON: {path}")


if __name__ == "__main__":
    main()
