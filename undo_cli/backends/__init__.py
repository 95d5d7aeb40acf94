"""Generation backends: `hf` (embedded transformers), `openai` (any server), `vllm` (in-process), and the
hosted batch APIs `openai-batch` and `anthropic-batch` (half price, results within 24 h: batch/).

    from undo_cli.backends import BackendConfig, open_backend
    with open_backend(BackendConfig(backend="hf", model="path/or/hub-name")) as llm:
        completions = llm.generate([[{"role": "user", "content": "2+2?"}]], SamplingConfig())

Each backend module is imported only when chosen, so the others' dependencies
(vLLM above all) need not be installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from undo_cli.backends.base import Backend, Completion, Message, SamplingConfig, TokenLogprobs
from undo_cli.errors import UndoError

BACKENDS = ("hf", "openai", "vllm", "openai-batch", "anthropic-batch")
BATCH_BACKENDS = ("openai-batch", "anthropic-batch")  # undo_cli/backends/batch: submitted as batches, polled
SERVED = ("openai", *BATCH_BACKENDS)  # the backends that talk to a server (--base-url, --api-key-env)
SORT_BY_LENGTH = {"hf": True, "openai": False, "vllm": False,  # hf pads a batch to its longest prompt
                  "openai-batch": False, "anthropic-batch": False}


@dataclass
class BackendConfig:
    """Where text comes from. One config shape for every backend; each reads the fields it needs."""

    backend: str = "hf"
    model: str = ""
    # hf / vllm
    dtype: str = "auto"                 # auto: bf16 on GPU, float32 on CPU
    trust_remote_code: bool = False     # opt-in only: it runs code from the model repo
    adapter: str | None = None          # a LoRA adapter folder to apply on top of `model` (hf)
    batch_size: int = 32                # hf: prompts per forward batch
    # openai
    base_url: str | list[str] | None = None  # one server, or several: requests are spread over them
    api_key_env: str = "OPENAI_API_KEY"  # the *name* of the variable holding the key, never the key
    concurrency: int = 16               # requests in flight per endpoint
    request_timeout: float = 600.0      # seconds for one whole request before it is retried
    max_retries: int = 5                # retries of one request (on another endpoint when there is one)
    # vllm
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    enforce_eager: bool = False
    # openai-batch / anthropic-batch
    batch_manifest: str | None = None   # <output stem>.batches.json: set by the generation loop from --output
    batch_poll_s: float = 30.0          # seconds between looks at the open batches
    batch_resubmits: int = 2            # times one run submits errored and expired requests again
    batch_max_requests: int = 0         # requests per batch; 0 = the API's limit (50,000 / 100,000)
    batch_max_mb: float = 0.0           # megabytes per batch; 0 = the API's limit (200 / 256)


def batch_hint(config: BackendConfig) -> int:
    """Prompts per `generate` call: hf --batch-size; openai several waves of requests on every endpoint (few
    enough that a kill loses little); vllm a large block, since vLLM schedules internally. Known before the
    backend opens (the teacher economy opens it only on the first cache miss)."""
    if config.backend == "openai":
        from undo_cli.urls import base_urls

        return max(64, 4 * max(1, config.concurrency) * max(1, len(base_urls(config.base_url))))
    if config.backend == "vllm":
        return max(256, 8 * config.batch_size)
    if config.backend in BATCH_BACKENDS:  # one call carries everything one batch may hold
        from undo_cli.backends.batch.providers import PROVIDERS

        limit = PROVIDERS[config.backend].max_requests
        return min(limit, config.batch_max_requests or limit)
    return max(1, config.batch_size)


def open_backend(config: BackendConfig) -> Backend:
    """Load the chosen backend (a context manager; `with` releases it)."""
    if config.backend == "hf":
        from undo_cli.backends.hf import HFBackend

        return HFBackend(config)
    if config.backend == "openai":
        from undo_cli.backends.openai import OpenAIBackend

        return OpenAIBackend(config)
    if config.backend == "vllm":
        from undo_cli.backends.vllm import VLLMBackend

        return VLLMBackend(config)
    if config.backend in BATCH_BACKENDS:
        from undo_cli.backends.batch import BatchBackend

        return BatchBackend(config)
    raise UndoError(f"unknown backend '{config.backend}'", hint=f"use one of: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "BATCH_BACKENDS", "SERVED", "SORT_BY_LENGTH", "Backend", "BackendConfig", "Completion", "Message", "SamplingConfig",
           "TokenLogprobs", "batch_hint", "open_backend"]
