"""The second hour (issue 23): what a new user meets after the demo, each fixed thing checked as they meet it.

In process (conftest's `undo_here`) where a subprocess adds nothing: help texts, refusals, the
`next:` lines, the stopping rule's words. The other items of the issue are tested beside their
code: Ctrl-C in `undo train` (tests/test_train.py), the prompt format recorded by `undo train`
(tests/test_evaluate.py), refine prompts against the teacher's context (tests/test_refine.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TAUGHT_PROBLEMS, write_jsonl


@pytest.fixture
def problems(tmp_path) -> Path:
    return write_jsonl(tmp_path / "problems.jsonl",
                  [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS[:3]])


# --- undo iterate --help: sections like the stage commands', and the dotted stage flags -----------------

def test_iterate_help_is_grouped_and_shows_the_dotted_stage_flags(undo_here, capsys):
    from undo_cli.cli.app import main

    capsys.readouterr()
    main(["iterate", "--help"])  # returns: exit code 0
    text = capsys.readouterr().out
    sections = [line.rstrip(":") for line in text.splitlines() if line and not line.startswith(" ")
                and line.endswith(":")]
    assert sections[:6] == ["Options", "Models and data", "Backends", "The loop", "Teacher economy (docs/economy.md)",
                            "Where stages run"]
    assert sections[-1].startswith("Stage settings (dotted flags")
    stage_part = text.split("Stage settings", 1)[1]
    for table in ("generate", "train", "evaluate", "collect-errors", "refine"):
        assert f"--{table}.KEY VALUE" in stage_part and f"undo {table} --help" in " ".join(stage_part.split())
    assert "--train.lr 2e-5" in stage_part and "--slurm.KEY VALUE" in stage_part
    loop = text.split("The loop:", 1)[1].split("Teacher economy", 1)[0]
    assert "--max-iterations" in loop and "--patience" in loop and "--teacher-backend" not in loop


# --- --dry-run: keys whole at 80 columns; JSON on stdout only with --format json ---------------------

def test_dry_run_keeps_keys_whole_and_prints_json_only_when_asked(problems, tmp_path, capsys, monkeypatch,
                                                                  undo_here):
    from undo_cli.cli.app import main

    from undo_cli.console import console

    monkeypatch.setattr(console, "width", 80)  # a log file, CI, a default terminal
    args = ["iterate", "--teacher", "org/teacher", "--student", "org/student", "--train-file", str(problems),
            "--val-file", str(problems), "--test-file", str(problems), "--runs-dir", str(tmp_path / "runs"),
            "--dry-run"]
    capsys.readouterr()
    main(args + ["--format", "json"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["settings"]["train.lr"] is None and shown["plan"][0][0] == "iter_00/cluster"
    assert shown["plan"][1][0] == "iter_00/generate"
    main(args)
    text = capsys.readouterr()
    assert text.out == ""  # people read the tables on stderr; stdout stays empty without --format json
    lines = text.err.splitlines()
    assert max(len(line) for line in lines) <= 80
    cells = {cell.strip() for line in lines for cell in line.split("│")}
    assert set(shown["settings"]) <= cells  # every key whole in its cell, none cut mid-word
    code, err = undo_here(*args[:-1], "--format", "json")
    assert code == 2 and "--format json is the format of --dry-run's output" in err


# --- a misspelt command, a CSV given to a stage ---------------------------------------------------

def test_a_misspelt_command_gets_the_nearest_one(undo_here, capsys):
    from undo_cli.cli.app import main

    for args, expected in ((["evalute"], "Did you mean 'evaluate'?"), (["data", "improt"], "Did you mean 'import'?"),
                           (["colect-errors"], "Did you mean 'collect-errors'?")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(args)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and expected in err and "Traceback" not in err, args
    with pytest.raises(SystemExit):
        main(["xyzzy"])
    assert "Commands: data, " in capsys.readouterr().err  # every command, when none is near


def test_a_misspelt_flag_gets_the_nearest_one(undo_here):
    """Every command, `undo iterate` too (its dotted stage flags reach it undeclared, so click cannot say it)."""
    for args, typo, expected in ((["iterate", "--max-iteration", "3"], "--max-iteration", "'--max-iterations'"),
                                 (["iterate", "--train.lr", "-1", "--patiense=2"], "--patiense",
                                  "Did you mean '--patience'?"),
                                 (["demo", "--max-iteration", "2"], "--max-iteration", "Did you mean '--max-iterations'?"),
                                 (["train", "--studnt", "x"], "--studnt", "'--student'")):
        code, err = undo_here(*args)
        assert code == 2 and f"No such option '{typo}'" in err and expected in err, (args, err)
        assert "Traceback" not in err


def test_a_csv_given_to_a_stage_points_to_data_import(undo_here, tmp_path, tiny_model):
    quiz = tmp_path / "quiz.csv"
    quiz.write_text('question,answer\n"What is 2+2?",4\n')
    code, err = undo_here("evaluate", "--model", tiny_model, "--input", quiz, "--output", tmp_path / "p.jsonl")
    assert code == 2 and "quiz.csv:1: not valid JSON" in err
    assert f"this looks like a CSV file, not JSONL: `undo data import {quiz} --output-dir data`" in err
    pretty = write_jsonl(tmp_path / "data.json", [])
    pretty.write_text('[\n  {"question": "2+2?", "answer": "4"}\n]\n')
    code, err = undo_here("train", "--student", tiny_model, "--data", pretty, "--output", tmp_path / "s")
    assert code == 2 and "a JSON file (not one object per line)" in err and "undo data import" in err
    broken = write_jsonl(tmp_path / "broken.jsonl", [])
    broken.write_text('{"id": "a", "question": "q", "answer": "1"}\n{"id": "b", oops}\n')
    code, err = undo_here("evaluate", "--model", tiny_model, "--input", broken, "--output", tmp_path / "q.jsonl")
    assert code == 2 and "broken.jsonl:2" in err and "fix or delete this line" in err  # a JSONL typo stays one


# --- throughput: what the model generated, apart from what the teacher cache answered -------------------

def test_cached_answers_are_reported_apart_from_the_throughput(undo_here, tiny_teacher, problems, tmp_path):
    args = ["generate", "--teacher", tiny_teacher, "--input", problems, "--max-tokens", "8", "--keep", "all"]
    code, err = undo_here(*args, "--output", tmp_path / "first.jsonl")
    assert code == 0, err
    assert "samples/s generated" in err and "from the teacher cache" not in err
    code, err = undo_here(*args, "--output", tmp_path / "second.jsonl")
    assert code == 0, err
    flat = " ".join(err.replace("│", " ").split())  # a table cell may wrap onto a second row
    assert "none generated; 3 samples (" in flat and "tokens) from the teacher cache" in flat
    first = [json.loads(line) for line in (tmp_path / "first.jsonl").read_text().splitlines()]
    second = [json.loads(line) for line in (tmp_path / "second.jsonl").read_text().splitlines()]
    assert not any(r["cached"] for r in first) and all(r["cached"] for r in second)


# --- every command ends with the next one: report, score, cache stats --------------------------------

def test_report_score_and_cache_stats_end_with_the_next_command(undo_here, tmp_path, problems):
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"id": "a", "question": "q", "answer": "1", "output": "#### 2"}])
    code, err = undo_here("score", preds, "--output", tmp_path / "scored.jsonl")
    assert code == 0 and f"next: undo collect-errors {tmp_path / 'scored.jsonl'} --output" in err
    code, err = undo_here("score", preds)
    assert code == 0 and f"next: undo score {preds} --output scored.jsonl" in err

    run = tmp_path / "runs" / "r"
    metrics = {"accuracy": 0.5, "correct": 1, "count": 2}
    for k in (0, 1):
        write_jsonl(run / f"iter_0{k}" / "errors.jsonl", []) if (run / f"iter_0{k}").mkdir(parents=True) is None else None
        (run / f"iter_0{k}" / "val").mkdir()
        (run / f"iter_0{k}" / "val" / "predictions.metrics.json").write_text(json.dumps(metrics))
    (run / "manifest.json").write_text(json.dumps({"status": "done", "best_iteration": 1, "stages": {}, "config": {
        "test_file": str(problems), "verify": "strict", "evaluate": {"max_tokens": 96}}}))
    code, err = undo_here("report", run)
    assert code == 0, err
    assert f"next: undo report {run} --html {run / 'report.html'} # one offline page" in err
    # The page written: what the chosen student changed on test, read from the run's own test predictions (the
    # run tested it: nothing is evaluated again); without them, no next line.
    code, err = undo_here("report", run, "--html", run / "report.html")
    assert code == 0 and "next:" not in err, err
    for k in (0, 1):
        write_jsonl(run / f"iter_0{k}" / "test" / "predictions.jsonl", [{"id": "a", "question": "q", "answer": "1",
                                                                          "output": "#### 1", "predicted": "1",
                                                                          "correct": bool(k)}])
    code, err = undo_here("report", run, "--html", run / "report.html")
    assert code == 0 and f"next: undo diff {run} 0 best --split test # what the chosen student" in err, err

    from undo_cli.economy.cache import TeacherCache

    with TeacherCache(tmp_path / "cache", quiet=True):
        pass
    code, err = undo_here("cache", "stats", "--cache-dir", tmp_path / "cache")
    assert code == 0 and f"next: undo cache prune --older-than 30 --cache-dir {tmp_path / 'cache'}" in err


# --- the stopping rule in words --------------------------------------------------------------------

def test_the_stop_reason_says_what_the_rule_asked():
    from undo_cli.loop.config import IterateConfig
    from undo_cli.loop.rounds import decide

    config = IterateConfig.__new__(IterateConfig)  # the rule reads three numbers; no files needed
    config.max_iterations, config.patience, config.min_delta = 5, 1, 0.0
    history = [{"accuracy": a, "errors": 3} for a in (0.3, 0.3)]
    assert decide(history, config)[1] == "validation accuracy did not improve for 1 iteration"
    config.min_delta, config.patience = 0.02, 2
    history.append({"accuracy": 0.31, "errors": 3})
    assert decide(history, config)[1] == "no validation gain of at least 0.02 for 2 iterations"


# --- "more rounds": an exact command that runs one more round -----------------------------------------

def test_the_more_rounds_hint_raises_what_stopped_the_run():
    from undo_cli.loop.config import IterateConfig
    from undo_cli.loop.ending import more_rounds
    from undo_cli.loop.rounds import decide

    config = IterateConfig.__new__(IterateConfig)
    config.max_iterations, config.patience, config.min_delta = 2, 1, 0.0
    command = ["--config", "run.toml", "--max-iterations", "2", "--name", "r"]

    def h(*accs):
        return [{"accuracy": a, "errors": 3} for a in accs]

    # Stopped by patience at iteration 1: --max-iterations alone would stop again at once.
    hint = more_rounds(config, h(0.3, 0.2), command)
    assert hint == "undo iterate --config run.toml --name r --resume --max-iterations 2 --patience 2"
    config.patience = 2
    assert decide(h(0.3, 0.2), config)[1] is None and decide(h(0.3, 0.2, 0.2), config)[1]  # one round, then stop
    # Stopped by max_iterations after a gain: only that.
    config.patience = 1
    assert more_rounds(config, h(0.3, 0.4, 0.5), command).endswith("--resume --max-iterations 3")
    # No error left: nothing to refine, no hint.
    assert more_rounds(config, [{"accuracy": 1.0, "errors": 0}], command) is None


# --- a changed --limit is refused in words, with the fix --------------------------------------------

def test_a_changed_limit_is_refused_in_words(undo_here, tiny_model, problems, tmp_path):
    out = tmp_path / "preds.jsonl"
    args = ["evaluate", "--model", tiny_model, "--input", problems, "--output", out, "--max-tokens", "4"]
    code, err = undo_here(*args, "--limit", "2")
    assert code == 0, err
    code, err = undo_here(*args)
    assert code == 2 and "changed: every problem (3), was --limit 2" in err
    assert "'input'" not in err and "prompts" not in err  # no digests
    assert f"pass --overwrite to start over, or choose another --output (e.g. {tmp_path / 'preds-2.jsonl'})" in err
    code, err = undo_here(*args, "--limit", "1")
    assert code == 2 and "changed: --limit 1, was --limit 2" in err
    code, err = undo_here(*args, "--limit", "2", "--max-tokens", "5")  # other settings still say key: old -> new
    assert code == 2 and "max_tokens: 4 -> 5" in err and "--limit" not in err
    write_jsonl(problems, [{"id": "x", "question": "What is 1 + 1?", "answer": "2"}])
    code, err = undo_here(*args, "--limit", "2")
    assert code == 2 and "the problems of --input differ from those it was made from" in err
    code, err = undo_here(*args, "--output", tmp_path / "preds-2.jsonl")  # the suggested other --output works
    assert code == 0, err


# --- the walk, in a terminal -------------------------------------------------------------------------

class Terminal:
    """An interactive bash on a pseudo-terminal, typed into as a person does (job control: Ctrl-C reaches the
    command running in the foreground, not the shell)."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        import fcntl
        import os
        import pty
        import subprocess
        import termios

        from tests.conftest import read_terminal, sigint_default

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, __import__("struct").pack("HHHH", 40, 100, 0, 0))

        def controlling_terminal():  # the pty is the shell's terminal: it gets job control, like a real login
            sigint_default()  # Ctrl-C must reach the typed command however the suite was started
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(["bash", "--norc", "--noprofile", "-i"], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=cwd, env=env, preexec_fn=controlling_terminal)
        os.close(slave)
        self.reader, self.screen = read_terminal(self.master)
        self.done = 0

    def text(self) -> str:
        return bytes(self.screen).decode("utf-8", errors="replace")

    def wait_for(self, what: str, after: int = 0, timeout: float = 900) -> None:
        import time

        deadline = time.monotonic() + timeout
        while what not in self.text()[after:]:
            assert time.monotonic() < deadline, f"waited for {what!r}:\n{self.text()[-3000:]}"
            time.sleep(0.1)

    def type(self, command: str, *, ctrl_c_after: str | None = None, timeout: float = 900) -> str:
        """Type `command`, Enter; optionally Ctrl-C once `ctrl_c_after` shows; what the screen showed meanwhile."""
        import os

        start = len(self.text())
        self.done += 1
        # The marker is printed, not typed: the typed line (echoed by the terminal) never contains it.
        os.write(self.master, f"{command}; printf '[%s {self.done}: exit %d]\\n' done $?\n".encode())
        if ctrl_c_after:
            self.wait_for(ctrl_c_after, start, timeout)
            os.write(self.master, b"\x03")
        self.wait_for(f"[done {self.done}: exit", start, timeout)
        return self.text()[start:]

    def close(self) -> None:
        import os

        os.write(self.master, b"exit\n")
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.reader.join(timeout=10)
            os.close(self.master)


