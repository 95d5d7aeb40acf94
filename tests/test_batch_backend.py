"""The batch API backends (openai-batch, anthropic-batch) against a stand-in server on 127.0.0.1
(tests/batch_api_server.py): results by custom_id, resume by batch id after a kill, only failed rows
resubmitted, split by count and bytes, keys refused in words and never written, the batch price, `undo batch`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.batch_api_server import BatchAPIServer
from tests.conftest import read_jsonl, write_jsonl

KEY = "sk-test-secret-1234"
PROBLEMS = [{"id": f"p{i}", "question": f"What is {i + 2} + {3 * i}?", "answer": str(i + 2 + 3 * i)} for i in range(6)]


@pytest.fixture
def server():
    s = BatchAPIServer(key=KEY).start()
    yield s
    s.stop()


@pytest.fixture
def problems(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", PROBLEMS)


def args(server, problems, out, backend="openai-batch", *extra):
    return ["generate", "--backend", backend, "--teacher", "stand-in-model", "--base-url", f"{server.url}/v1",
            "--input", problems, "--output", out, "--batch-poll-s", "0.05", "--no-cache", *extra]


ENV = {"OPENAI_API_KEY": KEY, "ANTHROPIC_API_KEY": KEY}


def manifest(out: Path) -> dict:
    return json.loads(out.with_name(out.stem + ".batches.json").read_text())


def first_batch_id(out: Path) -> str | None:
    """The id of the output's first batch once it is on disk (the manifest is saved before any batch exists too)."""
    side = out.with_name(out.stem + ".batches.json")
    batches = manifest(out)["batches"] if side.exists() else []
    return batches[0].get("batch_id") if batches else None


def test_openai_batch_writes_the_online_backends_records(server, problems, tmp_path, undo_inproc):
    out = tmp_path / "rationales.jsonl"
    r = undo_inproc(*args(server, problems, out, "openai-batch", "--price-input", "1", "--price-output", "2"), env=ENV)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(out)
    assert sorted(x["problem_id"] for x in rows) == [p["id"] for p in PROBLEMS]
    by_id = {x["problem_id"]: x for x in rows}
    for p in PROBLEMS:  # matched by custom_id although the server shuffles its result lines
        assert by_id[p["id"]]["rationale"].endswith(f"#### {p['answer']}")
        assert by_id[p["id"]]["correct"] is True and by_id[p["id"]]["backend"] == "openai-batch"
    assert server.created == 1
    m = manifest(out)
    assert m["batches"][0]["batch_id"] == "batch_001" and m["batches"][0]["state"] == "ended"
    assert m["key_fingerprint"] and KEY not in json.dumps(m)
    usage = json.loads(out.with_name("rationales.usage.json").read_text())
    # 6 requests x (20 prompt tokens at 1 + 7 completion tokens at 2) per million, at half the online price
    assert usage["cost"] == pytest.approx(6 * (20 * 1 + 7 * 2) / 1e6 * 0.5)
    assert usage["by_backend"]["openai-batch"]["paid"]["requests"] == 6
    for f in tmp_path.iterdir():
        assert KEY not in f.read_text(errors="replace")
    assert KEY not in r.stderr + r.stdout


def test_split_by_count_and_by_bytes(server, problems, tmp_path, undo_inproc):
    out = tmp_path / "a.jsonl"
    assert undo_inproc(*args(server, problems, out, "openai-batch", "--batch-max-requests", "4"), env=ENV).returncode == 0
    assert [b["requests"] for b in manifest(out)["batches"]] == [4, 2]
    one_line = len(json.dumps({"custom_id": "x" * 41}).encode()) + 300  # a request line is a few hundred bytes
    out2 = tmp_path / "b.jsonl"
    r = undo_inproc(*args(server, problems, out2, "openai-batch", "--batch-max-mb", str(2.5 * one_line / 2**20)),
                    env=ENV)
    assert r.returncode == 0, r.stderr
    sizes = [b["bytes"] for b in manifest(out2)["batches"]]
    assert len(sizes) > 1 and all(s <= 2.5 * one_line for s in sizes)
    assert len(read_jsonl(out2)) == len(PROBLEMS)


