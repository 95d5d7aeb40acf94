"""The `openai` backend: any OpenAI-compatible chat endpoint (or several) as the teacher (or the student).

    python -m vllm.entrypoints.openai.api_server --model Qwen/Qwen2.5-7B-Instruct --port 8000 &
    undo generate --backend openai --base-url http://127.0.0.1:8000/v1 --teacher Qwen/Qwen2.5-7B-Instruct \\
        --input train.jsonl --output rationales.jsonl --concurrency 32
    # N replicas: repeat --base-url; --concurrency is per endpoint
    undo generate --backend openai --base-url http://node1:8000/v1 --base-url http://node2:8000/v1 ...

Works with `vllm serve`, `transformers serve`, SGLang, llama.cpp's server and
hosted APIs. Design choices, and why:

* **A lean HTTP path** (`httpx2.AsyncClient`, the HTTP library under the
  official `openai` client) instead of `openai.AsyncOpenAI`. Three reasons: (1)
  a failed request must be retried on *another* endpoint, which the official
  client's retry loop (bound to one base URL) cannot do; (2) a malformed 200
  (invalid JSON, `choices: null`) must be a retryable fault, while the official
  client parses after its retry loop and hands back a half-built object or a
  JSONDecodeError; (3) cost: at concurrency 256 against bench/latency_server.py
  (`python bench/generation.py --sections openai`) the official client spends
  ~2.5 ms of CPU per request (pydantic models, its options machinery, one
  256-connection pool) and this path ~1.0 ms, so one core drives ~1,000 req/s.
* **Retry semantics are the official client's**: 408/409/429/5xx, connection
  errors, timeouts (and here malformed 200s) are retried up to `max_retries`
  times, with exponential backoff (0.5 s doubling to 8 s, 25% jitter) that
  honours `Retry-After`; when another endpoint is up, the retry goes there at
  once. 400/401/403/404/422 are the user's to fix and stop at once.
* **Timeouts**: `request_timeout` bounds each whole request (connect + wait +
  body), so a hung server costs that, not an hour. While requests wait, a line
  on stderr says on what (`waiting on URL: 16 requests in flight, oldest 45 s`)
  every min(30 s, request_timeout / 2).
* **Faults are named**: refused, reset, closed before answering, closed
  mid-response, timed out, or what a malformed 200 said (truncated).
* **Bounded concurrency per endpoint**: an `asyncio.Semaphore(concurrency)`
  per endpoint; each request goes to the least-loaded endpoint that is up. An
  endpoint that fails twice in a row rests (1 s doubling to 30 s). The generation loop
  hands us a few waves' worth of prompts per call, so every endpoint stays busy
  and each finished batch is written to disk. Per endpoint we count requests,
  failures and throughput for the stage's summary.
* **The key** comes from the environment variable *named* by `api_key_env`
  (OPENAI_API_KEY by default). It is never logged or recorded, and every message
  this module produces, server text included, is redacted: the key and any
  `Authorization`/`Bearer` value become `***`. A server on 127.0.0.1 usually
  wants no key, so a placeholder is sent when the variable is unset and every
  URL is loopback.
* **n > 1**: asked for with `n`; servers that ignore it (transformers serve
  does) get the missing samples as separate requests with seeds seed+1, seed+2...
  Once a server has ignored `n`, later prompts fan out right away.
* **Log-probabilities** (`logprobs=True, top_logprobs=K`) come back as token
  *strings*; distillation needs token *ids*. vLLM servers are asked for
  `return_tokens_as_token_ids` ("token_id:123"), detected by `owned_by: vllm` in
  /v1/models. Elsewhere the strings are mapped through the model's tokenizer
  when it can be loaded locally, else logprobs are recorded as null (with one
  warning) rather than as guessed ids.
* **Stop strings** are trimmed here as well, because some servers return the
  text with the stop string still on it. The end rules of backends/stopping.py (the answer line, a
  degenerate repetition) are applied to the text returned: OpenAI's `stop` takes plain strings only.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import os
import random
import time
from typing import Any

from undo_cli.backends import stopping
from undo_cli.backends.base import Completion, Message, SamplingConfig, TokenLogprobs
from undo_cli.console import console, warn
from undo_cli.errors import UndoError
from undo_cli.urls import base_urls, is_loopback, redact, server_message, shown_url, snippet

RETRYABLE = {408, 409, 429}      # and every 5xx, as the official client does
REST_MAX_S = 30.0                # longest an endpoint that keeps failing is left alone
# Connections per httpx2 client. Its pool scans every connection (and polls each idle socket) on every
# request, so one pool of 256 costs O(256) per request: at concurrency 256 that scan was 60% of the
# client's CPU (cProfile). Pools of 4, one per 4 slots, keep the scan short: 0.85-0.9 ms of client CPU
# per request against 1.0-1.25 ms with pools of 32 (issue 25, at load 4 on 2 cores).
POOL = 4


class _Fault(Exception):
    """A retryable failure of one request on one endpoint, said as a person would say it."""

    def __init__(self, what: str, status: int | None = None, retry_after: float | None = None,
                 kind: str | None = None):
        super().__init__(what)
        self.what, self.status, self.retry_after = what, status, retry_after
        self.kind = kind or (f"HTTP {status}" if status else what)  # the summary's short name for it


class _Refused(Exception):
    """A non-retryable answer (400/401/403/404/422): the request itself must change."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def describe_transport_error(exc: BaseException) -> str:
    """What happened to the connection: refused / reset / closed before or mid-response / timed out."""
    import httpx2

    errnos = {getattr(e, "errno", None) for e in _chain(exc) if isinstance(e, OSError)}
    root = next((e for e in reversed(list(_chain(exc))) if str(e)), exc)
    if isinstance(exc, httpx2.ConnectTimeout):
        return "timed out connecting"
    if isinstance(exc, httpx2.TimeoutException):
        return "timed out waiting for the response"
    if isinstance(exc, httpx2.ConnectError):
        if errno.ECONNREFUSED in errnos:
            return "connection refused"
        if errno.ECONNRESET in errnos:
            return "connection reset while connecting"
        return f"could not connect ({root})"
    if errno.ECONNRESET in errnos or errno.EPIPE in errnos:
        return "connection reset by the server"
    text = str(exc)
    if isinstance(exc, httpx2.RemoteProtocolError):
        if "without sending a response" in text:
            return "the server accepted the connection and closed it without answering"
        if "complete message body" in text or "incomplete" in text.lower():
            return "the server closed the connection mid-response"
        return f"the server broke the HTTP protocol ({text})"
    if isinstance(exc, httpx2.ReadError):
        return f"reading the response failed ({root})"
    if isinstance(exc, httpx2.WriteError):
        return f"sending the request failed ({root})"
    return f"{type(exc).__name__}: {root}"