def _unescaped(screen: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]", "", screen).replace("\r", "")


def _plain(screen: str) -> str:
    """What a person reads: escape sequences and carriage returns removed, lines joined."""
    return " ".join(_unescaped(screen).split())


def _hint(screen: str, label: str) -> str:
    """The command on the line that starts with `label` (undo prints a hint on one line, however long)."""
    line = next(line for line in _unescaped(screen).splitlines() if line.startswith(label))
    return line[len(label):].split("   (")[0].strip()


@pytest.mark.slow
def test_the_walk_in_a_terminal(tmp_path, trained_teacher, tiny_model, tiny_teacher):
    """Issue 23's walk after the demo, typed into a terminal: typos, help, dry run, a run to the end and its
    hints pasted, the bash loop, chat data trained (Ctrl-C, resume) and evaluated, a changed --limit, a CSV,
    the commands' `next:` lines. UNDO_WALK_TRANSCRIPT=FILE keeps what the screen showed."""
    import os
    import shlex
    import sys

    from tests.test_iterate import STAGE_FLAGS

    rows = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS]
    for name, part in (("train", rows[:8]), ("val", rows[8:]), ("test", rows[6:])):
        write_jsonl(tmp_path / f"{name}.jsonl", part)
    tables: dict[str, list[str]] = {}
    for flag, value in zip(STAGE_FLAGS[::2], STAGE_FLAGS[1::2]):
        table, key = flag[2:].split(".", 1)
        tables.setdefault(table.replace("-", "_"), []).append(f"{key.replace('-', '_')} = {json.dumps(value) if not value.replace('.', '').replace('e-', '').isdigit() else value}")
    (tmp_path / "run.toml").write_text(
        f'name = "walk"\nteacher = "{trained_teacher}"\nstudent = "{tiny_model}"\ntrain_file = "train.jsonl"\n'
        'val_file = "val.jsonl"\ntest_file = "test.jsonl"\nmax_iterations = 1\n'
        + "".join(f"[{t}]\n" + "\n".join(lines) + "\n" for t, lines in tables.items()))
    chat = [{"messages": [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["rationale"]}]}
            for p in TAUGHT_PROBLEMS]
    write_jsonl(tmp_path / "chat.jsonl", chat)
    (tmp_path / "quiz.csv").write_text('question,answer\n"What is 2 + 2?",4\n')
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "TERM": "xterm", "PS1": "$ ", "PATH": bin_dir + os.pathsep + os.environ["PATH"],
           "COLUMNS": "100", "LINES": "40", "HISTFILE": "/dev/null"}
    env.pop("NO_COLOR", None)
    term = Terminal(tmp_path, env)
    seen: dict[str, str] = {}
    try:
        term.type("set -o pipefail")  # `undo ... | tail` exits with undo's status, as the README advises
        seen["typo"] = term.type("undo evalute --model student --input val.jsonl")
        seen["help"] = term.type("undo iterate --help | grep -E '^[A-Z].*:$|KEY VALUE'")  # its sections
        seen["dry"] = term.type("undo iterate --config run.toml --dry-run 2>&1 | sed -n 1,12p")
        seen["run"] = term.type("undo iterate --config run.toml")
        more = _hint(seen["run"], "more rounds: ")
        seen["more"] = term.type(more)
        report = _hint(seen["more"], "next: ")
        seen["report"] = term.type(report)
        seen["bash"] = term.type("bash " + shlex.quote(str(Path(__file__).resolve().parent.parent / "examples"
                                                           / "undo_loop.sh"))
                                 + " --config run.toml --name bash-loop --max-iterations 0 2>&1 | tail -n 5")
        seen["train"] = term.type("undo train --student " + shlex.quote(str(tiny_teacher)) + " --data chat.jsonl "
                                  "--output chat-student --max-steps 1000 --batch-size 12 --lr 3e-3 "
                                  "--lr-scheduler constant --warmup-ratio 0 --logging-steps 20 --save-steps 5000",
                                  # Ctrl-C at the first log line: 980 steps left, so a loaded machine (two test
                                  # workers) still gets it in before training ends (it once did not, at step 40/400)
                                  ctrl_c_after="step 20/1000")
        resume = _hint(seen["train"], "continue with: ")
        seen["resume"] = term.type(resume + " 2>&1 | grep -E 'resuming from|missing keys|steps / epochs|next:'")
        seen["evaluate"] = term.type("undo evaluate --model chat-student --input val.jsonl --output chat-preds.jsonl "
                                     "--max-tokens 40 --limit 2 2>&1 | grep -v '│\\|┃\\|━\\|─'")
        seen["limit"] = term.type("undo evaluate --model chat-student --input val.jsonl --output chat-preds.jsonl "
                                  "--max-tokens 40")
        seen["csv"] = term.type("undo generate --teacher chat-student --input quiz.csv --output r.jsonl")
        seen["score"] = term.type("undo score chat-preds.jsonl --output scored.jsonl 2>&1 | tail -n 2")
        seen["cache"] = term.type("undo cache stats 2>&1 | tail -n 2")
    finally:
        transcript = term.text()
        term.close()
        if os.environ.get("UNDO_WALK_TRANSCRIPT"):
            Path(os.environ["UNDO_WALK_TRANSCRIPT"]).write_text(transcript)
    said = {k: _plain(v).split("done $?", 1)[-1] for k, v in seen.items()}  # what came after the typed line
    assert "Did you mean 'evaluate'?" in said["typo"] and "exit 2" in said["typo"]
    assert "Models and data:" in said["help"] and "The loop:" in said["help"]
    assert "undo iterate --dry-run:" in said["dry"] and "exit 0" in said["dry"] and "Traceback" not in transcript
    assert "UNDO run finished" in said["run"] and "exit 0" in said["run"]
    assert more.startswith("undo iterate --config run.toml --resume --max-iterations")
    assert "UNDO run finished" in said["more"] and "iteration 2" in said["more"] and "exit 0" in said["more"]
    assert "val acc" in said["report"] and "next: undo report " in said["report"] and "--html" in said["report"]
    assert "plot written to runs/bash-loop/report.png" in said["bash"] and "exit 0" in said["bash"]
    assert "checkpoint saved:" in said["train"] and "exit 130" in said["train"] and "--resume" in resume
    assert "resuming from chat-student/checkpoints/checkpoint-" in said["resume"] and "1000 / " in said["resume"]
    assert "missing keys" not in said["resume"] and "exit 0" in said["resume"]
    assert 'trained on {"messages"}-style data' in said["evaluate"] and "exit 0" in said["evaluate"]
    assert "every problem (4), was --limit 2" in said["limit"] and "exit 2" in said["limit"]
    assert "undo data import quiz.csv" in said["csv"] and "exit 2" in said["csv"]
    assert "next: undo collect-errors scored.jsonl" in said["score"]
    assert "next: undo cache prune --older-than 30" in said["cache"]


