"""Loading models and tokenizers, with one clear error; the software versions; giving memory back.

    from undo_cli.models import load_pretrained
    tokenizer = load_pretrained("tokenizer", "Qwen/Qwen2.5-0.5B-Instruct", trust_remote_code=False)
    model = load_pretrained("model", "out/student", trust_remote_code=False, dtype=torch.bfloat16)

Every place that opens a model (the hf and vllm backends, `undo train`'s
student and its merge, the white-box teacher) goes through `load_pretrained`
or `load_error`, so a wrong name, a missing folder or a model that ships its
own code gives the same message and hint everywhere, never a transformers
traceback; a `.gguf` file loads from its converted folder (undo_cli/gguf_models.py).
`library_versions()` (what train_summary.json and a run's manifest record) and
`release_memory()` (called between stages that load models in one process, `undo
iterate`) live in undo_cli/runtime.py, below both loaders, and are imported here
too.

Only the standard library at import: transformers and torch load inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError

# the versions and memory helpers live in runtime.py (below the loaders: gguf_models.py uses them too)
from undo_cli.runtime import LIBRARIES, library_versions, release_memory  # noqa: F401 (callers import them from here)


def load_error(model: str, exc: BaseException, *, trust_remote_code: bool = True, flag: str = "") -> UndoError:
    """One clear message for 'this model cannot be loaded', whatever transformers (or vLLM) raised.

    `flag` names the option the model came from (e.g. "--teacher") when the message should say it.
    """
    if "trust_remote_code" in str(exc) and not trust_remote_code:
        return UndoError(f"{flag + ' ' if flag else 'model '}{model!r} ships its own code and needs trust_remote_code",
                         hint="if you trust that repository, add --trust-remote-code")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).suffix != ""
    if looks_local or Path(model).exists():
        hint = "pass a folder that holds config.json and the tokenizer files (what `undo train` or save_pretrained writes)"
    else:
        hint = ("pass a local model folder or a hub name like Qwen/Qwen2.5-0.5B-Instruct; with HF_HUB_OFFLINE=1 "
                "only models already in the hub cache load")
    return UndoError(f"cannot load model '{model}': {first}", hint=hint)


def load_pretrained(kind: str, name: str, *, trust_remote_code: bool, flag: str = "", **kwargs: Any):
    """`AutoTokenizer` ("tokenizer"), `AutoModelForCausalLM` ("model") or `AutoModel` ("encoder": a sentence
    encoder, undo_cli/clusters.py) `.from_pretrained(name, **kwargs)`.

    Any failure becomes `load_error`'s UndoError (transformers raises OSError, ValueError, KeyError, ...
    depending on what is wrong, so every exception is translated).
    """
    from undo_cli.gguf_models import local_model
    from undo_cli.model_refs import check_hub_reachable

    source = local_model(name, flag or kind)  # a .gguf file: its converted folder (made once; gguf_models.py)
    check_hub_reachable(source, flag or kind)  # before transformers' imports and retries: an unreachable hub is fast
    import transformers

    from undo_cli.console import quiet_transformers

    quiet_transformers()  # no "Loading weights" / "Writing model shards" bars of its own: undo reports progress
    cls = {"tokenizer": transformers.AutoTokenizer, "model": transformers.AutoModelForCausalLM,
           "encoder": transformers.AutoModel}[kind]
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        if kind == "model" and "config" not in kwargs and _dense_gguf_folder(source):
            # A folder saved from a GGUF load (by hand, or by an older tool) keeps gguf's quantization_config
            # beside dense safetensors: transformers then treats the model as quantized and the Trainer refuses
            # to fine-tune it ("purely quantized models"). The weights are dense, so the marker is dropped.
            config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
            del config.quantization_config
            kwargs["config"] = config
        loaded = cls.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise load_error(name, exc, trust_remote_code=trust_remote_code, flag=flag) from None
    if kind == "model":
        from undo_cli import threads

        threads.fit(loaded)  # torch's thread count for this model's size (undo_cli/threads.py)
    return loaded


def _dense_gguf_folder(source: str) -> bool:
    """Whether `source` is a local folder of dense weights whose config.json still says `quant_method: gguf`."""
    import json

    folder = Path(source)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return (isinstance(quant, dict) and quant.get("quant_method") == "gguf" and not any(folder.glob("*.gguf"))
            and any(folder.glob("*.safetensors")))
