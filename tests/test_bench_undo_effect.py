"""bench/undo_effect.py's fixed design and statistics: the seed order, the groups, and both intervals against naive
recomputations (the figures in the README are recomputed from the JSON by `--summarize`, so these functions are
what the claims rest on)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import undo_effect  # noqa: E402


def _seed(seed: int, arms: dict[str, list[int]]) -> dict:
    """A reported seed as one_seed writes it, from each arm's outcomes on problems p0, p1, ..."""
    out = {}
    for arm in undo_effect.ARMS:
        outcomes = {f"p{i}": o for i, o in enumerate(arms.get(arm, arms["one_shot"]))}
        out[arm] = {"outcomes": outcomes, "correct": sum(outcomes.values()), "n": len(outcomes), "iteration": 0,
                    "rounds": 1}
    return {"seed": seed, "arms": out, "cost": {}}


def test_the_order_interleaves_fresh_and_bench_seeds_and_covers_each_once():
    order = undo_effect.ORDER
    assert order[:4] == (20, 0, 21, 1) and order[-10:] == tuple(range(10, 20))
    assert sorted(order) == sorted(undo_effect.SEEDS + undo_effect.FRESH_SEEDS) and len(set(order)) == len(order)
    assert not set(undo_effect.SEEDS) & set(undo_effect.FRESH_SEEDS)
    assert all(s < 100 for s in order)  # design seeds (>= 100) never reported


def test_seed_level_interval_is_the_student_t_interval_of_per_seed_means():
    from scipy import stats

    per_seed = [0.02, -0.01, 0.05, 0.0, 0.03]
    got = undo_effect.seed_level(per_seed)
    mean = sum(per_seed) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_seed) / 4)
    lo, hi = stats.t.interval(0.95, 4, loc=mean, scale=sd / math.sqrt(5))
    assert math.isclose(got["mean"], mean) and math.isclose(got["ci95"][0], lo) and math.isclose(got["ci95"][1], hi)
    assert undo_effect.seed_level([0.1])["ci95"] is None  # one seed: no interval, not a zero-width one


def test_hierarchical_bootstrap_matches_a_naive_loop_and_is_zero_when_arms_agree():
    import numpy as np

    diffs = [[1, 0, 0, -1, 1], [0, 0, 1, 1, 0, 0], [-1, 0, 0, 0]]
    got = undo_effect.hierarchical_bootstrap(diffs, resamples=400, seed=7)
    rng = np.random.default_rng(7)
    means = []
    for _ in range(400):  # seeds with replacement, then problems within each drawn seed
        picked = rng.integers(0, 3, size=3)
        means.append(np.mean([np.asarray(diffs[i], float)[rng.integers(0, len(diffs[i]), size=len(diffs[i]))].mean()
                              for i in picked]))
    assert got == [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    assert undo_effect.hierarchical_bootstrap([[0, 0], [0, 0, 0]], resamples=50) == [0.0, 0.0]


def test_summary_splits_bench_and_fresh_seeds_and_refuses_arms_on_other_problems(tmp_path):
    seeds = [_seed(0, {"one_shot": [1, 0, 0, 1], "loop": [1, 1, 0, 1]}),
             _seed(20, {"one_shot": [0, 0, 1, 1], "loop": [0, 0, 1, 1], "random": [1, 0, 1, 1]})]
    summary = undo_effect.summarize({"seeds": seeds})
    assert summary["k"] == 2 and summary["arms"]["loop"]["correct"] == 5
    assert summary["comparisons"]["loop-random"]["per_seed"] == [0.25, -0.25]
    bench, fresh = summary["groups"]["bench seeds (0-19)"], summary["groups"]["fresh seeds (20-29)"]
    assert bench["k"] == fresh["k"] == 1 and bench["comparisons"]["loop-one_shot"]["per_seed"] == [0.25]
    assert fresh["comparisons"]["loop-random"]["per_seed"] == [-0.25]
    assert "groups" not in undo_effect.summarize({"seeds": seeds[:1]})  # one group: the whole is the group

    seeds[1]["arms"]["random"]["outcomes"] = {"q0": 1}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"commit": "x", "seeds": seeds}))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "undo_effect.py"), "--summarize", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "seed 20: arms loop and random were tested on different problems" in proc.stderr


def test_the_validation_view_counts_packs_refinements_and_reads_the_choice(tmp_path):
    """bench/undo_effect_validation.py on a kept seed folder written by hand: what it counts is what is there."""
    sys.path.insert(0, str(REPO / "bench"))
    import undo_effect_validation as view

    demo = tmp_path / "seed-3" / "demo"
    (demo / "data").mkdir(parents=True)

    def write(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    train = [{"id": f"t{i}", "meta": {"skill": "packs" if i < 2 else "basic"}} for i in range(5)]
    val = [{"id": f"v{i}", "meta": {"skill": "packs" if i < 3 else "basic"}} for i in range(6)]
    write(demo / "data" / "train.jsonl", train)
    write(demo / "data" / "val.jsonl", val)
    for name, after, refined in (("demo", [1, 1, 0, 1, 1, 1], ["t0", "t1", "t4"]), ("random", [0, 0, 0, 1, 0, 1], ["t3"])):
        run = demo / "runs" / name
        write(run / "iter_00" / "val" / "predictions.jsonl",
              [{"id": f"v{i}", "correct": c} for i, c in enumerate([0, 0, 0, 1, 1, 1])])
        write(run / "iter_01" / "val" / "predictions.jsonl", [{"id": f"v{i}", "correct": c} for i, c in enumerate(after)])
        write(run / "iter_01" / "refined.jsonl", [{"id": f"{t}#0", "problem_id": t} for t in refined])
        kept = name == "demo"
        (run / "summary.json").write_text(json.dumps({"best_iteration": int(kept), "choice": {"tests": [
            {"iteration": 1, "against": 0, "gained": 2 if kept else 0, "lost": 0, "p": 0.5, "kept": kept}]}}))
    (tmp_path / "seed-4").mkdir()  # a seed whose loop never finished: left out, not an error

    seeds = view.collect(tmp_path)
    assert [s["seed"] for s in seeds] == [3]
    loop, rnd = seeds[0]["arms"]["loop"], seeds[0]["arms"]["random"]
    assert loop["iterations"][0] == {"iteration": 0, "right": 3, "n": 6, "packs_right": 0, "packs_n": 3}
    assert loop["iterations"][1]["packs_right"] == 2 and loop["iterations"][1]["right"] == 5
    assert (loop["iterations"][1]["refined"], loop["iterations"][1]["refined_packs"]) == (3, 2)
    assert (rnd["iterations"][1]["refined"], rnd["iterations"][1]["refined_packs"]) == (1, 0)
    assert loop["best_iteration"] == 1 and rnd["best_iteration"] == 0
    assert view._round1(loop)["change"] == 2 and view._round1(rnd)["change"] == -1
