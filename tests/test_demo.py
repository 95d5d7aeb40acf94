"""`undo demo` end to end, as a new user runs it: killed in the middle of the loop, refused without
--resume, resumed, and then checked for what it promises.

One demo run serves every test here (a module fixture): it is the most
expensive test of the suite (the whole demo: a tiny teacher trained with
`undo train`, then `undo iterate`), and a second run would check nothing new.
It runs with the demo's own flags for a shorter run (`--teacher-epochs`,
`--max-iterations 1`): the same code, less of it. The kill lands once
iteration 0's training is done, so the resumed run must pick up at iteration
0's evaluation and recompute neither the teacher, nor its rationales, nor the
student.
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

pytestmark = pytest.mark.slow

WIDE = {"COLUMNS": "200"}
SHORTER = ("--teacher-epochs", "6", "--max-iterations", "1")  # real flags: a shorter teacher training and loop


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stage(run: Path, key: str) -> dict:
    try:
        return json.loads((run / "manifest.json").read_text())["stages"].get(key) or {}
    except (OSError, ValueError):  # not written yet, or read mid-rename: poll again
        return {}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """The README's first command as written (`undo demo`, in a fresh folder, in a terminal), killed, resumed."""
    import pty

    from tests.conftest import read_terminal, run_undo

    here = tmp_path_factory.mktemp("demo")
    workdir = here / "undo-demo"  # the default --workdir, relative to where the user stands
    run = workdir / "runs" / "demo"
    env = {**os.environ, **WIDE, "TERM": "xterm"}
    # A pseudo-terminal for stdout and stderr: rich draws its live progress as it would for a person.
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "undo_cli", "demo", *SHORTER], cwd=here, stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, env=env)
    os.close(slave)
    reader, screen = read_terminal(master)
    deadline = time.monotonic() + 900
    while _stage(run, "iter_00/train").get("status") != "done":
        shown = bytes(screen).decode(errors="replace")[-3000:]
        assert proc.poll() is None, f"demo ended before the kill point:\n{shown}"
        assert time.monotonic() < deadline, "demo did not reach iter_00/train in 15 minutes"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join(timeout=10)
    os.close(master)
    before = {
        "teacher": (workdir / "models" / "teacher" / "train_summary.json").read_bytes(),
        "rationales": (run / "iter_00" / "rationales.jsonl").read_bytes(),
        "student": (run / "iter_00" / "student" / "train_summary.json").read_bytes(),
        "generate": _stage(run, "iter_00/generate"),
    }
    refused = run_undo("demo", *SHORTER, env=WIDE, cwd=here)
    resumed = run_undo("demo", *SHORTER, "--resume", env=WIDE, cwd=here, timeout=900)
    return {"workdir": workdir, "run": run, "before": before, "refused": refused, "resumed": resumed,
            "terminal": bytes(screen).decode(errors="replace")}


def test_in_a_terminal_the_demo_shows_live_progress(demo):
    terminal = demo["terminal"]
    assert "training the tiny teacher (undo train)" in terminal and "Traceback" not in terminal
    assert "\x1b[" in terminal  # rich drew for a terminal (colours, cursor moves), not for a log file


def test_resume_after_sigkill_finishes_without_redoing_finished_stages(demo):
    refused, resumed, run, before = demo["refused"], demo["resumed"], demo["run"], demo["before"]
    assert refused.returncode == 2 and "--resume" in refused.stderr and "Traceback" not in refused.stderr
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "reusing the models" in resumed.stderr  # the teacher was not trained again
    assert (demo["workdir"] / "models" / "teacher" / "train_summary.json").read_bytes() == before["teacher"]
    assert (run / "iter_00" / "rationales.jsonl").read_bytes() == before["rationales"]
    assert (run / "iter_00" / "student" / "train_summary.json").read_bytes() == before["student"]
    manifest = json.loads((run / "manifest.json").read_text())
    stages = manifest["stages"]
    assert stages["iter_00/generate"] == before["generate"]  # same attempts, same timings: skipped
    assert len(stages["iter_00/train"]["attempts"]) == 1
    assert manifest["status"] == "done" and all(s["status"] == "done" for s in stages.values())
    # The resumed loop decided again when to stop (its stopping rule, over every finished iteration).
    assert manifest["stop_reason"] and manifest["iterations_done"] <= 2  # --max-iterations 1: iterations 0 and 1


