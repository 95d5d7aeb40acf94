"""`--shard K/N` and `undo merge`: shards of generate/evaluate/refine/collect-errors merge into the unsharded file.

The teacher is conftest's `trained_teacher` (it solves TAUGHT_PROBLEMS, so
generate keeps some rationales and rejects others, and evaluate scores some
right and some wrong). Every stage runs once unsharded and once as 3 shards;
`undo merge` of the shards must give byte-identical files (outputs, rejected
sidecars, evaluate's metrics.json). Then merge's refusals: missing, duplicated,
foreign and unfinished shards.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import TAUGHT_PROBLEMS, write_jsonl

UNTAUGHT = [{"id": f"u{i}", "question": f"Sam has {i} apples and buys {i + 4} more. How many apples does Sam have?",
             "answer": str(2 * i + 4), "task": "math"} for i in range(1, 5)]
PROBLEMS = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS[:8]] + UNTAUGHT
N = 3
WIDE = {"COLUMNS": "400"}  # rich wraps stderr at the terminal width; keep messages on one line



def test_a_shard_plan_keeps_its_items_claims_its_output_and_says_how_it_ended(tmp_path):
    """ShardPlan, what the generation loop and collect-errors are handed: this shard's items in their order, a
    sidecar written at claim, marked complete at done, or stopped by the teacher budget (not complete)."""
    from undo_cli.errors import UndoError
    from undo_cli.stages.generate import SPEC, GenerateConfig
    from undo_cli.stages.shards import ShardPlan, read_sidecar, shard_of

    problems = write_jsonl(tmp_path / "p.jsonl", PROBLEMS)
    ids = [p["id"] for p in PROBLEMS]
    whole = ShardPlan(SPEC, GenerateConfig(teacher="t", input=str(problems), output=str(tmp_path / "all.jsonl")))
    assert whole.mine(PROBLEMS, ids) == PROBLEMS and whole.done(records=3) == {}
    whole.claim(fresh=False)
    assert read_sidecar(tmp_path / "all.jsonl") is None  # unsharded: no sidecar
    for k, left in ((0, 0), (1, 2)):
        out = tmp_path / f"r.{k}.jsonl"
        plan = ShardPlan(SPEC, GenerateConfig(teacher="t", input=str(problems), output=str(out), shard=f"{k}/{N}"))
        mine = plan.mine(PROBLEMS, ids)
        assert mine == [p for p in PROBLEMS if shard_of(p["id"], N) == k] and 0 < len(mine) < len(PROBLEMS)
        plan.claim(fresh=False)
        assert read_sidecar(out)["complete"] is False and read_sidecar(out)["shard"] == f"{k}/{N}"
        out.write_text("")
        assert plan.done(records=1, left_by_budget=left, budget={"max_teacher_tokens": 9}) == {"shard": f"{k}/{N}"}
        side = read_sidecar(out)
        assert side["complete"] is (left == 0) and side.get("left_by_budget") == (left or None)
    with pytest.raises(UndoError, match="is the output of shard 0/3"):  # an unsharded run over a shard's output
        ShardPlan(SPEC, GenerateConfig(teacher="t", input=str(problems), output=str(tmp_path / "r.0.jsonl"))).claim(
            fresh=False)


def test_partition_is_a_stable_hash_of_the_id():
    from undo_cli.stages.shards import parse_shard, shard_of

    ids = [f"gsm8k-{i}" for i in range(1000)]
    parts = [shard_of(i, 4) for i in ids]
    assert sorted(set(parts)) == [0, 1, 2, 3] and all(150 < parts.count(k) < 350 for k in range(4))
    # Pinned: blake2b(id, 8 bytes) mod N, the same on every machine and Python (hash() is salted).
    assert [shard_of(i, 7) for i in ("p00", "p01", "gsm8k-17", "é")] == [
        int.from_bytes(__import__("hashlib").blake2b(i.encode(), digest_size=8).digest(), "big") % 7
        for i in ("p00", "p01", "gsm8k-17", "é")]
    assert shard_of("p00", 7) == 6
    # Adding problems moves no other problem: the shard depends on the id alone.
    assert [shard_of(i, 4) for i in ids[:10]] == parts[:10]
    assert parse_shard("2/4").k == 2 and parse_shard(None) is None
    from undo_cli.errors import UndoError

    for bad in ("4/4", "-1/4", "1", "a/b", "0/0"):
        with pytest.raises(UndoError):
            parse_shard(bad)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trained_teacher) -> dict:
    """Every stage unsharded and as 3 shards (in-process, the way the CLI calls them)."""
    from undo_cli.stages import collect_errors, evaluate, generate, refine

    root = tmp_path_factory.mktemp("shards")
    train = write_jsonl(root / "train.jsonl", PROBLEMS)
    teacher = str(trained_teacher)
    # batch_size 2: the hf backend sorts by prompt length, so the raw order differs from the input's.
    common = dict(max_tokens=48, batch_size=2)
    teach = dict(cache=False)  # records say whether the teacher cache answered: every run asks the teacher
    out: dict = {"root": root, "train": train}

    def both(name, make, **kw):
        whole = root / "whole" / f"{name}.jsonl"
        make(output=str(whole), **kw)
        parts = []
        for k in range(N):
            part = root / "shards" / f"{name}.{k}.jsonl"
            out.setdefault("summaries", {})[(name, k)] = make(output=str(part), shard=f"{k}/{N}", **kw)
            parts.append(part)
        out[name] = (whole, parts)

    both("rationales", lambda **kw: generate.run(generate.GenerateConfig(
        teacher=teacher, input=str(train), prompt="student", **common, **teach, **kw)))
    both("predictions", lambda **kw: evaluate.run(evaluate.EvaluateConfig(
        model=teacher, input=str(train), **common, **kw)))
    preds = out["predictions"][0]
    both("errors", lambda **kw: collect_errors.run(collect_errors.CollectErrorsConfig(
        predictions=str(preds), max=3, **kw)))
    errors, rationales = out["errors"][0], out["rationales"][0]
    both("refined", lambda **kw: refine.run(refine.RefineConfig(
        teacher=teacher, errors=str(errors), targets=str(rationales), prompt="student", per_error=4, budget="25%",
        **common, **teach, **kw)))  # 25%: enough targets that every shard refines one (the default, 7%, leaves two idle)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rationales", "predictions", "errors", "refined"])
def test_merge_is_the_unsharded_file(runs, name, undo):
    whole, parts = runs[name]
    merged = runs["root"] / "merged" / f"{name}.jsonl"
    # Shards given in any order: merge orders them by K.
    result = undo("merge", merged, *reversed(parts))
    assert result.returncode == 0, result.stderr
    assert whole.read_bytes() and merged.read_bytes() == whole.read_bytes()
    ids = [json.loads(line)["id"] for line in whole.read_text().splitlines()]
    shard_ids = [json.loads(line)["id"] for p in parts for line in p.read_text().splitlines()]
    assert sorted(shard_ids) == sorted(ids)  # every record in exactly one shard
    if name == "rationales":
        # Verified rationales are kept, the rest rejected: both halves merge identically, in input order.
        rejected = whole.with_name("rationales.rejected.jsonl")
        assert rejected.read_text() and merged.with_name("rationales.rejected.jsonl").read_bytes() == rejected.read_bytes()
        order = [p["id"] for p in PROBLEMS]
        kept = [json.loads(line)["problem_id"] for line in whole.read_text().splitlines()]
        assert kept == sorted(kept, key=order.index)
    if name in ("rationales", "refined"):
        # The teacher's tokens the shards paid for are the merged output's: its ledger is theirs added up, and
        # (greedy, same prompts) what the unsharded run paid.
        ledger = lambda p: json.loads(p.with_name(p.name[:-6] + ".usage.json").read_text())  # noqa: E731
        merged_usage, whole_usage = ledger(merged), ledger(whole)
        assert merged_usage["paid"]["tokens"] == sum(ledger(p)["paid"]["tokens"] for p in parts) > 0
        assert merged_usage["paid"] == whole_usage["paid"] and merged_usage["merged_from"] == N
    if name == "predictions":
        # Metrics are recomputed from the merged predictions: the very metrics.json of the unsharded run.
        metrics = lambda p: p.with_name(p.name[:-6] + ".metrics.json")  # noqa: E731 - predictions.metrics.json
        assert json.loads(metrics(merged).read_text()) == \
            {**json.loads(metrics(whole).read_text()), "predictions": str(merged)}
        partial = [json.loads(p.with_name(p.name[:-6] + ".metrics.json").read_text()) for p in parts]
        assert sum(m["count"] for m in partial) == len(PROBLEMS) and all(m["shard"] for m in partial)
        assert 0 < json.loads(metrics(whole).read_text())["accuracy"] < 1


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="making a character device needs root")
def test_merge_into_a_device_writes_in_place_and_leaves_it_a_device(runs, undo, tmp_path):
    import stat

    device = tmp_path / "null"  # a private /dev/null (same major/minor): the machine's own is never touched
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    whole, parts = runs["errors"]
    result = undo("merge", device, *parts)
    assert result.returncode == 0, result.stderr
    assert stat.S_ISCHR(os.stat(device).st_mode)  # not renamed over: still the device
    assert not [p for p in tmp_path.iterdir() if p.name != "null"]  # no temp file, no sidecar left


@pytest.mark.slow
def test_merge_refuses_missing_duplicated_foreign_and_unfinished_shards(runs, undo, trained_teacher):
    from undo_cli.stages import generate

    whole, parts = runs["rationales"]
    out = runs["root"] / "refused.jsonl"
    r = undo("merge", out, parts[0], parts[2], env=WIDE)
    assert r.returncode == 2 and "missing shard 1/3" in r.stderr
    r = undo("merge", out, parts[0], parts[1], parts[2], parts[1], env=WIDE)
    assert r.returncode == 2 and "shard 1/3 given twice" in r.stderr
    r = undo("merge", out, runs["predictions"][1][0], parts[1], parts[2], env=WIDE)
    assert r.returncode == 2 and "not a shard of the same run" in r.stderr and "stage" in r.stderr
    r = undo("merge", out, whole, env=WIDE)
    assert r.returncode == 2 and "not a shard" in r.stderr
    # Same stage and input, other settings: foreign.
    other = runs["root"] / "other" / "rationales.1.jsonl"
    generate.run(generate.GenerateConfig(teacher=str(trained_teacher), input=str(runs["train"]), prompt="student",
                                         max_tokens=40, output=str(other), shard=f"1/{N}", cache=False))
    r = undo("merge", out, parts[0], other, parts[2], env=WIDE)
    assert r.returncode == 2 and "settings.max_tokens: was 48, now 40" in r.stderr
    # A shard whose run did not finish (what a killed task leaves: complete false).
    side = parts[1].with_name("rationales.1.shard.json")
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "complete": False}))
    try:
        r = undo("merge", out, *parts, env=WIDE)
        assert r.returncode == 2 and "unfinished shard" in r.stderr and "resume" in r.stderr
    finally:
        side.write_text(json.dumps(meta))
    assert not out.exists()


@pytest.mark.slow
def test_a_shard_resumes_alone_and_refuses_another_shard(runs, undo, trained_teacher, tmp_path):
    whole, parts = runs["predictions"]
    part = tmp_path / "predictions.1.jsonl"
    lines = parts[1].read_text().splitlines(keepends=True)
    assert len(lines) >= 2
    # A killed shard: one record on disk, a torn second line, the sidecar not complete.
    part.write_text(lines[0] + lines[1][:10])
    meta = json.loads(parts[1].with_name("predictions.1.shard.json").read_text())
    (tmp_path / "predictions.1.shard.json").write_text(json.dumps({**meta, "complete": False}))
    # ... and the record of what writes it, which the generation loop leaves at the start of a run.
    (tmp_path / "predictions.1.run.json").write_bytes(parts[1].with_name("predictions.1.run.json").read_bytes())
    args = ["evaluate", "--model", trained_teacher, "--input", runs["train"], "--max-tokens", "48",
            "--batch-size", "2", "--output", part]
    r = undo(*args, "--shard", f"2/{N}", env=WIDE)
    assert r.returncode == 2 and "holds shard 1/3 of another run" in r.stderr
    r = undo(*args, env=WIDE)
    assert r.returncode == 2 and "is the output of shard 1/3" in r.stderr
    r = undo(*args, "--shard", f"1/{N}", env=WIDE)
    assert r.returncode == 0, r.stderr
    assert "1 of" in r.stderr and "already done" in r.stderr
    assert part.read_bytes() == parts[1].read_bytes()
    assert json.loads((tmp_path / "predictions.1.shard.json").read_text())["complete"] is True
    r = undo(*args, "--shard", "0/2", "--output", "-", env=WIDE)
    assert r.returncode == 2 and "needs --output FILE" in r.stderr
    r = undo(*args, "--shard", "3/3", env=WIDE)
    assert r.returncode == 2 and "0 <= K < N" in r.stderr
