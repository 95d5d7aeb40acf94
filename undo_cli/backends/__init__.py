"""Generation backends: `hf` (embedded transformers), `openai` (any server), `vllm` (in-process).

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

BACKENDS = ("hf", "openai", "vllm")
SORT_BY_LENGTH = {"hf": True, "openai": False, "vllm": False}  # hf pads a batch to its longest prompt


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


def batch_hint(config: BackendConfig) -> int:
    """Prompts per `generate` call: hf --batch-size; openai several waves of requests on every endpoint (few
    enough that a kill loses little); vllm a large block, since vLLM schedules internally. Known before the
    backend opens (the teacher economy opens it only on the first cache miss)."""
    if config.backend == "openai":
        from undo_cli.urls import base_urls

        return max(64, 4 * max(1, config.concurrency) * max(1, len(base_urls(config.base_url))))
    if config.backend == "vllm":
        return max(256, 8 * config.batch_size)
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
    raise UndoError(f"unknown backend '{config.backend}'", hint=f"use one of: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "SORT_BY_LENGTH", "Backend", "BackendConfig", "Completion", "Message", "SamplingConfig",
           "TokenLogprobs", "batch_hint", "open_backend"]
