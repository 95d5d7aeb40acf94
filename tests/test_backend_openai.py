"""The `openai` backend against a real `transformers serve`, plus scripted faults (429, 404, closed port)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TAUGHT_PROBLEMS
from tests.servers import free_port
from undo_cli.backends import BackendConfig, SamplingConfig, open_backend
from undo_cli.errors import UndoError
from undo_cli.prompts import student_messages



def _openai(url: str, model: str, **kw) -> BackendConfig:
    return BackendConfig(backend="openai", model=model, base_url=url, **kw)


@pytest.mark.slow
def test_transformers_serve_gives_the_same_greedy_text_as_hf(transformers_server):
    messages = [student_messages(p) for p in TAUGHT_PROBLEMS[:4]]
    sampling = SamplingConfig(max_tokens=60)
    with open_backend(_openai(transformers_server.base_url, transformers_server.model, concurrency=4)) as llm:
        served = llm.generate(messages, sampling)
    for (c,), problem in zip(served, TAUGHT_PROBLEMS):
        assert c.text == problem["rationale"]  # same weights, same chat template, same text
        assert c.finish_reason == "stop"
        assert c.prompt_tokens > 0 and c.completion_tokens > 0


@pytest.mark.slow
def test_n_is_fanned_out_when_the_server_ignores_it(transformers_server):
    # transformers serve ignores `n`: the backend must ask again for the missing samples.
    with open_backend(_openai(transformers_server.base_url, transformers_server.model)) as llm:
        out = llm.generate([student_messages(TAUGHT_PROBLEMS[0])] * 2,
                           SamplingConfig(n=3, temperature=0.7, seed=1, max_tokens=40))
    assert [len(c) for c in out] == [3, 3]
    assert all(c.text for p in out for c in p)


@pytest.mark.slow
def test_wrong_model_name_on_a_real_server(transformers_server):
    with open_backend(_openai(transformers_server.base_url, "no-such-model")) as llm:
        with pytest.raises(UndoError, match="no-such-model"):
            llm.generate([[{"role": "user", "content": "hi"}]], SamplingConfig(max_tokens=4))


def test_429_then_200_succeeds_after_the_clients_retry(scripted_server):
    scripted_server.statuses = [429, 503]
    with open_backend(_openai(scripted_server.base_url, "scripted")) as llm:
        (c,), = llm.generate([[{"role": "user", "content": "4+4?"}]], SamplingConfig(max_tokens=16))
    assert c.text == scripted_server.text
    assert len([r for r in scripted_server.requests if r["path"].endswith("/chat/completions")]) == 3


def test_429_forever_gives_up_with_a_clear_message(scripted_server):
    scripted_server.statuses = [429] * 10
    with open_backend(_openai(scripted_server.base_url, "scripted", max_retries=2)) as llm:
        with pytest.raises(UndoError, match="rate-limiting") as err:
            llm.generate([[{"role": "user", "content": "hi"}]], SamplingConfig(max_tokens=4))
    assert "--concurrency" in err.value.hint


def test_404_model_names_what_the_server_serves(scripted_server):
    with open_backend(_openai(scripted_server.base_url, "gpt-nope")) as llm:
        with pytest.raises(UndoError, match="model 'gpt-nope' not found.*it serves: scripted"):
            llm.generate([[{"role": "user", "content": "hi"}]], SamplingConfig(max_tokens=4))


def test_closed_port_is_a_clear_error():
    with pytest.raises(UndoError, match="cannot reach the server .*connection refused"):
        open_backend(_openai(f"http://127.0.0.1:{free_port()}/v1", "m"))


def test_key_comes_from_the_named_variable_and_lands_nowhere(undo, scripted_server, tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "q1", "question": "4+4?", "answer": "8"}) + "\n")
    secret = "sk-test-DO-NOT-LEAK-123"
    out = tmp_path / "r.jsonl"
    result = undo("generate", "--backend", "openai", "--base-url", scripted_server.base_url, "--teacher", "scripted",
                  "--api-key-env", "MY_TEACHER_KEY", "--input", problems, "--output", out,
                  env={"MY_TEACHER_KEY": secret})
    assert result.returncode == 0, result.stderr
    assert scripted_server.requests[-1]["headers"].get("authorization") == f"Bearer {secret}"
    assert secret not in out.read_text() and secret not in result.stderr and secret not in result.stdout
    record = json.loads(out.read_text())
    assert record["correct"] is True and record["backend"] == "openai" and record["teacher"] == "scripted"


def test_no_key_for_a_remote_server_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("UNDO_TEST_UNSET_KEY", raising=False)
    with pytest.raises(UndoError, match=r"\$UNDO_TEST_UNSET_KEY is not set"):
        open_backend(BackendConfig(backend="openai", model="m", base_url="https://api.example.com/v1",
                                   api_key_env="UNDO_TEST_UNSET_KEY"))


def test_vllm_style_token_ids_become_logprobs(scripted_server):
    with open_backend(_openai(scripted_server.base_url, "scripted")) as llm:
        llm._is_vllm = True  # what /v1/models says on a vLLM server (owned_by: vllm)
        (c,), = llm.generate([[{"role": "user", "content": "4+4?"}]], SamplingConfig(max_tokens=16, logprobs=2))
    body = scripted_server.requests[-1]["body"]
    assert body["logprobs"] is True and body["top_logprobs"] == 2 and body["return_tokens_as_token_ids"] is True
    assert [t.token_id for t in c.logprobs] == list(range(len(scripted_server.text.split(" "))))
    assert c.logprobs[0].top == [(0, -0.5), (1, -1.5)]
    assert c.completion_tokens == len(c.logprobs)



# -- issue 25: no drain between batches -------------------------------------------------------------

def test_the_next_batchs_requests_run_while_a_batch_finishes():
    """A straggler in batch 1 is answered only once a request of batch 2 has reached the server (or after
    20 s): with one batch at a time it would wait the 20 s, since batch 2 starts after batch 1 is done.
    Also: results come back per batch, in order, and closing the stream early cancels what is in flight."""
    import threading
    from http.server import BaseHTTPRequestHandler

    from tests.servers import completion_payload, start_loopback_http

    batch2_seen, released = threading.Event(), []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, payload: dict) -> None:
            raw = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            self._send({"object": "list", "data": [{"id": "m", "object": "model"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            said = body["messages"][-1]["content"]
            if said.startswith("b2-"):
                batch2_seen.set()
            if said == "straggler":
                released.append(batch2_seen.wait(20))
            self._send(completion_payload(body, f"answer to {said}"))

    httpd, port, _ = start_loopback_http(Handler)
    try:
        config = _openai(f"http://127.0.0.1:{port}/v1", "m", concurrency=2)
        with open_backend(config) as llm:
            # The loop sends batches of llm.batch_hint; the stream takes any size, and small ones keep this quick.
            batch1 = [[{"role": "user", "content": "straggler"}]] + [[{"role": "user", "content": f"b1-{i}"}]
                                                                     for i in range(3)]
            batch2 = [[{"role": "user", "content": f"b2-{i}"}] for i in range(3)]
            batch3 = [[{"role": "user", "content": f"b3-{i}"}] for i in range(3)]
            stream = llm.generate_stream(iter([batch1, batch2, batch3]), SamplingConfig(max_tokens=8))
            first = next(stream)
            assert released == [True]  # batch 2 was under way before batch 1 was handed back
            assert [c[0].text for c in first] == [f"answer to {m[0]['content']}" for m in batch1]
            second = next(stream)
            assert [c[0].text for c in second] == [f"answer to {m[0]['content']}" for m in batch2]
            stream.close()  # batch 3 was in flight: cancelled, and the backend still works afterwards
            assert llm.generate([[{"role": "user", "content": "after"}]], SamplingConfig(max_tokens=8))[0][0].text \
                == "answer to after"
    finally:
        httpd.shutdown()
        httpd.server_close()
