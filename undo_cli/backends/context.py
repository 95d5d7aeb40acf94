"""How many tokens a model takes at once, and how long a prompt is in its tokens: before anything is sent.

    from undo_cli.backends.context import context_window, prompt_length
    window = context_window(backend_config)      # Window(1024, "teacher/config.json: max_position_embeddings")
    length = prompt_length(backend_config)       # length.exact(messages): the prompt in the model's tokens

A prompt longer than the model's context is not refused by every backend: transformers generates
anyway (with a warning of its own, past the positions the model was trained on) and a server may cut
it. A stage that builds long prompts (`undo refine`: earlier rationales, the student's output, similar
failures) asks here first, and shortens or refuses with the numbers.

Where the window comes from, first found:

* vllm backend: `--max-model-len` when given (vLLM's own limit), else the model's config;
* hf and vllm: the model's `config.json` (`max_position_embeddings`, or `n_positions`, `seq_length`,
  `max_sequence_length`, `n_ctx`; a multimodal config's `text_config`), read from the folder or the
  local hub cache, without loading the model;
* openai: the server's `GET /v1/models` entry for the model, where it says (`max_model_len`: vLLM and
  SGLang do; hosted APIs do not).

None when nothing says: then nothing is checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length", "n_ctx")


@dataclass(frozen=True)
class Window:
    tokens: int
    source: str  # where the number comes from, as a person finds it: a file and key, a flag, a URL


def context_window(config: Any) -> Window | None:
    """The model's context length in tokens (prompt + completion), or None when nothing says."""
    if config.backend == "vllm" and config.max_model_len:
        return Window(int(config.max_model_len), "--max-model-len")
    if config.backend == "openai":
        return _from_server(config)
    return _from_model_config(config.model)


def _config_file(model: str) -> Path | None:
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder / "config.json" if (folder / "config.json").is_file() else None
    try:  # a hub name: only what is already in the local cache (no download to answer a length question)
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # not a valid repo id, no cache: nothing says
        return None
    return Path(found) if isinstance(found, str) else None


def _from_model_config(model: str) -> Window | None:
    from undo_cli.gguf_models import local_model

    model = local_model(model)  # a .gguf file: its converted folder's config.json
    path = _config_file(model)
    if path is None:
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section, prefix in ((config, ""), (config.get("text_config") or {}, "text_config.")):
        for key in CONFIG_KEYS:
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                shown = path if Path(model).expanduser().is_dir() else f"{model}'s config.json"
                return Window(value, f"{shown}: {prefix}{key}")
    return None


def _from_server(config: Any) -> Window | None:
    """`max_model_len` of the model in the first endpoint's GET /models that answers; None when none says."""
    import os
    import urllib.request

    from undo_cli.urls import base_urls, shown_url

    key = os.environ.get(config.api_key_env)
    for url in base_urls(config.base_url):
        request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                listed = json.loads(response.read()).get("data") or []
        except Exception:  # down, no /models, not JSON: the backend itself will say what is wrong
            continue
        entries = [m for m in listed if isinstance(m, dict)]
        entry = next((m for m in entries if m.get("id") == config.model), entries[0] if len(entries) == 1 else None)
        value = (entry or {}).get("max_model_len")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return Window(value, f"{shown_url(url)}/models: max_model_len")
    return None


class PromptLength:
    """A prompt's length in the model's tokens, as the backend will send it (`prompts.encode_prompt`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def exact(self, messages: list[dict[str, str]]) -> int:
        from undo_cli.prompts import encode_prompt

        return len(encode_prompt(self.tokenizer, messages))

    def bound(self, messages: list[dict[str, str]]) -> int:
        """A length the exact one never exceeds, without tokenizing: twice the formatted prompt's UTF-8 bytes, plus
        a BOS (a token covers at least one byte; SentencePiece's word-start marker alone before a digit is one
        token for no byte of its own, hence twice). Prompts far inside the window need no tokenizing."""
        from undo_cli.prompts import chat_prompt

        return 2 * len(chat_prompt(self.tokenizer, messages).encode("utf-8")) + 2


def prompt_length(config: Any) -> PromptLength | None:
    """The model's tokenizer as a PromptLength; None without one (nothing to count with).

    hf and vllm load it as their backends do; openai uses it when the model name is a folder or in the
    local hub cache.
    """
    try:
        if config.backend == "openai":
            if _config_file(config.model) is None:
                return None
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
        else:
            from undo_cli.models import load_pretrained

            source = config.adapter if config.adapter and (Path(config.adapter) / "tokenizer_config.json").exists() \
                else config.model
            tokenizer = load_pretrained("tokenizer", source, trust_remote_code=config.trust_remote_code)
    except Exception:  # no tokenizer to count with: the backend itself reports a model that does not load
        return None
    return PromptLength(tokenizer)
