"""`undo train`: the student really learns, packing is exact, LoRA merges, resume is faithful, DDP saves once.

Everything runs on the tiny offline Llama from conftest (`tiny_model`), through
the real CLI in a subprocess, as a user would run it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_jsonl


# One BLAS thread per process: on a small shared machine, two threads per tiny model
# mostly wait on each other (10x slower), and the DDP test runs two processes anyway.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture
def train(undo):
    """`undo train ARGS...` as a subprocess; stderr comes back with rich's line wrapping undone."""
    def run(*args: object) -> subprocess.CompletedProcess:
        res = undo("train", *map(str, args), env=ONE_THREAD)
        res.stderr = " ".join(res.stderr.split())
        return res
    return run


@pytest.fixture
def train_here(undo_here):
    """`undo train ARGS...` in this process (conftest's undo_here), shaped like `train`'s result."""
    from types import SimpleNamespace

    def run(*args: object) -> SimpleNamespace:
        code, err = undo_here("train", *args)
        return SimpleNamespace(returncode=code, stderr=err)
    return run


def _rationales(n: int = 16) -> list[dict]:
    """Short arithmetic rationales ending in '#### N' (the set the student must overfit)."""
    rows = []
    for i in range(n):
        a, b = 3 + (i * 7) % 11, 2 + (i * 5) % 9
        rows.append({
            "id": f"r{i:02d}", "problem_id": f"q{i:02d}", "task": "math", "answer": str(a + b),
            "question": f"Mia has {a} pencils and gets {b} more. How many pencils does Mia have?",
            "rationale": f"Mia starts with {a} pencils. She gets {b} more, so {a} + {b} = {a + b}.\n#### {a + b}",
        })
    return rows



@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "rationales.jsonl", _rationales())


def _summary(output: Path) -> dict:
    return json.loads((output / "train_summary.json").read_text())


# ---- packing is exact ------------------------------------------------------------------

