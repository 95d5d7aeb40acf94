"""The teacher economy (undo_cli/economy): cache hits against a real server, concurrent writers, budgets, accounting.

    python -m pytest -q tests/test_economy.py

The cache tests put a request counter between `undo generate` and a real
`transformers serve`: what the counter saw is what the teacher was paid for.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import TAUGHT_PROBLEMS, wide_console, write_jsonl


class CountingProxy:
    """Forwards every request to `upstream` and counts the chat completions (what the teacher is asked)."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.completions = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, body: bytes | None) -> None:
                if body is not None and self.path.rstrip("/").endswith("/chat/completions"):
                    with proxy._lock:
                        proxy.completions += 1
                url = proxy.upstream + self.path[len("/v1"):] if self.path.startswith("/v1") else proxy.upstream + self.path
                request = urllib.request.Request(url, data=body, method=self.command,
                                                 headers={"content-type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=300) as r:
                        status, payload = r.status, r.read()
                except urllib.error.HTTPError as exc:
                    status, payload = exc.code, exc.read()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers.get("content-length", 0))))

        return Handler


@pytest.fixture
def counted_teacher(transformers_server):
    proxy = CountingProxy(transformers_server.base_url)
    try:
        yield proxy, transformers_server.model
    finally:
        proxy.close()


@pytest.fixture
def problems(tmp_path) -> Path:
    rows = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS[:6]]
    path = tmp_path / "problems.jsonl"
    write_jsonl(path, rows)
    return path


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def _served_generate(undo, proxy, model, problems, output, cache, *extra):
    # --keep all: every sample is a line, so the comparison covers every answer the teacher gave.
    proc = undo("generate", "--teacher", model, "--backend", "openai", "--base-url", proxy.base_url,
                "--input", problems, "--output", output, "--prompt", "student", "--max-tokens", "40",
                "--keep", "all", "--cache-dir", cache, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_second_identical_run_makes_no_teacher_request_and_writes_the_same_records(undo, counted_teacher,
                                                                                     problems, tmp_path):
    proxy, model = counted_teacher
    cache = tmp_path / "cache"
    _served_generate(undo, proxy, model, problems, tmp_path / "first.jsonl", cache)
    first_requests = proxy.completions
    assert first_requests == 6  # one per problem: nothing was cached yet

    proc = _served_generate(undo, proxy, model, problems, tmp_path / "second.jsonl", cache)
    assert proxy.completions == first_requests  # zero teacher requests the second time

    first, second = _lines(tmp_path / "first.jsonl"), _lines(tmp_path / "second.jsonl")
    assert len(first) == len(second) == 6
    assert all(json.loads(line)["cached"] is False for line in first)
    assert all(json.loads(line)["cached"] is True for line in second)
    # Byte-identical apart from the cache flag.
    assert [line.replace('"cached": false', '"cached": true') for line in first] == second
    usage = json.loads((tmp_path / "second.usage.json").read_text())
    assert usage["paid"]["requests"] == 0 and usage["cached"]["requests"] == 6
    assert usage["cached"]["tokens"] == json.loads((tmp_path / "first.usage.json").read_text())["paid"]["tokens"] > 0
    assert "teacher tokens paid / cached" in proc.stderr


@pytest.mark.slow
def test_changed_sampling_misses_and_unseeded_sampling_is_cached_only_on_request(undo, counted_teacher, problems,
                                                                                  tmp_path):
    proxy, model = counted_teacher
    cache = tmp_path / "cache"
    _served_generate(undo, proxy, model, problems, tmp_path / "a.jsonl", cache)
    assert proxy.completions == 6
    _served_generate(undo, proxy, model, problems, tmp_path / "b.jsonl", cache, "--top-p", "0.5")
    assert proxy.completions == 6  # greedy ignores top_p: the same request, a hit
    _served_generate(undo, proxy, model, problems, tmp_path / "c.jsonl", cache, "--max-tokens", "30")
    assert proxy.completions == 12  # a changed sampling setting misses
    for name in ("d", "e"):  # sampling without a seed: neither stored nor reused
        _served_generate(undo, proxy, model, problems, tmp_path / f"{name}.jsonl", cache, "--temperature", "0.8")
    assert proxy.completions == 24
    for name in ("f", "g"):  # with a seed it is reproducible, so cached
        _served_generate(undo, proxy, model, problems, tmp_path / f"{name}.jsonl", cache, "--temperature", "0.8",
                         "--seed", "3")
    assert proxy.completions == 30
    for name in ("h", "i"):  # unseeded, but the user asked for it
        _served_generate(undo, proxy, model, problems, tmp_path / f"{name}.jsonl", cache, "--temperature", "0.8",
                         "--cache-unseeded")
    assert proxy.completions == 36
    _served_generate(undo, proxy, model, problems, tmp_path / "j.jsonl", cache, "--no-cache")
    assert proxy.completions == 42  # --no-cache: paid again even though the answer is stored


_WRITER = """
import sys
from undo_cli.backends.base import Completion, TokenLogprobs
from undo_cli.economy.cache import TeacherCache
cache = TeacherCache(sys.argv[1])
identity = {"name": "m", "digest": "d" * 64}
start = int(sys.argv[2])
for batch in range(40):
    keys = [f"{i:064d}" for i in range(start + batch * 25, start + batch * 25 + 25)]
    cache.put_many((k, identity, [Completion(f"text {k}", "stop", 3, 5, [TokenLogprobs(1, -0.1, [(1, -0.1)])])])
                   for k in keys)
    got = cache.get_many(keys)
    assert all(got[k][0].text == f"text {k}" for k in keys), "a write was lost"
cache.close()
"""


def test_two_concurrent_writer_processes_do_not_corrupt_the_cache(tmp_path):
    from undo_cli.economy.cache import TeacherCache

    folder = tmp_path / "cache"
    # Overlapping key ranges: both processes write the keys 500..999 at the same time.
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(folder), str(start)], stderr=subprocess.PIPE,
                              text=True) for start in (0, 500)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    with TeacherCache(folder) as cache:
        assert cache.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert cache.journal_mode == "wal"
        keys = [f"{i:064d}" for i in range(1500)]
        got = cache.get_many(keys)
        assert len(got) == 1500 and all(got[k][0].text == f"text {k}" for k in keys)
        assert got[keys[0]][0].logprobs[0].token_id == 1 and got[keys[0]][0].cached


