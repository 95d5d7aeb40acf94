"""A GGUF file is a model: converted once into a local folder that every stage, and vLLM, loads.

    undo evaluate --model SmolLM2-135M-Instruct.Q4_1.gguf --input examples/arithmetic.jsonl
    undo models convert SmolLM2-135M-Instruct.Q4_1.gguf     # prints the folder, for vLLM or any other tool
    undo models list
    undo models rm b179c952

Wherever a model is named (--model, --teacher, --student, the white-box teacher of `undo train`, `undo
check`), a path ending in `.gguf` is a file in llama.cpp's format. `local_model(name)` is the one place
that turns it into a folder: every loader calls it first (models.load_pretrained, the vllm backend,
backends/context.py's config.json read, `undo check`'s configs), so nothing after it sees the file.

* Dequantized once. transformers reads a GGUF (`from_pretrained(dir, gguf_file=...)`) by unpacking every
  weight: about a minute for the 135M student on 2 loaded cores, where loading the converted folder takes
  under a second, so a stage that loaded the file itself would pay it again each time. The conversion is a
  plain model folder: safetensors weights, config.json (without the gguf `quantization_config`),
  generation_config.json, the tokenizer with its chat template, and `undo_gguf.json` (the source file, its
  sha256, the dtype, when, how long). `save_pretrained` refuses a model loaded from a GGUF, so a fresh
  model is built from its config on the meta device (no second copy of the weights) and given the loaded
  tensors (`load_state_dict(assign=True)`), then saved.
* Content-addressed: `MODELS/<sha256[:16]>-<dtype>/`, MODELS being `$UNDO_CACHE_DIR/models` (default
  `$XDG_CACHE_HOME/undo/models`, i.e. ~/.cache/undo/models). The same bytes under another name reuse the
  folder; another file under the same name does not. A file's sha256 is kept in `MODELS/hashes.json` by
  real path, size and mtime_ns, so a 1.1 GB teacher is hashed once, not at every stage.
* Atomic: built in `MODELS/.<key>.tmp-<host>-<pid>/` and renamed into place under a lock (`MODELS/.<key>.lock`),
  so two processes never convert one file at once (the second waits, then uses the first's folder) and a
  killed conversion leaves only a temporary folder, never trusted and removed by the next conversion. A
  folder counts only with its `undo_gguf.json`, written before the rename.
* dtype: float32 up to 1B parameters, bfloat16 above (`default_dtype`). A student is trained in float32
  anyway and small models run float32 fastest on CPUs without bf16 kernels; a 1.5B teacher takes 3.1 GB
  in bfloat16 instead of 6.2 GB, and bfloat16 moves a value by at most 0.4% (8-bit mantissa), far less
  than a 4-to-8-bit file's own quantization step. `undo models convert FILE --dtype float32` makes another conversion: pass its folder.
* Refused with the reason and what to do: a missing file, a file that is not GGUF, a GGUF version before
  2, a quantization type the `gguf` package cannot unpack, an architecture transformers cannot map.

The file's sha256 is part of each run's identity (undo_cli/identity.py: `<field>_sha256` beside a GGUF
path; loop/manifest.py's model fingerprint), so a re-run with another file under the same name is refused
like any other change of settings.

Only the standard library at import: torch, transformers and gguf load inside `convert`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import shutil
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from undo_cli.errors import UndoError

SUFFIX = ".gguf"
MAGIC = b"GGUF"
META = "undo_gguf.json"  # written into a conversion before it is renamed into place: its presence = complete
HASHES = "hashes.json"
FORMAT = 1
BF16_ABOVE = 1_000_000_000  # parameters: float32 up to here, bfloat16 above (module docstring)
DTYPES = ("float32", "bfloat16", "float16")
INSTALL_HINT = "pip install 'undo-cli[gguf]' (the gguf package)"
OTHER_ROUTE = ("or serve the file with llama.cpp's server (`llama-server -m FILE`) and use --backend openai, "
               "which reads every GGUF llama.cpp writes")


# --- where ----------------------------------------------------------------------------------

def cache_root() -> Path:
    """undo's cache folder: $UNDO_CACHE_DIR, else $XDG_CACHE_HOME/undo, else ~/.cache/undo."""
    own = os.environ.get("UNDO_CACHE_DIR")
    if own:
        return Path(own).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "undo"


