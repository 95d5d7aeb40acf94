"""Does error-targeting help? `undo demo`'s loop against three controls at the same teacher budget, on 20 seeds.

    python bench/undo_effect.py                          # ORDER below, 2 at a time -> bench/results/undo_effect.json
    python bench/undo_effect.py --seeds 100,101 --output /tmp/design.json   # other seeds, the same way
    python bench/undo_effect.py --summarize bench/results/undo_effect.json  # every figure again, from the JSON
    python bench/undo_effect.py --keep /tmp/effect       # keep each seed's folder (runs, predictions, models)

What is fixed before any result was seen (this file was committed before its first run):

* SEEDS = 0..19, the bench's seeds. Each seed is a whole `undo demo --seed S` from an
  empty folder (its own split of examples/arithmetic.jsonl, its own teacher trained
  by `undo train`, its own loop); nothing is shared between seeds but the shipped
  files. If the run has to be cut short, the reported seeds are the longest
  *prefix* of the run's order that finished, never a choice among finished seeds.
* FRESH_SEEDS = 20..29 (added with the second design, below, before it was run on
  any seed): seeds never run on any design, so that a result on the bench's
  seeds, which the first design's results were seen on, can be checked on seeds
  nobody has seen. ORDER, the default run's order, alternates one fresh seed and
  one bench seed while both last (20, 0, 21, 1, ..., 29, 9, then 10..19), so a
  cut leaves both groups in the prefix. The summary reports the bench seeds, the
  fresh seeds and all of them, each with both intervals.
* Four arms per seed, every one from the same data, teacher, student base and
  settings (examples/run.toml), every one scored on the same test problems:
  - one_shot: iteration 0 of the demo's run (the student trained on the teacher's
    first rationales);
  - loop: the demo's run, the student of the iteration it chose on validation
    (undo_cli/loop/choose.py: a paired test, not the raw maximum);
  - random: `undo iterate` with the same settings but `--refine.select random`:
    the same number of rounds as the loop ran, each refining the same budget of
    training problems (examples/run.toml [refine]), chosen uniformly at random;
    its best iteration chosen by the same rule;
  - more_samples: one-shot with more teacher samples: `--max-iterations 0
    --generate.n 1+E --generate.temperature T` (T: the refine table's), where E =
    ceil(refinement samples the loop drew / training problems): the teacher
    samples the loop's rounds cost, spent on more first-draft rationales.
* Per arm and seed: every test problem's outcome (0/1), saved in the JSON with the
  git commit, so every figure below is recomputed by `--summarize`.
* The comparisons: loop - random (the target: error-targeting beats a random
  spend of the same budget), loop - one_shot (the loop must not lose), loop -
  more_samples, in accuracy points. Two 95% intervals for each, both chosen
  before the run: the seed level (the mean of per-seed differences with a
  Student t interval over seeds: seeds are the unit, each with its own split,
  teacher and stopping) and a hierarchical bootstrap (BOOTSTRAP resamples: seeds
  with replacement, then, within each drawn seed, its test problems with
  replacement, the same problems for both arms; percentile interval,
  numpy.random.default_rng(BOOTSTRAP_SEED)).
* The target: loop - random with a seed-level interval above zero, and loop >=
  one_shot. Whatever the run shows is reported.

The two designs. The first (bench run at 5627c51, seeds 0-9; seeds 10-19 at
0f51238) split 300 problems into 120 training, 90 validation, 90 test problems.
Its diagnosis, from validation, not test: the loop's refined students were ahead
of one-shot on validation on 8 of 10 seeds, but the paired choice rule on 90
items kept one on a single seed. The second design keeps the rule, the budget,
the models and the 120 training problems, and gives the choice more items: 600
shipped problems, split 120 / 300 / 180 (undo_cli/demo.py SPLIT). It was decided
from that power argument before any seed ran on it, checked on design seeds
100-101 (validation only), and then run on ORDER.

How the demo was designed without looking at this bench: the demo's premise and
settings (examples/make_examples.py, examples/pretrain_student.py,
undo_cli/demo.py, examples/run.toml) were tried on seeds 100 and above and
judged on validation accuracy only.

Output: a table on stderr, JSON in bench/results/undo_effect.json (or --output).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SEEDS = tuple(range(20))  # fixed before the first run; design work used seeds >= 100
FRESH_SEEDS = tuple(range(20, 30))  # added with the second design, before it ran on any seed
ORDER = tuple(x for pair in zip(FRESH_SEEDS, SEEDS) for x in pair) + SEEDS[len(FRESH_SEEDS):]
GROUPS = {"bench seeds (0-19)": set(SEEDS), "fresh seeds (20-29)": set(FRESH_SEEDS)}
ARMS = ("one_shot", "loop", "random", "more_samples")
COMPARISONS = (("loop", "random"), ("loop", "one_shot"), ("loop", "more_samples"))
BOOTSTRAP = 10_000
BOOTSTRAP_SEED = 20240611
WORKERS = 2  # seeds at a time: the demo's tiny models use one torch thread each


# --- running one seed ------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "120"})
    return env


def _undo(args: list[str], log: Path) -> dict:
    """`undo ARGS` in a fresh process, its output appended to log: wall s, CPU s, peak RSS GB (os.wait4)."""
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ undo {' '.join(args)}\n")
        out.flush()
        proc = subprocess.Popen([sys.executable, "-m", "undo_cli", *args], stdout=out, stderr=out, env=_env(),
                                cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"undo {' '.join(args[:3])} ... failed with exit code {code} (log: {log})")
    return {"wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _arm(run: Path, iteration: int | None = None) -> dict:
    """A run's chosen (or given) iteration on test: outcomes per problem, and what the run did."""
    summary = json.loads((run / "summary.json").read_text())
    k = summary["best_iteration"] if iteration is None else iteration
    outcomes = {r["id"]: int(bool(r["correct"])) for r in _read(run / f"iter_{k:02d}" / "test" / "predictions.jsonl")}
    rows = summary.get("iterations") or []
    n = _refine_n()
    return {"outcomes": outcomes, "correct": sum(outcomes.values()), "n": len(outcomes), "iteration": k,
            "rounds": max(0, len(rows) - 1),
            "val_accuracy": [r.get("val_accuracy") for r in rows],
            "refined_targets": [r.get("refined") for r in rows[1:]],
            "refined_verified": [r.get("refined_verified") for r in rows[1:]],
            "refine_samples": sum((r.get("refined") or 0) * n for r in rows[1:]),
            "teacher_written": rows[0].get("teacher_written") if rows else None,
            "choice": summary.get("choice"),
            "teacher_tokens": (summary.get("teacher_usage") or {}).get("tokens")}