def test_packed_loss_equals_per_example_loss(tiny_model):
    """One packed row (restarting position_ids, no mask) == padded batch == each example alone."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from undo_cli.prompts import encode_example, student_messages
    from undo_cli.training.collate import PackedCollator, PaddedCollator
    from undo_cli.training.trainer import sft_loss

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    rows = _rationales(4)
    rows[1]["rationale"] += " Counting again: one, two, three, four, five."  # unequal lengths
    examples = []
    for r in rows:
        ids, labels = encode_example(tok, student_messages(r), r["rationale"])
        examples.append({"input_ids": ids, "labels": labels})

    alone = 0.0
    with torch.no_grad():
        for ex in examples:
            ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor(ex["labels"])
            logits = model(input_ids=ids).logits[0, :-1]
            alone += F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum").item()
        packed_batch = PackedCollator()(examples)
        assert packed_batch["input_ids"].shape[0] == 1 and "attention_mask" not in packed_batch
        packed = sft_loss(model, packed_batch)[0].item()
        padded = sft_loss(model, PaddedCollator(tok.pad_token_id)(examples))[0].item()
        # The same row with positions that do NOT restart attends across examples: a different loss,
        # which shows the block-diagonal mask is what makes `packed` match.
        leaky = dict(packed_batch, position_ids=torch.arange(packed_batch["input_ids"].shape[1])[None])
        leaked = sft_loss(model, leaky)[0].item()
    assert packed == pytest.approx(alone, rel=1e-5)
    assert padded == pytest.approx(alone, rel=1e-5)
    assert abs(leaked - alone) > 1e-3


# ---- the student learns ------------------------------------------------------------------

@pytest.mark.slow
def test_overfits_and_reproduces_a_rationale(tiny_model, data, tmp_path, train):
    out = tmp_path / "student"
    res = train("--student", tiny_model, "--data", data, "--output", out, "--epochs", "60",
               "--batch-size", "8", "--lr", "3e-3", "--lr-scheduler", "constant", "--warmup-ratio", "0",
               "--logging-steps", "40")
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""  # stdout is for JSONL; people read stderr
    assert "step 120/120" in res.stderr and "padding fraction" in res.stderr
    summary = _summary(out)
    assert summary["steps"] == 120 and summary["examples"] == 16
    assert summary["final_loss"] < 0.1 * summary["first_loss"]
    assert len(summary["epoch_losses"]) == 60 and summary["epoch_losses"][-1] < summary["epoch_losses"][0]
    # sdpa on CPU: packed rows, sdpa run per sequence, drawn in the length-grouped order (hf.batching)
    assert (summary["batching"], summary["attention"], summary["batch_order"]) == ("packed", "sdpa_packed",
                                                                                   "length-grouped")
    assert summary["padding_fraction"] == 0.0
    assert summary["tokens_seen"]["response"] < summary["tokens_seen"]["all"]
    assert summary["tokens_seen"]["examples"] == 16 * 60
    assert set(summary["versions"]) >= {"torch", "transformers", "peft", "accelerate", "undo"}
    assert summary["config"]["lr"] == 3e-3
    assert not (out / "checkpoints").exists()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from undo_cli.prompts import chat_prompt, student_messages

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    reproduced = 0
    for row in _rationales()[:8]:
        prompt = tok(chat_prompt(tok, student_messages(row)), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**prompt, do_sample=False, max_new_tokens=48)
        text = tok.decode(gen[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        reproduced += text == row["rationale"]
    assert reproduced >= 6, f"{reproduced}/8 reproduced; last greedy output: {text!r}"


@pytest.mark.slow
def test_lora_trains_and_merges(tiny_model, data, tmp_path, train):
    out = tmp_path / "lora"
    res = train("--student", tiny_model, "--data", data, "--output", out, "--max-steps", "12",
               "--batch-size", "8", "--lr", "1e-2", "--lora-r", "8", "--merge", "--warmup-ratio", "0")
    assert res.returncode == 0, res.stderr
    summary = _summary(out)
    assert summary["final_loss"] < summary["first_loss"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / "adapter_config.json").exists()  # OUTPUT itself is a plain model
    # Readable by colleagues: every file honours the umask (safetensors itself writes 0600).
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(f.relative_to(out)): oct(f.stat().st_mode & 0o777) for f in out.rglob("*") if f.is_file()}
    assert "model.safetensors" in modes and "adapter/adapter_model.safetensors" in modes
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert name in dict(merged.named_parameters())
    changed = [n for n, p in merged.named_parameters() if not p.detach().equal(dict(base.named_parameters())[n])]
    # all-linear LoRA touches attention and MLP projections, not the embeddings
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    assert not any("embed_tokens" in n for n in changed)


def test_a_folder_saved_from_a_gguf_load_trains(tiny_model, data, tmp_path, train):
    """Found on the real student (issue 33): a folder saved from a GGUF load keeps gguf's quantization_config beside
    dense safetensors, and transformers' Trainer refused it with a traceback ("cannot perform fine-tuning on purely
    quantized models"). Its weights are dense: it trains, and the checkpoint it writes is an ordinary one."""
    import json
    import shutil

    marked = tmp_path / "from-gguf"
    shutil.copytree(tiny_model, marked)
    config = json.loads((marked / "config.json").read_text())
    config["quantization_config"] = {"dequantize": False, "quant_method": "gguf"}
    (marked / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    res = train("--student", marked, "--data", data, "--output", out, "--max-steps", "2", "--batch-size", "4")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


# ---- resume after a kill ---------------------------------------------------------------

@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tiny_model, data, tmp_path, train):
    flags = ["--student", tiny_model, "--data", data, "--max-steps", "30", "--batch-size", "4",
             "--lr", "2e-3", "--save-steps", "5", "--logging-steps", "30"]
    straight = tmp_path / "straight"
    res = train(*flags, "--output", straight)
    assert res.returncode == 0, res.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "undo_cli", "train", *map(str, flags), "--output", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **ONE_THREAD})
    first = killed / "checkpoints" / "checkpoint-5"
    deadline = time.time() + 300
    while not ((first / "undo_stats.json").exists() or proc.poll() is not None or time.time() > deadline):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "train_summary.json").exists(), "the run finished before it could be killed"

    res = train(*flags, "--output", killed)  # without --resume: refused, nothing touched
    assert res.returncode == 2 and "--resume" in res.stderr
    res = train(*flags, "--output", killed, "--resume")
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stderr
    a, b = _summary(straight), _summary(killed)
    assert b["resumed_from_step"] >= 5 and b["steps"] == a["steps"] == 30
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-4, abs=1e-5)
    assert b["tokens_seen"] == a["tokens_seen"]  # counted once across the kill, not twice

    res = train(*flags, "--output", killed, "--resume")  # finished: nothing to do
    assert res.returncode == 0 and "already finished" in res.stderr
    res = train(*flags[:-6], "--lr", "1e-3", "--output", killed, "--resume")
    assert res.returncode == 2 and "lr: was 0.002, now 0.001" in res.stderr


