"""Learning from the student's own outputs: GKD on-policy, DistiLLM's adaptive schedule, MiniLLM.

The schedule is checked as the pure object it is (φ updates, λ decay, buffer,
the three-way choice's frequencies against its analytic probabilities); the
batches it builds on the tiny real models (samples really come from the
student's generate, the teacher's forward sees them); and end to end through
the real `undo train` CLI: each mode (on-policy, adaptive, minillm) lowers the
student's reverse KL to a taught teacher on held-out prompts, and a run resumed
from a checkpoint continues the same schedule. MiniLLM's math: test_minillm.py.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from undo_cli.errors import UndoError
from undo_cli.training.config import TrainConfig
from undo_cli.training.student_outputs import (FRESH, GROUND_TRUTH, REPLAY, AdaptiveSchedule, OnPolicySchedule,
                                               ReplayBuffer, prompt_of, split_examples)


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


def test_the_next_decision_is_known_in_advance_without_changing_the_draws():
    """UndoTrainer's look-ahead asks whether the next step trains on the data; asking must not move the
    random stream, and the answer must be what `decide` then does (for a fixed φ)."""
    for make in (lambda: OnPolicySchedule(0.5, seed=4), lambda: AdaptiveSchedule(0.4, seed=4)):
        asked, plain = make(), make()
        for k in range(200):
            predicted = asked.next_uses_data()
            choice = asked.decide(k, 200, k > 50)
            assert choice == plain.decide(k, 200, k > 50)
            assert predicted == (choice == GROUND_TRUTH), (k, choice)


# ---- config checks name the fix ----------------------------------------------------------

def _config(**kw):
    """`undo train`'s config (training/config.py), whose checks run when it is made."""
    base = dict(student_outputs="on-policy", method="sft", teacher="T", teacher_logprobs=False, objective="jsd",
                lmbda=0.5, phi_init=0.0, buffer_size=1000, batch_size=8, max_new_tokens=64, teacher_mix=0.2,
                clip_eps=0.2, sample_temperature=None, eval_steps=None, lm_data=None, val_data=None, lm_weight=0.0,
                seed=0)
    return TrainConfig(student="S", data="d.jsonl", output="out", **{**base, **kw})


@pytest.mark.parametrize("changes,message", [
    ({"teacher": None}, "needs a live --teacher of the same tokenizer"),
    ({"objective": "sft"}, "use --objective jsd (GKD) or srkl (DistiLLM)"),
    ({"teacher_logprobs": True}, "offline teacher cannot score the student's new samples"),
    ({"method": "minillm"}, "MiniLLM samples its own"),
    ({"student_outputs": "off", "method": "minillm", "objective": "skl"}, "drop --objective"),
    ({"lmbda": 1.5}, "--lmbda 1.5"),
    ({"student_outputs": "adaptive", "phi_init": 0.5, "buffer_size": 4}, "at least --batch-size (8)"),
    ({"student_outputs": "off", "objective": "sft", "lm_data": "x.jsonl"}, "with --method minillm"),
    ({"student_outputs": "sometimes"}, "off, on-policy, adaptive"),
    ({"student_outputs": "off", "method": "minillm", "objective": "sft", "sample_temperature": 0.7},
     "drop --sample-temperature"),
    ({"lm_data": "x.jsonl"}, "with --method minillm"),
    ({"student_outputs": "off", "method": "minillm", "objective": "rkl", "lm_data": "lm.jsonl"}, "--lm-weight 1 --lm-data"),
    ({"student_outputs": "off", "method": "minillm", "objective": "rkl", "teacher_url": "http://127.0.0.1:8000/v1"},
     "pass --teacher-mix 0"),
])
def test_config_errors_name_the_fix(changes, message):
    with pytest.raises(UndoError) as err:
        _config(**changes)
    assert message in f"{err.value} {getattr(err.value, 'hint', '')}"


def test_valid_configs_pass():
    _config()
    _config(student_outputs="adaptive", objective="srkl", val_data="val.jsonl")
    _config(student_outputs="adaptive", objective="srkl")  # validates on a held-out 5% of --data
    _config(student_outputs="off", method="minillm", objective="sft", lm_data="lm.jsonl", lm_weight=1.0)
    _config(student_outputs="off", method="minillm", objective="rkl")
    _config(student_outputs="off", method="minillm", objective="rkl", teacher_mix=0.0,
            teacher_url="http://127.0.0.1:8000/v1")  # a served teacher scores student-only samples
    _config(student_outputs="off", teacher=None, objective="sft")  # plain SFT: nothing to check