def _settings() -> dict:
    import tomllib

    return tomllib.loads((REPO / "examples" / "run.toml").read_text())


def _refine_n() -> int:
    return int(_settings().get("refine", {}).get("n", 1))


def one_seed(seed: int, folder: Path) -> dict:
    """The four arms of one seed (see the module docstring)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    log = folder / "log.txt"
    demo = folder / "demo"
    cost = {"demo": _undo(["demo", "--workdir", str(demo), "--seed", str(seed)], log)}
    run = demo / "runs" / "demo"
    loop, one_shot = _arm(run), _arm(run, 0)
    data, models = demo / "data", demo / "models"
    base = ["iterate", "--config", str(REPO / "examples" / "run.toml"), "--teacher", str(models / "teacher"),
            "--student", str(models / "student"), "--train-file", str(data / "train.jsonl"),
            "--val-file", str(data / "val.jsonl"), "--test-file", str(data / "test.jsonl"),
            "--runs-dir", str(demo / "runs"), "--seed", str(seed)]
    rounds = loop["rounds"]
    if rounds:  # the same rounds, each the same budget, on random training problems
        cost["random"] = _undo(base + ["--name", "random", "--refine.select", "random", "--max-iterations",
                                       str(rounds), "--patience", str(rounds)], log)
        random_arm = _arm(demo / "runs" / "random")
    else:  # the loop refined nothing: the random spend of nothing is one-shot
        random_arm = {**one_shot, "rounds": 0}
    train = len(_read(data / "train.jsonl"))
    extra = math.ceil(loop["refine_samples"] / train)
    temperature = _settings().get("refine", {}).get("temperature", 0.7)
    cost["more_samples"] = _undo(base + ["--name", "more_samples", "--max-iterations", "0", "--generate.n",
                                         str(1 + extra), "--generate.temperature", str(temperature)], log)
    more = {**_arm(demo / "runs" / "more_samples"), "samples_per_problem": 1 + extra}
    return {"seed": seed, "arms": {"one_shot": one_shot, "loop": loop, "random": random_arm, "more_samples": more},
            "cost": cost}


# --- statistics --------------------------------------------------------------------------------------

def _diffs(seeds: list[dict], a: str, b: str) -> list[list[int]]:
    """Per seed, per test problem (sorted ids): outcome of arm a minus arm b."""
    out = []
    for s in seeds:
        oa, ob = s["arms"][a]["outcomes"], s["arms"][b]["outcomes"]
        if set(oa) != set(ob):
            raise SystemExit(f"seed {s['seed']}: arms {a} and {b} were tested on different problems")
        out.append([oa[i] - ob[i] for i in sorted(oa)])
    return out


def seed_level(per_seed: list[float]) -> dict:
    """Mean of per-seed differences with a 95% Student t interval over seeds."""
    from scipy import stats

    k = len(per_seed)
    mean = sum(per_seed) / k
    if k < 2:
        return {"mean": mean, "ci95": None, "k": k}
    sd = math.sqrt(sum((g - mean) ** 2 for g in per_seed) / (k - 1))
    half = float(stats.t.ppf(0.975, k - 1)) * sd / math.sqrt(k)
    return {"mean": mean, "ci95": [mean - half, mean + half], "k": k, "sd": sd}


def hierarchical_bootstrap(diffs: list[list[int]], resamples: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> list:
    """95% percentile interval of the mean difference: seeds resampled, then problems within each drawn seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    k = len(diffs)
    arrays = [np.asarray(d, dtype=float) for d in diffs]
    means = np.empty(resamples)
    for r in range(resamples):
        picked = rng.integers(0, k, size=k)
        means[r] = np.mean([arrays[i][rng.integers(0, len(arrays[i]), size=len(arrays[i]))].mean() for i in picked])
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarize(report: dict) -> dict:
    """Every figure from the per-problem outcomes, over all reported seeds and over each group of GROUPS with a
    reported seed (`groups`)."""
    out = _summarize(report["seeds"])
    groups = {name: [s for s in report["seeds"] if s["seed"] in members] for name, members in GROUPS.items()}
    if sum(bool(g) for g in groups.values()) > 1:
        out["groups"] = {name: _summarize(g) for name, g in groups.items() if g}
    return out


