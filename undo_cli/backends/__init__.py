"""Generation backends: `hf` (embedded transformers), `openai` (any server), `vllm` (in-process), and the
hosted batch APIs `openai-batch` and `anthropic-batch` (half price, results within 24 h: batch/).

    from undo_cli.backends import BackendConfig, open_backend
    with open_backend(BackendConfig(backend="hf", model="path/or/hub-name")) as llm:
        completions = llm.generate([[{"role": "user", "content": "2+2?"}]], SamplingConfig())

Each backend module is imported only when chosen, so the others' dependencies
(vLLM above all) need not be installed.
"""

from __future__ import annotations

from undo_cli.backends.base import Backend, Completion, Message, SamplingConfig, TokenLogprobs
from undo_cli.backends.config import BACKENDS, BATCH_BACKENDS, SERVED, SORT_BY_LENGTH, BackendConfig, batch_hint
from undo_cli.errors import UndoError


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