# ---- two processes -----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_train_and_save_once(tiny_model, data, tmp_path):
    """torchrun (gloo) runs the same command as `accelerate launch` does on GPUs."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "undo_cli", "train", "--student", str(tiny_model), "--data", str(data), "--output", str(out),
           "--epochs", "2", "--batch-size", "4", "--logging-steps", "1", "--padding-free"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD})
    assert res.returncode == 0, res.stderr
    summary = _summary(out)
    assert summary["processes"] == 2 and summary["batching"] == "packed" and summary["padding_fraction"] == 0.0
    assert summary["steps"] == 2 * 16 // (4 * 2)  # each step sees a batch from each process
    assert summary["tokens_seen"]["examples"] == 32  # 16 examples x 2 epochs, summed over both processes
    assert res.stderr.count("undo train:") == 1  # one summary table, from the main process
    assert sorted(p.name for p in out.glob("train_summary*")) == ["train_summary.json"]

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


# ---- bad input -----------------------------------------------------------------------------

@pytest.mark.slow
def test_bad_inputs_exit_2_with_a_clear_message(tiny_model, data, tmp_path, train, train_here):
    def fails(*args: object, says: str, run=train_here) -> None:
        res = run(*args)
        assert res.returncode == 2, res.stderr
        assert says in res.stderr, res.stderr
        assert "Traceback" not in res.stderr

    out = ["--output", tmp_path / "out"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    fails("--student", tiny_model, "--data", empty, *out, says="no records", run=train)  # once as a user runs it

    rows = _rationales(3)
    del rows[1]["rationale"]
    missing = write_jsonl(tmp_path / "missing.jsonl", rows)
    fails("--student", tiny_model, "--data", missing, *out, says=f"{missing}:2: field 'rationale': missing")

    rows = _rationales(3)
    for row in rows:
        row["rationale"] = "  \n"
    blank = write_jsonl(tmp_path / "blank.jsonl", rows)
    fails("--student", tiny_model, "--data", blank, *out, says=f"{blank}:1: field 'rationale': every rationale is empty")

    fails("--student", tmp_path / "no-such-model", "--data", data, *out, says="no such model folder")
    fails("--student", tiny_model, "--data", data, *out, "--max-length", "12", says="every prompt is at least")
    fails("--student", tiny_model, "--data", data, *out, "--merge", says="only apply to LoRA")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    fails("--student", tiny_model, "--data", data, "--output", foreign, says="not an `undo train` output")
    assert (foreign / "notes.txt").exists()


@pytest.mark.slow
def test_empty_rationales_are_skipped_and_counted(tiny_model, tmp_path, train):
    # `undo iterate` with keep = "all" used to stop at train on the first whitespace-only rationale.
    rows = _rationales(4)
    rows[1]["rationale"] = " \n "
    data = write_jsonl(tmp_path / "some_blank.jsonl", rows)
    out = tmp_path / "student"
    res = train("--student", tiny_model, "--data", data, "--output", out, "--epochs", "1", "--batch-size", "4")
    assert res.returncode == 0, res.stderr
    assert f"{data}: skipping 1 of 4 records with an empty rationale (line 2)" in res.stderr
    summary = _summary(out)
    assert summary["examples"] == 3 and summary["empty_rationales_skipped"] == 1


# --- training on data people bring (gold solutions, other tools' shapes) ------------------------------------

def test_training_data_shapes_become_rationales(tmp_path):
    from undo_cli.errors import RecordError
    from undo_cli.training.data import read_training_records

    gold = {"id": "g1", "question": "2 + 2?", "answer": "4", "meta": {"solution": "2 + 2 = 4.\n#### 4"}}
    rows = [
        {"id": "a", "question": "1 + 1?", "answer": "2", "rationale": "1 + 1 = 2\n#### 2"},  # no problem_id
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3 + 3?"},
                      {"role": "assistant", "content": "#### 6"}]},
        {"prompt": "4 + 4?", "completion": "#### 8"},
        {"prompt": [{"role": "user", "content": "5 + 5?"}], "completion": [{"role": "assistant", "content": "#### 10"}]},
    ]
    records = read_training_records(str(write_jsonl(tmp_path / "mixed.jsonl", rows)))
    assert records[0]["problem_id"] == "a"
    assert records[1]["id"] == "row-2" and records[1]["rationale"] == "#### 6" and records[1]["question"] == "3 + 3?"
    assert records[1]["prompt_messages"] == rows[1]["messages"][:2]
    assert records[2]["prompt_messages"] == [{"role": "user", "content": "4 + 4?"}] and records[2]["rationale"] == "#### 8"
    assert records[3]["rationale"] == "#### 10"

    problems = write_jsonl(tmp_path / "problems.jsonl", [gold])
    [record] = read_training_records(str(problems), "meta.solution")
    assert record["rationale"] == gold["meta"]["solution"] and record["problem_id"] == "g1"
    with pytest.raises(RecordError) as exc:  # today's first-hour failure: a problem file without the flag
        read_training_records(str(problems))
    assert "field 'rationale'" in str(exc.value) and "--rationale-field meta.solution" in exc.value.hint
    with pytest.raises(RecordError, match="meta.solution.*no 'solution'"):
        read_training_records(str(write_jsonl(tmp_path / "p2.jsonl", [{**gold, "meta": {}}])), "meta.solution")
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(RecordError, match=r"bad.jsonl:2: field 'messages'.*assistant") as exc:
        read_training_records(str(bad))


@pytest.mark.slow
def test_train_on_gold_solutions_and_on_chat_messages(train, tiny_model, tmp_path):
    gold = [{"id": f"g{i}", "question": r["question"], "answer": r["answer"], "meta": {"solution": r["rationale"]}}
            for i, r in enumerate(_rationales(4))]
    res = train("--student", tiny_model, "--data", write_jsonl(tmp_path / "gold.jsonl", gold), "--rationale-field",
                "meta.solution", "--output", tmp_path / "s1", "--max-steps", "1", "--batch-size", "2")
    assert res.returncode == 0, res.stderr
    assert _summary(tmp_path / "s1")["examples"] == 4
    chat = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["rationale"]}]}
            for r in _rationales(4)]
    res = train("--student", tiny_model, "--data", write_jsonl(tmp_path / "chat.jsonl", chat), "--output", tmp_path / "s2",
                "--max-steps", "1", "--batch-size", "2")
    assert res.returncode == 0, res.stderr
    assert "next:" not in res.stderr  # train never saw the problems to evaluate on: no line with a placeholder


@pytest.mark.slow
def test_progress_in_a_log_file_and_in_a_terminal(train, tiny_model, data, tmp_path):
    """stderr a file: plain progress lines (each 10% / 30 s), no transformers bars; a terminal: rich's bar."""
    import shutil
    import sys

    res = train("--student", tiny_model, "--data", data, "--output", tmp_path / "log", "--max-steps", "2",
                "--batch-size", "8", "--logging-steps", "1")
    assert res.returncode == 0, res.stderr
    assert "train: step 1/2 (50%)" in res.stderr and "train: step 2/2 (100%)" in res.stderr
    final = json.loads((tmp_path / "log" / "train_summary.json").read_text())["final_loss"]
    assert "step 2/2 (100%) elapsed" in res.stderr and f"loss {final:.4f} (this step)" in res.stderr  # seen
    # One kind of progress line in a log file (issue 32): the log's metrics ride on it, no bare `step N/M` lines.
    assert "lr " in res.stderr and not any(line.startswith("step ") for line in res.stderr.splitlines())
    assert "Loading weights" not in res.stderr and "Writing model shards" not in res.stderr
    if shutil.which("script") is None:
        pytest.skip("no `script` to give the command a terminal")
    cmd = " ".join([sys.executable, "-m", "undo_cli", "train", "--student", str(tiny_model), "--data", str(data),
                    "--output", str(tmp_path / "tty"), "--max-steps", "2", "--batch-size", "8"])
    proc = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **ONE_THREAD, "COLUMNS": "160"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "eta" in proc.stdout and "tok/s" in proc.stdout and "2/2" in proc.stdout  # the bar, drawn in place
    assert "train: step" not in proc.stdout  # not the plain lines