def _summarize(seeds: list[dict]) -> dict:
    """Per arm, per comparison (both intervals) over these seeds."""
    arms = {}
    for arm in ARMS:
        correct = sum(s["arms"][arm]["correct"] for s in seeds)
        n = sum(s["arms"][arm]["n"] for s in seeds)
        arms[arm] = {"correct": correct, "n": n, "accuracy": correct / n if n else None}
    comparisons = {}
    for a, b in COMPARISONS:
        diffs = _diffs(seeds, a, b)
        per_seed = [sum(d) / len(d) for d in diffs]
        comparisons[f"{a}-{b}"] = {
            "per_seed": per_seed, "seed_level": seed_level(per_seed),
            "hierarchical_bootstrap": {"mean": sum(per_seed) / len(per_seed),
                                       "ci95": hierarchical_bootstrap(diffs) if len(diffs) > 1 else None},
            "wins": sum(g > 0 for g in per_seed), "ties": sum(g == 0 for g in per_seed),
            "losses": sum(g < 0 for g in per_seed)}
    return {"k": len(seeds), "arms": arms, "comparisons": comparisons,
            "method": f"seed level: mean of per-seed differences, Student t over seeds; hierarchical bootstrap: "
                      f"{BOOTSTRAP} resamples of seeds, then of problems within each, percentile"}


# --- the run -----------------------------------------------------------------------------------------

def _commit() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)


