"""The `hf` backend on tiny real models: batching, sampling, stops, lengths, log-probs, adapters, errors."""

from __future__ import annotations

import pytest

from tests.conftest import TAUGHT_PROBLEMS
from undo_cli.backends import BackendConfig, SamplingConfig, open_backend
from undo_cli.errors import UndoError
from undo_cli.prompts import student_messages

# Prompts of clearly different lengths, so batches really are left-padded.
PROMPTS = [[{"role": "user", "content": "What is " + "two plus " * k + "two?"}] for k in (0, 5, 1, 9, 3, 2)]


@pytest.fixture(scope="module")
def hf(tiny_model):
    with open_backend(BackendConfig(backend="hf", model=str(tiny_model), batch_size=4)) as backend:
        yield backend


@pytest.fixture(scope="module")
def teacher(trained_teacher):
    with open_backend(BackendConfig(backend="hf", model=str(trained_teacher))) as backend:
        yield backend


def forward_shapes(monkeypatch, backend) -> list[tuple[int, int]]:
    """The (rows, positions) of every forward pass of the backend's model from now on (the list fills up)."""
    shapes: list[tuple[int, int]] = []
    forward = type(backend.hf_model).forward

    def counting(self, input_ids=None, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(backend.hf_model), "forward", counting)
    return shapes


def test_batched_left_padded_greedy_matches_one_at_a_time(hf):
    sampling = SamplingConfig(max_tokens=12)
    batched = hf.generate(PROMPTS, sampling)
    alone = [hf.generate([p], sampling)[0] for p in PROMPTS]
    assert [c[0].text for c in batched] == [c[0].text for c in alone]
    assert [c[0].prompt_tokens for c in batched] == [len(hf.prompt_ids(p)) for p in PROMPTS]
    assert len({c[0].prompt_tokens for c in batched}) == len(PROMPTS)  # padding was needed


def test_n_sampled_with_seed_is_reproducible(hf):
    sampling = SamplingConfig(n=3, temperature=1.0, seed=11, max_tokens=8)
    first = hf.generate(PROMPTS[:2], sampling)
    again = hf.generate(PROMPTS[:2], sampling)
    assert [len(c) for c in first] == [3, 3]
    assert [[c.text for c in p] for p in first] == [[c.text for c in p] for p in again]
    assert len({c.text for c in first[0]}) > 1  # three samples, not one copied three times
    other = hf.generate(PROMPTS[:2], SamplingConfig(n=3, temperature=1.0, seed=12, max_tokens=8))
    assert [[c.text for c in p] for p in other] != [[c.text for c in p] for p in first]


@pytest.mark.slow
def test_finished_rows_leave_the_batch_and_greedy_text_matches_one_at_a_time(trained_teacher, monkeypatch):
    """18 prompts in one batch == each prompt alone (text, tokens, finish reason), with the end rules on;
    a row that has ended (eos, the repetition cut) is not computed again: the batch shrinks."""
    prompts = [student_messages(p) for p in TAUGHT_PROBLEMS] + PROMPTS  # rationales of several lengths, and loops
    sampling = SamplingConfig(max_tokens=40, stop_at_answer=True, repetition_cut=24)
    with open_backend(BackendConfig(backend="hf", model=str(trained_teacher), batch_size=32)) as backend:
        rows_seen = forward_shapes(monkeypatch, backend)
        batched = backend.generate(prompts, sampling)
        steps = [rows for rows, width in rows_seen if width == 1]
        alone = [backend.generate([p], sampling)[0] for p in prompts]
    assert [c[0].text for c in batched] == [c[0].text for c in alone]
    assert [c[0].completion_tokens for c in batched] == [c[0].completion_tokens for c in alone]
    assert [c[0].finish_reason for c in batched] == [c[0].finish_reason for c in alone]
    assert {c[0].finish_reason for c in batched[:12]} == {"stop"}  # the taught rationales end at their eos
    lengths = sorted(c[0].completion_tokens for c in batched)
    assert lengths[0] < lengths[-1]  # rows really end at different steps
    # One forward step per token, for the rows still running only: step s computes the rows that wrote more
    # than s tokens (a cut row counts the tokens it generated, a few more than it kept).
    assert steps == sorted(steps, reverse=True) and steps[0] == len(prompts) and steps[-1] < len(prompts)
    assert sum(steps) < len(prompts) * len(steps)


@pytest.mark.slow
def test_rows_that_end_make_room_for_the_next_prompts_and_the_next_batch(trained_teacher, monkeypatch):
    """batch_size 4 over 18 prompts, given as batches of 5, 0 (all cached) and 13: new prompts join the
    running rows (a prompt pass between decode steps, never more than 4 rows), each batch comes out whole
    and in order, at most one batch is read ahead, and the greedy text is each prompt's text alone."""
    prompts = [student_messages(p) for p in TAUGHT_PROBLEMS] + PROMPTS
    sampling = SamplingConfig(max_tokens=40, stop_at_answer=True, repetition_cut=24)
    with open_backend(BackendConfig(backend="hf", model=str(trained_teacher), batch_size=4)) as backend:
        alone = [backend.generate([p], sampling)[0][0] for p in prompts]
        shapes = forward_shapes(monkeypatch, backend)
        batches, pulled, read_when_written = [prompts[:5], [], prompts[5:]], [], []

        def given():
            for batch in batches:
                pulled.append(batch)
                yield batch

        out = []
        for results in backend.generate_stream(given(), sampling):
            read_when_written.append(len(pulled))
            out.append(results)
    assert [len(r) for r in out] == [5, 0, 13]
    assert [c[0].text for r in out for c in r] == [c.text for c in alone]
    assert [c[0].completion_tokens for r in out for c in r] == [c.completion_tokens for c in alone]
    assert all(read - written <= 1 for written, read in enumerate(read_when_written, start=1))
    assert max(rows for rows, _ in shapes) <= 4
    passes = [i for i, (_, width) in enumerate(shapes) if width > 1]
    assert len(passes) > 2 and any(shapes[i - 1][1] == 1 and shapes[i + 1][1] == 1 for i in passes[1:-1])