def test_adaptive_without_val_data_holds_out_a_seeded_share_of_the_examples():
    from undo_cli.training.student_outputs_setup import hold_out

    examples = [{"input_ids": [i], "labels": [i]} for i in range(100)]
    train, held = hold_out(_config(student_outputs="adaptive", seed=0), examples)
    assert len(held) == 5 and len(train) == 95 and sorted(train + held, key=lambda e: e["input_ids"]) == examples
    assert hold_out(_config(student_outputs="adaptive", seed=0), examples)[1] == held  # same seed, same split
    assert len(hold_out(_config(student_outputs="adaptive"), examples[:3])[1]) == 1  # at least one
    assert hold_out(_config(student_outputs="adaptive", val_data="v.jsonl"), examples) == (examples, [])
    assert hold_out(_config(), examples) == (examples, [])  # on-policy has no validation
    with pytest.raises(UndoError, match="add --val-data"):
        hold_out(_config(student_outputs="adaptive"), examples[:1])


VAL_SHAPES = {  # docs/artifacts.md, "training data": what --data accepts, --val-data accepts too
    "rationale": {"id": "v1#0", "problem_id": "v1", "question": "What is 2 plus 2?", "answer": "4",
                  "rationale": "2 + 2 = 4\n#### 4"},
    "rationale without problem_id": {"id": "v1", "question": "What is 2 plus 2?", "answer": "4",
                                     "rationale": "2 + 2 = 4\n#### 4"},
    "messages": {"messages": [{"role": "user", "content": "What is 2 plus 2?"},
                              {"role": "assistant", "content": "2 + 2 = 4\n#### 4"}]},
    "prompt/completion": {"prompt": "What is 2 plus 2?", "completion": "2 + 2 = 4\n#### 4"},
}


@pytest.mark.parametrize("shape", list(VAL_SHAPES))
def test_val_data_is_read_like_data_in_every_documented_shape(shape, tiny_tokenizer, tmp_path):
    """--val-data (adaptive's φ) used to demand rationale lines with problem_id, while --data took every shape."""
    from undo_cli.training.collate import PaddedCollator
    from undo_cli.training.student_outputs_setup import preflight, validation_batches

    val = write_jsonl(tmp_path / "val.jsonl", [{**VAL_SHAPES[shape], **({"id": f"v{i}"} if "id" in VAL_SHAPES[shape]
                                                                         else {})} for i in range(3)])
    config = _config(student_outputs="adaptive", objective="srkl", val_data=str(val), batch_size=2, buffer_size=8)
    preflight(config)  # read before anything is written: no error
    batches = validation_batches(config, tiny_tokenizer, PaddedCollator(tiny_tokenizer.pad_token_id))
    assert [len(b["input_ids"]) for b in batches] == [2, 1]
    assert all((b["labels"] != -100).any() for b in batches)  # the answers are the targets, as for --data


def test_a_bad_val_data_line_names_file_line_and_field(tmp_path):
    from undo_cli.errors import RecordError
    from undo_cli.training.student_outputs_setup import preflight

    val = write_jsonl(tmp_path / "val.jsonl", [VAL_SHAPES["messages"], {"messages": "hi"}])
    with pytest.raises(RecordError, match=r"val.jsonl:2: field 'messages'"):
        preflight(_config(student_outputs="adaptive", objective="srkl", val_data=str(val)))


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


# ---- through `undo train`: the samples are the student's, the teacher scores them, RKL falls ----

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _problem(i: int) -> dict:
    a, b = 2 + (i * 7) % 9, 1 + (i * 5) % 8
    return {"id": f"p{i:02d}", "problem_id": f"p{i:02d}", "task": "math", "answer": str(a + b),
            "question": f"Sam has {a} apples and buys {b} more. How many apples does Sam have?",
            "rationale": f"Sam starts with {a} apples. He buys {b} more, so {a} + {b} = {a + b}.\n#### {a + b}"}



def held_out_reverse_kl(student_dir: Path, teacher_dir: Path, problems: list[dict], *, new_tokens: int = 16) -> float:
    """Naive: per-token KL(q‖p) = Σ_v q·(log q − log p) along the student's own samples (seed 0,
    temperature 1, no top-k), averaged over the sampled tokens of the held-out prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from undo_cli.prompts import encode_prompt, student_messages

    tok = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    total, count = 0.0, 0
    torch.manual_seed(0)
    with torch.no_grad():
        for problem in problems:
            prompt = encode_prompt(tok, student_messages(problem))
            ids = student.generate(torch.tensor([prompt]), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                   max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
            q = torch.softmax(student(ids).logits[0, len(prompt) - 1: -1].double(), -1)
            p = torch.softmax(teacher(ids).logits[0, len(prompt) - 1: -1].double(), -1)
            total += float((q * (q.log() - p.log())).sum())
            count += ids.shape[1] - len(prompt)
    return total / count


HELD_OUT = [_problem(i) for i in range(12, 20)]  # the teacher was taught p00..p11


@pytest.fixture(scope="module")
def taught_teacher(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny teacher briefly overfit on the taught problems: peaked where the random student is flat.
    (conftest's `trained_teacher` trains 5x longer so that greedy decoding solves them; not needed here.)"""
    from tests.conftest import TAUGHT_PROBLEMS, overfit
    from undo_cli.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("models") / "taught", tokenizer=tiny_tokenizer, seed=2)
    return overfit(path, TAUGHT_PROBLEMS, steps=40)


