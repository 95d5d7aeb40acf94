"""Where a generation ends (undo_cli/backends/stopping.py): the answer line, degenerate repetitions, on every backend.

The loops below are SmolLM2-135M-Instruct's own (tests/data/real_outputs.jsonl, collected with
`undo evaluate` on examples/arithmetic.jsonl, greedy, before the end rules existed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from undo_cli.backends import BackendConfig, SamplingConfig, open_backend
from undo_cli.backends.stopping import CUT_SHORT, RowStop, apply, end_of, repetition_start
from undo_cli.scoring import answer_line_end, score

REAL = [json.loads(line) for line in (Path(__file__).parent / "data" / "real_outputs.jsonl").read_text().splitlines()]
RULES = SamplingConfig(stop_at_answer=True, repetition_cut=48)


def real(model: str, rid: str) -> dict:
    return next(r for r in REAL if r["model"] == model and r["id"] == rid)


# -- the degenerate-repetition cut -------------------------------------------------------------------

def test_smollm2s_hash_loop_is_cut_keeping_one_copy():
    r = real("smollm2-135m-instruct", "arith-279")
    assert r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 512
    cut = repetition_start(r["output"], 48)
    assert r["output"][:cut] == "Max has 6 + 4 = 12 cookies. He finds 4 more.\n############"


def test_a_loop_of_uneven_lines_is_cut_after_the_text_before_it():
    text = real("smollm2-135m-instruct", "arith-280")["output"]
    kept = text[:repetition_start(text, 48)]
    assert kept.rstrip("\n#") == text.split("\n")[0]  # the sentence, then one copy of the loop's unit
    assert len(kept) - len(text.split("\n")[0]) <= len("\n############\n")


@pytest.mark.parametrize("text", [
    "So Mia has 7 eggs.\n" * 5,                        # a sentence loop
    "abc" * 30,                                        # a short unit
    "\n" * 60,                                         # blank lines (the untrained tiny model's loop)
    "The answer is 7. " * 10,
])
def test_loops_are_cut(text):
    assert repetition_start("Intro. " + text, 48) is not None


@pytest.mark.parametrize("text", [
    "1/3 = 0.33333333333333333 is about a third",     # a repeating decimal written out, under 48 characters
    "| a | b | c |\n|---|---|---|",                    # a markdown table rule
    "#### 42",
    "Step 1: add.\nStep 2: add.\nStep 3: add.",       # similar lines are not one repeated unit
    "ha" * 23,                                         # 46 characters: under the threshold
    "So Mia has 7 eggs.\n" * 3,                        # three copies are not yet a loop
])
def test_ordinary_text_is_not_cut(text):
    assert repetition_start(text, 48) is None
    assert apply(text, "stop", RULES) == (text, "stop", False)


def test_zero_never_cuts():
    assert repetition_start("\n" * 500, 0) is None
    assert apply("\n" * 500, "length", SamplingConfig(repetition_cut=0)) == ("\n" * 500, "length", False)


# -- the answer line --------------------------------------------------------------------------------------

def test_answer_line_end_needs_a_complete_line_while_generating():
    assert answer_line_end("So 14 + 7 = 21.\n#### 2", complete=True) is None   # "21" may be coming
    assert answer_line_end("So 14 + 7 = 21.\n#### 21\n", complete=True) == len("So 14 + 7 = 21.\n#### 21")
    assert answer_line_end("So 14 + 7 = 21.\n#### 21") == len("So 14 + 7 = 21.\n#### 21")


@pytest.mark.parametrize("text", [
    "#### Step 1: add the apples\n3 + 4 = 7\n",           # a markdown heading
    'The line "#### <answer>" is a shortcut.\n',          # the prompt's placeholder, quoted back
    "Then:\n####\n",                                       # nothing after the marker
    "############\n########\n",                           # a rule of hashes
])
def test_what_is_not_an_answer_line_does_not_end_a_generation(text):
    assert answer_line_end(text, complete=True) is None


def test_the_answer_line_ends_the_completion_and_what_follows_goes():
    r = real("smollm2-135m-instruct", "arith-282")  # "#### 36\nThe answer is 36."
    text, finish, cut = apply(r["output"], r["finish_reason"], RULES)
    assert cut and finish == "stop" and text.endswith("#### 36") and "The answer is" not in text
    assert score(text, "36").predicted == score(r["output"], "36").predicted == "36"


def test_the_earlier_rule_wins():
    assert end_of("#### 5\n" + "ab" * 40, RULES, complete=False) == (6, "stop")
    looped = "x = 1\n" + "ab" * 40 + "\n#### 5\n"
    assert end_of(looped, SamplingConfig(stop_at_answer=True, repetition_cut=48), complete=False)[1] == "stop"
    assert end_of("x = 1\n" + "ab" * 40, RULES, complete=False) == (8, "repetition")


def test_a_repetition_counts_as_truncated_everywhere():
    from undo_cli.stages.collect_errors import classify
    from undo_cli.stages.evaluate import compute_metrics

    assert "repetition" in CUT_SHORT
    p = {"id": "a", "answer": "7", "task": "math", "predicted": None, "correct": False, "finish_reason": "repetition"}
    assert classify(p) == "truncated"
    m = compute_metrics([p, {**p, "id": "b", "finish_reason": "length"}])
    assert m["truncated"] == 2 and m["repetition"] == 1


# -- the hf backend: a StoppingCriteria over the decoded tail --------------------------------------------

def test_row_stop_fires_on_a_finished_answer_line_a_loop_and_a_stop_string(tiny_tokenizer):
    def ids(text: str) -> list[int]:
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    stop = RowStop(tiny_tokenizer, RULES)
    assert stop(ids("3 + 4 = 7\n#### 7")) is False
    assert stop(ids("3 + 4 = 7\n#### 7\n")) is True
    assert RowStop(tiny_tokenizer, RULES)(ids("yes " * 20)) is True
    strings = SamplingConfig(stop=["END"])
    assert RowStop(tiny_tokenizer, strings)(ids("3 + 4 = 7 E")) is False
    assert RowStop(tiny_tokenizer, strings)(ids("3 + 4 = 7 END and more")) is True
    assert RowStop(tiny_tokenizer, SamplingConfig())(ids("#### 7\n" + "yes " * 20)) is False  # nothing asked


@pytest.mark.slow
def test_hf_cuts_the_tiny_models_loop_and_counts_only_the_kept_tokens(tiny_model):
    prompts = [[{"role": "user", "content": "What is " + "two plus " * k + "two?"}] for k in (0, 3)]
    with open_backend(BackendConfig(backend="hf", model=str(tiny_model), batch_size=4)) as hf:
        free = hf.generate(prompts, SamplingConfig(max_tokens=96))
        cut = hf.generate(prompts, SamplingConfig(max_tokens=96, repetition_cut=48, logprobs=2))
        applied = hf.applied(SamplingConfig(repetition_cut=48))
    for (f,), (c,) in zip(free, cut):
        assert f.finish_reason == "length" and f.completion_tokens == 96  # the untrained model loops to the limit
        assert c.finish_reason == "repetition" and f.text.startswith(c.text) and len(c.text) < len(f.text)
        assert c.completion_tokens < 20 and len(c.logprobs) == c.completion_tokens
    assert applied["repetition_cut"] == 48 and applied["eos_token_id"]


# -- servers: the same rules on the text they return --------------------------------------------------

def test_openai_cuts_the_returned_loop_and_sends_the_stop_strings(scripted_server):
    loop = real("smollm2-135m-instruct", "arith-279")["output"]
    scripted_server.text = loop
    config = BackendConfig(backend="openai", model="scripted", base_url=scripted_server.base_url, max_retries=0)
    with open_backend(config) as llm:
        (c,), = llm.generate([[{"role": "user", "content": "hi"}]],
                             SamplingConfig(max_tokens=512, stop=["Question:"], repetition_cut=48))
        (raw,), = llm.generate([[{"role": "user", "content": "hi"}]], SamplingConfig(max_tokens=512))
    assert c.text == "Max has 6 + 4 = 12 cookies. He finds 4 more.\n############" and c.finish_reason == "repetition"
    assert c.completion_tokens == raw.completion_tokens  # what the server generated is still counted
    assert raw.text == loop and raw.finish_reason == "stop"
    sent = [r["body"] for r in scripted_server.requests if r["path"].endswith("/chat/completions")]
    assert sent[0]["stop"] == ["Question:"] and "stop" not in sent[1]


# -- the option, declared once -------------------------------------------------------------------------

def test_the_options_reach_the_sampling_of_every_generating_stage(tmp_path):
    from undo_cli.stages.evaluate import EvaluateConfig
    from undo_cli.stages.generate import GenerateConfig
    from undo_cli.stages.refine import RefineConfig

    for cls in (EvaluateConfig, GenerateConfig, RefineConfig):
        names = {f.name for f in __import__("dataclasses").fields(cls)}
        assert {"stop", "stop_at_answer", "repetition_cut"} <= names, cls
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"id": "a", "question": "2+2?", "answer": "4"}\n')
    config = EvaluateConfig(model=str(tmp_path), input=str(problems), stop=["\n\n"], repetition_cut=0)
    s = config.sampling()
    assert (s.stop, s.stop_at_answer, s.repetition_cut) == (["\n\n"], True, 0)


@pytest.mark.parametrize("command", ["evaluate", "generate", "refine"])
def test_cli_flags(undo_inproc, command):
    out = " ".join(undo_inproc(command, "--help", env={"COLUMNS": "200"}).stdout.split())
    assert "--stop-at-answer" in out and "--no-stop-at-answer" in out and "--repetition-cut" in out and "--stop " in out


def test_the_settings_that_applied_are_recorded_beside_the_output(tmp_path, tiny_model):
    from undo_cli.stages.evaluate import EvaluateConfig, run

    problems = tmp_path / "p.jsonl"
    problems.write_text('{"id": "a", "question": "What is two plus two?", "answer": "4"}\n')
    out = tmp_path / "preds.jsonl"
    summary = run(EvaluateConfig(model=str(tiny_model), input=str(problems), output=str(out), max_tokens=8))
    record = json.loads((tmp_path / "preds.run.json").read_text())
    assert record["applied"] == summary["generation"]
    applied = record["applied"]
    assert applied["backend"] == "hf" and applied["temperature"] == 0.0 and applied["eos_token_id"]
    assert (applied["stop_at_answer"], applied["repetition_cut"]) == (True, 48)
    assert record["identity"]["repetition_cut"] == 48 and "applied" not in record["identity"]


def test_the_teachers_markdown_headings_do_not_end_its_rationale():
    """Qwen2.5-Coder heads its steps '#### Step 1: ...': not an answer line, so generation goes on to its answer."""
    r = real("qwen2.5-coder-1.5b-instruct", "arith-281")
    text = r["output"]
    first_step = text[: text.index("\n", text.index("#### Step 2")) + 1]
    assert answer_line_end(first_step, complete=True) is None
    assert text[: answer_line_end(text)].endswith("#### Final Answer: Zoe has 21 marbles now.")
    tagged = real("qwen2.5-coder-1.5b-instruct", "arith-283")["output"]  # "#### Final Answer:\n#### <answer>31 eggs</answer>"
    assert answer_line_end(tagged + "\n", complete=True) == len(tagged) and score(tagged, "31").correct
