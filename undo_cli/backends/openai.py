"""The `openai` backend: any OpenAI-compatible chat endpoint as the teacher (or the student).

    python -m vllm.entrypoints.openai.api_server --model Qwen/Qwen2.5-7B-Instruct --port 8000 &
    undo generate --backend openai --base-url http://127.0.0.1:8000/v1 --teacher Qwen/Qwen2.5-7B-Instruct \\
        --input train.jsonl --output rationales.jsonl --concurrency 32

Works with `vllm serve`, `transformers serve`, SGLang, llama.cpp's server and
hosted APIs. Design choices, and why:

* **The official client** (`openai.AsyncOpenAI`): its retry logic already does
  exponential backoff with jitter on 408/409/429/5xx, connection errors and
  timeouts, and honours `Retry-After`; we set `max_retries` and do not write a
  loop of our own.
* **Bounded concurrency**: one asyncio event loop owned by the backend, an
  `asyncio.Semaphore(concurrency)` around each request. The runner hands us a
  few waves' worth of prompts per call, so the server stays busy and each
  finished batch is written to disk.
* **The key** comes from the environment variable *named* by `api_key_env`
  (OPENAI_API_KEY by default). It is never logged, recorded or echoed back. A
  server on 127.0.0.1 usually wants no key, so a placeholder is sent when the
  variable is unset and the URL is loopback.
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
  text with the stop string still on it.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any
from urllib.parse import urlparse

from undo_cli.backends.base import Completion, Message, SamplingConfig, TokenLogprobs
from undo_cli.console import warn
from undo_cli.errors import UndoError

LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def is_loopback(url: str | None) -> bool:
    host = urlparse(url).hostname if url else None
    return bool(host) and (host in LOOPBACK or host.startswith("127."))


def _server_message(exc: Any) -> str:
    """The server's own words from an APIStatusError (vLLM, OpenAI and FastAPI shapes), one line."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        for key in ("message", "detail"):
            if inner.get(key):
                return str(inner[key]).splitlines()[0]
    text = str(getattr(exc, "message", "") or exc)
    return text.splitlines()[0] if text else type(exc).__name__