def test_the_run_folder_has_every_artifact(demo):
    run = demo["run"]
    assert (run / "manifest.json").is_file() and (run / "report.png").read_bytes()[:4] == b"\x89PNG"
    iterations = sorted(p.name for p in run.glob("iter_*"))
    assert iterations[0] == "iter_00" and len(iterations) >= 2  # one-shot plus at least one refinement round
    assert _read(run / "iter_00" / "rationales.jsonl") and (run / "iter_01" / "refined.jsonl").is_file()
    summary = json.loads((run / "summary.json").read_text())
    test = summary["test"]
    assert test["one_shot"]["iteration"] == 0 and test["one_shot"]["count"] > 0
    assert test["best"]["iteration"] == summary["best_iteration"] and test["gain"] is not None
    low, high = test["one_shot"]["ci95"]
    assert 0 <= low <= test["one_shot"]["accuracy"] <= high <= 1


def test_the_user_sees_table_verdict_and_next_steps(demo):
    err, out = demo["resumed"].stderr, demo["resumed"].stdout
    assert "UNDO run finished" in err and "test accuracy:" in err and "95% CI" in err
    assert "undo report" in err and "undo_loop.sh" in err and "refined.jsonl" in err
    assert "say nothing about real models" in " ".join(err.split())  # the disclaimer, however wrapped
    # Compact (issue 23): inside the loop a stage says one line, not its table, and the loop's table comes once.
    assert "undo train: " in err and " steps / " in err and "loss per epoch" not in err
    assert "undo collect-errors: " in err and "% of predictions" not in err
    assert err.count("UNDO run finished") == 1 and "iterations so far" not in err.split("stopping:")[-1]
    line = json.loads(out.strip().splitlines()[-1])  # stdout: one JSON line, nothing else
    assert line["run_dir"] == str(Path("undo-demo") / "runs" / "demo") and line["test"]["one_shot"]["count"] > 0