def models_dir() -> Path:
    """Where conversions live: cache_root()/models."""
    return cache_root() / "models"


def is_gguf(name: str | os.PathLike | None) -> bool:
    """A model name that is a GGUF file (by its suffix; whether it exists is `check_file`'s question)."""
    return bool(name) and str(name).lower().endswith(SUFFIX)


def check_file(name: str, flag: str = "model") -> Path:
    """The GGUF file `name` as a Path, or a clear error: missing, a folder, unreadable, not GGUF."""
    path = Path(name).expanduser()
    if not path.exists():
        raise UndoError(f"{flag} {name}: no such file",
                        hint="pass the path of a .gguf file (llama.cpp's format), a model folder or a hub name")
    if not path.is_file():
        raise UndoError(f"{flag} {name}: is a folder, not a .gguf file",
                        hint="pass the folder's path without the .gguf name, or the .gguf file inside it")
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise UndoError(f"{flag} {name}: cannot be read ({exc.strerror or exc})") from None
    if head != MAGIC:
        raise UndoError(f"{flag} {name}: not a GGUF file (it starts with {head!r}, not {MAGIC!r})",
                        hint="a .gguf file comes from llama.cpp's converters or a model download; a "
                             "transformers model is a folder with config.json: pass the folder")
    return path


# --- the file's header: architecture, tensors, types (no gguf package, no weights read) -----------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class Header:
    """What a GGUF says about itself, read from its header (tensor data untouched)."""

    version: int
    metadata: dict[str, Any]  # scalar and string values; arrays (the vocabulary, merges) are skipped
    types: dict[str, int]  # tensor type name -> number of tensors
    parameters: int
    tensors: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return value if isinstance(value, int) else None


def _type_name(number: int) -> str:
    try:
        from gguf import GGMLQuantizationType
    except ImportError:
        return f"type {number}"
    try:
        return GGMLQuantizationType(number).name
    except ValueError:
        return f"type {number} (unknown to gguf)"


class _Reader:
    def __init__(self, buf):
        self.buf, self.at = buf, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self, keep: bool = True) -> str | None:
        n = self.take("<Q")
        start, self.at = self.at, self.at + n
        if self.at > len(self.buf):
            raise struct.error("string past the end of the file")
        return bytes(self.buf[start:self.at]).decode("utf-8", "replace") if keep else None

    def value(self, kind: int, keep: bool = True) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string(keep)
        if kind == _ARRAY:  # skipped, not kept: walking it is all that is needed (tokens: 150k strings)
            item, count = self.take("<I"), self.take("<Q")
            if item in _SCALARS:
                self.at += count * struct.calcsize(_SCALARS[item])
            else:
                for _ in range(count):
                    self.value(item, keep=False)
            return None
        raise struct.error(f"unknown metadata value type {kind}")


def read_header(path: str | os.PathLike) -> Header:
    """The header of the GGUF at `path` (checked with `check_file` first); an UndoError if it is damaged."""
    path = Path(path)
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            r = _Reader(buf)
            if bytes(buf[:4]) != MAGIC:
                raise struct.error("no GGUF magic")
            r.at = 4
            version = r.take("<I")
            if version < 2:
                raise UndoError(f"{path}: GGUF version {version} (2023) is not read",
                                hint="convert the model again with a current llama.cpp (its files are version 3)")
            tensors, kv = r.take("<Q"), r.take("<Q")
            metadata: dict[str, Any] = {}
            for _ in range(kv):
                key = r.string()
                value = r.value(r.take("<I"))
                if value is not None:
                    metadata[key] = value
            types: dict[int, int] = {}
            parameters = 0
            for _ in range(tensors):
                r.string(keep=False)
                dims = [r.take("<Q") for _ in range(r.take("<I"))]
                kind = r.take("<I")
                r.take("<Q")  # offset
                types[kind] = types.get(kind, 0) + 1
                n = 1
                for d in dims:
                    n *= d
                parameters += n
    except (struct.error, ValueError, OSError) as exc:
        raise UndoError(f"{path}: not a readable GGUF file ({exc})",
                        hint="the file may be truncated (an interrupted download?): fetch it again") from None
    return Header(version=version, metadata=metadata, types={_type_name(k): v for k, v in sorted(types.items())},
                  parameters=parameters, tensors=tensors)


