"""The two hosted batch APIs, each as four calls: submit a file of requests, look at a batch, read its results,
cancel it. Nothing here knows about runs, manifests or retries (batch/__init__.py does).

OpenAI (https://platform.openai.com/docs/guides/batch):
    request line   {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
    submit         POST /files (multipart, purpose=batch) -> file id; POST /batches {input_file_id, endpoint,
                   completion_window: "24h", metadata} -> batch
    look           GET /batches/{id}: status validating|in_progress|finalizing|completed|failed|expired|
                   cancelling|cancelled; request_counts {total, completed, failed}
    results        GET /files/{output_file_id}/content and /files/{error_file_id}/content: lines
                   {"id", "custom_id", "response": {"status_code", "body"}, "error"}; requests a batch did not
                   reach before it expired are in the error file with error code "batch_expired"
    limits         50,000 requests and 200 MB per input file
Anthropic (https://docs.anthropic.com/en/docs/build-with-claude/batch-processing):
    submit         POST /messages/batches {"requests": [{"custom_id", "params": {...}}]}
    look           GET /messages/batches/{id}: processing_status in_progress|canceling|ended;
                   request_counts {processing, succeeded, errored, canceled, expired}; results_url when ended
    results        GET results_url: lines {"custom_id", "result": {"type": succeeded|errored|canceled|expired,
                   "message"|"error"}}, in any order
    limits         100,000 requests or 256 MB per batch; custom_id matches ^[a-zA-Z0-9_-]{1,64}$

Both sell tokens at half the online price (docs/economy.md, "Batch APIs").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from undo_cli.backends.base import Completion, Message, SamplingConfig
from undo_cli.errors import UndoError
from undo_cli.urls import redact, server_message, shown_url


@dataclass
class Look:
    """A batch as the API describes it now, in words both APIs share."""

    status: str                  # the API's own word (in_progress, completed, ended, expired, ...)
    ended: bool                  # no request of it will change any more
    total: int
    done: int                    # answered, successfully or not
    failed: int
    expires_at: float | None = None
    results: list[str] | None = None  # where its result lines are, once ended (file ids or a URL)


@dataclass
class Result:
    """One request's outcome, matched by custom_id."""

    custom_id: str
    ok: bool
    completions: list[Completion] | None = None
    kind: str = ""               # errored | expired | canceled (when not ok)
    reason: str = ""             # the API's own words for a failure


class Provider:
    """What the batch backend needs of one API. `client` is an httpx2.Client with the key in its headers."""

    name = ""
    max_requests = 0
    max_bytes = 0
    default_url = ""

    def __init__(self, client: Any, base_url: str, secrets: list[str]):
        self.client, self.base_url, self.secrets = client, base_url.rstrip("/"), secrets

    # --- shared HTTP ---
    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx2

        url = path if path.startswith("http") else f"{self.base_url}{path}"
        try:
            response = self.client.request(method, url, **kwargs)
        except httpx2.HTTPError as exc:
            raise UndoError(f"{self.name} batch API at {shown_url(self.base_url)}: {type(exc).__name__}: "
                            f"{redact(str(exc), self.secrets)}",
                            hint="check the network and --base-url; a re-run resumes: batches already "
                                 "submitted are polled, not submitted again") from None
        if response.status_code == 404 and "/batches/" in path:
            raise UndoError(f"{self.name}: no batch at {redact(path, self.secrets)} (404)",
                            hint="a batch is visible only to the API key (and project) that created it: use that "
                                 "key, or start again with --overwrite (what those batches cost is lost)")
        if response.status_code >= 400:
            words = redact(server_message(response.content), self.secrets)
            hint = ("check the key in the variable --api-key-env names" if response.status_code in (401, 403) else
                    "a re-run resumes where this stopped")
            raise UndoError(f"{self.name} batch API answered {response.status_code} to {method} "
                            f"{redact(path, self.secrets)}: {words}", hint=hint)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._call(method, path, **kwargs)
        try:
            data = response.json()
        except ValueError:
            raise UndoError(f"{self.name} batch API: {method} {path} answered with something that is not JSON: "
                            f"{redact(response.text[:200], self.secrets)}",
                            hint="is --base-url the API's root (e.g. https://api.openai.com/v1)?") from None
        if not isinstance(data, dict):
            raise UndoError(f"{self.name} batch API: {method} {path} answered {type(data).__name__}, not an object")
        return data

    def lines(self, where: str) -> list[dict[str, Any]]:
        """The JSON lines of a result file or URL; a malformed line is skipped (its request counts as errored,
        so it is resubmitted), never trusted."""
        out = []
        for line in self._call("GET", where).text.splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("custom_id"), str):
                    out.append(row)
        return out

    # --- per API ---
    def request_lines(self, requests: list[tuple[str, list[Message], SamplingConfig, str]]) -> list[bytes]:
        """One JSON line per (custom_id, messages, sampling, model): what the batch's input holds, in order."""
        return [json.dumps(self.request(*r), ensure_ascii=False).encode() + b"\n" for r in requests]

    def request(self, custom_id: str, messages: list[Message], sampling: SamplingConfig, model: str) -> dict:
        raise NotImplementedError

    def submit(self, lines: list[bytes], local_id: str) -> dict[str, Any]:
        raise NotImplementedError

    def find(self, local_id: str) -> str | None:
        """The batch created for `local_id` before a kill left its id unrecorded, when the API can say."""
        return None

    def look(self, batch_id: str) -> Look:
        raise NotImplementedError

    def results(self, look: Look) -> list[Result]:
        raise NotImplementedError

    def cancel(self, batch_id: str) -> None:
        raise NotImplementedError


