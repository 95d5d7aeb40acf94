"""A .gguf file named as a model: what is refused, and how (undo_cli/gguf_models.py), on small crafted files.

The conversion itself, on the real SmolLM2 file, is tested in tests/test_real_student.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import parse_jsonl, write_jsonl

gguf = pytest.importorskip("gguf")


def craft(path: Path, arch: str = "llama", qtype=None, *, name: str = "crafted") -> Path:
    """A small GGUF written with the gguf package's own writer: one tensor of `qtype` (F32 by default)."""
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(300)])  # an array of strings: skipped when read
    if qtype is None:
        w.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float32))
    else:
        size = gguf.GGML_QUANT_SIZES[qtype][1]  # bytes per block of 32 values
        w.add_tensor("token_embd.weight", np.zeros((10, size), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("UNDO_CACHE_DIR", str(folder))
    return folder / "models"


@pytest.fixture
def problems(tmp_path) -> Path:
    return write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "question": "1+1?", "answer": "2"}])


def test_header_is_read_without_the_gguf_reader(tmp_path):
    from undo_cli.gguf_models import read_header

    h = read_header(craft(tmp_path / "m.gguf", "qwen2", gguf.GGMLQuantizationType.Q8_0))
    assert (h.version, h.architecture, h.context_length, h.tensors) == (3, "qwen2", 64, 1)
    assert h.types == {"Q8_0": 1} and h.parameters == 10 * 32
    assert h.metadata["general.name"] == "crafted" and "tokenizer.ggml.tokens" not in h.metadata


def test_a_missing_gguf_and_a_file_that_is_not_gguf_are_refused_before_anything_loads(undo_here, tmp_path, problems):
    (tmp_path / "fake.gguf").write_text("<html>not found</html>")
    code, err = undo_here("evaluate", "--model", str(tmp_path / "nosuch.gguf"), "--input", str(problems))
    assert code == 2 and "nosuch.gguf: no such file" in err and "Traceback" not in err
    code, err = undo_here("evaluate", "--model", str(tmp_path / "fake.gguf"), "--input", str(problems))
    assert code == 2 and "not a GGUF file (it starts with b'<htm'" in err and "Traceback" not in err


def test_a_bare_gguf_name_in_the_working_folder_is_a_file_not_a_hub_name(tmp_path, monkeypatch):
    from undo_cli.errors import UndoError
    from undo_cli.model_refs import check_model_ref, looks_like_path

    monkeypatch.chdir(tmp_path)
    craft(tmp_path / "SmolLM2.gguf")
    assert looks_like_path("SmolLM2.gguf")
    check_model_ref("SmolLM2.gguf", "--model")  # exists, is GGUF: accepted
    with pytest.raises(UndoError, match="Smol.gguf: no such file"):
        check_model_ref("Smol.gguf", "--model")


def test_a_damaged_or_ancient_gguf_is_refused_with_what_to_do(tmp_path, cache):
    from undo_cli.errors import UndoError
    from undo_cli.gguf_models import source

    whole = craft(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:60])  # inside the metadata
    with pytest.raises(UndoError, match="not a readable GGUF file") as exc:
        source(str(cut))
    assert "truncated" in exc.value.hint
    old = tmp_path / "v1.gguf"
    old.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + whole[8:])
    with pytest.raises(UndoError, match="GGUF version 1"):
        source(str(old))


@pytest.mark.parametrize("qtype", ["Q8_1", "Q8_K"])
def test_a_quantization_type_gguf_cannot_unpack_is_named_before_transformers_loads(undo_here, tmp_path, cache, qtype):
    path = craft(tmp_path / f"{qtype}.gguf", qtype=getattr(gguf.GGMLQuantizationType, qtype))
    code, err = undo_here("models", "convert", str(path))
    assert code == 2 and "Traceback" not in err
    assert f"quantization type {qtype} cannot be dequantized" in err and "--backend openai" in err
    assert not [p for p in cache.iterdir() if p.is_dir()]  # nothing half-made left, nothing listed