def test_only_errored_and_expired_rows_are_resubmitted(server, problems, tmp_path, undo_inproc):
    out = tmp_path / "r.jsonl"
    # the ids are the backend's own (content-derived); learn them from a first, clean run's manifest
    assert undo_inproc(*args(server, problems, out, "openai-batch", "--max-tokens", "100"), env=ENV).returncode == 0
    ids = manifest(out)["batches"][0]["custom_ids"]
    server.error_once, server.expire_once = {ids[0]}, {ids[1]}
    server.requests_seen.clear()
    out2 = tmp_path / "r2.jsonl"
    r = undo_inproc(*args(server, problems, out2, "openai-batch", "--max-tokens", "100"), env=ENV)
    assert r.returncode == 0, r.stderr
    assert sorted(server.requests_seen) == sorted(ids + [ids[0], ids[1]])  # those two twice, the rest once
    assert len(read_jsonl(out2)) == len(PROBLEMS)
    assert "submitting 2 failed request(s) again" in r.stderr


def test_a_request_that_keeps_failing_fails_the_stage_in_words_and_the_rest_is_written(server, problems, tmp_path,
                                                                                         undo_inproc):
    out = tmp_path / "r.jsonl"
    assert undo_inproc(*args(server, problems, tmp_path / "probe.jsonl"), env=ENV).returncode == 0
    bad = manifest(tmp_path / "probe.jsonl")["batches"][0]["custom_ids"][2]
    server.error_always[bad] = "insufficient_quota"
    server.requests_seen.clear()
    r = undo_inproc(*args(server, problems, out, "openai-batch", "--batch-resubmits", "1"), env=ENV)
    assert r.returncode == 2
    assert "1 request(s) to the openai-batch API failed after 1 resubmission(s): errored: insufficient_quota (1)" \
        in r.stderr and "Traceback" not in r.stderr
    assert len(read_jsonl(out)) == len(PROBLEMS) - 1
    assert server.requests_seen.count(bad) == 2
    # credit topped up: the re-run submits that one row only
    del server.error_always[bad]
    server.requests_seen.clear()
    r = undo_inproc(*args(server, problems, out, "openai-batch", "--batch-resubmits", "1"), env=ENV)
    assert r.returncode == 0, r.stderr
    assert server.requests_seen == [bad] and len(read_jsonl(out)) == len(PROBLEMS)


