"""What the run's software is and the memory it holds: the versions every summary and manifest records, and
giving memory back between stages. Standard library only; below every loader (models.py, gguf_models.py).
"""

from __future__ import annotations

import sys

LIBRARIES = ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "math-verify", "scikit-learn",
             "openai", "vllm")


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """{'undo': ..., 'python': ..., 'torch': ..., ...}: the installed versions of `names` (absent ones left out)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import undo_cli

    found = {"undo": undo_cli.__version__, "python": platform.python_version()}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def release_memory() -> None:
    """Drop what the last stage left (models, KV caches) before the next one loads its own.

    Each stage frees its model when its run() returns; this collects the
    garbage cycles and hands cached CUDA blocks back, so a 30B teacher and the
    student are never resident at the same time.
    """
    import gc

    gc.collect()
    torch = sys.modules.get("torch")  # only if a stage imported it; importing it here would cost seconds
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