def test_model_identity_follows_the_folder_contents_and_memoises_weight_hashes(tmp_path):
    from undo_cli.economy.cache import TeacherCache

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "model.safetensors").write_bytes(b"\0" * 1000)
    with TeacherCache(tmp_path / "cache") as cache:
        first = cache.model_identity(str(model))
        assert cache.model_identity(str(model))["digest"] == first["digest"]
        assert cache.db.execute("SELECT count(*) FROM file_hashes").fetchone()[0] == 2
        copy = tmp_path / "copy"
        copy.mkdir()
        for f in model.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        assert cache.model_identity(str(copy))["digest"] == first["digest"]  # a copied folder is the same model
        (model / "model.safetensors").write_bytes(b"\1" * 1000)  # retrained: same size, new contents
        assert cache.model_identity(str(model))["digest"] != first["digest"]
        named = cache.model_identity("org/served-model")
        assert cache.model_identity("org/served-model", revision="abc")["digest"] != named["digest"]


def _generate(undo, teacher, problems, output, *extra):
    return undo("generate", "--teacher", teacher, "--input", problems, "--output", output, "--prompt", "student",
                "--max-tokens", "48", "--keep", "all", *extra)


@pytest.mark.slow
def test_budget_stops_before_exceeding_keeps_what_finished_and_resumes_with_more(undo, trained_teacher, problems,
                                                                                   tmp_path):
    out = tmp_path / "r.jsonl"
    full = _generate(undo, trained_teacher, problems, tmp_path / "full.jsonl", "--no-cache", "--batch-size", "1")
    assert full.returncode == 0, full.stderr[-2000:]
    per_item = json.loads((tmp_path / "full.usage.json").read_text())["paid"]["tokens"] / 6
    budget = int(per_item * 2.5 + 48)  # room for about two problems, never six

    stopped = _generate(undo, trained_teacher, problems, out, "--no-cache", "--batch-size", "1",
                        "--max-teacher-tokens", str(budget))
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert "teacher budget reached" in stopped.stderr and "--max-teacher-tokens" in stopped.stderr
    done = len(_lines(out))
    assert 1 <= done < 6
    spent = json.loads((tmp_path / "r.usage.json").read_text())["paid"]["tokens"]
    assert spent <= budget

    again = _generate(undo, trained_teacher, problems, out, "--no-cache", "--batch-size", "1",
                      "--max-teacher-tokens", str(budget))
    assert len(_lines(out)) == done  # the same budget buys nothing more: it is this output's total

    more = _generate(undo, trained_teacher, problems, out, "--no-cache", "--batch-size", "1",
                     "--max-teacher-tokens", str(budget * 10))
    assert more.returncode == 0 and "teacher budget reached" not in more.stderr
    ids = [json.loads(line)["id"] for line in _lines(out)]
    assert sorted(ids) == sorted(json.loads(line)["id"] for line in _lines(tmp_path / "full.jsonl"))
    ledger = json.loads((tmp_path / "r.usage.json").read_text())
    assert ledger["paid"]["requests"] == 6  # each problem paid for once, over three runs
    assert again.returncode == 0