def unreadable_types(types: dict[str, int]) -> list[str]:
    """The tensor types (names, as `Header.types`) the installed gguf package cannot dequantize ([] when all can)."""
    try:
        import gguf.quants
    except ImportError:
        raise UndoError("reading a .gguf model needs the gguf package, which is not installed",
                        hint=INSTALL_HINT) from None
    traits = getattr(gguf.quants, "_type_traits", None)
    if traits is None:  # another gguf version: transformers will say, and `convert` translates it
        return []
    readable = {"F32", "F16"} | {t.name for t in traits}
    # a name hashed where gguf was missing is "type N": named now (hashes.json keeps what it was first told)
    named = [_type_name(int(n.split()[1])) if n.startswith("type ") and n.split()[1].isdigit() else n for n in types]
    return [name for name in named if name not in readable]


# --- the file's identity: sha256, kept by path, size and mtime ----------------------------------

@contextlib.contextmanager
def _locked(path: Path, waiting: str | None = None) -> Iterator[None]:
    """An exclusive flock on `path` (created); `waiting` is said on stderr when another process holds it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise UndoError(f"cannot use the model cache {path.parent} ({exc.strerror or exc})",
                        hint="set UNDO_CACHE_DIR to a folder you can write (converted models go to its models/)") from None
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no advisory locks: one process at a time is then the user's care
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                yield  # a file system without flock (some NFS): go on unlocked, as records/io.py's writers do
                return
            if waiting:
                from undo_cli.console import console

                console.print(waiting, soft_wrap=True, markup=False)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_hashes() -> dict[str, Any]:
    try:
        data = json.loads((models_dir() / HASHES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class Source:
    """A GGUF file as undo knows it: where, its bytes' sha256 and what its header says."""

    path: Path
    size: int
    sha256: str
    architecture: str
    parameters: int
    types: dict[str, int] = field(default_factory=dict)

    @property
    def dtype(self) -> str:
        return default_dtype(self.parameters)

    def identity(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256}


def default_dtype(parameters: int) -> str:
    """float32 up to BF16_ABOVE parameters, bfloat16 above (the module docstring says why)."""
    return "bfloat16" if parameters > BF16_ABOVE else "float32"


def source(name: str, flag: str = "model") -> Source:
    """The GGUF `name`, checked, with its sha256 (hashed once per path, size and mtime_ns) and header facts."""
    path = check_file(name, flag).resolve()
    st = path.stat()
    known = _read_hashes().get(str(path))
    if isinstance(known, dict) and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns \
            and known.get("format") == FORMAT:
        return Source(path=path, size=st.st_size, sha256=known["sha256"], architecture=known["architecture"],
                      parameters=known["parameters"], types=known.get("types") or {})
    header = read_header(path)
    from undo_cli.records import sha256_file

    digest = sha256_file(path)
    entry = {"format": FORMAT, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest,
             "architecture": header.architecture, "parameters": header.parameters, "types": header.types}
    try:
        with _locked(models_dir() / ".hashes.lock"):
            hashes = _read_hashes()
            hashes = {p: e for p, e in hashes.items() if Path(p).exists()}  # files deleted since: forgotten
            hashes[str(path)] = entry
            from undo_cli.records import write_json

            write_json(models_dir() / HASHES, hashes)
    except (OSError, UndoError):  # a read-only cache: hash again next time rather than fail
        pass
    return Source(path=path, size=st.st_size, sha256=digest, architecture=header.architecture,
                  parameters=header.parameters, types=header.types)


def identity(name: Any) -> dict[str, Any] | None:
    """{"path", "sha256"} for a model name that is an existing GGUF file, else None (what runs record)."""
    if not isinstance(name, str) or not is_gguf(name) or not Path(name).expanduser().is_file():
        return None
    try:
        return source(name).identity()
    except UndoError:  # not GGUF after all: the stage that loads it says so
        return None


