"""A stand-in for OpenAI's and Anthropic's batch APIs on 127.0.0.1, for the batch backend's tests.

The hosted APIs cannot be reached from tests, so this server speaks their batch protocols as their docs
describe them (backends/batch/providers.py lists the calls): files and batches (OpenAI), message batches
(Anthropic). Its "model" does arithmetic: the last `a op b` in the last user message, answered as
`a op b = c\\n#### c`, so rationales verify. A batch ends once `polls_to_end` looks have seen it (or when
`hold` is cleared), results come back shuffled, and knobs make requests error or expire, and keys differ.

    server = BatchAPIServer(key="sk-test-1").start()
    ... undo generate --backend openai-batch --base-url {server.url}/v1 ...
    server.created      # how many batches were created (a resumed run must not add any)
    server.stop()
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ARITH = re.compile(r"(\d+)\s*([+\-*])\s*(\d+)")


def answer(messages: list[dict[str, str]]) -> str:
    user = [m["content"] for m in messages if m.get("role") == "user"]
    found = ARITH.findall(user[-1] if user else "")
    if not found:
        return "I do not know.\n#### 0"
    a, op, b = found[-1]
    value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    return f"{a} {op} {b} = {value}\n#### {value}"


class BatchAPIServer:
    def __init__(self, key: str = "sk-test-1", polls_to_end: int = 1, seed: int = 0):
        self.key = key                      # the one key it accepts (a batch belongs to the key that made it)
        self.polls_to_end = polls_to_end
        self.rng = random.Random(seed)
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.created = 0                    # batches created, both APIs
        self.requests_seen: list[str] = []  # custom_ids submitted, in order, repeats included
        self.error_once: set[str] = set()   # custom_ids that error the first time they are submitted
        self.expire_once: set[str] = set()  # custom_ids that expire the first time
        self.error_always: dict[str, str] = {}  # custom_id -> error code, every time
        self.hold = threading.Event()       # set: batches stay in progress whatever polls_to_end says
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None

    # --- lifecycle ---
    def start(self) -> "BatchAPIServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._dispatch(self, "GET")

            def do_POST(self) -> None:
                server._dispatch(self, "POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    # --- HTTP ---
    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        key = (h.headers.get("Authorization") or "").removeprefix("Bearer ") or h.headers.get("x-api-key") or ""
        path = h.path.split("?")[0]
        try:
            if key != self.key:
                return self._send(h, 401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
            with self.lock:
                status, payload = self._route(method, path, body, h.headers.get("Content-Type") or "")
        except Exception as exc:  # a bug here must show in the test, not hang it
            status, payload = 500, {"error": {"message": f"stand-in server: {exc!r}"}}
        self._send(h, status, payload)

    def _send(self, h: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _route(self, method: str, path: str, body: bytes, ctype: str) -> tuple[int, Any]:
        if method == "POST" and path == "/v1/files":
            return 200, self._upload(body, ctype)
        if method == "POST" and path == "/v1/batches":
            return 200, self._create_openai(json.loads(body))
        if method == "GET" and path == "/v1/batches":
            return 200, {"data": [self._openai_view(b) for b in self.batches.values() if b["api"] == "openai"]}
        m = re.fullmatch(r"/v1/batches/([^/]+)(/cancel)?", path)
        if m and m.group(1) in self.batches:
            if m.group(2):
                self.batches[m.group(1)]["cancelled"] = True
            return 200, self._openai_view(self.batches[m.group(1)], look=method == "GET")
        if m:
            return 404, {"error": {"message": f"No batch found with id '{m.group(1)}'."}}
        m = re.fullmatch(r"/v1/files/([^/]+)/content", path)
        if m and m.group(1) in self.files:
            return 200, self.files[m.group(1)]
        if method == "POST" and path == "/v1/messages/batches":
            return 200, self._create_anthropic(json.loads(body))
        m = re.fullmatch(r"/v1/messages/batches/([^/]+)(/cancel|/results)?", path)
        if m and m.group(1) in self.batches:
            b = self.batches[m.group(1)]
            if m.group(2) == "/cancel":
                b["cancelled"] = True
            if m.group(2) == "/results":
                return 200, b["results"]
            return 200, self._anthropic_view(b, look=m.group(2) is None)
        if m:
            return 404, {"type": "error", "error": {"type": "not_found_error", "message": "batch not found"}}
        return 404, {"error": {"message": f"no route {method} {path}"}}

    def _upload(self, body: bytes, ctype: str) -> dict[str, Any]:
        boundary = ctype.split("boundary=")[1].strip('"').encode()
        for part in body.split(b"--" + boundary):
            head, _, content = part.partition(b"\r\n\r\n")
            if b'name="file"' in head:
                fid = f"file-{len(self.files) + 1}"
                self.files[fid] = content.removesuffix(b"\r\n")
                return {"id": fid, "object": "file", "purpose": "batch"}
        raise ValueError("no file part")

    # --- batches ---
    def _new(self, api: str, requests: list[tuple[str, Any]], metadata: dict | None) -> dict[str, Any]:
        self.created += 1
        bid = f"{'batch' if api == 'openai' else 'msgbatch'}_{self.created:03d}"
        b = {"id": bid, "api": api, "requests": requests, "metadata": metadata or {}, "looks": 0,
             "cancelled": False, "ended": False, "results": b"", "created_at": int(time.time())}
        self.requests_seen += [cid for cid, _ in requests]
        self.batches[bid] = b
        return b

    def _outcome(self, cid: str) -> str:
        """succeeded | errored:<code> | expired, as the knobs say (the *_once ones are spent)."""
        if cid in self.error_always:
            return f"errored:{self.error_always[cid]}"
        if cid in self.error_once:
            self.error_once.discard(cid)
            return "errored:server_error"
        if cid in self.expire_once:
            self.expire_once.discard(cid)
            return "expired"
        return "succeeded"

    def _maybe_end(self, b: dict[str, Any], look: bool) -> None:
        if look:
            b["looks"] += 1
        if b["ended"] or self.hold.is_set() or (b["looks"] < self.polls_to_end and not b["cancelled"]):
            return
        b["ended"] = True
        rows = [(cid, req, "canceled" if b["cancelled"] else self._outcome(cid)) for cid, req in b["requests"]]
        self.rng.shuffle(rows)  # results in any order: matched by custom_id, never by position
        b["outcomes"] = rows
        if b["api"] == "openai":
            out, err = [], []
            for i, (cid, req, what) in enumerate(rows):
                if what == "succeeded":
                    text = answer(req["messages"])
                    choices = [{"index": k, "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop"} for k in range(req.get("n", 1))]
                    out.append({"id": f"r{i}", "custom_id": cid, "response": {"status_code": 200, "body": {
                        "choices": choices, "usage": {"prompt_tokens": 20, "completion_tokens": 7 * len(choices)}}},
                        "error": None})
                elif what == "expired":
                    err.append({"id": f"r{i}", "custom_id": cid, "response": None,
                                "error": {"code": "batch_expired", "message": "This request could not be executed "
                                                                              "before the completion window expired."}})
                else:
                    code = what.split(":", 1)[1] if ":" in what else "cancelled"
                    err.append({"id": f"r{i}", "custom_id": cid, "response": {"status_code": 500, "body": {
                        "error": {"message": code, "code": code}}}, "error": None})
            for name, lines in (("out", out), ("err", err)):
                if lines:
                    fid = f"file-{b['id']}-{name}"
                    self.files[fid] = "".join(json.dumps(x) + "\n" for x in lines).encode()
                    b[f"{name}_file"] = fid
        else:
            lines = []
            for cid, req, what in rows:
                if what == "succeeded":
                    result = {"type": "succeeded", "message": {"content": [{"type": "text", "text": answer(
                        req["messages"])}], "stop_reason": "end_turn", "usage": {"input_tokens": 20, "output_tokens": 7}}}
                elif what.startswith("errored"):
                    result = {"type": "errored", "error": {"type": "error", "error": {
                        "type": what.split(":", 1)[1], "message": "failed"}}}
                else:
                    result = {"type": what}
                lines.append(json.dumps({"custom_id": cid, "result": result}) + "\n")
            b["results"] = "".join(lines).encode()

    def _counts(self, b: dict[str, Any]) -> dict[str, int]:
        rows = b.get("outcomes") or []
        ok = sum(w == "succeeded" for _, _, w in rows)
        return {"total": len(b["requests"]), "completed": ok, "failed": len(rows) - ok}

    def _create_openai(self, data: dict[str, Any]) -> dict[str, Any]:
        lines = self.files[data["input_file_id"]].decode().splitlines()
        requests = [(row["custom_id"], row["body"]) for row in map(json.loads, lines)]
        assert all(json.loads(x)["url"] == "/v1/chat/completions" for x in lines)
        assert len({cid for cid, _ in requests}) == len(requests), "custom_ids must be unique in a batch"
        return self._openai_view(self._new("openai", requests, data.get("metadata")))

    def _openai_view(self, b: dict[str, Any], look: bool = False) -> dict[str, Any]:
        self._maybe_end(b, look)
        rows = b.get("outcomes") or []
        expired = any(w == "expired" for _, _, w in rows)
        status = ("cancelled" if b["cancelled"] else "expired" if expired else "completed") if b["ended"] else "in_progress"
        return {"id": b["id"], "object": "batch", "status": status, "metadata": b["metadata"],
                "request_counts": self._counts(b), "output_file_id": b.get("out_file"),
                "error_file_id": b.get("err_file"), "expires_at": b["created_at"] + 86400}

    def _create_anthropic(self, data: dict[str, Any]) -> dict[str, Any]:
        requests = [(r["custom_id"], r["params"]) for r in data["requests"]]
        assert all(re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", cid) for cid, _ in requests), "custom_id pattern"
        return self._anthropic_view(self._new("anthropic", requests, None))

    def _anthropic_view(self, b: dict[str, Any], look: bool = False) -> dict[str, Any]:
        self._maybe_end(b, look)
        rows = b.get("outcomes") or []
        counts = {"processing": 0 if b["ended"] else len(b["requests"]),
                  **{k: sum(w.split(":")[0] == k for _, _, w in rows) for k in ("succeeded", "errored", "canceled",
                                                                                 "expired")}}
        return {"id": b["id"], "type": "message_batch", "processing_status": "ended" if b["ended"] else "in_progress",
                "request_counts": counts, "expires_at": "2030-01-01T00:00:00Z",
                "results_url": f"{self.url}/v1/messages/batches/{b['id']}/results" if b["ended"] else None}
