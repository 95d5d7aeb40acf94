"""The `openai` backend against faulty servers and several endpoints.

Faults come from real sockets on 127.0.0.1: `FaultProxy` in front of the real
`transformers serve` (or a `ScriptedServer` where the upstream's text does not
matter and speed does), see tests/servers.py. The run that matters most:
`test_generate_completes_exactly_once_per_problem_at_30pct_faults`.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.conftest import TAUGHT_PROBLEMS, write_jsonl
from tests.servers import FAULTS, ScriptedServer, free_port
from undo_cli.backends import BackendConfig, SamplingConfig, open_backend
from undo_cli.errors import UndoError
from undo_cli.urls import redact


HI = [[{"role": "user", "content": "4+4?"}]]


def _openai(url, model: str, **kw) -> BackendConfig:
    return BackendConfig(backend="openai", model=model, base_url=url, **kw)


def _problems(path, count: int) -> list[str]:
    """`count` taught problems (cycled) with unique ids, written as JSONL; returns the ids."""
    rows = [{**TAUGHT_PROBLEMS[i % len(TAUGHT_PROBLEMS)], "id": f"q{i:03d}"} for i in range(count)]
    for r in rows:
        r.pop("rationale")
    write_jsonl(path, rows)
    return [r["id"] for r in rows]


def _row(stderr: str, label: str) -> str:
    """The summary table's row whose first cell starts with `label`, its cells joined by ' | '."""
    for line in stderr.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0].startswith(label):
            return " | ".join(cells)
    raise AssertionError(f"no row '{label}' in:\n{stderr}")


def _ids(path) -> list[str]:
    return [json.loads(line)["problem_id"] for line in path.read_text().splitlines()]


# -- hold the line: a 30% fault rate in front of a real server ------------------------------------

@pytest.mark.slow
def test_generate_completes_exactly_once_per_problem_at_30pct_faults(undo, transformers_server, fault_proxy,
                                                                       tmp_path):
    # Seed 2 draws 10 faults in the first 36 requests (~30%), so every one of the 9 kinds is injected.
    proxy = fault_proxy(transformers_server.base_url, rate=0.3, seed=2, delay_s=12.0)
    ids = _problems(tmp_path / "p.jsonl", 36)
    out = tmp_path / "r.jsonl"
    result = undo("generate", "--backend", "openai", "--base-url", proxy.base_url, "--teacher",
                  transformers_server.model, "--input", tmp_path / "p.jsonl", "--output", out, "--keep", "all",
                  "--max-tokens", "40", "--concurrency", "4", "--request-timeout", "8", "--max-retries", "12",
                  env={"COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    got = _ids(out)
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))  # every problem, exactly once
    assert set(proxy.injected) == set(FAULTS), proxy.injected
    assert proxy.forwarded >= len(ids)
    assert sum(proxy.injected.values()) >= 9
    # The summary counts what the endpoint did, faults included.
    row = _row(result.stderr, f"endpoint {proxy.base_url}")
    for kind in ("HTTP 429", "HTTP 500", "HTTP 503", "200 not JSON", "200 without choices", "reset",
                 "closed before answering", "closed mid-response", "timed out"):
        assert kind in row, row
    print("faults injected:", dict(proxy.injected), "forwarded:", proxy.forwarded)


# -- 8. a malformed 200 is a retryable fault --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("broken", ["malformed_json", "choices_null"])
def test_malformed_200_is_retried(scripted_server, broken):
    scripted_server.statuses = [broken, broken]
    with open_backend(_openai(scripted_server.base_url, "scripted")) as llm:
        (c,), = llm.generate(HI, SamplingConfig(max_tokens=16))
    assert c.text == scripted_server.text
    assert len([r for r in scripted_server.requests if r["path"].endswith("/chat/completions")]) == 3


@pytest.mark.slow
def test_malformed_200_forever_exits_2_with_what_the_server_sent_and_keeps_finished_batches(
        undo, scripted_server, tmp_path):
    # The first batch (64 problems, the backend's smallest batch) is answered; then only `choices: null`.
    scripted_server.statuses = [200] * 64 + ["choices_null"] * 500
    ids = _problems(tmp_path / "p.jsonl", 70)
    out = tmp_path / "r.jsonl"
    result = undo("generate", "--backend", "openai", "--base-url", scripted_server.base_url, "--teacher", "scripted",
                  "--input", tmp_path / "p.jsonl", "--output", out, "--keep", "all", "--concurrency", "1",
                  "--max-retries", "2", "--no-cache")  # the cycled questions repeat: the cache would answer them
    err = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "gave up on a request after 3 attempts" in err and "without a list of choices" in err and '"choices": null' in err
    assert sorted(_ids(out)) == ids[:64]  # the finished batch is on disk, once