def test_n_samples_share_one_pass_over_the_prompt(hf, monkeypatch):
    """n > 1: the prompt runs once (its cache repeated n times), and each sample continues it correctly:
    with top_p ~ 0 sampling keeps only the most likely token, so every sample is the greedy answer."""
    greedy = [c[0].text for c in hf.generate(PROMPTS, SamplingConfig(max_tokens=10))]
    rows_seen = forward_shapes(monkeypatch, hf)
    near_greedy = hf.generate(PROMPTS, SamplingConfig(n=3, temperature=1.0, top_p=1e-9, seed=0, max_tokens=10))
    assert [[c.text for c in per_prompt] for per_prompt in near_greedy] == [[g] * 3 for g in greedy]
    # The batches of 4 sequences hold 1 prompt x 3 samples (batch_size counts sequences): each prompt is
    # run once for one row, then only single tokens for its 3 rows.
    prompt_widths = [len(hf.prompt_ids(p)) for p in PROMPTS]
    assert sorted(shape for shape in rows_seen if shape[1] > 1) == sorted((1, w) for w in prompt_widths)
    assert all(shape == (3, 1) for shape in rows_seen if shape[1] == 1)


def test_greedy_n_copies_one_answer(hf):
    out = hf.generate(PROMPTS[:1], SamplingConfig(n=2, max_tokens=5))
    assert len(out[0]) == 2 and out[0][0].text == out[0][1].text


def test_finish_reason_length_and_token_counts(hf):
    out = hf.generate(PROMPTS[:3], SamplingConfig(max_tokens=3))
    for (c,) in out:
        assert c.finish_reason == "length"
        assert c.completion_tokens == 3


@pytest.mark.slow
def test_trained_teacher_stops_at_eos_and_stop_strings_trim(teacher):
    messages = [student_messages(p) for p in TAUGHT_PROBLEMS[:3]]
    full = teacher.generate(messages, SamplingConfig(max_tokens=60))
    for (c,), problem in zip(full, TAUGHT_PROBLEMS):
        assert c.finish_reason == "stop"  # the model ended its turn itself
        assert c.text == problem["rationale"]
    stopped = teacher.generate(messages, SamplingConfig(max_tokens=60, stop=["####"]))
    for (c,), problem in zip(stopped, TAUGHT_PROBLEMS):
        assert c.finish_reason == "stop"
        assert c.text == problem["rationale"].split("####")[0]  # text ends before the stop string
        assert c.completion_tokens < full[0][0].completion_tokens


@pytest.mark.slow
def test_logprobs_are_the_generated_ids_and_the_model_distribution(teacher):
    import torch

    messages = [student_messages(TAUGHT_PROBLEMS[0])]
    (c,), = teacher.generate(messages, SamplingConfig(max_tokens=60, logprobs=3))
    assert c.logprobs is not None and len(c.logprobs) == c.completion_tokens
    ids = [t.token_id for t in c.logprobs]
    tok = teacher.tokenizer
    assert ids[-1] == tok.eos_token_id  # the model chose to stop: that token is recorded too
    assert tok.decode(ids[:-1], skip_special_tokens=True) == c.text
    for t in c.logprobs:
        assert len(t.top) == 3
        assert t.top[0][0] == t.token_id  # greedy picks the top-1
        assert t.top[0][1] >= t.top[1][1] >= t.top[2][1]
    # The recorded log-probs are the model's own: a teacher-forced forward pass agrees.
    prompt = teacher.prompt_ids(messages[0])
    with torch.no_grad():
        logits = teacher.hf_model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits.float(), -1)
    got = torch.tensor([t.logprob for t in c.logprobs])
    assert torch.allclose(got, expected[torch.arange(len(ids)), torch.tensor(ids)], atol=1e-4)
    # JSON round trip (what lands in teacher_logprobs)
    from undo_cli.backends import TokenLogprobs

    assert TokenLogprobs.from_json(c.logprobs[0].to_json()).token_id == ids[0]


@pytest.mark.slow
def test_lora_adapter_is_applied(tiny_model, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    # init_lora_weights=False: random A and B, so the adapter really changes the model.
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    sampling = SamplingConfig(max_tokens=8, logprobs=1)
    with open_backend(BackendConfig(model=str(tiny_model))) as plain:
        (a,), = plain.generate(PROMPTS[:1], sampling)
    with open_backend(BackendConfig(model=str(tiny_model), adapter=str(tmp_path / "adapter"))) as adapted:
        assert adapted.model.endswith("adapter")
        (b,), = adapted.generate(PROMPTS[:1], sampling)
    assert [t.logprob for t in a.logprobs] != [t.logprob for t in b.logprobs]


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(UndoError, match="cannot load model") as err:
        open_backend(BackendConfig(model=str(tmp_path / "no-such-model")))
    assert "config.json" in (err.value.hint or "")
    with pytest.raises(UndoError, match="cannot load model 'nobody/no-such-model-xyz'") as err:
        open_backend(BackendConfig(model="nobody/no-such-model-xyz"))  # offline hub (conftest sets HF_HUB_OFFLINE)
    assert "HF_HUB_OFFLINE" in (err.value.hint or "")


def test_unknown_backend_names_the_choices():
    with pytest.raises(UndoError, match="unknown backend 'tgi'") as err:
        open_backend(BackendConfig(backend="tgi", model="x"))
    assert "hf, openai, vllm" in err.value.hint
