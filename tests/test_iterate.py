"""`undo iterate`: the whole loop on tiny models, killed mid-training and mid-refine, resumed, compared with bash.

The loop runs as a user runs it, `undo iterate` in a subprocess, on the tiny
offline models of conftest: `trained_teacher` (which reproduces worked solutions
for TAUGHT_PROBLEMS when shown the student prompt, so generate and refine
really verify) and the untrained `tiny_model` as the student. One run is killed
with SIGKILL twice (once when training has written a checkpoint, once when
refine has written its first record), resumed each time, and then checked for
what a person relies on: nothing finished was recomputed, nothing was lost or
written twice, and the manifest tells the story.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TAUGHT_PROBLEMS, write_jsonl


# Tiny but real: the teacher sees the student template it was overfit on (generate and refine
# both take a `prompt` template), refine works one target per batch so that it can be
# killed between two records, and training checkpoints every 3 steps so it can be killed
# between two checkpoints.
STAGE_FLAGS = [
    "--generate.prompt", "student", "--generate.max-tokens", "48",
    "--refine.prompt", "student", "--refine.max-tokens", "48", "--refine.per-error", "4",
    "--refine.batch-size", "1", "--refine.budget", "none",
    "--train.max-steps", "12", "--train.save-steps", "3", "--train.batch-size", "4", "--train.lr", "3e-3",
    "--train.logging-steps", "3",
    "--evaluate.max-tokens", "8",
]



@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model, trained_teacher) -> dict:
    root = tmp_path_factory.mktemp("iterate")
    problems = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS]
    files = {"train": write_jsonl(root / "train.jsonl", problems[:8]), "val": write_jsonl(root / "val.jsonl", problems[8:]),
             "test": write_jsonl(root / "test.jsonl", problems[6:])}
    args = ["iterate", "--teacher", trained_teacher, "--student", tiny_model, "--train-file", files["train"],
            "--val-file", files["val"], "--test-file", files["test"], "--runs-dir", root / "runs",
            "--max-iterations", "2", "--patience", "1", *STAGE_FLAGS]
    return {"root": root, "files": files, "args": [str(a) for a in args], "teacher": trained_teacher,
            "student": tiny_model}


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "undo_cli", *args], stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True, env=os.environ.copy())


def _manifest(run: Path) -> dict:
    try:
        return json.loads((run / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait_then_kill(proc: subprocess.Popen, ready, log: Path, what: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"undo iterate ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished_run(workdir) -> dict:
    """One run, SIGKILLed mid-training and mid-refine, resumed to the end; what was seen along the way."""
    args, run = workdir["args"] + ["--name", "killed"], workdir["root"] / "runs" / "killed"
    seen: dict = {}

    # 1. Kill while iteration 0 trains, once a complete checkpoint exists.
    log = workdir["root"] / "first.log"
    proc = _start(args, log)
    checkpoint = run / "iter_00" / "student" / "checkpoints" / "checkpoint-3" / "undo_stats.json"
    _wait_then_kill(proc, lambda: checkpoint.exists(), log, "the first training checkpoint")
    assert _manifest(run)["stages"]["iter_00/train"]["status"] == "running"
    seen["rationales_mtime"] = (run / "iter_00" / "rationales.jsonl").stat().st_mtime_ns
    seen["generate_after_kill"] = _manifest(run)["stages"]["iter_00/generate"]

    # 2. Resume; kill while iteration 1 refines, once its first record is on disk.
    log = workdir["root"] / "second.log"
    proc = _start(args + ["--resume"], log)
    refined = run / "iter_01" / "refined.jsonl"
    _wait_then_kill(proc, lambda: refined.exists() and len(_lines(refined)) >= 1
                    and _manifest(run).get("stages", {}).get("iter_01/refine", {}).get("status") == "running",
                    log, "the first refined record")
    seen["refined_at_kill"] = _lines(refined)
    seen["train0_mtime"] = (run / "iter_00" / "student" / "train_summary.json").stat().st_mtime_ns

    # 3. Resume to the end.
    log = workdir["root"] / "third.log"
    proc = _start(args + ["--resume"], log)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return {**workdir, "run": run, "args": args, "seen": seen, "stdout": out, "log": log.read_text()}


@pytest.mark.slow
def test_killed_twice_and_resumed_run_completes_without_recomputing(finished_run):
    run, seen = finished_run["run"], finished_run["seen"]
    manifest = _manifest(run)
    assert manifest["status"] == "done"
    stages = manifest["stages"]
    expected = ["iter_00/cluster", "iter_00/generate", "iter_00/train", "iter_00/evaluate", "iter_00/collect_errors",
                "iter_01/refine", "iter_01/mix", "iter_01/train", "iter_01/evaluate", "iter_01/collect_errors",
                "iter_00/test"]
    assert list(stages) == expected  # patience 1 and no gain: stops after iteration 1; best = 0 is tested
    assert all(stages[k]["status"] == "done" for k in expected)

    # Generation finished before the first kill: never run again.
    assert stages["iter_00/generate"]["attempts"] == seen["generate_after_kill"]["attempts"]
    assert len(stages["iter_00/generate"]["attempts"]) == 1
    assert (run / "iter_00" / "rationales.jsonl").stat().st_mtime_ns == seen["rationales_mtime"]
    # Training resumed from its checkpoint, not from step 0; after that it was not touched again.
    assert [a["outcome"] for a in stages["iter_00/train"]["attempts"]] == ["killed", "done"]
    train0 = json.loads((run / "iter_00" / "student" / "train_summary.json").read_text())
    assert train0["resumed_from_step"] >= 3 and train0["steps"] == 12
    assert (run / "iter_00" / "student" / "train_summary.json").stat().st_mtime_ns == seen["train0_mtime"]
    # Refine kept what it had written and finished the rest: no record lost, none twice.
    assert [a["outcome"] for a in stages["iter_01/refine"]["attempts"]] == ["killed", "done"]
    refined = _lines(run / "iter_01" / "refined.jsonl")
    assert refined[: len(seen["refined_at_kill"])] == seen["refined_at_kill"]
    ids = [json.loads(line)["id"] for line in refined]
    assert len(ids) == len(set(ids)) == stages["iter_01/refine"]["summary"]["jobs"] == 4
    assert "resumes where it stopped" in finished_run["log"] or "resuming" in finished_run["log"]
    # Killed twice, yet no temp file is left, and every file is readable by others (it honours the umask).
    assert not list(run.rglob("*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(f.relative_to(run)): oct(f.stat().st_mode & 0o777) for f in run.rglob("*") if f.is_file()}
    assert {"manifest.json", "summary.json", "iter_00/rationales.jsonl", "iter_01/student/model.safetensors"} <= set(modes)
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


@pytest.mark.slow
def test_run_folder_records_config_inputs_and_the_mixed_data(finished_run):
    run = finished_run["run"]
    manifest = _manifest(run)
    files = finished_run["files"]
    for split in ("train", "val", "test"):
        assert manifest["inputs"][split]["sha256"] == hashlib.sha256(files[split].read_bytes()).hexdigest()
    assert manifest["config"]["train"]["lr"] == 3e-3 and manifest["config"]["refine"]["per_error"] == 4
    assert manifest["config"]["train"]["seed"] == 0 == manifest["seeds"]["seed"]
    assert {"undo", "torch", "transformers"} <= set(manifest["versions"])
    for stage in manifest["stages"].values():
        assert stage["seconds"] >= 0 and all(Path(p).exists() for p in stage["outputs"].values())

    # mix = replace: the training data of iteration 1 is iteration 0's, with the refined records swapped in by id.
    base = [json.loads(x) for x in _lines(run / "iter_00" / "rationales.jsonl")]
    refined = {r["id"]: r for r in map(json.loads, _lines(run / "iter_01" / "refined.jsonl"))}
    mixed = [json.loads(x) for x in _lines(run / "iter_01" / "train_data.jsonl")]
    assert [r["id"] for r in mixed] == [r["id"] for r in base]
    assert all(r == refined[r["id"]] for r in mixed if r["id"] in refined)
    assert any(r["refinement"]["verified"] for r in refined.values())  # the teacher's refinements verify

    summary = json.loads((run / "summary.json").read_text())
    assert [r["iteration"] for r in summary["iterations"]] == [0, 1]
    assert all(r["val_accuracy"] is not None and r["train_loss"] is not None for r in summary["iterations"])
    assert summary["best_iteration"] == 0 and summary["test"]["one_shot"]["count"] == 6
    out = json.loads(finished_run["stdout"])
    assert out["status"] == "done" and out["best_student"].endswith("iter_00/student")


@pytest.mark.slow
def test_resume_refuses_a_changed_config_and_a_rerun_without_resume(finished_run, undo):
    args = finished_run["args"]
    changed = undo(*args, "--resume", "--train.lr", "1e-3", "--max-iterations", "3", env={"COLUMNS": "400"})
    assert changed.returncode == 2, changed.stderr
    # train.lr was used by the finished training stages: refused; the stopping rule was used by none.
    assert "train.lr: was 0.003, now 0.001" in changed.stderr and "iter_00/train" in changed.stderr
    assert "max_iterations" not in changed.stderr
    again = undo(*args)
    assert again.returncode == 2 and "already exists" in again.stderr and "--resume" in again.stderr
    assert "--overwrite" in again.stderr


def _hint(log: str, label: str) -> str:
    """The command after `label` on its line of a log (undo prints each hint on one line)."""
    line = next(line for line in log.splitlines() if line.startswith(label))
    return line[len(label):].split("   (")[0].strip()


@pytest.mark.slow
def test_a_finished_run_extends_with_the_more_rounds_hint_as_printed(finished_run, undo):
    """The finished run's `more rounds:` hint, pasted (on a copy of the run: --name extended), runs one more
    round and recomputes nothing finished; then a resume under the original rule keeps the finished round
    in the count: the best iteration is decided over every finished one (issue 23, items 2 and 3)."""
    import shutil

    from tests.conftest import paste

    run = finished_run["run"]
    copy = run.with_name("extended")
    shutil.copytree(run, copy)
    before = _manifest(copy)["stages"]
    assert _manifest(copy)["stop_reason"]
    done = _manifest(copy)["iterations_done"]  # iterations 0 .. done-1 ran; the hint asks for one more
    hint = _hint(finished_run["log"], "more rounds:")
    assert hint.startswith("undo iterate ") and f"--resume --max-iterations {max(2, done)}" in hint
    assert "--name killed" in hint and ("--patience" in hint or done > 2)  # stopped before max_iterations: patience
    proc = paste(hint.replace("--name killed", "--name extended"), env={"COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = _manifest(copy)["stages"]
    new = f"iter_{done:02d}"
    assert stages[f"{new}/train"]["status"] == "done" and stages[f"{new}/collect_errors"]["status"] == "done"
    assert f"iter_{done + 1:02d}/refine" not in stages  # one more round, as the hint said
    assert all(stages[k]["attempts"] == before[k]["attempts"] for k in before)  # nothing finished ran again
    # The tables printed while it ran did not repeat the finished run's reason for stopping.
    assert "stopped:" not in proc.stderr.split("UNDO run finished")[0]
    # Each "iterations so far" table shows the rows its decision has seen, its star on the iteration it names
    # (issue 32: replaying iteration 0 printed row 1, higher, beside "★ ... decided through iteration 0").
    import re

    tables = proc.stderr.split("UNDO run finished")[0].split("iterations so far")[1:]
    assert len(tables) == 1, len(tables)  # the replayed iterations print none; the new round's decision one
    for table in tables:
        rows = [int(m.group(1)) for m in re.finditer(r"^\s*(\d+)(?: ★)?\s+\d", table.split("★ chosen")[0], re.M)]
        starred = re.search(r"^\s*(\d+) ★", table, re.M)
        chosen = re.search(r"★ chosen: iteration (\d+).*?decided through iteration (\d+)", table)
        assert chosen and starred and starred.group(1) == chosen.group(1), table
        assert rows and max(rows) == int(chosen.group(2)), (rows, table)
    assert "next: undo report" in proc.stderr and "more rounds: undo iterate" in proc.stderr

    # The report of the extended run: the plot marks the iteration the run chose after the extension, every
    # panel labels its iterations, and the HTML page agrees with the files in a real browser.
    from tests.test_report import check_figure
    from undo_cli.loop.run_state import collect

    page = copy / "page.html"
    report = undo("report", copy, "--html", page, env={"COLUMNS": "200"})
    assert report.returncode == 0, report.stderr
    best = _manifest(copy)["best_iteration"]
    state = collect(copy)
    assert state["best_iteration"] == best and [r["iteration"] for r in state["rows"]] == list(range(done + 1))
    legend = " ".join(check_figure(state)["legend"]).replace("\n", " ")
    assert f"chosen: iteration {best}, the run's choice" in legend
    assert f"★ chosen: iteration {best}, the run's choice" in report.stderr
    from tests.browser import Chromium, available

    if available() is None:  # without chromium, the synthetic page tests say why they skip
        from tests.test_report_html import check_page

        with Chromium() as browser:
            shown = check_page(page, copy, browser)
        assert set(shown["refined"]) == set(range(1, done + 1))

    # Resumed under the original rule (max 2 iterations, patience 1), the last iteration best on validation:
    # before issue 23 the loop stopped at iteration 1 again and wrote "best iteration 0" over it.
    # The choice reads each iteration's validation predictions (a paired test), the stopping rule the accuracy.
    manifest = _manifest(copy)
    for k in range(done + 1):
        accuracy = 0.25 if k == 0 else 0.5 if k == done else 0.0
        manifest["stages"][f"iter_{k:02d}/evaluate"]["summary"]["accuracy"] = accuracy
        predictions = copy / f"iter_{k:02d}" / "val" / "predictions.jsonl"
        rows = [{**json.loads(line), "correct": k == done} for line in predictions.read_text().splitlines()]
        predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(rows) == 4  # all right against all wrong on 4 items: exact McNemar p = 2/16, kept at alpha 0.2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    args = [a if a != "killed" else "extended" for a in finished_run["args"]]
    proc = undo(*args, "--resume", "--choose-alpha", "0.2", env={"COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = _manifest(copy)
    assert manifest["best_iteration"] == done and json.loads((copy / "summary.json").read_text())["best_iteration"] == done
    assert manifest["stages"][f"{new}/test"]["status"] == "done"  # the best student, tested
    assert all(manifest["stages"][k]["attempts"] == stages[k]["attempts"] for k in stages if k != f"{new}/test")


@pytest.mark.slow
def test_the_hints_of_a_finished_run_work_when_pasted(finished_run):
    """`next: undo report RUN`, the report's own `next:` (the whole run as one page) and the page's (what the chosen
    student changed on test, when it is not the one-shot one), each pasted as printed."""
    from tests.conftest import paste

    report = paste(_hint(finished_run["log"], "next:"), env={"COLUMNS": "400"})
    assert report.returncode == 0 and "val acc" in report.stderr, report.stderr[-2000:]
    page = paste(_hint(report.stderr, "next:"), env={"COLUMNS": "400"})
    assert page.returncode == 0 and (finished_run["run"] / "report.html").is_file(), page.stderr[-2000:]
    if _manifest(finished_run["run"])["best_iteration"]:
        diff = paste(_hint(page.stderr, "next:"), env={"COLUMNS": "400"})
        assert diff.returncode == 0 and "fixed" in diff.stderr, diff.stderr[-2000:]
    else:
        assert "next:" not in page.stderr  # the one-shot student was kept: nothing to compare on test


@pytest.mark.slow
def test_report_on_the_finished_run(finished_run, undo):
    proc = undo("report", finished_run["run"], "--html", finished_run["root"] / "page.html", env={"COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr
    assert "val acc" in proc.stderr and "0 ★" in proc.stderr and "4/4 ref" in proc.stderr
    png = finished_run["run"] / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in proc.stderr.replace("\n", "")
    page = (finished_run["root"] / "page.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "html report written to" in proc.stderr
    # undo diff on the real run: the transitions of iteration 0 -> 1 are those the two files give.
    from tests.test_report_html import _counts, expected_pairs

    diff = undo("diff", finished_run["run"], "0", "1", "--format", "jsonl")
    assert diff.returncode == 0, diff.stderr
    truth = expected_pairs(finished_run["run"])["val 0->1"]
    assert {r["id"]: r["transition"] for r in map(json.loads, diff.stdout.splitlines())} == truth
    assert all(f"{name} {n} " in " ".join(diff.stderr.split()) for name, n in _counts(truth).items())


def _fields(path: Path) -> dict[str, set]:
    """Top-level field names (and the refinement sub-fields) over all records of a JSONL file."""
    keys: set = set()
    sub: set = set()
    for line in _lines(path):
        record = json.loads(line)
        keys |= set(record)
        sub |= set(record.get("refinement") or {})
    return {"fields": keys, "refinement": sub}


def _identity(path: Path, run: Path) -> dict:
    """What produced a stage's output (its <stem>.run.json, or train_run.json), the run folder's path as RUN.

    Digests of input records are left out: those records name the student by its path (the records
    themselves are compared, with RUN for that path)."""
    identity = json.loads(json.dumps(json.loads(path.read_text())["identity"]).replace(str(run), "RUN"))
    return {k: v for k, v in identity.items() if k not in ("errors", "targets", "data_sha256")}


def _records(path: Path, run: Path) -> list[dict]:
    """The records of a JSONL file, the run folder's path as RUN, without the cache flags (`cached`, and lineage's
    `cached` of the row and of each cascade attempt): which run the teacher cache answered depends on test order."""
    def uncached(record: dict) -> dict:
        record.pop("cached", None)
        lineage = record.get("lineage")
        if isinstance(lineage, dict):
            lineage.pop("cached", None)
            for attempt in lineage.get("cascade") or []:
                attempt.pop("cached", None)
        return record

    return [uncached(json.loads(line.replace(str(run), "RUN"))) for line in _lines(path)]


@pytest.mark.slow
def test_bash_script_runs_the_stages_with_the_runs_settings(finished_run, tmp_path):
    """examples/undo_loop.sh given `undo iterate`'s own flags (issue 23): every stage runs with the settings
    `undo iterate` used, not the stages' defaults, and writes the same artifacts."""
    runs = tmp_path / "runs"
    args = list(finished_run["args"][1:])  # iterate's flags, without `iterate`
    args[args.index("--runs-dir") + 1] = str(runs)
    args[args.index("--name") + 1] = "bash"
    args[args.index("--max-iterations") + 1] = "1"  # iterations 0 and 1 are enough to compare
    env = {**os.environ, "UNDO": f"{sys.executable} -m undo_cli"}
    proc = subprocess.run(["bash", str(REPO / "examples" / "undo_loop.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out, run = runs / "bash", finished_run["run"]
    # The settings: each stage's record of what produced its output is the iterate run's.
    for rel in ("iter_00/rationales.run.json", "iter_00/val/predictions.run.json", "iter_01/refined.run.json",
                "iter_01/val/predictions.run.json", "iter_00/test/predictions.run.json",
                "iter_00/student/train_run.json", "iter_01/student/train_run.json"):
        assert _identity(out / rel, out) == _identity(run / rel, run), rel
    train = json.loads((out / "iter_00/student/train_run.json").read_text())["identity"]
    assert train["max_steps"] == 12 and train["lr"] == 3e-3 and train["batch_size"] == 4  # not undo train's defaults
    # The artifacts: the same records (the teacher cache answered the script's teacher calls: `cached` differs).
    for rel in ("iter_00/rationales.jsonl", "iter_00/val/predictions.jsonl", "iter_00/errors.jsonl",
                "iter_01/refined.jsonl", "iter_01/train_data.jsonl", "iter_01/val/predictions.jsonl",
                "iter_01/errors.jsonl", "iter_00/test/predictions.jsonl"):
        assert _records(out / rel, out) == _records(run / rel, run), rel
    for rel in ("iter_00/student/train_summary.json", "iter_01/student/train_summary.json"):
        a, b = (json.loads((p / rel).read_text()) for p in (out, run))
        assert a["steps"] == b["steps"] and a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-5), rel
    assert "val acc" in proc.stderr  # the script ends with `undo report`, which reads its folder
    # An `undo iterate` run folder is not the script's: refused before anything runs.
    same = subprocess.run(["bash", str(REPO / "examples" / "undo_loop.sh"), *finished_run["args"][1:]], env=env,
                          capture_output=True, text=True, timeout=300)
    said = " ".join(same.stderr.split())
    assert same.returncode == 2 and "holds an `undo iterate` run" in said and "--name" in said


# --- settings and the stopping rule, in process (no models) ------------------------------------

def test_bash_script_follows_the_run_layout():
    """examples/undo_loop.sh spells the run folder in bash: the very names of loop/layout.py."""
    import re

    from undo_cli.loop import layout

    code = "\n".join(line for line in (REPO / "examples" / "undo_loop.sh").read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    written = set(re.findall(r'"\$(?:d|prev)/([\w./$]+)"', code))  # every path under an iteration folder
    for path in [w for w in written if w.startswith("$2/")]:  # evaluate(): $2 is the split, val or test
        written |= {path.replace("$2", split) for split in layout.SPLITS}
        written.remove(path)
    expected = {layout.RATIONALES, layout.REFINED, layout.TRAIN_DATA, layout.ERRORS, layout.STUDENT,
                *(f"{split}/{name}" for split in layout.SPLITS for name in (layout.PREDICTIONS, layout.METRICS))}
    assert written == expected
    iteration_format = re.search(r"it\(\) \{ printf '%s/([^']+)'", code).group(1)
    assert all(iteration_format % k == layout.iteration_name(k) for k in (0, 7, 12))


def test_settings_toml_flags_and_stage_tables(tmp_path):
    from undo_cli.errors import UndoError
    from undo_cli.loop.config import IterateConfig
    from undo_cli.loop.settings import resolve

    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", TAUGHT_PROBLEMS[:2]) for split in ("train", "val", "test")}
    toml = tmp_path / "run.toml"
    toml.write_text(f'teacher = "t"\nstudent = "s"\ntrain_file = "{files["train"]}"\nval_file = "{files["val"]}"\n'
                    f'test_file = "{files["test"]}"\nmax_iterations = 5\n[train]\nlr = 1e-5\nepochs = 2\n'
                    '[refine]\nk = 1\n')
    config = resolve(IterateConfig, str(toml), {"max_iterations": 2, "mix": None},
                     ["--train.lr", "3e-5", "--train.lora-r=8", "--train.merge", "--generate.n", "2",
                      "--generate.temperature", "0.7", "--train.lr-scheduler", "linear"])
    assert config.max_iterations == 2 and config.mix == "replace" and config.name == "s-from-t"
    assert config.train == {"lr": 3e-5, "epochs": 2.0, "lora_r": 8, "merge": True, "lr_scheduler": "linear"}
    assert config.settings("train")["seed"] == 0 and config.settings("refine")["k"] == 1
    assert isinstance(config.train["epochs"], float)  # an int in TOML fits a float field

    def error(dotted=(), flags=None, path=str(toml)) -> str:
        with pytest.raises(UndoError) as exc:
            resolve(IterateConfig, path, flags or {}, list(dotted))
        return str(exc.value)

    assert "has no field 'lrr'" in error(["--train.lrr", "1"]) and "did you mean 'lr'" in error(["--train.lrr", "1"])
    assert "set by `undo iterate` itself" in error(["--train.output", "x"])
    assert "expected a number" in error(["--train.lr", "fast"])
    assert "no such option: --max-iteration" in error(["--max-iteration", "3"])
    assert "--mix blend: unknown mix" in error(flags={"mix": "blend"}) and "--mix append" in error(flags={"mix": "blend"})
    bad = tmp_path / "bad.toml"
    bad.write_text('teacher = "t"\nmax_iteratons = 3\n')
    assert "unknown key 'max_iteratons'" in error(path=str(bad))


def _history(*accs, errors=3, n=100):
    """Iterations whose first round(a * n) validation items are right (so a better one gains, never loses)."""
    return [{"accuracy": a, "errors": errors, "outcomes": {f"v{i}": i < round(a * n) for i in range(n)}}
            for a in accs]


def test_stopping_rule():
    from undo_cli.loop.config import IterateConfig
    from undo_cli.loop.rounds import decide

    config = IterateConfig.__new__(IterateConfig)  # the rule reads a few numbers; no files needed
    config.max_iterations, config.patience, config.min_delta = 5, 2, 0.05
    config.choose_alpha, config.choose_min_gain = 0.05, 0.02
    config.stop_rule, config.stop_min_gain_per_ktok = "patience", 0.0
    h = _history

    assert decide(h(0.3), config) == (0, None)
    assert decide(h(0.3, 0.32, 0.33), config)[1] is not None  # +0.03 twice is not a 0.05 gain: patience 2 ran out
    assert decide(h(0.3, 0.4, 0.42), config) == (1, None)     # +10 of 100 is kept; +2 more is no significant gain
    assert decide(h(0.3, 0.4, 0.5), config) == (2, None)      # +10 over the kept one is: the gain clock restarted
    assert decide(h(0.3, 0.4, 0.4, 0.4), config)[0] == 1      # ties keep the earlier iteration
    assert "every validation question" in decide(h(0.3, 1.0, errors=0), config)[1]
    config.max_iterations = 1
    assert "max_iterations" in decide(h(0.3, 0.5), config)[1]


def test_best_iteration_is_a_paired_test_not_the_raw_maximum():
    """39 -> 40 of 90 on the same validation items is a wobble: iteration 0 stays the best (issue 29, item 5)."""
    from undo_cli.loop.choose import choose, describe, mcnemar_exact

    zero = {f"v{i}": i < 39 for i in range(90)}
    wobble = {**zero, "v39": True, "v40": True, "v0": False}  # +2 -1: 40 of 90, the raw maximum
    best, tests = choose([zero, wobble])
    assert best == 0 and tests[0]["gained"] == 2 and tests[0]["lost"] == 1 and tests[0]["p"] == 1.0
    assert "+2/-1 of 90 (+1.1 points), exact McNemar p = 1.000: not kept" in describe(tests[0], 0.05, 0.02)
    clear = {**zero, **{f"v{i}": True for i in range(39, 51)}}  # +12 -0: p = 2 / 2**12
    assert choose([zero, wobble, clear]) == (2, [tests[0], {"iteration": 2, "against": 0, "n": 90, "gained": 12,
                                                           "lost": 0, "gain": 12 / 90, "p": 2 / 4096, "kept": True}])
    assert choose([zero, clear], min_gain=0.2)[0] == 0  # significant but smaller than the minimum effect
    assert mcnemar_exact(0, 0) == 1.0 and abs(mcnemar_exact(8, 1) - 0.0390625) < 1e-12  # 2 * 10/512


def test_the_choice_is_in_the_manifest_table_and_summary(tmp_path, capsys):
    """A constructed run folder (39 -> 40 of 90): manifest-less report keeps iteration 0 and prints the test."""
    from undo_cli.loop import report, run_state
    from undo_cli.records import write_json, write_records

    run = tmp_path / "wobble"
    for k, right in enumerate((range(39), [*range(1, 39), 39, 40])):
        d = run / f"iter_{k:02d}"
        write_records(d / "val" / "predictions.jsonl", [{"id": f"v{i}", "correct": i in right} for i in range(90)])
        write_json(d / "val" / "predictions.metrics.json", {"accuracy": len(right) / 90, "correct": len(right),
                                                            "count": 90})
        write_json(d / "student" / "train_summary.json", {"final_loss": 1.0, "steps": 10})
    state = run_state.collect(run)
    assert state["best_iteration"] == 0 and state["choice"]["tests"][0]["p"] == 1.0
    report.print_table(state)
    err = " ".join(capsys.readouterr().err.split())
    assert "iteration 1 vs 0: +2/-1 of 90 (+1.1 points), exact McNemar p = 1.000: not kept" in err
    summary = run_state.write_summary(run, state)
    assert summary["choice"]["tests"][0]["kept"] is False and summary["best_iteration"] == 0