def test_the_demos_bash_loop_line_carries_the_demos_settings(tmp_path, tiny_model, trained_teacher, capsys,
                                                             monkeypatch, undo_here):
    """`undo demo` ends with the bash loop as a command line: `undo iterate`'s flags for the demo's run, so the
    script gets run.toml's settings (item 1); checked here on tiny models, its settings as the script reads them."""
    import shlex

    from undo_cli import demo

    monkeypatch.chdir(tmp_path)
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", [{k: p[k] for k in ("id", "question", "answer")}
                                                 for p in TAUGHT_PROBLEMS[:4]]) for s in ("train", "val", "test")}
    models = {"teacher": trained_teacher, "student": tiny_model}
    capsys.readouterr()
    demo._print_next_steps(tmp_path, tmp_path / "runs" / "demo", files, models, seed=0)
    lines = capsys.readouterr().err.splitlines()
    line = next(lines[i + 1].strip() for i, text in enumerate(lines) if "bash script of stage commands" in text)
    words = shlex.split(line)
    assert words[0] == "bash" and words[1].endswith("examples/undo_loop.sh") and words[-2:] == ["--name", "bash-loop"]
    capsys.readouterr()
    from undo_cli.cli.app import main

    main(["iterate", *words[2:], "--dry-run", "--format", "shell"])
    settings = capsys.readouterr().out
    assert f"OUT={tmp_path / 'runs' / 'bash-loop'}" in settings
    # run.toml's settings, not the stages' defaults (the issue: epochs 2 instead of 20, no lr, 512-token answers)
    import tomllib

    from undo_cli.prompts import bundled_dir

    toml = tomllib.loads((bundled_dir("examples") / "run.toml").read_text())
    train, refine = toml["train"], toml["refine"]
    assert f"--epochs {float(train['epochs'])}" in settings and f"--lr {train['lr']}" in settings
    assert f"--warmup-ratio {train['warmup_ratio']}" in settings and f"--k {refine['k']}" in settings
    assert settings.count(f"--max-tokens {refine['max_tokens']}") == 3
    from dataclasses import fields

    from undo_cli.stages.refine import RefineConfig

    assert f"--prompt {refine['prompt']}" in settings  # the demo teacher's own prompt
    # What refine verifies with when the script runs it: the flag's value, or refine's own default when the flag
    # is not passed (a default is not written out); either way it must be what run.toml says.
    words = shlex.split(next(line for line in settings.splitlines() if line.startswith("REFINE_ARGS="))
                        .partition("=")[2].strip("()"))
    passed = words[words.index("--verify") + 1] if "--verify" in words else None
    default = next(f.default for f in fields(RefineConfig) if f.name == "verify")
    assert (passed or default) == refine["verify"], (passed, default)


def test_a_stage_error_inside_iterate_names_the_loops_keys():
    """A hint printed by a stage that `undo iterate` runs must work in `undo iterate`: `--max-tokens` there is
    `refine.max_tokens` (--refine.max-tokens); an error about no option stays as the stage said it."""
    from undo_cli.errors import UndoError
    from undo_cli.loop.terms import in_config_terms

    def too_long():
        raise UndoError("refine prompt for p1#0 is 900 tokens; with --max-tokens 512 that is 1,412, more than the "
                        "teacher's context of 1,024 tokens", hint="lower --max-tokens to at most 124; or a teacher "
                        "with a longer context")

    with pytest.raises(UndoError) as exc:
        in_config_terms("refine", too_long)()
    assert "with refine.max_tokens 512" in exc.value.message
    assert exc.value.hint.startswith("lower refine.max_tokens to at most 124")
    assert exc.value.hint.endswith("set in the config's refine table or with --refine.KEY")

    def server_down():
        raise UndoError("cannot reach the server at http://127.0.0.1:9/v1", hint="start it first")

    with pytest.raises(UndoError) as exc:
        in_config_terms("generate", server_down)()
    assert exc.value.hint == "start it first"
