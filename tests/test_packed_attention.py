"""Packed rows run sdpa once per sequence (training/packed_attention.py): the same loss and gradients as before.

The pinned numbers were computed by the code on main before issue 25 (padded,
length-grouped batches, transformers' sdpa with its padding mask) on conftest's
tiny Llama with one thread; the default `undo train` now packs its rows on CPU
and must still compute them.
"""

from __future__ import annotations

import pytest

from tests.conftest import write_jsonl
from tests.test_train import _rationales

# main @ 4090f62, OMP_NUM_THREADS=1: sft_loss of the padded batch of the first 6 examples, its grad norm,
# and `undo train --max-steps 4 --batch-size 4 --lr 1e-3 --seed 0` (the summary's losses).
PINNED_BATCH_LOSS_SUM = 1210.5880126953125
PINNED_GRAD_NORM = 806.1500854492188
PINNED_RUN = {"first_loss": 6.234646421490294, "final_loss": 5.624849319458008, "epoch_loss": 5.975341915160186}


@pytest.fixture
def examples(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from undo_cli.records import read_records
    from undo_cli.training.data import encode_records

    data = write_jsonl(tmp_path / "r.jsonl", _rationales())
    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples, _ = encode_records(read_records(data, "rationale"), tok, max_length=512, template="student",
                                 path=str(data))
    return tok, examples


def _loss_and_grads(model, batch):
    import torch

    from undo_cli.training.trainer import sft_loss

    model.zero_grad()
    loss, _ = sft_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), torch.nn.utils.get_total_norm(list(grads.values())).item(), grads


def test_per_sequence_sdpa_gives_the_pinned_loss_and_gradients(tiny_model, examples):
    import torch
    from transformers import AutoModelForCausalLM

    from undo_cli.training import packed_attention
    from undo_cli.training.collate import PackedCollator, PaddedCollator

    tok, examples = examples
    batch = examples[:6]
    dense = AutoModelForCausalLM.from_pretrained(tiny_model)  # transformers' sdpa, as on main
    assert dense.config._attn_implementation == "sdpa" and packed_attention.supports(dense)
    per_sequence = AutoModelForCausalLM.from_pretrained(tiny_model)
    packed_attention.enable(per_sequence)
    assert per_sequence.config._attn_implementation == packed_attention.NAME

    padded_before = _loss_and_grads(dense, PaddedCollator(tok.pad_token_id)(batch))
    assert padded_before[0] == pytest.approx(PINNED_BATCH_LOSS_SUM, rel=1e-6)
    assert padded_before[1] == pytest.approx(PINNED_GRAD_NORM, rel=1e-6)
    for name, collated in (("packed, boundaries from cu_seq_lens", PackedCollator(flash_attention=True)(batch)),
                           ("packed, boundaries from position_ids", PackedCollator()(batch)),
                           ("padded (transformers' sdpa underneath)", PaddedCollator(tok.pad_token_id)(batch))):
        loss, norm, grads = _loss_and_grads(per_sequence, collated)
        assert loss == pytest.approx(PINNED_BATCH_LOSS_SUM, rel=1e-5), name
        assert norm == pytest.approx(PINNED_GRAD_NORM, rel=1e-5), name
        assert grads.keys() == padded_before[2].keys()
        for param, grad in grads.items():
            torch.testing.assert_close(grad, padded_before[2][param], rtol=1e-4, atol=1e-5, msg=f"{name}: {param}")

    # Without the restarts the row is one sequence: attention leaks across examples, the loss differs.
    leaky = PackedCollator()(batch)
    leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1])[None]
    assert abs(_loss_and_grads(per_sequence, leaky)[0] - PINNED_BATCH_LOSS_SUM) > 0.1  # >> the 1e-5 above


def test_grouped_query_attention_and_one_token_sequences(tiny_tokenizer, tmp_path):
    """GQA (2 key/value heads for 4 query heads) and a 1-token example in the row: each sequence alone."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from undo_cli.tiny import build_tiny_model
    from undo_cli.training import packed_attention
    from undo_cli.training.collate import PackedCollator

    path = build_tiny_model(tmp_path / "gqa", tokenizer=tiny_tokenizer, num_heads=4, num_kv_heads=2, seed=3)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    packed_attention.enable(model)
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 12, 3]
    examples = [{"input_ids": torch.randint(5, 200, (n,), generator=g).tolist()} for n in lengths]
    for ex in examples:
        ex["labels"] = list(ex["input_ids"])
    batch = PackedCollator(flash_attention=True)(examples)
    with torch.no_grad():
        row = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"],
                    max_length_q=batch["max_length_q"], max_length_k=batch["max_length_k"]).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([ex["input_ids"]])).logits[0] for ex in examples])
    torch.testing.assert_close(row, alone, rtol=1e-4, atol=1e-5)
    assert F.mse_loss(row, alone).item() < 1e-10


def test_generation_is_unchanged_by_per_sequence_sdpa(tiny_model):
    """A student switched to per-sequence sdpa still generates (KV cache, left-padded batch) as with sdpa."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from undo_cli.training import packed_attention

    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    plain = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    switched = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    packed_attention.enable(switched)
    prompts = tok(["Mia has 3 pencils", "How many pencils does Mia have after she gets 4 more?"],
                  return_tensors="pt", padding=True)
    settings = dict(do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        assert torch.equal(plain.generate(**prompts, **settings), switched.generate(**prompts, **settings))
        one = tok(["Mia has 3 pencils"], return_tensors="pt")
        assert torch.equal(plain.generate(**one, **settings), switched.generate(**one, **settings))


def test_unsupported_attention_is_left_alone(tiny_model):
    from transformers import AutoModelForCausalLM

    from undo_cli.training import packed_attention

    eager = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager")
    assert not packed_attention.supports(eager)
    windowed = AutoModelForCausalLM.from_pretrained(tiny_model)
    windowed.config.sliding_window = 16
    assert not packed_attention.supports(windowed)


def test_default_run_trains_on_the_same_batches_to_the_same_losses(tiny_model, tmp_path):
    """`undo train`'s default on CPU now packs (per-sequence sdpa) in the length-grouped order: main's losses."""
    from undo_cli.stages.train import TrainConfig, run

    data = write_jsonl(tmp_path / "r.jsonl", _rationales())
    summary = run(TrainConfig(student=str(tiny_model), data=str(data), output=str(tmp_path / "out"), max_steps=4,
                              batch_size=4, lr=1e-3, seed=0, logging_steps=1, save_steps=1000))
    assert summary["batching"] == "packed" and summary["attention"] == "sdpa_packed"
    assert summary["batch_order"] == "length-grouped" and summary["padding_fraction"] == 0.0
    assert summary["first_loss"] == pytest.approx(PINNED_RUN["first_loss"], rel=1e-5)
    assert summary["final_loss"] == pytest.approx(PINNED_RUN["final_loss"], rel=1e-5)
    assert summary["epoch_losses"] == [pytest.approx(PINNED_RUN["epoch_loss"], rel=1e-5)]
    assert summary["tokens_seen"] == {"all": 1380, "response": 516, "padding": 0, "examples": 16}
    import json

    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "sdpa_packed" not in json.dumps(saved)  # a runtime setting: the saved model loads anywhere
