"""A tiny OpenAI-compatible server whose every request takes a fixed time: for client-overhead benchmarks.

    python bench/latency_server.py --port 8001 --latency-ms 100
    python bench/latency_server.py --port 8001 --latency-ms 200 --jitter 0.5   # log-normal stragglers
    undo generate --backend openai --base-url http://127.0.0.1:8001/v1 --teacher latency ...

It answers /v1/models and /v1/chat/completions. Each completion sleeps
`latency` seconds (no compute: the server is not what is being measured) and
returns a fixed text with honest token counts (one "token" per word). Requests
are served on threads, so N concurrent requests take about one latency, which
is what lets `bench/generation.py` measure how well the client overlaps them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TEXT = "Sam starts with 2 apples. He buys 1 more, so 2 + 1 = 3.\n#### 3"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The listen() backlog: a class attribute, because the constructor already listens. A burst of
    # hundreds of concurrent connections (concurrency 256) must queue, not be reset.
    request_queue_size = 1024


class LatencyServer:
    """Serve in a background thread (`with LatencyServer(0.1) as s: s.base_url`)."""

    def __init__(self, latency_s: float = 0.1, port: int = 0, model: str = "latency", text: str = TEXT,
                 jitter: float = 0.0, seed: int = 0):
        self.latency_s, self.model, self.text = latency_s, model, text
        # jitter > 0: each request takes latency * exp(jitter * N(0, 1)) (log-normal, median `latency`), from a
        # seeded generator: the stragglers a real server has, where one batch at a time waits for the slowest.
        self.jitter, self._rng = jitter, random.Random(seed)
        self.requests = 0
        self._lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", port), self._handler())
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "LatencyServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "LatencyServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handler(self):
        server = self
        words = len(server.text.split())

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
            disable_nagle_algorithm = True  # else headers and body wait ~40 ms on delayed ACKs

            def log_message(self, *args):
                pass

            def _json(self, payload: dict, status: int = 200) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._json({"object": "list", "data": [{"id": server.model, "object": "model", "created": 0,
                                                            "owned_by": "bench"}]})
                elif self.path == "/health":
                    self._json({"status": "ok"})
                else:
                    self._json({"error": {"message": "not found"}}, 404)

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with server._lock:
                    server.requests += 1
                    factor = math.exp(server.jitter * server._rng.gauss(0.0, 1.0)) if server.jitter else 1.0
                time.sleep(server.latency_s * factor)
                n = int(request.get("n") or 1)
                self._json({
                    "id": "bench", "object": "chat.completion", "created": 0, "model": request.get("model"),
                    "choices": [{"index": i, "finish_reason": "stop", "logprobs": None,
                                 "message": {"role": "assistant", "content": server.text}} for i in range(n)],
                    "usage": {"prompt_tokens": 20, "completion_tokens": words * n, "total_tokens": 20 + words * n},
                })

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--model", default="latency")
    parser.add_argument("--jitter", type=float, default=0.0,
                        help="log-normal sigma of each request's latency (0: every request takes --latency-ms)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    server = LatencyServer(args.latency_ms / 1000, args.port, args.model, jitter=args.jitter, seed=args.seed)
    print(f"serving {server.base_url} (model '{args.model}', {args.latency_ms:.0f} ms per request); Ctrl-C stops")
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