def run(seeds: list[int], output: Path, keep: Path | None, workers: int) -> dict:
    """Every seed (up to `workers` at once); the JSON is rewritten after each, the finished prefix summarized."""
    started = time.time()
    report = {**_commit(), "requested_seeds": seeds, "seeds": [], "load_avg": [round(os.getloadavg()[0], 2)],
              "cpus": os.cpu_count(), "workers": workers, "settings": _settings(), "started": time.ctime(started)}
    done: dict[int, dict] = {}
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="undo-effect-") as tmp:
        root = keep or Path(tmp)

        def work(seed: int) -> None:
            result = one_seed(seed, root / f"seed-{seed}")
            with lock:
                done[seed] = result
                prefix = []
                for s in seeds:  # the reported seeds: the finished prefix of the requested order
                    if s not in done:
                        break
                    prefix.append(done[s])
                report["seeds"] = prefix
                report["finished_out_of_order"] = sorted(set(done) - {s["seed"] for s in prefix})
                report["load_avg"].append(round(os.getloadavg()[0], 2))
                report["wall_s"] = round(time.time() - started)
                arms = result["arms"]
                print(f"seed {seed}: " + ", ".join(f"{a} {arms[a]['correct']}/{arms[a]['n']}" for a in ARMS)
                      + f" (loop iteration {arms['loop']['iteration']} of {arms['loop']['rounds']} rounds; "
                      f"{result['cost']['demo']['wall_s']:.0f} s demo)", file=sys.stderr, flush=True)
                if prefix:
                    report["summary"] = summarize(report)
                _write(output, report)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(work, s) for s in seeds]:
                future.result()
    return report


def _table(report: dict, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    seeds, summary = report["seeds"], report.get("summary")
    if not seeds:
        console.print(f"no finished seed in {path}")
        return
    table = Table(title=f"undo demo on test, 4 arms at the same teacher budget (commit {report['commit'][:10]}"
                        f"{', dirty' if report.get('dirty') else ''})")
    for col in ("seed", "n", "one-shot", "loop (iter/rounds)", "random", "more samples", "loop-random",
                "loop-one-shot"):
        table.add_column(col, justify="right")
    for s in seeds:
        arms, n = s["arms"], s["arms"]["loop"]["n"]
        table.add_row(str(s["seed"]), str(n), str(arms["one_shot"]["correct"]),
                      f"{arms['loop']['correct']} ({arms['loop']['iteration']}/{arms['loop']['rounds']})",
                      str(arms["random"]["correct"]), f"{arms['more_samples']['correct']} "
                      f"(x{arms['more_samples'].get('samples_per_problem', '?')})",
                      f"{arms['loop']['correct'] - arms['random']['correct']:+d}",
                      f"{arms['loop']['correct'] - arms['one_shot']['correct']:+d}")
    a = summary["arms"]
    table.add_row("pooled", str(a["loop"]["n"]), *(f"{100 * a[x]['accuracy']:.1f}%" for x in ARMS), "", "",
                  end_section=True)
    console.print(table)
    ci = lambda v: "n/a" if v is None else f"{100 * v[0]:+.1f} to {100 * v[1]:+.1f}"  # noqa: E731
    for title, part in [("all reported seeds", summary), *summary.get("groups", {}).items()]:
        arms = ", ".join(f"{x} {100 * part['arms'][x]['accuracy']:.1f}%" for x in ARMS)
        console.print(f"{title} (k = {part['k']}, n = {part['arms']['loop']['n']}): {arms}")
        for name, c in part["comparisons"].items():
            lvl, hb = c["seed_level"], c["hierarchical_bootstrap"]
            console.print(f"  {name}: {100 * lvl['mean']:+.1f} points; seed-level 95% t interval {ci(lvl['ci95'])}; "
                          f"hierarchical bootstrap {ci(hb['ci95'])}; per seed {c['wins']} better, {c['ties']} equal, "
                          f"{c['losses']} worse")
    if report.get("finished_out_of_order"):
        console.print(f"finished but after an unfinished seed (not reported): {report['finished_out_of_order']}")
    console.print(f"load average {report.get('load_avg')}; {report.get('workers')} seeds at a time; JSON: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: ORDER, 0-29 interleaved)")
    parser.add_argument("--output", type=Path, default=RESULTS / "undo_effect.json")
    parser.add_argument("--keep", type=Path, default=None, help="keep each seed's folder here (seed-S/)")
    parser.add_argument("--workers", type=int, default=WORKERS, help="seeds run at a time")
    parser.add_argument("--summarize", type=Path, default=None,
                        help="recompute every figure of an earlier run's JSON from its per-problem outcomes")
    args = parser.parse_args()
    if args.summarize:
        report = json.loads(args.summarize.read_text())
        report["summary"] = summarize(report)
        _write(args.summarize, report)
        _table(report, args.summarize)
        return
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(ORDER)
    report = run(seeds, args.output, args.keep, args.workers)
    _table(report, args.output)


if __name__ == "__main__":
    main()