@pytest.mark.slow  # imports transformers' GGUF loader
def test_an_architecture_transformers_cannot_map_is_refused_by_name(undo_here, tmp_path, cache):
    path = craft(tmp_path / "odd.gguf", arch="nosucharch")
    code, err = undo_here("models", "convert", str(path))
    assert code == 2 and "Traceback" not in err
    assert "architecture 'nosucharch' is not supported by transformers" in err and "llama-server -m FILE" in err
    assert not [p for p in cache.iterdir() if p.is_dir()]
    code, err = undo_here("models", "list")
    assert code == 0 and "no converted models" in err


def test_the_sha256_is_kept_by_path_size_and_mtime(tmp_path, cache):
    """A second look at an unchanged file does not hash it again; a changed mtime does."""
    from undo_cli.gguf_models import source
    from undo_cli.records import sha256_file

    path = craft(tmp_path / "m.gguf", name="first")
    first = source(str(path))
    assert first.sha256 == sha256_file(path) and first.dtype == "float32"
    assert json.loads((cache / "hashes.json").read_text())[str(path.resolve())]["sha256"] == first.sha256
    st = path.stat()
    path.write_bytes(path.read_bytes().replace(b"first", b"other"))  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert source(str(path)).sha256 == first.sha256  # the kept hash: not read again
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert source(str(path)).sha256 == sha256_file(path) != first.sha256


def test_a_runs_identity_holds_the_gguf_sha256_so_another_file_of_that_name_is_a_change(tmp_path, cache):
    from undo_cli.identity import changes, identity
    from undo_cli.stages.evaluate import EvaluateConfig

    path = craft(tmp_path / "m.gguf", name="first")
    problems = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "question": "1+1?", "answer": "2"}])
    before = identity(EvaluateConfig(model=str(path), input=str(problems)))
    assert before["model"] == str(path) and len(before["model_sha256"]) == 64
    craft(path, name="second")
    after = identity(EvaluateConfig(model=str(path), input=str(problems)))
    assert [c[0] for c in changes(before, after)] == ["model_sha256"]


def test_the_model_fingerprint_of_undo_iterate_is_the_files_sha256(tmp_path, cache):
    from undo_cli.loop.manifest import model_fingerprint
    from undo_cli.records import sha256_file

    path = craft(tmp_path / "m.gguf")
    assert model_fingerprint(str(path)) == {"path": str(path.resolve()), "sha256": sha256_file(path)}


def _fake_conversion(cache: Path, sha: str, source: str) -> Path:
    """A complete conversion as `converted` leaves it (its undo_gguf.json and config.json), without weights."""
    folder = cache / f"{sha[:16]}-float32"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "undo_gguf.json").write_text(json.dumps({"format": 1, "source": source, "sha256": sha, "size": 5,
                                                       "dtype": "float32", "created": "2026-01-01T00:00:00+0000"}))
    return folder


def test_models_list_and_rm(undo_inproc, tmp_path, cache):
    a = _fake_conversion(cache, "ab" * 32, "/m/a.gguf")
    b = _fake_conversion(cache, "cd" * 32, "/m/b.gguf")
    (cache / ".junk.tmp-123").mkdir()  # a killed conversion's temporary folder: never listed
    listed = parse_jsonl(undo_inproc("models", "list", "--json").stdout)
    assert [(m["source"], m["sha256"], m["folder"]) for m in listed] == [
        ("/m/a.gguf", "ab" * 32, str(a)), ("/m/b.gguf", "cd" * 32, str(b))]
    done = undo_inproc("models", "rm", "abab")
    assert done.returncode == 2 and "no converted model matches 'abab'" in done.stderr  # under 6 digits: no prefix
    done = undo_inproc("models", "rm", "ababab")
    assert done.returncode == 0 and f"removed {a}" in done.stderr and not a.exists() and b.is_dir()
    done = undo_inproc("models", "rm", str(b))
    assert done.returncode == 0 and not b.exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".") and "tmp-rm" in p.name]


def test_a_folder_without_its_record_is_not_a_conversion(tmp_path, cache):
    from undo_cli.gguf_models import existing

    path = craft(tmp_path / "m.gguf")
    folder = _fake_conversion(cache, __import__("hashlib").sha256(path.read_bytes()).hexdigest(), str(path))
    assert existing(str(path)) == folder
    (folder / "undo_gguf.json").unlink()  # as a conversion killed before its record was written
    assert existing(str(path)) is None