def _finish(reason: str | None) -> str | None:
    return {"stop": "stop", "end_turn": "stop", "stop_sequence": "stop", "length": "length",
            "max_tokens": "length"}.get(reason or "", reason)


class OpenAIBatches(Provider):
    name = "OpenAI"
    max_requests = 50_000
    max_bytes = 200 * 1024 * 1024
    default_url = "https://api.openai.com/v1"

    def request(self, custom_id, messages, sampling, model):
        body: dict[str, Any] = {"model": model, "messages": messages, "temperature": sampling.temperature,
                                "top_p": sampling.top_p, "max_tokens": sampling.max_tokens, "n": sampling.n}
        if sampling.stop:
            body["stop"] = sampling.stop
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}

    def submit(self, lines, local_id):
        uploaded = self._json("POST", "/files", data={"purpose": "batch"},
                              files={"file": (f"{local_id}.jsonl", b"".join(lines), "application/jsonl")})
        batch = self._json("POST", "/batches", json={
            "input_file_id": uploaded.get("id"), "endpoint": "/v1/chat/completions", "completion_window": "24h",
            "metadata": {"undo_local_id": local_id}})
        if not isinstance(batch.get("id"), str):
            raise UndoError(f"OpenAI batch API: creating batch {local_id} answered no batch id")
        return {"batch_id": batch["id"], "input_file_id": uploaded.get("id"),
                "expires_at": batch.get("expires_at"), "status": batch.get("status")}

    def find(self, local_id):
        # metadata is the one thing of ours a batch carries: a kill between its creation and our write of
        # its id is then found again instead of paid twice
        data = self._json("GET", "/batches", params={"limit": 100})
        for batch in data.get("data") or []:
            if isinstance(batch, dict) and (batch.get("metadata") or {}).get("undo_local_id") == local_id:
                return batch.get("id")
        return None

    def look(self, batch_id):
        b = self._json("GET", f"/batches/{batch_id}")
        counts = b.get("request_counts") or {}
        status = str(b.get("status"))
        total, completed, failed = (int(counts.get(k) or 0) for k in ("total", "completed", "failed"))
        return Look(status, status in ("completed", "failed", "expired", "cancelled"), total,
                    completed + failed, failed, b.get("expires_at"),
                    [f for f in (b.get("output_file_id"), b.get("error_file_id")) if f])

    def results(self, look):
        out = []
        for file_id in look.results or []:
            for row in self.lines(f"/files/{file_id}/content"):
                out.append(self._result(row))
        return out

    def _result(self, row: dict[str, Any]) -> Result:
        cid, response, error = row["custom_id"], row.get("response") or {}, row.get("error")
        body = response.get("body") if isinstance(response, dict) else None
        if not error and response.get("status_code") == 200 and isinstance(body, dict):
            try:
                usage = body.get("usage") or {}
                choices = sorted(body["choices"], key=lambda c: c.get("index", 0))
                prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
                per = [completion // len(choices) + (1 if i < completion % len(choices) else 0)
                       for i in range(len(choices))]
                return Result(cid, True, [Completion(str(c["message"]["content"] or ""), _finish(c.get("finish_reason")),
                                                     prompt, per[i]) for i, c in enumerate(choices)])
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                return Result(cid, False, kind="errored", reason="a malformed answer")
        err = error if isinstance(error, dict) else (body or {}).get("error") if isinstance(body, dict) else None
        code = (err or {}).get("code") if isinstance(err, dict) else None
        words = (err or {}).get("message") if isinstance(err, dict) else None
        expired = code == "batch_expired"
        return Result(cid, False, kind="expired" if expired else "errored",
                      reason=str(code or words or f"HTTP {response.get('status_code')}"))

    def cancel(self, batch_id):
        self._json("POST", f"/batches/{batch_id}/cancel")