@pytest.mark.slow
def test_a_killed_run_polls_its_batch_instead_of_paying_twice(server, problems, tmp_path):
    out = tmp_path / "r.jsonl"
    server.hold.set()  # the batch stays in progress until released
    cmd = [sys.executable, "-m", "undo_cli", *args(server, problems, out)]
    proc = subprocess.Popen(cmd, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not first_batch_id(out):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert server.created == 1 and not out.exists() or read_jsonl(out) == []
    server.hold.clear()
    done = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert server.created == 1  # polled the stored id; nothing submitted again
    assert len(read_jsonl(out)) == len(PROBLEMS)


def test_a_kill_inside_the_create_call_finds_the_batch_by_its_metadata(server, problems, tmp_path, undo_inproc):
    out = tmp_path / "r.jsonl"
    assert undo_inproc(*args(server, problems, out), env=ENV).returncode == 0
    # as if killed after the API made the batch but before its id was written: the entry is still 'creating'
    m = manifest(out)
    m["batches"][0].update(state="creating", batch_id=None)
    out.with_name("r.batches.json").write_text(json.dumps(m))
    out.write_text("")
    r = undo_inproc(*args(server, problems, out), env=ENV)
    assert r.returncode == 0, r.stderr
    assert server.created == 1 and len(read_jsonl(out)) == len(PROBLEMS)
    assert manifest(out)["batches"][0]["batch_id"] == "batch_001"


def test_batches_made_under_another_key_are_refused_in_words(server, problems, tmp_path, undo_inproc):
    out = tmp_path / "r.jsonl"
    server.hold.set()
    side = out.with_name("r.batches.json")
    from undo_cli.backends.batch.manifest import Manifest, key_fingerprint

    Manifest(str(side), "openai-batch", f"{server.url}/v1", "OPENAI_API_KEY", key_fingerprint("sk-another-key"),
             "stand-in-model", [{"local_id": "b0001-x", "state": "submitted", "batch_id": "batch_999",
                                 "custom_ids": [], "requests": 0}]).save()
    r = undo_inproc(*args(server, problems, out), env=ENV)
    assert r.returncode == 2
    assert "made with another API key" in r.stderr and "fingerprint" in r.stderr and "--overwrite" in r.stderr
    assert KEY not in r.stderr and server.created == 0
    status = undo_inproc("batch", "status", str(out), env=ENV)
    assert status.returncode == 2 and "another API key" in status.stderr


def test_anthropic_batch_one_request_per_sample(server, problems, tmp_path, undo_inproc):
    out = tmp_path / "r.jsonl"
    r = undo_inproc(*args(server, problems, out, "anthropic-batch", "--n", "2", "--temperature", "0.7", "--seed", "1",
                          "--price-input", "3", "--price-output", "15"), env=ENV)
    assert r.returncode == 0, r.stderr
    ids = manifest(out)["batches"][0]["custom_ids"]
    assert len(ids) == 2 * len(PROBLEMS) and all(len(i) <= 64 for i in ids)
    rows = read_jsonl(out)
    assert len(rows) == 2 * len(PROBLEMS)  # generate keeps each verified sample
    usage = json.loads(out.with_name("r.usage.json").read_text())
    assert usage["cost"] == pytest.approx(len(PROBLEMS) * (2 * 20 * 3 + 2 * 7 * 15) / 1e6 * 0.5)


def test_cached_rows_are_never_submitted(server, problems, tmp_path, undo_inproc):
    cache = ["--cache", "--cache-dir", str(tmp_path / "cache"), "--model-revision", "v1"]
    first = [a for a in args(server, problems, tmp_path / "a.jsonl") if a != "--no-cache"]
    assert undo_inproc(*first, *cache, env=ENV).returncode == 0
    server.requests_seen.clear()
    second = [a for a in args(server, problems, tmp_path / "b.jsonl") if a != "--no-cache"]
    r = undo_inproc(*second, *cache, env=ENV)
    assert r.returncode == 0, r.stderr
    assert server.requests_seen == [] and server.created == 1
    assert len(read_jsonl(tmp_path / "b.jsonl")) == len(PROBLEMS)


def test_a_budget_stops_submission(server, problems, tmp_path, undo_inproc):
    from undo_cli.economy.accounting import Budget, Ledger, Prices
    from undo_cli.stages.generate import build_items

    out = tmp_path / "r.jsonl"
    item = build_items(PROBLEMS[:1], "generate", [])[0]
    prompt, completion = Budget(None, None, Prices()).bound(Ledger(), item.messages, 1, 10)
    budget = 3 * (prompt + completion) + 1  # room for three requests at their upper bound, not six
    r = undo_inproc(*args(server, problems, out, "openai-batch", "--max-tokens", "10", "--max-teacher-tokens",
                          str(budget)), env=ENV)
    assert r.returncode == 0, r.stderr
    assert 0 < len(server.requests_seen) < len(PROBLEMS)
    assert len(read_jsonl(out)) == len(server.requests_seen)


def test_batch_status_wait_cancel(server, problems, tmp_path, undo_inproc):
    out = tmp_path / "r.jsonl"
    server.polls_to_end = 10**6  # never ends by itself
    server.hold.set()
    proc = subprocess.Popen([sys.executable, "-m", "undo_cli", *args(server, problems, out)],
                            env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not first_batch_id(out):
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    r = undo_inproc("batch", "status", str(tmp_path), "--json", env=ENV)
    assert r.returncode == 0, r.stderr
    (row,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert row["batch_id"] == "batch_001" and row["state"] == "submitted" and row["requests"] == len(PROBLEMS)
    r = undo_inproc("batch", "wait", str(out), "--poll-s", "0.05", "--timeout-s", "0.2", env=ENV)
    assert r.returncode == 2 and "still open" in r.stderr
    r = undo_inproc("batch", "cancel", str(out), env=ENV)
    assert r.returncode == 0 and "cancel 1 batch" in r.stderr
    server.hold.clear()
    r = undo_inproc("batch", "wait", str(out), "--poll-s", "0.05", env=ENV)
    assert r.returncode == 0, r.stderr
    assert manifest(out)["batches"][0]["state"] == "ended"


def test_a_stream_output_is_refused(server, problems, undo_inproc):
    r = undo_inproc(*args(server, problems, "-"), env=ENV)
    assert r.returncode == 2 and "needs an output file" in r.stderr


def test_dry_run_estimate_shows_batch_and_online_prices():
    from types import SimpleNamespace

    from undo_cli.economy.estimate import describe, estimate_generate

    config = SimpleNamespace(teacher="no-such-model", n=1, max_tokens=100, price_input=1.0, price_output=2.0,
                             backend="openai-batch")
    est = estimate_generate([[{"role": "user", "content": "x" * 100}]], config, max_cost=0.00015)
    assert est["cost_batch"] == pytest.approx(est["cost"] / 2)
    rows = dict(describe(est))
    assert "the chosen backend" in rows["cost through a batch API, upper bound"] and "cost online" in rows
    assert est["budget"]["covers_all"]  # at the batch price the budget covers what the online price would not


@pytest.mark.slow
def test_undo_iterate_with_a_batch_teacher(server, tmp_path, tiny_model, undo_inproc):
    """The whole loop with the teacher behind the batch API: generate and refine go in batches, the rest of the
    run is what an online teacher gives (the stand-in's teacher does one operation; the tiny student learns little,
    so refine has errors to work on)."""
    rows = [{"id": f"q{i:02d}", "question": f"Apples in the basket: {i % 7 + 2} + {i % 5 + 1}. How many apples in total?", "answer": str(i % 7 + 2 + i % 5 + 1),
             "task": "math"} for i in range(16)]
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", part) for s, part in
             (("train", rows[:8]), ("val", rows[8:12]), ("test", rows[12:]))}
    flags = ["--teacher-backend", "openai-batch", "--teacher-base-url", f"{server.url}/v1",
             "--generate.batch-poll-s", "0.05", "--refine.batch-poll-s", "0.05"]
    r = undo_inproc("iterate", "--teacher", "stand-in-model", "--student", tiny_model, "--train-file", files["train"],
                    "--val-file", files["val"], "--test-file", files["test"], "--runs-dir", tmp_path / "runs",
                    "--name", "b", "--max-iterations", "1", "--patience", "1", *flags,
                    "--generate.max-tokens", "48", "--refine.max-tokens", "48", "--train.max-steps", "4",
                    "--train.batch-size", "4", "--evaluate.max-tokens", "8", env=ENV)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "b"
    sides = sorted(str(p.relative_to(run)) for p in run.rglob("*.batches.json"))
    assert any(s.endswith("rationales.batches.json") for s in sides), sides
    assert any(s.endswith("refined.batches.json") for s in sides), sides  # refine's targets went in batches too
    assert server.created >= 2
    assert KEY not in "".join(p.read_text(errors="replace") for p in run.rglob("*") if p.is_file()
                              and p.suffix in (".json", ".jsonl", ".log", ".txt"))
