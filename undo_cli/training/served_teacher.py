"""The teacher behind a server: its top-K log-probs at every trained token, from vLLM's completions endpoint.

    python -m vllm.entrypoints.openai.api_server --model Qwen/Qwen2.5-7B-Instruct --port 8000 --max-logprobs 20 &
    undo train --student Qwen/Qwen2.5-0.5B-Instruct --objective fkl --teacher Qwen/Qwen2.5-7B-Instruct \\
        --teacher-url http://127.0.0.1:8000/v1 --teacher-top-k 20 --data rationales.jsonl --output runs/student

A big teacher lives on its own GPUs behind an OpenAI-compatible vLLM server; the
student trains elsewhere. For every sequence the student trains on (the data's
rationales and, on-policy, the student's own samples) this module asks the
server to *score* the sequence: `POST /v1/completions` with the sequence as
token ids (not text: no re-tokenisation), `echo: true, max_tokens: 0` (nothing
is generated) and vLLM's `prompt_logprobs: K`. vLLM answers, per position j,
the log-probs of the K most likely tokens given ids[:j] plus the one of ids[j]
itself: exactly what `undo generate --logprobs K` records for the offline path,
so the loss is the same top-K + tail-bucket code (`objectives/offline.py`,
docs/objectives.md states the approximation). K is `--teacher-top-k`; the server
must allow it (`--max-logprobs`, vLLM's default 20; `-1` allows the vocabulary).

Overlap, not waiting: `submit(batch)` sends the batch's sequences from a small
thread pool and returns a future; the trainer submits each optimizer step's
micro-batches one step ahead (`UndoTrainer(prefetch=...)`), and the loss waits
only after the student's own forward. `wait_s` is the wall time the training
loop actually spent blocked on the server; train_summary.json reports it.

Faults: the official `openai` client does the retries (exponential backoff with
jitter on 408/409/429/5xx, connection errors and timeouts: `--teacher-max-retries`,
`--teacher-timeout`), and what is left becomes one `UndoError` naming the server
and the fix. The run then stops with exit code 2; its checkpoints stay, and
`undo train ... --resume` (with the same or a new `--teacher-url`) continues.

Before any work, `check_tokenizer` compares the server's tokenizer with the
student's token by token through vLLM's `/tokenize` endpoint (see its docstring).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

from undo_cli.errors import UndoError

FUTURE_KEY = "undo_teacher_topk"   # a batch's pending teacher request (set by prefetch, consumed by the loss)
VLLM_NEG_INF = -9999.0             # vLLM sends -inf log-probs as -9999.0 (JSON has no infinity)
PROBE_IDS = 8192                   # tokenizer check: at most this many vocabulary entries, evenly spread
PROBE_CHUNK = 512                  # ... this many per /tokenize request
CACHE_SEQUENCES = 256              # scores kept for sequences asked about again

SHARED_TOKENIZER_HINT = ("use --objective uld or gold (or auto) for a teacher with another tokenizer (its "
                         "tokenizer must load here), or --objective sft (black-box: any teacher)")


def server_root(url: str) -> str:
    """http://host:8000/v1 -> http://host:8000 (vLLM's /tokenize and /health are not under /v1)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _examples(batch: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    from undo_cli.training.student_outputs import split_examples

    return split_examples(batch)


