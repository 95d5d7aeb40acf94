"""Hosted batch APIs as a backend: a stage's requests go to OpenAI's or Anthropic's batch API at half the
online price, are matched back by custom_id, and a manifest beside the output makes a killed run poll
instead of paying twice.

    export OPENAI_API_KEY=...
    undo generate --backend openai-batch --teacher gpt-4o-mini --input train.jsonl --output rationales.jsonl \\
        --price-input 0.15 --price-output 0.60        # booked at half: the batch price
    undo batch status rationales.jsonl                 # from another shell: what is in flight, done, failed
    # killed? run the same command again: the stored batch ids are polled, nothing is submitted twice

What happens in one call (`generate`), every step recorded in `<stem>.batches.json` (manifest.py) first:

1. Each prompt gets a custom_id derived from its content (model, messages, sampling, and which sample), so a
   re-run after a kill computes the same ids and finds them in the manifest.
2. Ids no batch holds yet are split by count and by bytes (the API's limits, or --batch-max-requests) and
   each part is created as one batch, its manifest entry written before the upload.
3. Every batch still open is polled every --batch-poll-s seconds, with a line on stderr.
4. Results are matched by custom_id, never by order. Errored and expired requests (only those) are
   submitted again, at most --batch-resubmits times in one run; what still fails comes back as None (the
   generation loop leaves it undone), the rest is written, and the stage then fails with the API's reasons.

The output is the online backends' output, record for record: every later stage is unchanged. Cached rows
never reach this backend (the teacher economy answers them first) and a budget admits requests before
they are submitted. Limits, said plainly: Anthropic keeps no metadata on a batch, so a run killed inside
the one HTTP request that creates a batch cannot find that batch again and submits its rows once more.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from typing import Any

from undo_cli.backends import stopping
from undo_cli.backends.base import Completion, Message, SamplingConfig, one_batch_at_a_time
from undo_cli.backends.batch.manifest import FINAL, Manifest, key_fingerprint
from undo_cli.backends.batch.providers import PROVIDERS, Look, Provider, Result
from undo_cli.console import console
from undo_cli.errors import UndoError
from undo_cli.urls import base_urls, is_loopback, shown_url

KEY_ENV = {"openai-batch": "OPENAI_API_KEY", "anthropic-batch": "ANTHROPIC_API_KEY"}


def api_key_env(config: Any) -> str:
    """The variable the key is read from: --api-key-env, except that its OpenAI default means ANTHROPIC_API_KEY
    for the Anthropic API."""
    if config.backend == "anthropic-batch" and config.api_key_env == "OPENAI_API_KEY":
        return KEY_ENV["anthropic-batch"]
    return config.api_key_env


def open_provider(backend: str, base_url: str | None, key_env: str) -> tuple[Provider, str]:
    """An API client with its key, and the key's fingerprint (never the key)."""
    import httpx2

    cls = PROVIDERS[backend]
    url = (base_url or cls.default_url).rstrip("/")
    key = os.environ.get(key_env)
    if not key:
        if not is_loopback(url):
            raise UndoError(f"no API key: ${key_env} is not set",
                            hint=f"export {key_env}=... (or name another variable with --api-key-env)")
        key = "undo-local-no-key"  # a stand-in server on loopback; not a secret
    headers = ({"Authorization": f"Bearer {key}"} if backend == "openai-batch" else
               {"x-api-key": key, "anthropic-version": "2023-06-01"})
    client = httpx2.Client(headers=headers, timeout=httpx2.Timeout(120.0, connect=10.0))
    fingerprint = key_fingerprint(key)
    return cls(client, url, [key] if len(key) >= 4 else []), fingerprint


def custom_ids(model: str, prompts: list[list[Message]], sampling: SamplingConfig, per_sample: bool) -> list[list[str]]:
    """Each prompt's request ids: one (OpenAI asks for n samples in one request) or n (Anthropic has no n).
    From content, so a re-run computes the same ids; a prompt repeated in one call gets its occurrence added."""
    setting = json.dumps([model, sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.stop,
                          sampling.seed, sampling.n], sort_keys=True)
    seen: Counter[str] = Counter()
    out = []
    for messages in prompts:
        base = hashlib.sha256((setting + json.dumps(messages, sort_keys=True)).encode()).hexdigest()[:40]
        seen[base] += 1
        stem = f"u{base}" if seen[base] == 1 else f"u{base}-d{seen[base] - 1}"
        out.append([f"{stem}-s{k}" for k in range(sampling.n)] if per_sample else [stem])
    return out