@pytest.fixture(scope="module")
def sft_student(tmp_path_factory, tiny_model) -> Path:
    """The tiny student after a little SFT on the same problems, as these methods expect to start
    (from a random student its own samples are noise and 12 steps barely move it)."""
    import shutil

    from tests.conftest import TAUGHT_PROBLEMS, overfit

    path = tmp_path_factory.mktemp("models") / "sft_student"
    shutil.copytree(tiny_model, path, dirs_exist_ok=True)
    return overfit(path, TAUGHT_PROBLEMS, steps=30)


def _train_args(student, teacher, data, out, *extra):
    return ["--student", student, "--teacher", teacher, "--data", data, "--output", out,
            "--max-steps", 12, "--batch-size", 8, "--lr", 1e-3, "--lr-scheduler", "constant", "--warmup-ratio", 0,
            "--max-new-tokens", 16, "--logging-steps", 4, *extra]


FLAGS = {
    "on-policy": ["--objective", "jsd", "--student-outputs", "on-policy", "--lmbda", 0.5],
    "adaptive": ["--objective", "srkl", "--student-outputs", "adaptive", "--phi-init", 0.5, "--eval-steps", 4,
                 "--buffer-size", 16],
    "minillm": ["--method", "minillm", "--lm-weight", 1],  # + --lm-data below
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(FLAGS))
def test_each_mode_lowers_the_students_reverse_kl_on_held_out_prompts(mode, sft_student, taught_teacher, tmp_path,
                                                                     undo):
    """Through the real CLI: the student's reverse KL to the teacher on held-out prompts falls, and the
    summary says which steps trained on what."""
    from tests.conftest import TAUGHT_PROBLEMS

    data = write_jsonl(tmp_path / "rationales.jsonl", [_problem(i) for i in range(len(TAUGHT_PROBLEMS))])
    extra = {"adaptive": ["--val-data", write_jsonl(tmp_path / "val.jsonl", [_problem(i) for i in range(20, 28)])],
             "minillm": ["--lm-data", write_jsonl(tmp_path / "lm.jsonl", [{"text": f"Sam has {i} apples."} for i in range(8)])],
             }.get(mode, [])
    out = tmp_path / "out"
    res = undo("train", *map(str, _train_args(sft_student, taught_teacher, data, out, *FLAGS[mode], *extra)),
               env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    so, steps = summary["student_outputs"], summary["student_outputs"]["steps"]
    assert so["mode"] == mode and steps["fresh"] + steps["replay"] + steps["ground_truth"] == 12
    assert steps["fresh"] >= 1 and so["batches"]["fresh"] == steps["fresh"]  # one micro-batch per step
    assert 4 * steps["fresh"] <= so["sampled_sequences"] <= 8 * steps["fresh"]  # 12 examples: batches of 8 and 4
    assert 0 < so["generation_share"] < 1
    if mode == "adaptive":  # with this seed the buffer (2 fresh batches) fills and gets replayed
        assert steps["replay"] >= 1 and so["buffer"] == {"capacity": 16, "filled": 16}
        assert [h["step"] for h in so["phi_history"]] == [0, 4, 8, 12] and so["phi_final"] >= 0.5
    if mode == "minillm":  # every step samples (teacher-mixed); the single-step term is the token-level rkl
        assert steps["fresh"] == 12 and so["mean_reward"] is not None and so["lm_data_examples"] == 8
        assert summary["objective"]["name"] == "rkl"
    before = held_out_reverse_kl(sft_student, taught_teacher, HELD_OUT)
    after = held_out_reverse_kl(out, taught_teacher, HELD_OUT)
    assert after < 0.8 * before, (before, after)


@pytest.mark.slow
def test_a_run_resumed_from_a_checkpoint_continues_the_same_schedule(sft_student, taught_teacher, tmp_path, undo):
    """A run "killed" after its step-6 checkpoint (only that checkpoint left) resumes with the same φ,
    buffer and random streams: same decisions, same φ history, same final loss as the uninterrupted run."""
    import shutil

    data = write_jsonl(tmp_path / "rationales.jsonl", [_problem(i) for i in range(12)])
    val = write_jsonl(tmp_path / "val.jsonl", [_problem(i) for i in range(20, 28)])
    args = _train_args(sft_student, taught_teacher, data, tmp_path / "full", *FLAGS["adaptive"], "--val-data", val,
                       "--save-steps", 6)
    res = undo("train", *map(str, args), "--keep-checkpoints", env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "train_run.json", killed)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "checkpoint-6", killed / "checkpoints" / "checkpoint-6")
    assert (killed / "checkpoints" / "checkpoint-6" / "undo_student_outputs-rank0.json").is_file()
    args[args.index(tmp_path / "full")] = killed
    res = undo("train", *map(str, args), "--resume", env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    full, resumed = (json.loads((d / "train_summary.json").read_text()) for d in (tmp_path / "full", killed))
    assert resumed["resumed_from_step"] == 6
    for key in ("steps", "batches", "sampled_sequences", "phi_history", "phi_final", "buffer"):
        assert resumed["student_outputs"][key] == full["student_outputs"][key], key
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], rel=1e-4)