class ServedTeacher:
    """Top-K teacher log-probs from a vLLM server, fetched in the background (see the module docstring)."""

    def __init__(self, url: str, model: str, *, top_k: int, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 300.0, max_retries: int = 5, concurrency: int = 2):
        import openai

        from undo_cli.urls import is_loopback

        self.url, self.model, self.top_k = url.rstrip("/"), model, top_k
        self.where = describe_url(self.url)  # for messages and the summary: no credentials a URL may carry
        self.api_key_env, self.max_retries = api_key_env, max_retries
        self._openai = openai
        key = os.environ.get(api_key_env)
        if not key:
            if not is_loopback(url):
                raise UndoError(f"--teacher-url {url}: no API key: ${api_key_env} is not set",
                                hint=f"export {api_key_env}=... (or name another variable with --teacher-api-key-env)")
            key = "undo-local-no-key"  # local servers accept any key; this one is not a secret
        self._headers = {"Authorization": f"Bearer {key}"}
        self._client = openai.OpenAI(base_url=self.url, api_key=key, max_retries=max_retries, timeout=timeout)
        del key
        self._pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="undo-teacher")
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "sequences": 0, "tokens": 0, "request_s": 0.0, "wait_s": 0.0}
        self.max_model_len: int | None = None
        self.served: list[str] = []
        self.vocab_limit: int | None = None  # the student's output rows (set once it is loaded)
        # Recent scores by sequence: MiniLLM scores its samples for the rewards, then trains on them.
        self._cache: OrderedDict[tuple[int, ...], list] = OrderedDict()

    # -- setup: is the server there, does it serve the model, does it share the tokenizer -----------

    def probe(self) -> None:
        """GET /v1/models: reachable, serves `model` (else the list it serves), its context length."""
        try:
            listed = list(self._client.with_options(max_retries=1, timeout=15.0).models.list())
        except self._openai.OpenAIError as exc:
            raise self._translate(exc, running=False) from None
        self.served = [m.id for m in listed]
        if self.model not in self.served:
            raise UndoError(f"--teacher {self.model}: not served at {self.where} (it serves: {', '.join(self.served)})",
                            hint="pass the exact served model name with --teacher")
        for m in listed:
            if m.id == self.model:
                self.max_model_len = (m.model_extra or {}).get("max_model_len")

    def _tokenize(self, text: str, *, add_special_tokens: bool = False) -> tuple[list[int], list[str]]:
        import json
        import urllib.error
        import urllib.request

        url, shown = f"{server_root(self.url)}/tokenize", f"{server_root(self.where)}/tokenize"
        body = json.dumps({"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens,
                           "return_token_strs": True}).encode()
        request = urllib.request.Request(url, data=body, headers={**self._headers, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60.0) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise UndoError(f"{shown} answered {exc.code}: the tokenizer check needs vLLM's /tokenize endpoint",
                            hint="serve the teacher with vLLM's OpenAI server (python -m vllm.entrypoints.openai."
                                 "api_server), or use --objective sft") from None
        except (urllib.error.URLError, OSError) as exc:
            raise UndoError(f"cannot reach {shown} ({getattr(exc, 'reason', exc)})",
                            hint="start the teacher's vLLM server first, or fix --teacher-url") from None
        return list(answer["tokens"]), list(answer.get("token_strs") or [])

    def check_tokenizer(self, tokenizer, *, whose: str = "the student's") -> None:
        """Refuse a served teacher whose tokenizer is not `tokenizer` (the student's, or for a cross-tokenizer
        objective the teacher's own loaded here), compared token by token.

        Same vocabulary size proves nothing. Probe texts are the student's decoding of (up to
        PROBE_IDS, evenly spread) vocabulary entries in chunks; the server must split each into the
        same ids with the same token strings as the student does. Every special token of the
        student must be one token on the server, with the same id and string.
        """
        vocab = len(tokenizer)
        special = set(tokenizer.all_special_ids)
        step = max(1, vocab // PROBE_IDS)
        ids = [i for i in range(0, vocab, step) if i not in special]
        where = f"--teacher {self.model} at {self.where}"
        for start in range(0, len(ids), PROBE_CHUNK):
            text = tokenizer.decode(ids[start: start + PROBE_CHUNK])
            mine = tokenizer(text, add_special_tokens=False)["input_ids"]
            theirs, strs = self._tokenize(text)
            if theirs != mine or (strs and strs != tokenizer.convert_ids_to_tokens(mine)):
                at = next((j for j, (a, b) in enumerate(zip(theirs, mine)) if a != b), min(len(theirs), len(mine)))
                raise UndoError(
                    f"{where}: its tokenizer differs from {whose} (a probe text splits into other tokens "
                    f"from token {at} on: server {theirs[at:at + 3]} vs {mine[at:at + 3]}): exact-vocabulary "
                    "objectives need a shared tokenizer", hint=SHARED_TOKENIZER_HINT)
        for token in tokenizer.all_special_tokens:
            theirs, strs = self._tokenize(token)
            mine = tokenizer.convert_tokens_to_ids(token)
            if theirs != [mine] or (strs and strs != [token]):
                raise UndoError(f"{where}: special token {token!r} is id {mine} for {whose} tokenizer but "
                                f"{theirs} {strs} on the server: exact-vocabulary objectives need a shared tokenizer",
                                hint=SHARED_TOKENIZER_HINT)

    def check_top_k(self, ids: list[int]) -> None:
        """One scoring request of a short sequence with K = --teacher-top-k: a server whose --max-logprobs is
        lower refuses it now, with the fix, not at the first training step. Not counted in the summary."""
        saved = dict(self.stats)
        try:
            self._request([list(ids[:16]) or [0]])
        finally:
            self.stats = saved

    def check_lengths(self, longest: int, max_length: int) -> None:
        """Every sequence trained on (at most --max-length tokens) must fit the server's context."""
        if self.max_model_len is not None and min(longest, max_length) > self.max_model_len:
            raise UndoError(f"--teacher-url {self.where}: serves at most {self.max_model_len} tokens per sequence, "
                            f"but training sequences reach {min(longest, max_length)}",
                            hint=f"lower --max-length to {self.max_model_len}, or raise the server's --max-model-len")

    # -- scoring ---------------------------------------------------------------------------------

    def _translate(self, exc: Exception, *, running: bool = True) -> UndoError:
        """What is left after the client's retries, as one message a person can act on."""
        from undo_cli.urls import redact, server_message

        def said(error) -> str:  # the server's words, with the key redacted if it echoed it back
            body = getattr(getattr(error, "response", None), "content", b"") or str(error).encode()
            return redact(server_message(body), [os.environ.get(self.api_key_env) or ""])

        openai = self._openai
        if isinstance(exc, openai.APIConnectionError):
            why = "timed out" if isinstance(exc, openai.APITimeoutError) else "connection failed"
            if not running:
                return UndoError(f"the teacher server at {self.where} cannot be reached ({why})",
                                 hint="start it first (python -m vllm.entrypoints.openai.api_server --model "
                                      f"{self.model} ...), or fix --teacher-url")
            return UndoError(f"the teacher server at {self.where} cannot be reached ({why}, after "
                             f"{self.max_retries} retries)",
                             hint="restart it (the same --teacher model), then rerun with --resume: training "
                                  "continues from the last checkpoint (pass --teacher-url if it moved)")
        if isinstance(exc, openai.AuthenticationError):
            return UndoError(f"{self.where} refused the API key from ${self.api_key_env} (401)",
                             hint=f"check ${self.api_key_env}, or name another with --teacher-api-key-env")
        if isinstance(exc, openai.NotFoundError):
            return UndoError(f"--teacher {self.model}: not found at {self.where} ({said(exc)})",
                             hint="pass the exact served model name with --teacher")
        if isinstance(exc, openai.APIStatusError):
            message = said(exc)
            hint = ("start the server with --max-logprobs of at least --teacher-top-k (or -1), or lower --teacher-top-k"
                    if "logprobs" in message else
                    "check --max-length against the server's --max-model-len")
            return UndoError(f"the teacher server at {self.where} rejected a scoring request ({exc.status_code}): "
                             f"{message}", hint=hint)
        return UndoError(f"scoring request to {self.where} failed: {exc}")

    def score(self, sequences: list[list[int]]) -> list[list[dict[int, float] | None]]:
        """Per sequence, per position j: {token id: log-prob} of the top K at j plus ids[j] (None at j = 0)."""
        keys = [tuple(seq) for seq in sequences]
        with self._lock:
            known = {k: self._cache[k] for k in keys if k in self._cache}
        todo = [seq for seq, k in zip(sequences, keys) if k not in known]
        fresh = dict(zip((tuple(s) for s in todo), self._request(todo))) if todo else {}
        with self._lock:
            for k, v in fresh.items():
                self._cache[k] = v
            while len(self._cache) > CACHE_SEQUENCES:
                self._cache.popitem(last=False)
        return [known[k] if k in known else fresh[k] for k in keys]

    def _request(self, sequences: list[list[int]]) -> list[list[dict[int, float] | None]]:
        started = time.perf_counter()
        try:
            response = self._client.completions.create(
                model=self.model, prompt=sequences, max_tokens=0, echo=True, temperature=0.0,
                extra_body={"prompt_logprobs": self.top_k, "add_special_tokens": False})
        except self._openai.OpenAIError as exc:
            raise self._translate(exc) from None
        choices = sorted(response.choices, key=lambda c: c.index)
        if len(choices) != len(sequences):
            raise UndoError(f"the teacher server at {self.where} answered {len(choices)} scores for "
                            f"{len(sequences)} sequences", hint="serve the teacher with vLLM's OpenAI server")
        out = []
        for seq, choice in zip(sequences, choices):
            rows = (choice.model_extra or {}).get("prompt_logprobs")
            if rows is None or len(rows) != len(seq):
                raise UndoError(f"the teacher server at {self.where} returned no prompt_logprobs for a sequence of "
                                f"{len(seq)} tokens (got {None if rows is None else len(rows)})",
                                hint="serve the teacher with vLLM's OpenAI server, which supports prompt_logprobs")
            out.append([None if row is None else
                        {int(t): (-math.inf if v["logprob"] <= VLLM_NEG_INF else float(v["logprob"]))
                         for t, v in row.items()} for row in rows])
        with self._lock:
            self.stats["requests"] += 1
            self.stats["sequences"] += len(sequences)
            self.stats["tokens"] += sum(len(s) for s in sequences)
            self.stats["request_s"] += time.perf_counter() - started
        return out

    def topk_tensors(self, batch: dict[str, Any], packed: bool) -> dict[str, Any]:
        """The teacher's top-K at every labelled position of `batch`, laid out like its labels (CPU tensors)."""
        import torch

        examples = _examples(batch)
        wanted = [i for i, (_, labels) in enumerate(examples) if any(t != -100 for t in labels[1:])]
        scores = dict(zip(wanted, self.score([examples[i][0] for i in wanted])))
        width = self.top_k + 1  # the top K, plus the trained token where it is not among them
        fields = []
        for i, (ids, labels) in enumerate(examples):
            n = len(ids)
            tid = torch.zeros((n, width), dtype=torch.long)
            tlp = torch.full((n, width), -math.inf, dtype=torch.float32)
            valid = torch.zeros((n, width), dtype=torch.bool)
            for j in range(1, n) if i in scores else ():
                row = scores[i][j]
                if labels[j] == -100 or row is None:
                    continue
                # A teacher padded wider than the student (same tokenizer) may rank a padding row: such
                # ids cannot be compared, their mass goes to the tail bucket.
                best = sorted(((t, lp) for t, lp in row.items() if self.vocab_limit is None or t < self.vocab_limit),
                              key=lambda kv: -kv[1])[: self.top_k]
                if ids[j] not in dict(best):
                    best.append((ids[j], row.get(ids[j], -math.inf)))
                k = len(best)
                tid[j, :k] = torch.tensor([t for t, _ in best])
                tlp[j, :k] = torch.tensor([lp for _, lp in best])
                valid[j, :k] = True
            fields.append((tid, tlp, valid))
        return layout(fields, batch, packed=packed)

    # -- in the background -----------------------------------------------------------------------

    def submit(self, batch: dict[str, Any], packed: bool) -> Future:
        """Start scoring `batch` (its token ids are read now, on the caller's thread)."""
        snapshot = {k: batch[k].detach().cpu() for k in ("input_ids", "labels", "attention_mask", "position_ids")
                    if k in batch}
        return self._pool.submit(self.topk_tensors, snapshot, packed)

    def prefetch(self, batches: list[dict[str, Any]], packed: bool) -> None:
        """Give each batch without one a pending request (UndoTrainer calls this one step ahead)."""
        for batch in batches:
            if FUTURE_KEY not in batch:
                batch[FUTURE_KEY] = self.submit(batch, packed)

    def prefetch_sequences(self, batches: list[dict[str, Any]], sequences_of) -> None:
        """Cross-tokenizer objectives: score each batch's *teacher* sequences (`sequences_of(batch)`, the teacher's
        own tokenisation, read here on the caller's thread) in the background; `wait_scores` collects them."""
        for batch in batches:
            if FUTURE_KEY not in batch:
                batch[FUTURE_KEY] = self._pool.submit(self.score, sequences_of(batch))

    def wait_scores(self, inputs: dict[str, Any], sequences_of) -> list[list[dict[int, float] | None]]:
        """The batch's teacher scores (`score`'s shape), waiting for its request if it is still running."""
        future = inputs.get(FUTURE_KEY)
        started = time.perf_counter()
        scores = future.result() if future is not None else self.score(sequences_of(inputs))
        self.stats["wait_s"] += time.perf_counter() - started
        return scores

    def wait(self, inputs: dict[str, Any], packed: bool) -> dict[str, Any]:
        """The batch's teacher tensors on its device, waiting for the request if it is still running."""
        future = inputs.get(FUTURE_KEY)
        started = time.perf_counter()
        tensors = future.result() if future is not None else self.topk_tensors(inputs, packed)
        self.stats["wait_s"] += time.perf_counter() - started
        device = inputs["input_ids"].device
        return {k: v.to(device) for k, v in tensors.items()}

    def summary(self, runtime_s: float | None = None) -> dict[str, Any]:
        s = self.stats
        out = {"url": self.where, "top_k": self.top_k, "requests": s["requests"], "sequences": s["sequences"],
               "tokens": s["tokens"], "request_s": round(s["request_s"], 3), "wait_s": round(s["wait_s"], 3)}
        if runtime_s:
            out["wait_share"] = round(s["wait_s"] / runtime_s, 4)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def layout(fields: list[tuple[Any, Any, Any]], batch: dict[str, Any], *, packed: bool) -> dict[str, Any]:
    """Per-example [len, K] (ids, log-probs, valid) -> batch tensors shaped like `batch`'s labels.

    Packed: one row, examples end to end. Padded: right-padded to the batch's width.
    """
    import torch

    from undo_cli.training.distill import TOPK_KEYS

    out: dict[str, Any] = {}
    if packed:
        for j, key in enumerate(TOPK_KEYS):
            out[key] = torch.cat([f[j] for f in fields]).unsqueeze(0)
        return out
    rows, width = batch["input_ids"].shape
    pads = (0, -math.inf, False)
    for j, key in enumerate(TOPK_KEYS):
        tensor = torch.full((rows, width, fields[0][j].shape[-1]), pads[j], dtype=fields[0][j].dtype)
        for b, f in enumerate(fields):
            tensor[b, : f[j].shape[0]] = f[j]
        out[key] = tensor
    return out


def describe_url(url: str) -> str:
    """The URL without credentials (never print a key someone put into it)."""
    p = urlparse(url)
    return p._replace(netloc=p.hostname + (f":{p.port}" if p.port else "")).geturl() if p.hostname else url
