"""`undo models convert|list|rm`: the GGUF conversions every stage shares (undo_cli/gguf_models.py).

    undo models convert SmolLM2-135M-Instruct.Q4_1.gguf          # prints the folder on stdout
    vllm serve "$(undo models convert qwen2.5-coder-1.5b-instruct-q4_k_m.gguf)"
    undo models list                                              # source, sha256, size, dtype, folder, created
    undo models list --json | jq -r .folder
    undo models rm b179c952                                       # by sha256 prefix, .gguf file or folder

A stage given a .gguf file converts it itself the first time; `convert` does it ahead (before a long run,
or for another tool) and with another `--dtype` than the default.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

from undo_cli.errors import UndoError

_DTYPES = {"auto": "float32 up to 1B parameters, bfloat16 above", "float32": "4 bytes a weight",
           "bfloat16": "2 bytes a weight", "float16": "2 bytes a weight"}


@dataclass
class ConvertConfig:
    """What `undo models convert` needs."""

    file: str = field(metadata={"argument": True, "help": "The .gguf file."})
    dtype: str = field(default="auto", metadata={"choices": _DTYPES,
        "help": "Weights' dtype in the folder; auto is what a stage given the file uses."})

    def __post_init__(self) -> None:
        from undo_cli.fields import check_choices

        check_choices(self)


@dataclass
class ListConfig:
    """What `undo models list` needs."""

    json: bool = field(default=False, metadata={"help": "One JSON object per conversion on stdout instead of a table."})


@dataclass
class RemoveConfig:
    """What `undo models rm` needs."""

    ref: str = field(metadata={"argument": True,
        "help": "Which conversions: a sha256 prefix (6+ hex digits), the .gguf file, or a conversion's folder."})


def convert(config: ConvertConfig) -> dict[str, Any]:
    from undo_cli.gguf_models import converted, is_gguf, source

    if not is_gguf(config.file):
        raise UndoError(f"{config.file}: not a .gguf file name",
                        hint="pass a file in llama.cpp's format, named *.gguf; a model folder needs no conversion")
    src = source(config.file, "FILE")
    folder = converted(src, None if config.dtype == "auto" else config.dtype)
    sys.stdout.write(f"{folder}\n")  # stdout: the folder alone, for $(undo models convert ...)
    return {"folder": str(folder), "source": str(src.path), "sha256": src.sha256}


def list_models(config: ListConfig) -> list[dict[str, Any]]:
    from undo_cli.console import console
    from undo_cli.gguf_models import conversions, models_dir

    found = conversions()
    if config.json:
        for c in found:
            sys.stdout.write(json.dumps(c) + "\n")
        return found
    if not found:
        console.print(f"no converted models in {models_dir()}")
        return found
    from rich.table import Table

    table = Table(title=f"converted models: {models_dir()}", title_justify="left")
    for col in ("source", "sha256", "size", "dtype", "folder", "created"):
        table.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
    for c in found:
        table.add_row(str(c.get("source")), str(c.get("sha256", ""))[:16], f"{c['bytes'] / 1e9:.2f} GB",
                      str(c.get("dtype")), c["folder"], str(c.get("created", "")))
    console.print(table)
    return found


def remove(config: RemoveConfig) -> list[dict[str, Any]]:
    from undo_cli.console import console
    from undo_cli.gguf_models import matching, models_dir
    from undo_cli.gguf_models import remove as remove_one

    found = matching(config.ref)
    if not found:
        raise UndoError(f"no converted model matches {config.ref!r} in {models_dir()}",
                        hint="`undo models list` shows them; name one by its sha256 prefix, .gguf file or folder")
    for c in found:
        remove_one(c)
        console.print(f"removed {c['folder']} ({c['bytes'] / 1e9:.2f} GB, from {c.get('source')})", soft_wrap=True)
    return found