def _short(what: str) -> str:
    """describe_transport_error's sentence as a short label for the summary's fault counts."""
    for needle, label in (("refused", "refused"), ("reset", "reset"), ("without answering", "closed before answering"),
                          ("mid-response", "closed mid-response"), ("timed out", "timed out")):
        if needle in what:
            return label
    return what.split(" (")[0]


class _Endpoint:
    """One server: its connection pool, its concurrency bound, what is in flight, and its counts."""

    def __init__(self, url: str, concurrency: int, headers: dict[str, str], timeout: float):
        import httpx2

        self.url, self.name = url, shown_url(url)
        self.concurrency = concurrency
        self.slots = asyncio.Semaphore(concurrency)
        self.free = list(range(concurrency - 1, -1, -1))  # slot numbers; slot i uses clients[i // POOL]
        # One kept-alive connection per slot; the total deadline is ours (asyncio.timeout), these are the
        # per-phase bounds under it. One TLS context for all the clients (each would build its own, ~20 ms).
        ssl_context = httpx2.create_ssl_context()
        self.clients = [httpx2.AsyncClient(
            headers=headers, timeout=httpx2.Timeout(timeout, connect=min(timeout, 30.0)), verify=ssl_context,
            limits=httpx2.Limits(max_connections=min(POOL, concurrency - i), max_keepalive_connections=POOL))
            for i in range(0, concurrency, POOL)]
        self.client = self.clients[0]  # for the probe
        self.in_flight: dict[int, float] = {}
        self.queued = 0
        self.requests = self.failures = self.ok = 0
        self.faults: dict[str, int] = {}
        self.consecutive = 0
        self.rest_until = 0.0
        self.dead: str | None = None  # why it was dropped at start (unreachable)

    def load(self) -> float:
        return (len(self.in_flight) + self.queued) / self.concurrency

    def failed(self, fault: _Fault) -> None:
        self.failures += 1
        self.consecutive += 1
        self.faults[fault.kind] = self.faults.get(fault.kind, 0) + 1
        rest = fault.retry_after if fault.retry_after is not None else 0.0
        if self.consecutive >= 2:  # twice in a row: not a blip; steer requests elsewhere for a while
            rest = max(rest, min(REST_MAX_S, 0.5 * 2 ** (self.consecutive - 1)))
        self.rest_until = max(self.rest_until, time.monotonic() + rest)

    def succeeded(self) -> None:
        self.ok += 1
        self.consecutive = 0
        self.rest_until = 0.0


