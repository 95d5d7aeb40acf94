"""Where a model comes from: a local folder or a hub name, checked before anything heavy loads.

    undo generate --teacher ./models/teachr ...
    error: --teacher ./models/teachr: no such model folder
      hint: did you mean ./models/teacher? ...

Two checks, both cheap, so a typo costs a second and not a model load:

* `check_model_ref(name, flag)` (no network, no imports): a name that looks
  like a path (starts with `.`, `/` or `~`, has more separators than a hub
  `org/name`, or whose first part is an existing folder) must be an existing
  folder; otherwise the error names the nearest existing folder (difflib).
  A name ending in `.gguf` must be a GGUF file (gguf_models.check_file: its magic bytes).
  Stage configs call it in `__post_init__`, so `undo iterate` refuses a
  misspelt model before any stage runs.
* `check_hub_reachable(name, flag)` (`models.load_pretrained` calls it before loading): when the
  name is not a local folder, HF_HUB_OFFLINE is unset and the model is not in
  the local hub cache, one TCP connection to the hub with a short timeout
  decides; unreachable -> one clear error line, instead of transformers'
  minute-long retries ending in a repo-id error. A cached model loads offline.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from pathlib import Path
from typing import Iterator

from undo_cli.errors import UndoError

CONNECT_TIMEOUT_S = 3.0
_FUTURE: list[Path] = []  # folders whose models a run is going to write (see `to_be_written`)


@contextlib.contextmanager
def to_be_written(folder: str | os.PathLike) -> Iterator[None]:
    """Model paths under `folder` are not checked: `undo iterate` validates stages whose students do not exist yet."""
    _FUTURE.append(Path(folder).resolve())
    try:
        yield
    finally:
        _FUTURE.pop()


def looks_like_path(name: str) -> bool:
    """A folder or file path rather than a hub name (`org/name` or `name`); a `.gguf` name is always a file."""
    from undo_cli.gguf_models import is_gguf

    if is_gguf(name) or name.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in name):
        return True
    parts = [p for p in name.split("/") if p]
    if len(parts) > 2:  # a hub name has at most one '/'
        return True
    return len(parts) == 2 and Path(parts[0]).is_dir()  # models/teachr where ./models exists


def _nearest(path: Path) -> Path | None:
    """The existing folder closest to a missing `path`: the deepest existing parent + the closest child names."""
    parts = path.parts
    base = Path(parts[0]) if path.is_absolute() else Path(".")
    rest = parts[1:] if path.is_absolute() else parts
    for i, part in enumerate(rest):
        candidate = base / part
        if candidate.is_dir():
            base = candidate
            continue
        try:
            children = sorted(p.name for p in base.iterdir() if p.is_dir())
        except OSError:
            return None
        close = difflib.get_close_matches(part, children, n=1, cutoff=0.6)
        if not close:
            return None
        base = base / close[0]
    return base if base.is_dir() and base != Path(".") else None


def check_model_ref(name: str | None, flag: str) -> None:
    """Refuse a model that looks like a local path but is no folder (nor a GGUF file), naming the nearest one."""
    if not name or not looks_like_path(name):
        return
    path = Path(name).expanduser()
    if any(f == path.resolve() or f in path.resolve().parents for f in _FUTURE):
        return
    from undo_cli.gguf_models import check_file, is_gguf

    if is_gguf(name):  # llama.cpp's format: converted once when a stage loads it (undo_cli/gguf_models.py)
        check_file(name, flag)
        return
    if path.is_dir():
        return
    if path.exists():
        raise UndoError(f"{flag} {name}: is a file, not a model folder",
                        hint="pass the folder that holds config.json (what `undo train` or save_pretrained writes), "
                             "or a .gguf file")
    near = _nearest(path)
    shown = ("./" if name.startswith("./") and not str(near).startswith((".", "/")) else "") + str(near) if near else None
    hint = f"did you mean {shown}? " if shown else ""
    raise UndoError(f"{flag} {name}: no such model folder",
                    hint=hint + "a model folder holds config.json and the tokenizer files; a hub name looks like "
                                "Qwen/Qwen2.5-0.5B-Instruct")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # a malformed repo id: let transformers say what is wrong with it
        return False
    return isinstance(found, str)


def check_hub_reachable(name: str, flag: str) -> None:
    """Fail fast with one line when `name` must come from the hub and the hub cannot be reached."""
    import socket
    from urllib.parse import urlparse

    if not name or Path(name).expanduser().exists() or looks_like_path(name) or _offline():
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # the hub is reached through a proxy: a direct connection says nothing
    if _cached(name):
        return
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UndoError(f"{flag} {name}: not a local folder, and the Hugging Face Hub ({endpoint}) cannot be reached "
                        f"({type(exc).__name__}: {exc})",
                        hint=f"download it where the hub is reachable (`hf download {name} --local-dir "
                             f"{name.rstrip('/').split('/')[-1]}`: huggingface_hub's CLI), copy the folder here and "
                             "pass its path; behind a proxy set HTTPS_PROXY or HF_ENDPOINT") from None