def test_the_printed_bash_loop_runs_as_printed(demo):
    """The `bash .../undo_loop.sh ...` line the demo ends with, run as printed from where the user stands, with
    one flag added so it stops after the one-shot iteration (the rounds are what `undo iterate` ran above)."""
    import shlex

    lines = demo["resumed"].stderr.splitlines()
    line = next(lines[i + 1].strip() for i, text in enumerate(lines) if "bash script of stage commands" in text)
    words = shlex.split(line)
    assert words[0] == "bash" and words[1].endswith("undo_loop.sh") and words[-2:] == ["--name", "bash-loop"]
    env = {**os.environ, **WIDE, "UNDO": f"{sys.executable} -m undo_cli"}
    proc = subprocess.run([*words, "--max-iterations", "0"], cwd=demo["workdir"].parent, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = demo["workdir"] / "runs" / "bash-loop"
    assert "plot written to" in proc.stdout + proc.stderr and (run / "report.png").is_file()
    # The demo's settings reached the stages: the same teacher, prompt and verification as `undo iterate`'s run.
    ours, theirs = _read(run / "iter_00" / "rationales.jsonl"), _read(demo["run"] / "iter_00" / "rationales.jsonl")
    assert [(r["id"], r["rationale"], r["verify"]) for r in ours] == [(r["id"], r["rationale"], r["verify"])
                                                                      for r in theirs]


def test_every_command_the_demo_ends_with_runs_as_printed(demo):
    """Issue 32: the `next:` line and each command of the closing block, pasted into bash from where the user
    stands (the bash loop, the longest, has its own test above)."""
    from tests.conftest import paste

    err = demo["resumed"].stderr
    lines = err.split("─ next ─")[-1].splitlines()
    block = [lines[i + 1].strip() for i, text in enumerate(lines[:-1]) if text.startswith("# ")
             and lines[i + 1].strip() and not lines[i + 1].startswith("#")]
    commands = [line[len("next: "):] for line in err.splitlines() if line.startswith("next: ")]
    commands += [c for c in block if "undo_loop.sh" not in c]
    assert len(commands) >= 6 and any(c.startswith("undo report ") for c in commands), commands
    for command in commands:
        proc = paste(command, cwd=demo["workdir"].parent, env=WIDE)
        assert proc.returncode == 0 and proc.stdout + proc.stderr, (command, proc.stderr[-2000:])


def test_data_is_the_shipped_problems_split(demo):
    from undo_cli.prompts import bundled_dir

    shipped = {p["id"]: p for p in _read(bundled_dir("examples") / "arithmetic.jsonl")}
    splits = {s: _read(demo["workdir"] / "data" / f"{s}.jsonl") for s in ("train", "val", "test")}
    ids = [p["id"] for rows in splits.values() for p in rows]
    assert sorted(ids) == sorted(shipped) and len(set(ids)) == len(ids)  # a partition, nothing lost
    # Each record is the shipped one; `undo data import` adds where it came from.
    assert all({k: v for k, v in p.items() if k != "source"} == shipped[p["id"]] for rows in splits.values()
               for p in rows)
    assert len(splits["val"]) >= 50 and len(splits["test"]) >= 50


def test_the_student_is_the_shipped_base_and_the_teacher_was_trained_from_it_by_undo_train(demo):
    from transformers import AutoTokenizer

    from undo_cli.prompts import bundled_dir
    from undo_cli import demo as demo_stage

    teacher, student = demo["workdir"] / "models" / "teacher", demo["workdir"] / "models" / "student"
    base = bundled_dir("examples") / "student-base"
    assert (student / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    tok_t, tok_s = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    assert tok_t.get_vocab() == tok_s.get_vocab() and tok_t.chat_template == tok_s.chat_template
    summary = json.loads((teacher / "train_summary.json").read_text())  # written by `undo train` itself
    assert (demo["workdir"].parent / summary["student"]).resolve() == student.resolve()  # relative to the cwd
    assert summary["epochs"] == 6.0
    assert summary["final_loss"] < summary["first_loss"] / 3
    # What the teacher was taught: every training problem's brief solution behind the generate prompt, and
    # behind the refine prompt the worked one (every product written out).
    data = _read(demo["workdir"] / "build" / "teacher_data.jsonl")
    train = {p["id"]: p for p in _read(demo["workdir"] / "data" / "train.jsonl")}
    generate = [r for r in data if r["id"].endswith("/generate")]
    refine = [r for r in data if r["id"].endswith("/refine")]
    assert len(generate) == len(train) and 0 < len(refine) < len(train)
    assert all(r["rationale"] == train[r["problem_id"]]["meta"]["brief"] for r in generate)
    assert all(r["rationale"] == train[r["problem_id"]]["meta"]["solution"] for r in refine)
    # every packs problem is re-taught (the kind the student base never saw, where brief and worked differ)
    packs = {i for i, p in train.items() if p["meta"]["skill"] == demo_stage.SKILL}
    assert packs and {r["problem_id"] for r in refine} >= packs
    assert all(p["meta"]["brief"] != p["meta"]["solution"] for i, p in train.items() if i in packs)
    assert all(p["meta"]["brief"] == p["meta"]["solution"] for i, p in train.items() if i not in packs)


def test_setup_only_on_a_set_up_folder_prints_the_loop_command(demo, undo):
    proc = undo("demo", "--workdir", demo["workdir"], "--setup-only", env=WIDE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing the models" in proc.stderr and "undo iterate --config" in proc.stderr


def test_a_folder_of_another_seed_or_not_a_demo_is_refused(demo, undo, tmp_path):
    other_seed = undo("demo", "--workdir", demo["workdir"], "--seed", "7", env=WIDE)
    assert other_seed.returncode == 2 and "--seed 0" in other_seed.stderr
    (tmp_path / "stuff.txt").write_text("mine\n")
    foreign = undo("demo", "--workdir", tmp_path, env=WIDE)
    assert foreign.returncode == 2 and "not a demo folder" in foreign.stderr
    assert (tmp_path / "stuff.txt").read_text() == "mine\n"  # nothing touched


def test_example_configs_resolve_and_fit_their_models(tmp_path, monkeypatch):
    """run.toml points at what `undo demo --setup-only` writes; run-qwen.toml has limits that fit real models."""
    from undo_cli.prompts import bundled_dir
    from undo_cli.loop.config import IterateConfig
    from undo_cli.loop.settings import resolve

    monkeypatch.chdir(tmp_path)
    for name in ("undo-demo/data", "data"):
        (tmp_path / name).mkdir(parents=True)
        for split in ("train", "val", "test"):
            (tmp_path / name / f"{split}.jsonl").write_text('{"id": "a", "question": "q", "answer": "1"}\n')
    demo_cfg = resolve(IterateConfig, str(bundled_dir("examples") / "run.toml"), {}, [])
    assert demo_cfg.teacher == "undo-demo/models/teacher" and demo_cfg.train_file == "undo-demo/data/train.jsonl"
    real = resolve(IterateConfig, str(bundled_dir("examples") / "run-qwen.toml"), {}, [])
    for table in ("generate", "evaluate", "refine"):
        assert real.settings(table)["max_tokens"] >= 1024, table  # a 7B teacher's rationales are not cut short
    train = real.settings("train")
    assert train["warmup_ratio"] > 0 and train["lr_scheduler"] == "cosine" and train["lr"] == 2e-5
    assert real.settings("refine")["k"] > 1