def sources(**models: Any) -> dict[str, Any]:
    """{"gguf": {role: {"path", "sha256"}}} for the roles whose model is a GGUF file ({} when none is): a summary's
    record of which files a run used (`sources(student=..., teacher=...)`)."""
    found = {role: gguf for role, name in models.items() if (gguf := identity(name)) is not None}
    return {"gguf": found} if found else {}


# --- conversions ------------------------------------------------------------------------------

def key(sha256: str, dtype: str) -> str:
    return f"{sha256[:16]}-{dtype}"


def conversion_dir(sha256: str, dtype: str) -> Path:
    return models_dir() / key(sha256, dtype)


def _complete(folder: Path) -> bool:
    return (folder / META).is_file() and (folder / "config.json").is_file()


def existing(name: str, dtype: str | None = None) -> Path | None:
    """The conversion of GGUF `name` if one is complete (never converts), else None."""
    try:
        src = source(name)
    except UndoError:
        return None
    folder = conversion_dir(src.sha256, dtype or src.dtype)
    return folder if _complete(folder) else None


def local_model(name: str, flag: str = "model", dtype: str | None = None) -> str:
    """`name` itself, or for a .gguf file the folder of its conversion (made now if there is none)."""
    if not is_gguf(name):
        return name
    return str(converted(source(name, flag), dtype))


def converted(src: Source, dtype: str | None = None) -> Path:
    """The conversion of `src` in `dtype` (default: `src.dtype`): reused when complete, else made under a lock."""
    dtype = dtype or src.dtype
    folder = conversion_dir(src.sha256, dtype)
    if _complete(folder):
        return folder
    with _locked(models_dir() / f".{folder.name}.lock",
                 waiting=f"waiting for another process converting {src.path.name} ({folder})"):
        if _complete(folder):  # the process we waited for made it
            return folder
        for stale in models_dir().glob(f".{folder.name}.tmp-*"):  # a killed conversion's: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if folder.exists():  # a folder without its undo_gguf.json is not ours to trust
            shutil.rmtree(folder)
        tmp = models_dir() / f".{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}"  # nodes may share the cache
        from undo_cli.console import console

        console.print(f"converting {src.path.name} ({src.size / 1e6:,.0f} MB, {src.architecture}, "
                      f"{src.parameters / 1e6:,.0f}M parameters) to {dtype} safetensors, once: {folder}",
                      soft_wrap=True, markup=False)
        try:
            convert(src, tmp, dtype)
            os.rename(tmp, folder)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if _complete(folder):  # another node made it meanwhile (a shared file system without flock)
                return folder
            raise UndoError(f"cannot write the conversion of {src.path.name} to {folder} "
                            f"({exc.strerror or exc})",
                            hint="free some space there, or set UNDO_CACHE_DIR to a folder with room "
                                 f"(this one needs about {src.parameters * (4 if dtype == 'float32' else 2) / 1e9:.1f} GB)") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def convert(src: Source, out: Path, dtype: str) -> dict[str, Any]:
    """Dequantize `src` into the model folder `out` (weights, config, generation config, tokenizer, META)."""
    from undo_cli.console import console

    bad = unreadable_types(src.types)
    if bad:
        raise UndoError(f"{src.path}: quantization type {', '.join(bad)} cannot be dequantized by the installed gguf "
                        "package, so transformers cannot load this file",
                        hint=f"upgrade gguf (pip install -U gguf), or use a file of another quantization (Q4_K_M, "
                             f"Q8_0, F16, ...), {OTHER_ROUTE}")
    if dtype not in DTYPES:
        raise UndoError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    started = time.monotonic()
    import torch
    import transformers

    from undo_cli.console import quiet_transformers
    from undo_cli.runtime import library_versions

    quiet_transformers()
    torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"gguf_file": src.path.name, "dtype": torch_dtype}
    if hasattr(transformers, "GgufConfig"):  # dense weights, whatever kernels are installed
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        with _quiet_dequantizing():
            loaded = transformers.AutoModelForCausalLM.from_pretrained(str(src.path.parent), **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
    except Exception as exc:
        raise _refusal(src, exc) from None
    for loading_only in ("is_local", "local_files_only"):  # how this load went, not what the tokenizer is
        tokenizer.init_kwargs.pop(loading_only, None)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the folder holds dense weights: nothing to unpack when loading it
        del config.quantization_config
    with torch.device("meta"):  # no second copy: the fresh model takes the loaded tensors as they are
        fresh = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    fresh.load_state_dict(loaded.state_dict(), assign=True)
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    out.mkdir(parents=True)
    fresh.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    del fresh, loaded
    meta = {"format": FORMAT, "source": str(src.path), "sha256": src.sha256, "size": src.size, "dtype": dtype,
            "architecture": src.architecture, "parameters": src.parameters, "types": src.types,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.monotonic() - started, 1),
            "versions": library_versions(("torch", "transformers", "gguf"))}
    from undo_cli.records import honour_umask, write_json

    write_json(out / META, meta)
    honour_umask(out)  # safetensors writes 0600
    from undo_cli.runtime import release_memory

    release_memory()
    console.print(f"converted {src.path.name} in {meta['seconds']:.0f} s; every later stage loads the folder",
                  soft_wrap=True, markup=False)
    return meta