class OpenAIBackend:
    """Chat completions over HTTP behind the `Backend` interface (see base.py)."""

    name = "openai"
    sort_by_length = False  # the server schedules; order does not matter

    def __init__(self, config):
        try:
            import openai
        except ImportError:  # pragma: no cover - a core dependency
            raise UndoError("the openai backend needs the openai package", hint="pip install openai") from None
        if not config.model:
            raise UndoError("no model name given", hint="pass --teacher/--model with the name the server serves")
        self.config = config
        self.model = config.model
        self.base_url = config.base_url or "https://api.openai.com/v1"
        self.concurrency = max(1, config.concurrency)
        # Enough prompts per call for several waves of requests, few enough that a kill loses little.
        self.batch_hint = max(64, 4 * self.concurrency)
        self._openai = openai
        key = os.environ.get(config.api_key_env)
        if not key:
            if config.base_url and is_loopback(config.base_url):
                key = "undo-local-no-key"  # local servers accept any key; this one is not a secret
            else:
                raise UndoError(f"no API key: ${config.api_key_env} is not set",
                                hint=f"export {config.api_key_env}=... (or name another variable with --api-key-env)")
        self._loop = asyncio.new_event_loop()
        self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=config.max_retries,
                                          timeout=config.timeout)
        del key
        self._served: list[str] = []
        self._is_vllm = False
        self._ignores_n = False
        self._tokenizer = None
        self._token_ids: dict[str, int] | None = None
        self._warned: set[str] = set()
        try:
            self._probe()
        except BaseException:
            self.close()  # no half-open client or event loop left behind
            raise

    # -- setup -------------------------------------------------------------------------------

    def _probe(self) -> None:
        """Fail fast and clearly when the server is down; learn what it serves and whether it is vLLM."""
        openai = self._openai

        async def models():
            quick = self._client.with_options(max_retries=1, timeout=15.0)
            return [m async for m in quick.models.list()]

        try:
            listed = self._loop.run_until_complete(models())
        except openai.APIConnectionError as exc:
            raise self._unreachable(exc) from None
        except openai.AuthenticationError:
            raise UndoError(f"{self.base_url} refused the API key from ${self.config.api_key_env} (401)",
                            hint=f"check the key in ${self.config.api_key_env}, or name another with --api-key-env") from None
        except openai.APIStatusError:
            return  # some servers have no /models; the first request will tell
        self._served = [m.id for m in listed]
        self._is_vllm = any(getattr(m, "owned_by", None) == "vllm" for m in listed)

    def _unreachable(self, exc: Exception) -> UndoError:
        cause = exc.__cause__ or exc.__context__
        why = "timed out" if isinstance(exc, self._openai.APITimeoutError) else (
            "connection refused" if "refused" in str(cause).lower() or "connect" in str(cause).lower() else str(cause or exc))
        return UndoError(f"cannot reach the server at {self.base_url} ({why})",
                         hint="start it first (e.g. `python -m vllm.entrypoints.openai.api_server --model M --port 8000`) "
                              "or fix --base-url")

    def _translate(self, exc: Exception) -> UndoError:
        """An OpenAI client error (after its retries) as one message a person can act on."""
        openai = self._openai
        if isinstance(exc, openai.APIConnectionError):
            return self._unreachable(exc)
        if isinstance(exc, openai.NotFoundError):
            served = f"; it serves: {', '.join(self._served)}" if self._served else ""
            return UndoError(f"model '{self.model}' not found at {self.base_url}{served} ({_server_message(exc)})",
                             hint="pass the exact served model name with --teacher/--model")
        if isinstance(exc, openai.AuthenticationError):
            return UndoError(f"{self.base_url} refused the API key from ${self.config.api_key_env} (401)",
                             hint=f"check ${self.config.api_key_env}")
        if isinstance(exc, openai.RateLimitError):
            return UndoError(f"{self.base_url} kept rate-limiting after {self.config.max_retries} retries (429)",
                             hint="lower --concurrency, or re-run later: finished batches are kept and resume")
        if isinstance(exc, openai.APIStatusError):
            return UndoError(f"{self.base_url} rejected the request ({exc.status_code}): {_server_message(exc)}",
                             hint="check the model name, --max-tokens against the context length, and sampling flags")
        return UndoError(f"request to {self.base_url} failed: {exc}")

    # -- generation ---------------------------------------------------------------------------

    def generate(self, prompts: list[list[Message]], sampling: SamplingConfig) -> list[list[Completion]]:
        return self._loop.run_until_complete(self._generate_all(prompts, sampling))

    async def _generate_all(self, prompts, sampling) -> list[list[Completion]]:
        semaphore = asyncio.Semaphore(self.concurrency)
        tasks = [asyncio.ensure_future(self._one_prompt(m, sampling, semaphore)) for m in prompts]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:  # do not leave requests running in the background after a failure
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _one_prompt(self, messages, sampling, semaphore) -> list[Completion]:
        if self._ignores_n and sampling.n > 1:
            parts = await asyncio.gather(*(self._request(messages, sampling, 1, k, semaphore) for k in range(sampling.n)))
            return [c for part in parts for c in part]
        completions = await self._request(messages, sampling, sampling.n, 0, semaphore)
        if len(completions) < sampling.n:
            self._ignores_n = True  # e.g. transformers serve: ask for the rest one by one
            rest = await asyncio.gather(*(self._request(messages, sampling, 1, k, semaphore)
                                          for k in range(len(completions), sampling.n)))
            completions += [c for part in rest for c in part]
        return completions[: sampling.n]

    async def _request(self, messages, sampling, n, offset, semaphore) -> list[Completion]:
        kwargs: dict[str, Any] = {
            "model": self.model, "messages": messages, "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
        }
        if n > 1:
            kwargs["n"] = n
        if sampling.stop:
            kwargs["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            kwargs["seed"] = sampling.seed + offset  # repeated requests must not repeat the same sample
        if sampling.logprobs:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = sampling.logprobs
            if self._is_vllm:
                kwargs["extra_body"] = {"return_tokens_as_token_ids": True}
        async with semaphore:
            try:
                response = await self._client.chat.completions.create(**kwargs)
            except self._openai.OpenAIError as exc:
                raise self._translate(exc) from None
        return self._completions(response, sampling)

    def _completions(self, response, sampling) -> list[Completion]:
        usage = response.usage
        choices = sorted(response.choices, key=lambda c: c.index)
        texts = [self._trim(c.message.content or "", sampling.stop) for c in choices]
        logprobs = [self._logprobs(c) if sampling.logprobs else None for c in choices]
        counts = self._completion_counts(choices, texts, usage)
        return [Completion(text=t, finish_reason=c.finish_reason, prompt_tokens=usage.prompt_tokens if usage else 0,
                           completion_tokens=k, logprobs=lp)
                for c, t, lp, k in zip(choices, texts, logprobs, counts)]

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
        counts = [len(c.logprobs.content) if c.logprobs and c.logprobs.content else None for c in choices]
        if all(k is not None for k in counts):
            return counts  # type: ignore[return-value]
        total = usage.completion_tokens if usage else 0
        if len(choices) == 1:
            return [total]
        chars = [max(1, len(t)) for t in texts]
        shares = [total * c // sum(chars) for c in chars]
        shares[-1] += total - sum(shares)
        return shares

    # -- token ids for log-probs -----------------------------------------------------------------

    def _logprobs(self, choice) -> list[TokenLogprobs] | None:
        content = choice.logprobs.content if choice.logprobs else None
        if not content:
            self._warn_once("nologprobs", f"{self.base_url} returned no log-probs; teacher_logprobs is null "
                                          "(servers such as transformers serve do not support them; vLLM does)")
            return None
        out = []
        for tok in content:
            tid = self._token_id(tok.token)
            top = [(self._token_id(t.token), t.logprob) for t in (tok.top_logprobs or [])]
            if tid is None or any(i is None for i, _ in top):
                self._warn_once("ids", "could not map the server's token strings to token ids; teacher_logprobs is "
                                       "null (serve with vLLM, or give a model name whose tokenizer loads locally)")
                return None
            out.append(TokenLogprobs(tid, tok.logprob, top))  # type: ignore[arg-type]
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

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn(message)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._loop.run_until_complete(self._client.close())
        finally:
            self._loop.close()

    def __enter__(self) -> "OpenAIBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