class OpenAIBackend:
    """Chat completions over HTTP behind the `Backend` interface (see base.py)."""

    name = "openai"
    sort_by_length = False  # the server schedules; order does not matter

    def __init__(self, config):
        if not config.model:
            raise UndoError("no model name given", hint="pass --teacher/--model with the name the server serves")
        self.config = config
        self.model = config.model
        urls = base_urls(config.base_url) or ["https://api.openai.com/v1"]
        if len(set(urls)) != len(urls):
            raise UndoError(f"--base-url lists the same server twice: {', '.join(map(shown_url, urls))}",
                            hint="give each endpoint once (--concurrency is per endpoint)")
        self.base_url = urls[0]
        self.concurrency = max(1, config.concurrency)
        self.request_timeout = float(config.request_timeout)
        self.max_retries = max(0, int(config.max_retries))
        if self.request_timeout <= 0:
            raise UndoError(f"--request-timeout {config.request_timeout}: must be > 0 seconds")
        key = os.environ.get(config.api_key_env)
        if not key:
            if config.base_url and all(is_loopback(u) for u in urls):
                key = "undo-local-no-key"  # local servers accept any key; this one is not a secret
            else:
                raise UndoError(f"no API key: ${config.api_key_env} is not set",
                                hint=f"export {config.api_key_env}=... (or name another variable with --api-key-env)")
        self._secrets = [key] if len(key) >= 4 else []
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        del key
        self._loop = asyncio.new_event_loop()
        self._endpoints = [_Endpoint(u, self.concurrency, headers, self.request_timeout) for u in urls]
        from undo_cli.backends.config import batch_hint

        self.batch_hint = batch_hint(config)
        self._served: list[str] = []
        self._is_vllm = False
        self._ignores_n = False
        self._tokenizer = None
        self._token_ids: dict[str, int] | None = None
        self._warned: set[str] = set()
        self._busy_s = 0.0
        self._batches_in_flight, self._watcher = 0, None  # generate_stream: up to two batches, one _watch
        self._seq = 0
        try:
            self._probe()
        except BaseException:
            self.close()  # no half-open client or event loop left behind
            raise

    # -- messages ------------------------------------------------------------------------------

    def _error(self, message: str, hint: str | None = None) -> UndoError:
        """An UndoError with every secret redacted and server text safe from rich markup."""
        from rich.markup import escape

        clean = lambda s: escape(redact(s, self._secrets)) if s else s  # noqa: E731
        return UndoError(clean(message), hint=clean(hint))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            from rich.markup import escape

            self._warned.add(key)
            warn(escape(redact(message, self._secrets)))

    # -- setup -------------------------------------------------------------------------------

    def _probe(self) -> None:
        """Fail fast and clearly when no server is up; learn what they serve and whether it is vLLM."""
        results = self._loop.run_until_complete(_gather(*(self._probe_one(e) for e in self._endpoints)))
        down = [(e, why) for e, why in zip(self._endpoints, results) if why]
        if len(down) == len(self._endpoints):
            if len(down) == 1:
                message = f"cannot reach the server at {down[0][0].name} ({down[0][1]})"
            else:
                message = (f"cannot reach any of the {len(down)} servers: "
                           + "; ".join(f"{e.name} ({why})" for e, why in down))
            raise self._error(message, hint="start it first (e.g. `python -m vllm.entrypoints.openai.api_server "
                                            "--model M --port 8000`) or fix --base-url")
        for e, why in down:
            e.dead = why
            self._warn_once(f"dead:{e.url}", f"cannot reach {e.name} ({why}); continuing with "
                                             f"{len(self._endpoints) - len(down)} of {len(self._endpoints)} endpoints")

    async def _probe_one(self, e: _Endpoint) -> str | None:
        """None when the endpoint answers (anything HTTP); else what went wrong connecting."""
        import httpx2

        why = None
        for _ in range(2):  # one retry: a server that is just starting may drop the first connection
            try:
                async with asyncio.timeout(min(15.0, self.request_timeout)):
                    r = await e.client.get(f"{e.url}/models")
            except (httpx2.HTTPError, OSError) as exc:
                why = describe_transport_error(exc)
                continue
            except TimeoutError:
                why = f"no answer to GET /models within {min(15.0, self.request_timeout):g} s"
                continue
            if r.status_code == 401:
                raise self._error(f"{e.name} refused the API key from ${self.config.api_key_env} (401)",
                                  hint=f"check the key in ${self.config.api_key_env}, or name another with --api-key-env")
            if r.status_code == 200:
                try:
                    listed = [m for m in json.loads(r.content).get("data") or [] if isinstance(m, dict)]
                except (ValueError, AttributeError):
                    listed = []
                self._served += [str(m.get("id")) for m in listed if str(m.get("id")) not in self._served]
                self._is_vllm = self._is_vllm or any(m.get("owned_by") == "vllm" for m in listed)
            return None  # some servers have no /models; the first request will tell
        return why

    # -- generation ---------------------------------------------------------------------------

    def generate(self, prompts: list[list[Message]], sampling: SamplingConfig) -> list[list[Completion]]:
        started = time.perf_counter()
        try:
            return self._loop.run_until_complete(self._generate_all(prompts, sampling))
        finally:
            self._busy_s += time.perf_counter() - started

    def generate_stream(self, batches, sampling: SamplingConfig):
        """Each batch's completions in order, with the next batch's requests already running: the endpoints'
        slots stay full across a batch boundary, where one batch at a time left them to drain while its
        slowest requests finished (issue 25). Two batches in flight at most, the older one first in every
        endpoint's queue (asyncio's semaphore is FIFO). The event loop runs only inside this generator, so
        while the caller writes a batch nothing new is sent: a killed run loses at most the two batches
        in flight, and a failure cancels the younger one's requests."""
        batches = iter(batches)
        pending: collections.deque[asyncio.Task] = collections.deque()

        def start_next() -> None:
            prompts = next(batches, None)
            if prompts is not None:
                pending.append(self._loop.create_task(self._generate_all(prompts, sampling)))

        try:
            start_next()
            start_next()
            while pending:
                started = time.perf_counter()
                try:
                    results = self._loop.run_until_complete(pending[0])
                finally:
                    self._busy_s += time.perf_counter() - started
                pending.popleft()
                start_next()  # before the yield: the caller's next `next()` runs it beside the one ahead
                yield results
        finally:
            for task in pending:
                task.cancel()
            if pending and not self._loop.is_closed():
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

    async def _generate_all(self, prompts, sampling) -> list[list[Completion]]:
        # One watcher while any batch is in flight (generate_stream runs two): one "waiting on" line, not two.
        if self._batches_in_flight == 0:
            self._watcher = asyncio.ensure_future(self._watch())
        self._batches_in_flight += 1
        tasks = [asyncio.ensure_future(self._one_prompt(m, sampling)) for m in prompts]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:  # do not leave requests running in the background after a failure
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            self._batches_in_flight -= 1
            if self._batches_in_flight == 0 and self._watcher is not None:
                self._watcher.cancel()
                self._watcher = None

    async def _watch(self) -> None:
        """Say what a stalled run waits for: a line per endpoint whose oldest request is old."""
        interval = min(30.0, max(0.5, self.request_timeout / 2))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for e in self._endpoints:
                if e.in_flight:
                    oldest = now - min(e.in_flight.values())
                    if oldest >= interval:
                        n = len(e.in_flight)
                        console.print(f"waiting on {e.name}: {n} request{'s' if n != 1 else ''} in flight, "
                                      f"oldest {oldest:.0f} s (--request-timeout {self.request_timeout:g})",
                                      markup=False, highlight=False)

    async def _one_prompt(self, messages, sampling) -> list[Completion]:
        if self._ignores_n and sampling.n > 1:
            parts = await asyncio.gather(*(self._request(messages, sampling, 1, k) for k in range(sampling.n)))
            return [c for part in parts for c in part]
        completions = await self._request(messages, sampling, sampling.n, 0)
        if len(completions) < sampling.n:
            self._ignores_n = True  # e.g. transformers serve: ask for the rest one by one
            rest = await asyncio.gather(*(self._request(messages, sampling, 1, k)
                                          for k in range(len(completions), sampling.n)))
            completions += [c for part in rest for c in part]
        return completions[: sampling.n]

    async def _request(self, messages, sampling, n, offset) -> list[Completion]:
        body: dict[str, Any] = {
            "model": self.model, "messages": messages, "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
        }
        if n > 1:
            body["n"] = n
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            body["seed"] = sampling.seed + offset  # repeated requests must not repeat the same sample
        if sampling.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = sampling.logprobs
            if self._is_vllm:
                body["return_tokens_as_token_ids"] = True
        data = await self._send(json.dumps(body).encode())
        return self._completions(data, sampling)

    def _pick(self, avoid: _Endpoint | None) -> _Endpoint:
        """The least-loaded live endpoint that is not resting, preferring one other than `avoid`."""
        now = time.monotonic()
        live = [e for e in self._endpoints if e.dead is None]
        up = [e for e in live if e.rest_until <= now]
        pool = [e for e in up if e is not avoid] or up or live
        return min(pool, key=_Endpoint.load)

    async def _send(self, payload: bytes) -> dict:
        """POST to some endpoint until a well-formed answer comes back or the retries are spent."""
        failed: _Endpoint | None = None
        fault: _Fault | None = None
        for attempt in range(self.max_retries + 1):
            e = self._pick(failed)
            if attempt and (e is failed or e.rest_until > time.monotonic()):
                await asyncio.sleep(self._backoff(attempt, fault))  # nowhere else to go now: back off
                e = self._pick(failed)
            e.queued += 1
            try:
                await e.slots.acquire()
            finally:
                e.queued -= 1
            slot = e.free.pop()  # never empty: the semaphore admits at most `concurrency`
            try:
                return await self._post(e, e.clients[slot // POOL], payload)
            except _Fault as f:
                e.failed(f)
                failed, fault = e, f
            except _Refused as r:
                raise self._translate(r, e.name) from None
            finally:
                e.free.append(slot)
                e.slots.release()
        raise self._gave_up(failed, fault)

    @staticmethod
    def _backoff(attempt: int, fault: _Fault | None) -> float:
        if fault is not None and fault.retry_after is not None and 0 <= fault.retry_after <= 60:
            return fault.retry_after
        return min(0.5 * 2 ** (attempt - 1), 8.0) * (1 - 0.25 * random.random())

    async def _post(self, e: _Endpoint, client, payload: bytes) -> dict:
        import httpx2

        self._seq += 1
        ticket = self._seq
        e.requests += 1
        e.in_flight[ticket] = time.monotonic()
        try:
            async with asyncio.timeout(self.request_timeout):
                r = await client.post(f"{e.url}/chat/completions", content=payload)
        except TimeoutError:
            raise _Fault(f"timed out after {self.request_timeout:g} s without a complete response",
                         kind="timed out") from None
        except (httpx2.HTTPError, OSError) as exc:
            what = describe_transport_error(exc)
            raise _Fault(what, kind=_short(what)) from None
        finally:
            del e.in_flight[ticket]
        status = r.status_code
        if status == 200:
            data = self._parse(r.content)
            e.succeeded()
            return data
        if status in RETRYABLE or status >= 500:
            retry_after = None
            try:
                retry_after = float(r.headers.get("retry-after", ""))
            except ValueError:
                pass
            raise _Fault(f"answered {status}: {server_message(r.content)}", status=status, retry_after=retry_after)
        raise _Refused(status, server_message(r.content))

    @staticmethod
    def _parse(content: bytes) -> dict:
        """A 200's body, checked for the shape we read; anything else is a retryable fault."""
        try:
            data = json.loads(content)
        except ValueError:
            raise _Fault(f"answered 200 with a body that is not JSON: {snippet(content)}",
                         kind="200 not JSON") from None
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            raise _Fault(f"answered 200 without a list of choices: {snippet(content)}", kind="200 without choices")
        for c in choices:
            msg = c.get("message") if isinstance(c, dict) else None
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), (str, type(None))):
                raise _Fault(f"answered 200 with a choice that has no message text: {snippet(content)}",
                             kind="200 without message")
        if not isinstance(data.get("usage"), (dict, type(None))):
            raise _Fault(f"answered 200 with a malformed usage field: {snippet(content)}", kind="200 bad usage")
        return data

    def _gave_up(self, e: _Endpoint | None, fault: _Fault | None) -> UndoError:
        tries = self.max_retries + 1
        where = e.name if len(self._endpoints) == 1 else f"{len(self._endpoints)} endpoints (last: {e.name})"
        resume = "finished batches are kept: re-run the same command to resume"
        if fault is not None and fault.status == 429:
            return self._error(f"{where} kept rate-limiting after {self.max_retries} retries (429)",
                               hint=f"lower --concurrency, or re-run later: {resume}")
        return self._error(f"{where}: gave up on a request after {tries} attempt{'s' if tries != 1 else ''}; "
                           f"last: {fault.what if fault else '?'}",
                           hint=f"check the server's log; raise --max-retries or --request-timeout if it is only "
                                f"slow or flaky; {resume}")

    def _translate(self, exc: _Refused, e_name: str) -> UndoError:
        if exc.status == 404:
            served = f"; it serves: {', '.join(self._served)}" if self._served else ""
            return self._error(f"model '{self.model}' not found at {e_name}{served} ({exc.message})",
                               hint="pass the exact served model name with --teacher/--model")
        if exc.status in (401, 403):
            return self._error(f"{e_name} refused the API key from ${self.config.api_key_env} ({exc.status})",
                               hint=f"check ${self.config.api_key_env}")
        return self._error(f"{e_name} rejected the request ({exc.status}): {exc.message}",
                           hint="check the model name, --max-tokens against the context length, and sampling flags")

    def _completions(self, data: dict, sampling) -> list[Completion]:
        usage = data.get("usage") or {}
        choices = sorted(data["choices"], key=lambda c: c.get("index") or 0)
        texts = [self._trim(c["message"].get("content") or "", sampling.stop) for c in choices]
        logprobs = [self._logprobs(c) if sampling.logprobs else None for c in choices]
        counts = self._completion_counts(choices, texts, usage)  # what the server generated (and bills)
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        out = []
        for c, t, lp, k in zip(choices, texts, logprobs, counts):
            # The run's end rules (backends/stopping.py), judged on the returned text: the tokens after the
            # cut were generated and are still counted, but they are not part of the completion.
            kept, finish, cut = stopping.apply(t, c.get("finish_reason"), sampling)
            if cut and lp is not None:
                lp = lp[: stopping.tokens_covering([_piece_length(tok) for tok in _content(c) or []], len(kept))]
            out.append(Completion(text=kept, finish_reason=finish, prompt_tokens=prompt_tokens,
                                  completion_tokens=k, logprobs=lp))
        return out

    def applied(self, sampling: SamplingConfig) -> dict[str, Any]:
        """What each request sets; a server applies its own defaults to what a request leaves out (vLLM
        serve: the model's generation_config, e.g. top_k and repetition_penalty)."""
        return {"backend": "openai", "temperature": sampling.temperature, "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens, "stop": list(sampling.stop), "seed": sampling.seed,
                "stop_at_answer": sampling.stop_at_answer, "repetition_cut": sampling.repetition_cut,
                "not_sent": "top_k, repetition_penalty and other sampling settings: the server's defaults"}

    @staticmethod
    def _trim(text: str, stop: list[str]) -> str:
        for s in stop:
            cut = text.find(s)
            if cut != -1:
                text = text[:cut]
        return text

    @staticmethod
    def _completion_counts(choices, texts, usage) -> list[int]:
        # Exact per choice when log-probs list the tokens or there is one choice; with n > 1 the
        # server only reports a total, which we apportion by text length (the total stays exact).
        counts = [len(_content(c)) if _content(c) else None for c in choices]
        if all(k is not None for k in counts):
            return counts  # type: ignore[return-value]
        total = int(usage.get("completion_tokens") or 0)
        if len(choices) == 1:
            return [total]
        chars = [max(1, len(t)) for t in texts]
        shares = [total * c // sum(chars) for c in chars]
        shares[-1] += total - sum(shares)
        return shares

    # -- per-endpoint figures for the summary ---------------------------------------------------

    def endpoint_summary(self) -> list[dict[str, Any]]:
        busy = max(self._busy_s, 1e-9)
        return [{"url": e.name, "requests": e.requests, "ok": e.ok, "failures": e.failures, "faults": dict(e.faults),
                 "req_per_s": round(e.ok / busy, 2), "unreachable_at_start": e.dead} for e in self._endpoints]

    # -- token ids for log-probs -----------------------------------------------------------------

    def _logprobs(self, choice) -> list[TokenLogprobs] | None:
        content = _content(choice)
        if not content:
            self._warn_once("nologprobs", f"{self.base_url} returned no log-probs; teacher_logprobs is null "
                                          "(servers such as transformers serve do not support them; vLLM does)")
            return None
        out = []
        for tok in content:
            tid = self._token_id(tok.get("token", ""))
            top = [(self._token_id(t.get("token", "")), t.get("logprob")) for t in (tok.get("top_logprobs") or [])]
            if tid is None or any(i is None for i, _ in top):
                self._warn_once("ids", "could not map the server's token strings to token ids; teacher_logprobs is "
                                       "null (serve with vLLM, or give a model name whose tokenizer loads locally)")
                return None
            out.append(TokenLogprobs(tid, float(tok.get("logprob")), [(i, float(lp)) for i, lp in top]))
        return out

    def _token_id(self, token: str) -> int | None:
        if token.startswith("token_id:"):
            try:
                return int(token[len("token_id:"):])
            except ValueError:
                return None
        if self._token_ids is None:
            self._token_ids = self._vocabulary()
        return self._token_ids.get(token)

    def _vocabulary(self) -> dict[str, int]:
        """Decoded text of each token -> id, from the model's tokenizer if it loads locally."""
        try:
            from transformers import AutoTokenizer

            remote = {"trust_remote_code": True} if self.config.trust_remote_code else {}
            tok = AutoTokenizer.from_pretrained(self.model, **remote)
        except Exception:
            return {}
        table: dict[str, int] = {}
        for i in range(len(tok)):
            table.setdefault(tok.decode([i]), i)
        return table

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._loop.run_until_complete(_gather(*(c.aclose() for e in getattr(self, "_endpoints", [])
                                                    for c in e.clients), return_exceptions=True))
        finally:
            self._loop.close()

    def __enter__(self) -> "OpenAIBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _gather(*aws, return_exceptions: bool = False) -> list:
    # gather() called outside a running loop binds to the thread's default loop, not ours.
    return await asyncio.gather(*aws, return_exceptions=return_exceptions)


def _piece_length(token: dict) -> int:
    """Characters one log-prob entry's token spells (its UTF-8 `bytes` when given: a vLLM token may be
    named 'token_id:123')."""
    raw = token.get("bytes")
    if isinstance(raw, list):
        return len(bytes(b & 0xFF for b in raw if isinstance(b, int)).decode("utf-8", "replace"))
    return len(str(token.get("token", "")))


def _content(choice: dict) -> list | None:
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, dict) else None
    return content if isinstance(content, list) else None