class AnthropicBatches(Provider):
    name = "Anthropic"
    max_requests = 100_000
    max_bytes = 256 * 1024 * 1024
    default_url = "https://api.anthropic.com/v1"

    def request(self, custom_id, messages, sampling, model):
        # a line per request, though the API takes one JSON body (submit joins them): the same split by count and bytes
        system = "\n\n".join(m["content"] for m in messages if m.get("role") == "system")
        params: dict[str, Any] = {"model": model, "max_tokens": sampling.max_tokens,
                                  "messages": [m for m in messages if m.get("role") != "system"],
                                  "temperature": min(1.0, sampling.temperature)}  # Anthropic's range is 0..1
        if system:
            params["system"] = system
        if sampling.top_p < 1:
            params["top_p"] = sampling.top_p
        if sampling.stop:
            params["stop_sequences"] = sampling.stop
        return {"custom_id": custom_id, "params": params}

    def submit(self, lines, local_id):
        body = b'{"requests": [' + b",".join(line.rstrip(b"\n") for line in lines) + b"]}"
        batch = self._json("POST", "/messages/batches", content=body,
                           headers={"content-type": "application/json"})
        if not isinstance(batch.get("id"), str):
            raise UndoError(f"Anthropic batch API: creating batch {local_id} answered no batch id")
        return {"batch_id": batch["id"], "input_file_id": None, "expires_at": _epoch(batch.get("expires_at")),
                "status": batch.get("processing_status")}

    def look(self, batch_id):
        b = self._json("GET", f"/messages/batches/{batch_id}")
        c = {k: int(v or 0) for k, v in (b.get("request_counts") or {}).items()}
        failed = c.get("errored", 0) + c.get("canceled", 0) + c.get("expired", 0)
        total = sum(c.values())
        status = str(b.get("processing_status"))
        return Look(status, status == "ended", total, total - c.get("processing", 0), failed,
                    _epoch(b.get("expires_at")), [b["results_url"]] if b.get("results_url") else None)

    def results(self, look):
        out = []
        for url in look.results or []:
            for row in self.lines(url):
                result = row.get("result") or {}
                kind = result.get("type") if isinstance(result, dict) else None
                if kind == "succeeded":
                    try:
                        m = result["message"]
                        text = "".join(part.get("text", "") for part in m["content"] if part.get("type") == "text")
                        usage = m.get("usage") or {}
                        out.append(Result(row["custom_id"], True, [Completion(
                            text, _finish(m.get("stop_reason")), int(usage.get("input_tokens") or 0),
                            int(usage.get("output_tokens") or 0))]))
                        continue
                    except (KeyError, TypeError, ValueError, AttributeError):
                        kind, reason = "errored", "a malformed answer"
                else:
                    err = (result.get("error") or {}) if isinstance(result, dict) else {}
                    inner = err.get("error") if isinstance(err.get("error"), dict) else err
                    reason = str(inner.get("type") or inner.get("message") or kind)
                out.append(Result(row["custom_id"], False, kind=kind if kind in ("expired", "canceled") else "errored",
                                  reason=reason))
        return out

    def cancel(self, batch_id):
        self._json("POST", f"/messages/batches/{batch_id}/cancel")


def _epoch(value: Any) -> float | None:
    """Anthropic writes RFC 3339 times, OpenAI epoch seconds: the manifest keeps epoch seconds."""
    if value is None or isinstance(value, (int, float)):
        return value
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


PROVIDERS = {"openai-batch": OpenAIBatches, "anthropic-batch": AnthropicBatches}
