"""Shared fixtures: offline environment, tiny real models, running the CLI.

Everything here is real: models are saved folders loaded by transformers,
the CLI runs as a subprocess exactly as a user's shell would run it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    """No hub at test time; an HF_HOME of our own (transformers serve needs $HF_HOME/hub)."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    (hf_home / "hub").mkdir()
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(hf_home), TOKENIZERS_PARALLELISM="false")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from undo_cli.tiny import train_tokenizer

    return train_tokenizer([])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_tokenizer) -> Path:
    """A ~0.4M-parameter Llama with a chat template, saved to a folder (the 'student')."""
    from undo_cli.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "student", tokenizer=tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_tokenizer) -> Path:
    """A slightly larger model with the same tokenizer as `tiny_model` (the 'teacher')."""
    from undo_cli.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "teacher", tokenizer=tiny_tokenizer,
                            num_layers=3, seed=1)


def run_undo(*args: str, input: str | None = None, cwd: Path | None = None, env: dict | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `undo ARGS...` as a user would; returns the finished process (text mode)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "undo_cli", *map(str, args)], input=input, text=True,
                          capture_output=True, cwd=cwd, env=full_env, timeout=timeout)


@pytest.fixture
def undo():
    return run_undo
