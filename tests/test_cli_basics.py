"""The `undo` command line as a shell sees it: help, exit codes, a light start."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import click
import pytest

from undo_cli.cli.app import COMMANDS
from undo_cli.cli.builder import Command, Group, Special, landed, load
from undo_cli.fields import LISTS, SCALARS, describe


def _landed() -> list[str]:
    return [entry.name for entry in COMMANDS if landed(entry)]


def _commands() -> list[tuple[str, Command | Special]]:
    out = []
    for entry in COMMANDS:
        if not landed(entry):
            continue
        for sub in entry.commands if isinstance(entry, Group) else [entry]:
            out.append((f"{entry.name} {sub.name}" if isinstance(entry, Group) else entry.name, sub))
    return out


@pytest.mark.parametrize("name,entry", _commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_flags_are_the_config_fields(name, entry):
    """Every command's flags are its config's fields, one to one, with the same defaults and help."""
    cmd = entry.build()
    config_cls = load(entry.config)
    params = {p.name: p for p in cmd.params}
    if isinstance(entry, Special):  # undo iterate: the top-level fields (tables are dotted flags), layered
        from undo_cli.loop.settings import STAGES

        extra = {"config", "resume", "overwrite", "dry_run", "dry_run_format"}  # how to run, not what: not config fields
        # Table-valued top-level fields ([prices]) come from run.toml, not a flag of their own.
        fields = [s for s in describe(config_cls) if s.name not in STAGES and s.type in SCALARS + LISTS]
        assert set(params) - extra == {s.name for s in fields}
        for spec in fields:  # none applied here: a TOML file may set them; the field's default is shown
            assert params[spec.name].default is None and not params[spec.name].required
            if spec.default is not dataclasses.MISSING and spec.default is not None:
                shown = str(spec.default).lower() if isinstance(spec.default, bool) else str(spec.default)
                assert f"[default: {shown}]" in params[spec.name].help
        return
    assert set(params) == {f.name for f in dataclasses.fields(config_cls)}
    for spec in describe(config_cls):
        param = params[spec.name]
        assert spec.help, f"{config_cls.__name__}.{spec.name} has no metadata help"
        assert param.required == spec.required, spec.name
        if not spec.required:
            assert param.default == spec.default, spec.name
        assert isinstance(param, click.Argument) == spec.argument
        if isinstance(param, click.Option):
            assert param.help.startswith(spec.help)
            assert spec.flag in param.opts
            if spec.type == "bool":
                assert param.secondary_opts == [f"--no-{spec.flag[2:]}"]


def test_help_lists_every_landed_command(undo):
    proc = undo("--help", env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    landed = _landed()
    assert {"data", "score"} <= set(landed)
    for name in landed:
        assert f" {name} " in proc.stdout, f"`undo --help` does not list {name}"
    data = undo("data", "import", "--help", env={"COLUMNS": "200"})
    assert data.returncode == 0
    for flag in ("--preset", "--question-field", "--answer-field", "--choices-field", "--split", "--seed", "--output-dir"):
        assert flag in data.stdout


def test_the_console_script_entry_point_runs():
    """`undo` as pip installs it calls main() directly: no `python -m` (runpy) imports anything on its behalf."""
    code = "import sys; from undo_cli.cli.app import main; sys.argv = ['undo', 'score', '--help']; main()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--output" in proc.stdout


def test_usage_errors_exit_2_without_a_traceback(undo):
    for args in (["frobnicate"], ["score", "--bogus", "x"], ["score"], ["data", "import", "--limit", "many"]):
        proc = undo(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert "Usage:" in proc.stderr
    bare = undo()  # no command: the help, as a usage error
    assert bare.returncode == 2 and "Commands" in bare.stdout + bare.stderr


def test_success_is_0_and_user_errors_are_2(undo, tmp_path):
    good = undo("score", "-", input=json.dumps({"answer": "4", "output": "#### 4"}) + "\n")
    assert good.returncode == 0 and json.loads(good.stdout)["correct"] is True
    bad = undo("score", tmp_path / "missing.jsonl")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "hint:" in bad.stderr


def _wait_until_reading_stdin(pid: int, timeout: float = 60) -> None:
    """Block until the process sits in read(0, ...) (Linux /proc), so the signal lands inside the command."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):  # syscall numbers differ elsewhere
        time.sleep(3)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/syscall") as fh:
                if fh.read().startswith("0 0x0 "):  # syscall 0 = read, first argument = fd 0
                    return
        except OSError:  # no /proc here: give it time to start instead
            time.sleep(3)
            return
        time.sleep(0.05)


def test_ctrl_c_exits_130(tmp_path):
    # `undo score -` waits on stdin; an interrupt there must not look like success.
    from tests.conftest import sigint_default

    proc = subprocess.Popen([sys.executable, "-m", "undo_cli", "score", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    proc.stdin.write('{"answer": "1", "output": "#### 1"}\n')
    proc.stdin.flush()
    _wait_until_reading_stdin(proc.pid)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err


def test_help_imports_nothing_heavy():
    """`undo --help` must start instantly: no torch, transformers, datasets or math-verify at import."""
    code = ("import sys, undo_cli.cli.app; "
            "print(','.join(m for m in ('torch', 'transformers', 'datasets', 'math_verify', 'sympy', 'pyarrow', "
            "'sklearn', 'openai', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