@pytest.mark.slow
def test_prices_turn_tokens_into_money_and_max_cost_needs_them(undo, trained_teacher, problems, tmp_path):
    proc = _generate(undo, trained_teacher, problems, tmp_path / "r.jsonl", "--price-input", "1",
                     "--price-output", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ledger = json.loads((tmp_path / "r.usage.json").read_text())
    expected = (ledger["paid"]["prompt_tokens"] * 1 + ledger["paid"]["completion_tokens"] * 2) / 1e6
    assert ledger["cost"] == pytest.approx(expected, abs=1e-6)
    refused = _generate(undo, trained_teacher, problems, tmp_path / "x.jsonl", "--max-cost", "1")
    assert refused.returncode == 2 and "--max-cost needs prices" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.slow
def test_cache_stats_and_prune(undo, trained_teacher, problems, tmp_path):
    cache = tmp_path / "cache"
    assert _generate(undo, trained_teacher, problems, tmp_path / "a.jsonl", "--cache-dir", cache).returncode == 0
    assert _generate(undo, trained_teacher, problems, tmp_path / "b.jsonl", "--cache-dir", cache).returncode == 0
    stats = undo("cache", "stats", "--cache-dir", cache, "--json")
    assert stats.returncode == 0, stats.stderr
    data = json.loads(stats.stdout)
    assert data["entries"] == 6 and data["hits"] == 6 and data["tokens_saved"] > 0
    assert data["models"][0]["model"] == str(trained_teacher)
    kept = undo("cache", "prune", "--cache-dir", cache, "--older-than", "1")
    assert kept.returncode == 0 and "removed 0" in kept.stderr
    nothing = undo("cache", "prune", "--cache-dir", cache)
    assert nothing.returncode == 2 and "--older-than" in nothing.stderr
    gone = undo("cache", "prune", "--cache-dir", cache, "--model", str(trained_teacher))
    assert gone.returncode == 0 and "removed 6" in gone.stderr
    assert json.loads(undo("cache", "stats", "--cache-dir", cache, "--json").stdout)["entries"] == 0


@pytest.mark.slow
def test_iterate_budget_stops_the_loop_and_a_resume_with_more_finishes_with_per_iteration_usage(
        undo, tiny_model, trained_teacher, tmp_path):
    from tests.test_iterate import STAGE_FLAGS

    rows = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS]
    files = {}
    for split, part in (("train", rows[:8]), ("val", rows[8:]), ("test", rows[6:])):
        files[split] = tmp_path / f"{split}.jsonl"
        write_jsonl(files[split], part)
    args = ["iterate", "--teacher", trained_teacher, "--student", tiny_model, "--train-file", files["train"],
            "--val-file", files["val"], "--test-file", files["test"], "--runs-dir", tmp_path / "runs",
            "--name", "budget", "--max-iterations", "1", *STAGE_FLAGS]
    run = tmp_path / "runs" / "budget"

    stopped = undo(*args, "--max-teacher-tokens", "100")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert "teacher budget reached in iter_00/generate" in manifest["stop_reason"]
    assert manifest["stages"]["iter_00/generate"]["status"] == "budget"
    assert "iter_00/train" not in manifest["stages"] or manifest["stages"]["iter_00/train"]["status"] != "done"
    assert json.loads(stopped.stdout)["stop_reason"] == manifest["stop_reason"]

    # A higher budget (and prices) is not a different run: --resume accepts it and the loop goes on.
    resumed = undo(*args, "--resume", "--max-teacher-tokens", "10000000", "--price-input", "1", "--price-output", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["iter_00/generate"]["status"] == "done"
    assert "reached max_iterations" in manifest["stop_reason"] or "validation" in manifest["stop_reason"]
    usage = manifest["teacher_usage"]
    assert [u["iteration"] for u in usage["iterations"]][0] == 0
    assert usage["total"]["paid"]["tokens"] == sum(u["paid"]["tokens"] for u in usage["iterations"]) > 0
    assert usage["total"]["cost"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher_usage"]["paid"]["tokens"] == usage["total"]["paid"]["tokens"]
    first = summary["iterations"][0]
    assert first["teacher_tokens"] == usage["iterations"][0]["paid"]["tokens"]
    assert first["teacher_tokens_cumulative"] == first["teacher_tokens"]

    report = undo("report", run, "--price-input", "0", "--price-output", "1000000", env={"COLUMNS": "120"})
    assert report.returncode == 0, report.stderr
    assert "teacher tokens" in report.stderr and "paid total" in report.stderr and "cost total" in report.stderr
    # At 1 per completion token the cost total is the completion token count.
    completion = usage["total"]["paid"]["completion_tokens"]
    assert f"{completion:.4f}" in report.stderr
    assert (run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- undo iterate --dry-run: an upper bound of iteration 0's teacher tokens, before any call -----------------

def _dry_run(tiny_teacher_or_name, tmp_path, *flags):
    """`undo iterate ... --dry-run` in process: (the JSON on stdout, people's text on stderr)."""
    rows = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS[:3]]
    train = tmp_path / "train.jsonl"
    write_jsonl(train, rows)
    return ["iterate", "--teacher", str(tiny_teacher_or_name), "--student", "org/student", "--train-file", str(train),
            "--val-file", str(train), "--test-file", str(train), "--runs-dir", str(tmp_path / "runs"), "--name", "r",
            "--dry-run", "--format", "json", *map(str, flags)]


def _main(args, capsys, monkeypatch):
    from undo_cli.cli.app import main

    capsys.readouterr()
    with wide_console():
        try:
            main(args)
        except SystemExit as exc:
            assert exc.code in (0, None), capsys.readouterr().err
    captured = capsys.readouterr()
    return json.loads(captured.out), " ".join(captured.err.split())


def test_dry_run_bounds_iteration0_teacher_tokens_with_the_local_tokenizer_and_costs_them(
        tiny_teacher, tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer

    from undo_cli.prompts import encode_prompt, load_template, problem_variables, render_messages

    args = _dry_run(tiny_teacher, tmp_path, "--generate.n", "2", "--generate.temperature", "0.7",
                    "--generate.max-tokens", "16", "--price-input", "1", "--price-output", "2")
    shown, err = _main(args, capsys, monkeypatch)
    est = shown["teacher_estimate"]

    # By hand: the generate prompt of each problem, tokenised with the teacher's tokenizer, once per request
    # (a request asks for n samples), plus n x max_tokens.
    tok, tmpl = AutoTokenizer.from_pretrained(tiny_teacher), load_template("generate")
    prompts = [len(encode_prompt(tok, render_messages(tmpl, **problem_variables(p), examples=[])))
               for p in TAUGHT_PROBLEMS[:3]]
    assert est["stage"] == "iter_00/generate" and est["upper_bound"] is True
    assert (est["problems"], est["requests"], est["n"], est["max_tokens"]) == (3, 3, 2, 16)
    assert est["prompt_tokens"] == sum(prompts) and est["completion_tokens"] == 3 * 2 * 16
    assert est["tokens"] == sum(prompts) + 96
    assert "teacher's tokenizer" in est["prompt_tokens_from"]
    assert est["cost"] == pytest.approx((sum(prompts) * 1 + 96 * 2) / 1e6, abs=1e-6)
    assert "UPPER BOUND" in err and f"{est['tokens']:,}" in err and "cost, upper bound" in err
    assert not (tmp_path / "runs").exists()

    # The prompt count is what the teacher is billed for: a real generate run's ledger agrees.
    from undo_cli.stages import generate

    cfg = generate.GenerateConfig(teacher=str(tiny_teacher), input=str(tmp_path / "train.jsonl"),
                                  output=str(tmp_path / "r.jsonl"), n=2, temperature=0.7, max_tokens=16, seed=0,
                                  keep="all", cache=False)
    generate.run(cfg)
    paid = json.loads((tmp_path / "r.usage.json").read_text())["paid"]
    assert paid["prompt_tokens"] == est["prompt_tokens"] and paid["requests"] == 3
    assert paid["tokens"] <= est["tokens"]


def test_dry_run_says_how_much_of_it_a_budget_covers(tiny_teacher, tmp_path, capsys, monkeypatch):
    args = _dry_run(tiny_teacher, tmp_path, "--generate.max-tokens", "16")
    per_problem = _main(args, capsys, monkeypatch)[0]["teacher_estimate"]["tokens"] / 3  # close: similar questions
    shown, err = _main(args + ["--max-teacher-tokens", int(per_problem * 2.5)], capsys, monkeypatch)
    budget = shown["teacher_estimate"]["budget"]
    assert budget["covers_problems"] == 2 and budget["covers_all"] is False
    assert 0.75 < budget["tokens_fraction"] < 0.9
    assert "covers" in err and "the first 2 of 3 problems" in err
    shown, err = _main(args + ["--max-cost", "1", "--price-output", "1"], capsys, monkeypatch)
    assert shown["teacher_estimate"]["budget"]["covers_all"] is True and "covers all of it" in err


def test_dry_run_with_a_hub_teacher_not_cached_estimates_from_characters_without_network(
        tmp_path, capsys, monkeypatch):
    import socket

    from undo_cli.economy.accounting import PER_MESSAGE_OVERHEAD
    from undo_cli.prompts import load_template, problem_variables, render_messages

    def no_network(*a, **k):
        raise AssertionError("the dry run tried the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    shown, err = _main(_dry_run("org/not-downloaded", tmp_path, "--generate.max-tokens", "16"), capsys, monkeypatch)
    est = shown["teacher_estimate"]
    tmpl = load_template("generate")
    by_chars = 0
    for p in TAUGHT_PROBLEMS[:3]:
        messages = render_messages(tmpl, **problem_variables(p), examples=[])
        by_chars += -(-sum(len(m["content"]) for m in messages) // 2) + PER_MESSAGE_OVERHEAD * (len(messages) + 1)
    assert est["prompt_tokens"] == by_chars and est["tokens"] == by_chars + 3 * 16
    assert est["upper_bound"] is True and est["cost"] is None and est["budget"] is None
    assert "from characters at 2 characters a token" in est["prompt_tokens_from"]
    assert "not a local folder nor in the local hub cache" in err


def test_the_model_digest_leaves_out_the_run_records_train_writes_beside_the_weights(tmp_path):
    """Two trainings with the same weights are one model: train_run.json / train_summary.json hold timings and paths."""
    from undo_cli.economy.cache import RUN_RECORDS, TeacherCache
    from undo_cli.stages.train import RUN_FILE, SUMMARY_FILE

    assert RUN_RECORDS == {RUN_FILE, SUMMARY_FILE}
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, when in ((a, "1"), (b, "2")):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        (folder / RUN_FILE).write_text(when)
        (folder / SUMMARY_FILE).write_text(when)
    with TeacherCache(tmp_path / "cache", quiet=True) as cache:
        assert cache.model_identity(str(a))["digest"] == cache.model_identity(str(b))["digest"]
        (b / "model.safetensors").write_bytes(b"other weights")
        assert cache.model_identity(str(a))["digest"] != cache.model_identity(str(b))["digest"]