# -- 9. a hung server: --request-timeout / --max-retries, and a run that says what it waits for ----

@pytest.mark.slow
def test_hung_server_times_out_and_says_what_it_waits_for(undo, tmp_path):
    server = ScriptedServer(statuses=["hang"] * 10, hang_s=30)
    try:
        _problems(tmp_path / "p.jsonl", 1)
        result = undo("generate", "--backend", "openai", "--base-url", server.base_url, "--teacher", "scripted",
                      "--input", tmp_path / "p.jsonl", "--output", tmp_path / "r.jsonl",
                      "--request-timeout", "2", "--max-retries", "1", timeout=60)
    finally:
        server.close()
    err = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert f"waiting on {server.base_url}: 1 request in flight, oldest" in err
    assert "after 2 attempts" in err and "timed out after 2 s" in err
    assert len(server.requests) == 2  # one try + --max-retries 1


@pytest.mark.parametrize("command", ["generate", "evaluate", "refine"])
def test_request_timeout_and_max_retries_are_flags(undo, command):
    out = " ".join(undo(command, "--help", env={"COLUMNS": "200"}).stdout.split())
    assert "--request-timeout" in out and "--max-retries" in out


def test_iterate_stage_tables_take_request_timeout_and_max_retries(tmp_path):
    from undo_cli.loop.config import IterateConfig
    from undo_cli.loop.settings import resolve

    for split in ("train", "val", "test"):
        _problems(tmp_path / f"{split}.jsonl", 1)
    flags = {"teacher": "t", "student": "s", "train_file": str(tmp_path / "train.jsonl"),
             "val_file": str(tmp_path / "val.jsonl"), "test_file": str(tmp_path / "test.jsonl"),
             "teacher_backend": "openai", "teacher_base_url": ["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"]}
    config = resolve(IterateConfig, None, flags, ["--generate.request-timeout", "30", "--refine.max-retries", "9",
                                                  "--evaluate.request-timeout=5"])
    assert config.generate["request_timeout"] == 30.0 and config.refine["max_retries"] == 9
    assert config.evaluate["request_timeout"] == 5.0
    assert config.teacher_base_url == ["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"]
    from undo_cli.stages.generate import GenerateConfig

    with pytest.raises(UndoError, match="--max-retries -1: must be >= 0"):
        GenerateConfig(teacher="t", input=flags["train_file"], backend="openai", max_retries=-1)
    with pytest.raises(UndoError, match="--request-timeout 0.0: must be > 0"):
        GenerateConfig(teacher="t", input=flags["train_file"], backend="openai", request_timeout=0.0)


# -- 10. a dropped connection is named for what happened -------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fault, said", [
    ("close_before", "closed it without answering"),
    ("close_mid_body", "closed the connection mid-response"),
    ("reset", "connection reset"),
    ("delay", "timed out after 2 s"),
    ("503", "answered 503: injected 503"),
])
def test_a_dropped_connection_is_reported_as_what_happened(scripted_server, fault_proxy, fault, said):
    proxy = fault_proxy(scripted_server.base_url, rate=1.0, faults=(fault,), delay_s=10)
    with open_backend(_openai(proxy.base_url, "scripted", max_retries=0, request_timeout=2)) as llm:
        with pytest.raises(UndoError) as err:
            llm.generate(HI, SamplingConfig(max_tokens=4))
    assert said in err.value.message and "refused" not in err.value.message
    assert proxy.injected[fault] == 1


def test_a_closed_port_is_connection_refused():
    with pytest.raises(UndoError, match=r"cannot reach the server .*\(connection refused\)"):
        open_backend(_openai(f"http://127.0.0.1:{free_port()}/v1", "m"))


# -- 11. the key never leaves: server text that echoes it is redacted -----------------------------

def test_a_server_echoing_the_key_gets_it_redacted(undo, scripted_server, tmp_path):
    secret = "sk-test-ECHOED-BACK-9876"
    scripted_server.statuses = ["echo_auth"]
    _problems(tmp_path / "p.jsonl", 1)
    result = undo("generate", "--backend", "openai", "--base-url", scripted_server.base_url, "--teacher", "scripted",
                  "--api-key-env", "MY_TEACHER_KEY", "--input", tmp_path / "p.jsonl", "--output", tmp_path / "r.jsonl",
                  env={"MY_TEACHER_KEY": secret})
    assert result.returncode == 2, result.stderr
    assert scripted_server.requests[-1]["headers"]["authorization"] == f"Bearer {secret}"  # it was sent ...
    assert secret not in result.stderr + result.stdout and "ECHOED" not in result.stderr  # ... and never shown
    assert "rejected the request (400)" in result.stderr and "Bearer ***" in result.stderr