@contextlib.contextmanager
def _quiet_dequantizing() -> Iterator[None]:
    """No tqdm bar from transformers' GGUF loader outside a terminal (it ignores disable_progress_bar): a log file
    gets our two lines, a terminal the bar, as training's progress does."""
    import importlib
    import sys

    try:
        module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        module = None
    if module is None or sys.stderr.isatty() or not hasattr(module, "tqdm"):
        yield
        return
    bar = module.tqdm
    module.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        module.tqdm = bar


def _refusal(src: Source, exc: BaseException) -> UndoError:
    """transformers' error on a GGUF it cannot read, as one line with what to do."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "architecture" in text and "not supported" in text:
        import transformers

        return UndoError(f"{src.path}: architecture '{src.architecture}' is not supported by transformers "
                         f"{transformers.__version__}'s GGUF loader",
                         hint=f"upgrade transformers if a newer one reads it, or use the original model folder "
                              f"(safetensors) instead of the GGUF, {OTHER_ROUTE}")
    if isinstance(exc, NotImplementedError) or "Dequantization" in text:
        return UndoError(f"{src.path}: {text}", hint=f"use a file of another quantization (Q4_K_M, Q8_0, F16, ...), "
                                                     f"{OTHER_ROUTE}")
    if isinstance(exc, ImportError) or ("gguf" in text.lower() and "install" in text.lower()):
        return UndoError(f"{src.path}: {text}", hint=INSTALL_HINT)
    return UndoError(f"{src.path}: transformers cannot load this GGUF ({type(exc).__name__}: {text})",
                     hint=f"check the file is complete (sha256 {src.sha256[:16]}...), {OTHER_ROUTE}")


def conversions() -> list[dict[str, Any]]:
    """Every complete conversion: its undo_gguf.json plus `folder` and `bytes`, oldest first."""
    found = []
    root = models_dir()
    if not root.is_dir():
        return []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        found.append({**meta, "folder": str(folder), "bytes": size})
    return sorted(found, key=lambda m: str(m.get("created", "")))


def matching(ref: str) -> list[dict[str, Any]]:
    """The conversions `ref` names: a sha256 (prefix of 6+ hex digits), a .gguf file, or a conversion folder."""
    every = conversions()
    p = Path(ref).expanduser()
    if p.is_dir():
        return [c for c in every if Path(c["folder"]).resolve() == p.resolve()]
    if is_gguf(ref) and p.exists():
        sha = source(ref).sha256
        return [c for c in every if c.get("sha256") == sha]
    if len(ref) >= 6 and all(ch in "0123456789abcdef" for ch in ref.lower()):
        return [c for c in every if str(c.get("sha256", "")).startswith(ref.lower())]
    return [c for c in every if c.get("source") == str(p.resolve())]  # a source file deleted since


def remove(conversion: dict[str, Any]) -> None:
    """Delete one conversion (renamed aside first, so a reader never sees half a folder)."""
    folder = Path(conversion["folder"])
    with _locked(models_dir() / f".{folder.name}.lock"):
        aside = folder.with_name(f".{folder.name}.tmp-rm{os.getpid()}")
        os.rename(folder, aside)
        shutil.rmtree(aside)