@pytest.mark.slow
def test_on_policy_batches_are_the_students_samples_and_the_teacher_scores_them(tiny_model, tiny_teacher, tmp_path,
                                                                                 monkeypatch):
    """In-process `undo train` with λ = 1: every token id trained on comes from the student's generate,
    and the teacher's forward sees exactly those sequences."""
    import torch
    from transformers import LlamaForCausalLM

    from undo_cli.stages.train import TrainConfig, run

    generated, forwards = [], []
    real_generate, real_forward = LlamaForCausalLM.generate, LlamaForCausalLM.forward

    def spy_generate(self, *args, **kwargs):
        out = real_generate(self, *args, **kwargs)
        width = kwargs["input_ids"].shape[1]
        for row, mask in zip(out.tolist(), kwargs["attention_mask"].tolist()):
            prompt, response = row[mask.index(1): width], row[width:]
            generated.append((id(self), prompt, response))
        return out

    def spy_forward(self, *args, **kwargs):
        if kwargs.get("input_ids") is not None and kwargs.get("past_key_values") is None:
            forwards.append((id(self), kwargs["input_ids"].tolist(), torch.is_grad_enabled()))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", spy_generate)
    monkeypatch.setattr(LlamaForCausalLM, "forward", spy_forward)
    data = write_jsonl(tmp_path / "rationales.jsonl", [_problem(i) for i in range(8)])
    summary = run(TrainConfig(student=str(tiny_model), teacher=str(tiny_teacher), data=str(data),
                              output=str(tmp_path / "out"), objective="jsd", student_outputs="on-policy", lmbda=1.0,
                              max_steps=2, batch_size=4, max_new_tokens=6, logging_steps=1))
    assert summary["student_outputs"]["steps"] == {"fresh": 2, "replay": 0, "ground_truth": 0}
    students = {who for who, _, _ in generated}
    assert len(students) == 1 and len(generated) == 8  # one model sampled: 2 steps x 4 prompts
    student = students.pop()
    training = [ids for who, ids, grad in forwards if who == student and grad]
    teacher_rows = [ids for who, ids, grad in forwards if who != student and not grad]
    assert training and teacher_rows

    def contains(rows, seq):
        n = len(seq)
        return any(row[j: j + n] == seq for batch in rows for row in batch for j in range(len(row) - n + 1))

    from transformers import AutoTokenizer

    from undo_cli.prompts import encode_example, student_messages

    tok = AutoTokenizer.from_pretrained(tiny_model)
    for _, prompt, response in generated:  # generate pads after the eos; the sample ends at it
        cut = next((j + 1 for j, t in enumerate(response) if t == tok.eos_token_id), len(response))
        sampled = prompt + response[:cut]
        assert contains(training, sampled), "the student trained on something it did not sample"
        assert contains(teacher_rows, sampled), "the teacher did not score the student's sample"
    for problem in [_problem(i) for i in range(8)]:  # λ = 1: no ground-truth rationale reached the trainer
        ids, _ = encode_example(tok, student_messages(problem), problem["rationale"])
        assert not contains(training, ids)


@pytest.mark.slow
def test_config_errors_exit_2_naming_the_fix(tiny_model, tiny_teacher, tmp_path, undo):
    data = write_jsonl(tmp_path / "rationales.jsonl", [_problem(0)])
    res = undo("train", "--student", tiny_model, "--data", data, "--output", tmp_path / "o",
               "--objective", "jsd", "--student-outputs", "on-policy")
    assert res.returncode == 2 and "needs a live --teacher of the same tokenizer" in " ".join(res.stderr.split())
    res = undo("train", "--student", tiny_model, "--teacher", tiny_teacher, "--data", data, "--output", tmp_path / "o",
               "--student-outputs", "adaptive")
    assert res.returncode == 2 and "use --objective jsd (GKD) or srkl (DistiLLM)" in " ".join(res.stderr.split())