def test_redact_covers_keys_and_authorization_values():
    assert redact("key sk-abc123 here", ["sk-abc123"]) == "key *** here"
    assert redact('{"Authorization": "Bearer xyz.123"}', []) == '{"Authorization": "Bearer ***"}'
    assert redact("authorization: Basic dXNlcjpwYXNz", []) == "authorization: Basic ***"
    assert redact("token=bearer abc-DEF_1", []) == "token=bearer ***"


# -- issue 14: several endpoints ---------------------------------------------------------------------

@pytest.mark.slow
def test_two_real_endpoints_and_a_dead_one(undo, transformers_server, fault_proxy, tmp_path):
    # Two endpoints in front of real generation (the server itself and a fault-free proxy to it) and one
    # that nobody listens on: the run warns, uses the two, and the summary shows each.
    proxy = fault_proxy(transformers_server.base_url, rate=0.0)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    ids = _problems(tmp_path / "p.jsonl", 12)
    out = tmp_path / "r.jsonl"
    result = undo("generate", "--backend", "openai", "--base-url", transformers_server.base_url,
                  "--base-url", proxy.base_url, "--base-url", dead, "--teacher", transformers_server.model,
                  "--input", tmp_path / "p.jsonl", "--output", out, "--concurrency", "2", "--max-tokens", "40",
                  "--keep", "all", env={"COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    err = " ".join(result.stderr.split())
    assert f"cannot reach {dead} (connection refused); continuing with 2 of 3 endpoints" in err
    assert _row(result.stderr, f"endpoint {dead}") == f"endpoint {dead} | unreachable at start"
    assert sorted(_ids(out)) == ids  # each once
    assert proxy.forwarded > 0  # the second endpoint did real work ...
    assert proxy.forwarded < len(ids)  # ... but not all of it
    for url in (transformers_server.base_url, proxy.base_url):
        assert " requests, 0 failed, " in _row(result.stderr, f"endpoint {url}")


def test_a_request_failing_on_one_endpoint_is_retried_on_another():
    broken, good = ScriptedServer(statuses=[503] * 1000), ScriptedServer()
    try:
        config = _openai([broken.base_url, good.base_url], "scripted", max_retries=1, concurrency=4)
        with open_backend(config) as llm:
            out = llm.generate(HI * 20, SamplingConfig(max_tokens=8))
            stats = {e["url"]: e for e in llm.endpoint_summary()}
    finally:
        broken.close()
        good.close()
    assert [c[0].text for c in out] == [good.text] * 20
    assert stats[broken.base_url]["failures"] == stats[broken.base_url]["requests"] > 0
    assert stats[broken.base_url]["faults"] == {"HTTP 503": stats[broken.base_url]["requests"]}
    assert stats[good.base_url]["ok"] == 20 and stats[good.base_url]["failures"] == 0


def test_requests_are_spread_with_bounded_concurrency_per_endpoint():
    a, b = ScriptedServer(), ScriptedServer()
    try:
        with open_backend(_openai(f"{a.base_url},{b.base_url}", "scripted", concurrency=3)) as llm:
            assert llm.batch_hint >= 4 * 3 * 2
            llm.generate(HI * 40, SamplingConfig(max_tokens=8))
    finally:
        a.close()
        b.close()
    counts = Counter(len(s.requests) for s in (a, b))
    assert sum(len(s.requests) for s in (a, b)) == 40 and all(len(s.requests) >= 10 for s in (a, b)), counts


def test_the_same_endpoint_twice_is_refused():
    with pytest.raises(UndoError, match="same server twice"):
        open_backend(_openai(["http://127.0.0.1:1/v1", "http://127.0.0.1:1/v1/"], "m"))


def test_an_endpoint_that_dies_mid_run_is_left_for_the_others():
    a, b = ScriptedServer(), ScriptedServer()
    try:
        with open_backend(_openai([a.base_url, b.base_url], "scripted", max_retries=2, concurrency=2)) as llm:
            a.close()  # after the probe: from now on its port refuses connections
            out = llm.generate(HI * 12, SamplingConfig(max_tokens=8))
            stats = {e["url"]: e for e in llm.endpoint_summary()}
    finally:
        b.close()
    assert [c[0].text for c in out] == [b.text] * 12
    assert stats[a.base_url]["ok"] == 0 and stats[a.base_url]["faults"] == {"refused": stats[a.base_url]["failures"]}
    assert stats[b.base_url]["ok"] == 12