class BatchBackend:
    """The `Backend` protocol over a batch API (see the module docstring)."""

    sort_by_length = False

    def __init__(self, config: Any):
        if not config.model:
            raise UndoError("no model name given", hint="pass --teacher/--model with the API's model name")
        if not config.batch_manifest:
            raise UndoError(f"the {config.backend} backend needs an output file: its batches are recorded beside it",
                            hint="pass --output FILE (not - or a pipe); a killed run then resumes from that file")
        urls = base_urls(config.base_url)
        if len(urls) > 1:
            raise UndoError(f"{config.backend}: one --base-url, not {len(urls)}",
                            hint="a batch API is one endpoint; it spreads the work itself")
        self.name, self.model, self.config = config.backend, config.model, config
        self.key_env = api_key_env(config)
        self.api, fingerprint = open_provider(config.backend, urls[0] if urls else None, self.key_env)
        self.max_requests = min(self.api.max_requests, config.batch_max_requests or self.api.max_requests)
        self.max_bytes = min(self.api.max_bytes, int((config.batch_max_mb or 1e9) * 1024 * 1024))
        self.batch_hint = self.max_requests
        self.manifest = Manifest.open(config.batch_manifest, provider=config.backend, endpoint=self.api.base_url,
                                      api_key_env=self.key_env, fingerprint=fingerprint, model=config.model)
        self._results: dict[str, Result] = {}   # custom_id -> its newest outcome, from ended batches read
        self._read: set[str] = set()            # local ids of the batches whose results are in _results
        self.failed: Counter[str] = Counter()   # this run's requests that failed for good, by the API's reason
        self._adopt_unrecorded()

    # --- the Backend protocol ---
    def generate(self, prompts: list[list[Message]], sampling: SamplingConfig) -> list[list[Completion] | None]:
        per_sample = self.name == "anthropic-batch"
        ids = custom_ids(self.model, prompts, sampling, per_sample)
        sample = sampling if not per_sample else SamplingConfig(**{**sampling.__dict__, "n": 1})
        wanted = {cid: (prompts[i], sample) for i, group in enumerate(ids) for cid in group}
        resubmitted = 0
        while True:
            self._wait(wanted)
            failed = [cid for cid in wanted if cid in self._results and not self._results[cid].ok]
            todo = [cid for cid in wanted if cid not in self._results]  # _wait left no open batch holding one
            if failed and resubmitted < self.config.batch_resubmits:
                resubmitted += 1
                reasons = Counter(f"{self._results[c].kind}: {self._results[c].reason}" for c in failed)
                console.print(f"[dim]{self.name}: submitting {len(failed)} failed request(s) again "
                              f"({resubmitted}/{self.config.batch_resubmits}): "
                              f"{', '.join(f'{r} ({n})' for r, n in reasons.most_common(3))}[/dim]")
                for cid in failed:
                    del self._results[cid]
                todo += failed
            if not todo:
                break
            self._submit([(cid, *wanted[cid]) for cid in todo])
        out: list[list[Completion] | None] = []
        for group in ids:
            results = [self._results.get(cid) for cid in group]
            if all(r is not None and r.ok for r in results):
                # The run's end rules (backends/stopping.py) on the returned text, as for any server.
                completions = [stopping.applied_to(c, sampling) for r in results for c in r.completions]
                if per_sample:  # n requests were billed their prompt each: the ledger reads it off the first
                    billed = sum(c.prompt_tokens for c in completions)
                    for c in completions:
                        c.prompt_tokens = billed
                out.append(completions)
            else:
                for r in results:
                    if r is not None and not r.ok:
                        self.failed[f"{r.kind}: {r.reason}"] += 1
                out.append(None)
        return out

    def generate_stream(self, batches, sampling):
        yield from one_batch_at_a_time(self, batches, sampling)
        if self.failed:  # after the last results are written: the stage fails, saying why, and a re-run retries
            total = sum(self.failed.values())
            raise UndoError(
                f"{total} request(s) to the {self.name} API failed after {self.config.batch_resubmits} "
                f"resubmission(s): " + ", ".join(f"{r} ({n})" for r, n in self.failed.most_common(5)),
                hint="the others are written; run the same command again to submit only these (after fixing "
                     "what the API said, e.g. credit or a request it rejects)")

    def endpoint_summary(self) -> list[dict[str, Any]] | None:
        return None

    def applied(self, sampling: SamplingConfig) -> dict[str, Any]:
        """What each request sets; the API applies its own defaults to the rest."""
        return {"backend": self.name, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens, "stop": list(sampling.stop),
                "stop_at_answer": sampling.stop_at_answer, "repetition_cut": sampling.repetition_cut}

    def close(self) -> None:
        self.api.client.close()

    def __enter__(self) -> "BatchBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the work ---
    def _adopt_unrecorded(self) -> None:
        """Entries a kill left in 'creating': the batch found again by its metadata, or its rows resubmitted."""
        changed = False
        for entry in self.manifest.batches:
            if entry["state"] != "creating":
                continue
            found = self.api.find(entry["local_id"])
            entry.update({"batch_id": found, "state": "submitted"} if found else {"state": "abandoned"})
            changed = True
        if changed:
            self.manifest.save()

    def _submit(self, requests: list[tuple[str, list[Message], SamplingConfig]]) -> None:
        lines = self.api.request_lines([(cid, m, s, self.model) for cid, m, s in requests])
        part: list[int] = []
        size = 0
        for i, line in enumerate(lines):
            if len(line) > self.max_bytes:
                raise UndoError(f"one request is {len(line):,} bytes, over the {self.name} batch limit of "
                                f"{self.max_bytes:,}", hint="shorten the prompt or lower --max-tokens")
            if part and (len(part) >= self.max_requests or size + len(line) > self.max_bytes):
                self._create([requests[j][0] for j in part], [lines[j] for j in part])
                part, size = [], 0
            part.append(i)
            size += len(line)
        if part:
            self._create([requests[j][0] for j in part], [lines[j] for j in part])

    def _create(self, ids: list[str], lines: list[bytes]) -> None:
        entry = self.manifest.new_entry(ids, lines)  # on disk before the API hears of it
        made = self.api.submit(lines, entry["local_id"])
        entry.update(made, state="submitted")
        self.manifest.save()
        console.print(f"[dim]{self.name}: batch {made['batch_id']} created: {len(ids):,} requests, "
                      f"{entry['bytes']:,} bytes ({entry['local_id']} in {self.manifest.path})[/dim]")

    def _wait(self, wanted: dict[str, Any]) -> None:
        """Poll the open batches that hold wanted requests until they end; read every ended batch's results."""
        shown = 0.0
        while True:
            open_ = [b for b in self.manifest.batches
                     if b["state"] == "submitted" and any(cid in wanted for cid in b["custom_ids"])]
            for entry in open_:
                look = self.api.look(entry["batch_id"])
                self._note(entry, look)
                if look.ended:
                    self._read_results(entry, look)
            for entry in self.manifest.batches:  # ended before this run started: results read once
                if entry["state"] == "ended" and entry["local_id"] not in self._read \
                        and any(cid in wanted for cid in entry["custom_ids"]):
                    self._read_results(entry, self.api.look(entry["batch_id"]))
            self.manifest.save()
            still = [b for b in open_ if b["state"] == "submitted"]
            if not still:
                return
            now = time.monotonic()
            if now - shown >= min(60.0, max(self.config.batch_poll_s, 1.0) * 2) or not shown:
                shown = now
                done = sum(b["counts"]["done"] for b in still)
                total = sum(b["counts"]["total"] or b["requests"] for b in still)
                console.print(f"[dim]{self.name}: waiting on {len(still)} batch(es) at "
                              f"{shown_url(self.api.base_url)}: {done:,}/{total:,} requests answered "
                              f"({', '.join(sorted({b['status'] for b in still}))}); polling every "
                              f"{self.config.batch_poll_s:g} s. Safe to stop: a re-run polls these ids.[/dim]")
            time.sleep(self.config.batch_poll_s)

    def _note(self, entry: dict[str, Any], look: Look) -> None:
        entry.update(status=look.status, expires_at=look.expires_at or entry.get("expires_at"),
                     counts={"total": look.total, "done": look.done, "failed": look.failed})
        if look.ended:
            entry["state"] = "ended"

    def _read_results(self, entry: dict[str, Any], look: Look) -> None:
        mine = set(entry["custom_ids"])
        prompt = completion = 0
        got = set()
        for result in self.api.results(look):
            if result.custom_id in mine:  # never trust a line for a request this batch did not hold
                self._results[result.custom_id] = result
                got.add(result.custom_id)
                for c in result.completions or []:
                    completion += c.completion_tokens
                prompt += result.completions[0].prompt_tokens if result.completions else 0
        for cid in mine - got:  # an ended batch that says nothing of a request: it failed
            self._results[cid] = Result(cid, False, kind="expired" if look.status == "expired" else "errored",
                                        reason=f"no result line (batch {look.status})")
        entry["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion}
        self._read.add(entry["local_id"])


__all__ = ["BatchBackend", "FINAL", "api_key_env", "custom_ids", "open_provider"]
