"""What every backend is opened with: the backend names, `BackendConfig`, and `batch_hint` (known before one opens).

    from undo_cli.backends import BackendConfig, batch_hint    # the package re-exports these

Below the backend modules (hf.py, openai.py, vllm.py read `batch_hint` from here), so that the package's
`open_backend`, which imports them, is not imported back by them.
"""

from __future__ import annotations

from dataclasses import dataclass

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