# ---- Ctrl-C -----------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_printed_command_resumes_it(tiny_model, data, tmp_path):
    """Ctrl-C mid-training (no --save-steps checkpoint yet): a checkpoint at the current step, the exact
    `--resume` command on stderr, exit 130; that command, pasted, continues from it without a false
    'missing keys' warning about the tied LM head, and ends at the planned step."""
    from tests.conftest import paste, sigint_default

    out = tmp_path / "run with space"
    flags = ["--student", str(tiny_model), "--data", str(data), "--output", str(out), "--max-steps", "60",
             "--batch-size", "4", "--logging-steps", "1", "--save-steps", "1000"]
    proc = subprocess.Popen([sys.executable, "-m", "undo_cli", "train", *flags], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD, "COLUMNS": "400"},
                            preexec_fn=sigint_default)
    seen = []
    for line in proc.stderr:  # the per-step log lines: the run is training
        seen.append(line)
        if "step 3/60 " in line:  # off a terminal: `train: step 3/60 (5%)  elapsed ...`
            proc.send_signal(signal.SIGINT)
            break
    err = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=300) == 130, err
    assert "Traceback" not in err and "interrupted" in err
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "undo_stats.json").is_file(), err
    step = int(checkpoints[0].name.split("-")[1])
    assert 3 <= step < 60 and f"checkpoint saved: {checkpoints[0]}" in err
    command = err.split("continue with:", 1)[1].strip().splitlines()[0]
    assert command.startswith("undo train ") and command.endswith("--resume") and "'" in command  # quoted path

    resumed = paste(command, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoints[0]} (step {step})" in " ".join(resumed.stderr.split())
    assert "missing keys" not in resumed.stderr
    summary = _summary(out)
    assert summary["resumed_from_step"] == step and summary["steps"] == 60
    assert summary["tokens_seen"]["examples"] == 60 * 4  # the steps before Ctrl-C counted once
