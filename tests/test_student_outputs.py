"""Learning from the student's own outputs: GKD on-policy and DistiLLM's adaptive schedule.

The schedule is checked as the pure object it is (φ updates, λ decay, buffer,
the three-way choice's frequencies against its analytic probabilities); the
batches it builds on the tiny real models (samples really come from the
student's generate, the teacher's forward sees them); and end to end through
the real `undo train` CLI (each mode lowers the student's reverse KL to a
trained teacher on held-out prompts).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from undo_cli.errors import UndoError
from undo_cli.training.student_outputs import (FRESH, GROUND_TRUTH, REPLAY, AdaptiveSchedule, OnPolicySchedule,
                                               ReplayBuffer, check_config, prompt_of, split_examples)


# ---- φ, λ, the buffer, the three-way choice ------------------------------------------------

def test_phi_grows_by_a_tenth_on_a_rise_of_a_tenth_and_stops_at_one():
    s = AdaptiveSchedule(0.0)
    assert not s.record_validation(0, 2.0) and s.phi == 0.0 and s.reference == 2.0  # the first loss is recorded
    assert not s.record_validation(10, 2.05) and s.phi == 0.0  # +0.05: unchanged
    assert not s.record_validation(20, 2.09) and s.phi == 0.0  # still measured from the recorded 2.0
    assert s.record_validation(30, 2.1) and s.phi == 0.1 and s.reference == 2.1  # +0.1 exactly: grows
    assert not s.record_validation(40, 1.5) and s.phi == 0.1  # a fall never shrinks φ
    assert s.record_validation(50, 2.2) and s.phi == 0.2  # 2.2 - 2.1 is 0.0999... in floating point
    assert [h["phi"] for h in s.history] == [0.0, 0.0, 0.0, 0.1, 0.1, 0.2]
    assert [h["step"] for h in s.history] == [0, 10, 20, 30, 40, 50]

    capped = AdaptiveSchedule(0.95)
    capped.record_validation(0, 1.0)
    assert capped.record_validation(1, 1.3) and capped.phi == 1.0
    capped.record_validation(2, 1.8)
    assert capped.phi == 1.0
    tenths = AdaptiveSchedule(0.0)
    tenths.record_validation(0, 0.2)
    for i in range(1, 13):  # 0.1 added twelve times: exactly 0.1, 0.2, ..., 1.0, 1.0, 1.0
        tenths.record_validation(i, 0.2 + 0.1 * i)
    assert [h["phi"] for h in tenths.history[1:]] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0, 1.0]


def test_generation_probability_decays_linearly_to_zero():
    s = AdaptiveSchedule(0.8)
    assert [s.generation_probability(k, 100) for k in (0, 25, 50, 100)] == pytest.approx([0.8, 0.6, 0.4, 0.0])
    assert AdaptiveSchedule(0.0).generation_probability(10, 100) == 0.0


def test_buffer_keeps_the_newest_capacity_sequences_and_samples_without_replacement():
    buf = ReplayBuffer(3)
    buf.push([([1], [10]), ([2], [20])])
    assert len(buf) == 2 and not buf.full
    buf.push([([3], [30]), ([4], [40]), ([5], [50])])
    assert buf.full and [p[0] for p, _ in buf.items] == [3, 4, 5]  # first in, first out
    drawn = buf.sample(3, random.Random(0))
    assert sorted(p[0] for p, _ in drawn) == [3, 4, 5]  # distinct
    assert len(buf.sample(10, random.Random(0))) == 3
    again = ReplayBuffer(3)
    again.load_state_dict(buf.state_dict())
    assert list(again.items) == list(buf.items)


@pytest.mark.parametrize("phi,step,total,full,expected", [
    (0.6, 25, 100, True, {FRESH: 0.45, REPLAY: 0.15, GROUND_TRUTH: 0.4}),  # λ = 0.6 * 0.75
    (0.6, 25, 100, False, {FRESH: 0.6, REPLAY: 0.0, GROUND_TRUTH: 0.4}),  # fill the buffer first
    (1.0, 90, 100, True, {FRESH: 0.1, REPLAY: 0.9, GROUND_TRUTH: 0.0}),
    (0.0, 0, 100, False, {FRESH: 0.0, REPLAY: 0.0, GROUND_TRUTH: 1.0}),  # DistiLLM's start: data only
])
def test_three_way_choice_frequencies_match_the_analytic_probabilities(phi, step, total, full, expected):
    s = AdaptiveSchedule(phi, seed=123)
    assert s.probabilities(step, total, full) == pytest.approx(expected)
    n = 20000
    counts = {FRESH: 0, REPLAY: 0, GROUND_TRUTH: 0}
    for _ in range(n):
        counts[s.decide(step, total, full)] += 1
    for source, p in expected.items():
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(counts[source] / n - p) <= 4 * sigma + 1e-12, (source, counts)


def test_on_policy_draws_student_batches_with_probability_lambda():
    s = OnPolicySchedule(0.3, seed=7)
    n = 20000
    fresh = sum(s.decide(k, n) == FRESH for k in range(n))
    assert abs(fresh / n - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    assert s.probabilities(0, n) == {FRESH: 0.3, REPLAY: 0.0, GROUND_TRUTH: pytest.approx(0.7)}


def test_a_restored_schedule_draws_what_the_uninterrupted_one_draws():
    a = AdaptiveSchedule(0.5, seed=3)
    a.record_validation(0, 1.0)
    first = [a.decide(k, 50, k > 10) for k in range(20)]
    b = AdaptiveSchedule(0.0, seed=99)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # through JSON, as in a checkpoint
    assert [a.decide(k, 50, True) for k in range(20, 40)] == [b.decide(k, 50, True) for k in range(20, 40)]
    assert b.phi == 0.5 and b.reference == 1.0 and len(first) == 20


# ---- config checks name the fix ----------------------------------------------------------

def _config(**kw):
    base = dict(student_outputs="on-policy", method="sft", teacher="T", teacher_logprobs=False, objective="jsd",
                lmbda=0.5, phi_init=0.0, buffer_size=1000, batch_size=8, max_new_tokens=64, teacher_mix=0.2,
                clip_eps=0.2, sample_temperature=None, eval_steps=None, lm_data=None, val_data=None, lm_weight=0.0)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("changes,message", [
    ({"teacher": None}, "needs a live --teacher of the same tokenizer"),
    ({"objective": "sft"}, "use --objective jsd (GKD) or srkl (DistiLLM)"),
    ({"teacher_logprobs": True}, "offline teacher cannot score the student's new samples"),
    ({"method": "minillm"}, "MiniLLM samples its own"),
    ({"student_outputs": "off", "method": "minillm", "objective": "skl"}, "drop --objective"),
    ({"student_outputs": "adaptive"}, "needs --val-data"),
    ({"lmbda": 1.5}, "--lmbda 1.5"),
    ({"buffer_size": 4}, "at least --batch-size (8)"),
    ({"student_outputs": "sometimes"}, "off, on-policy, adaptive"),
    ({"student_outputs": "off", "method": "minillm", "objective": "sft", "sample_temperature": 0.7},
     "drop --sample-temperature"),
    ({"lm_data": "x.jsonl"}, "with --method minillm"),
    ({"student_outputs": "off", "method": "minillm", "objective": "rkl", "lm_data": "lm.jsonl"}, "--lm-weight 1 --lm-data"),
])
def test_config_errors_name_the_fix(changes, message):
    with pytest.raises(UndoError) as err:
        check_config(_config(**changes))
    assert message in f"{err.value} {getattr(err.value, 'hint', '')}"


def test_valid_configs_pass():
    check_config(_config())
    check_config(_config(student_outputs="adaptive", objective="srkl", val_data="val.jsonl"))
    check_config(_config(student_outputs="adaptive", objective="srkl", phi_init=0.5))
    check_config(_config(student_outputs="off", method="minillm", objective="sft", lm_data="lm.jsonl", lm_weight=1.0))
    check_config(_config(student_outputs="off", method="minillm", objective="rkl"))
    check_config(_config(student_outputs="off", teacher=None, objective="sft"))  # plain SFT: nothing to check


# ---- prompts out of collated batches, samples back in -------------------------------------

def _encoded(tokenizer, n=3):
    from undo_cli.prompts import encode_example, encode_prompt, student_messages

    rows = []
    for i in range(n):
        problem = {"question": f"Tom has {i + 2} coins and finds {i * 3} more. How many coins?" + " Think." * i,
                   "answer": str(2 + 4 * i), "task": "math"}
        ids, labels = encode_example(tokenizer, student_messages(problem), f"He has {2 + 4 * i} coins.\n#### {2 + 4 * i}")
        rows.append(({"input_ids": ids, "labels": labels}, encode_prompt(tokenizer, student_messages(problem))))
    return rows


@pytest.mark.parametrize("packed", [True, False])
def test_prompts_are_recovered_from_packed_and_padded_batches(tiny_tokenizer, packed):
    from undo_cli.training.collate import PackedCollator, PaddedCollator

    rows = _encoded(tiny_tokenizer)
    collator = PackedCollator() if packed else PaddedCollator(tiny_tokenizer.pad_token_id)
    batch = collator([example for example, _ in rows])
    examples = split_examples(batch)
    assert [ids for ids, _ in examples] == [example["input_ids"] for example, _ in rows]
    assert [prompt_of(*ex) for ex in examples] == [prompt for _, prompt in rows]


def test_sampling_uses_the_plain_distribution_and_stops_after_eos(tiny_model, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from undo_cli.training.student_outputs import eos_ids_of, sample_responses, sampling_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    eos = eos_ids_of(model, tiny_tokenizer)
    gen = sampling_config(model, temperature=0.9, top_p=1.0, max_new_tokens=7, pad_id=0, eos_ids=eos)
    assert (gen.top_k, gen.top_p, gen.temperature, gen.repetition_penalty, gen.do_sample) == (0, 1.0, 0.9, 1.0, True)
    prompts = [prompt for _, prompt in _encoded(tiny_tokenizer)]
    torch.manual_seed(0)
    with torch.no_grad():
        responses = sample_responses(model, prompts, tokenizer=tiny_tokenizer, eos_ids=eos, temperature=1.0,
                                     max_new_tokens=7, max_length=len(prompts[0]) + 5)
    assert len(responses[0]) <= 5  # --max-length bounds prompt + response
    for response in responses:
        assert 1 <= len(response) <= 7
        assert not any(t in eos for t in response[:-1])  # nothing after the first eos
        assert tiny_tokenizer.pad_token_id not in response or tiny_tokenizer.pad_token_id in eos
