"""Guidance for a newcomer's first hour: what to run next, how to resume, what a typo means, which settings apply.

In process where the point is a config decision (`undo iterate`'s checks, dry
run and resume rules, model paths); through the CLI where the point is what a
person sees (`--version`, `-h`, the "next:" line, a stopped iterate).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import TAUGHT_PROBLEMS, write_jsonl
from undo_cli.errors import UndoError

WIDE = {"COLUMNS": "400"}


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    rows = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS[:2]]
    return {split: str(write_jsonl(tmp_path / f"{split}.jsonl", rows)) for split in ("train", "val", "test")}


def _config(files, tmp_path, dotted=(), toml: str | None = None, origins=None, **flags):
    from undo_cli.loop.config import IterateConfig
    from undo_cli.loop.settings import resolve

    base = {"teacher": "org/teacher", "student": "org/student", "train_file": files["train"],
            "val_file": files["val"], "test_file": files["test"], "runs_dir": str(tmp_path / "runs"), "name": "r"}
    return resolve(IterateConfig, toml, {**base, **flags}, list(dotted), origins)


# --- 13.7: every table checked before any work, in config-key terms ---------------------------------

def test_a_bad_stage_value_stops_iterate_before_any_work_naming_the_config_key(files, tmp_path):
    from undo_cli.loop.iterate import run

    config = _config(files, tmp_path, ["--train.lr", "-1.0"])
    with pytest.raises(UndoError) as exc:
        run(config)
    assert exc.value.message.startswith("train.lr -1.0: must be positive")
    assert "--lr" not in exc.value.message
    assert not (tmp_path / "runs").exists()  # no run folder: nothing to resume, nothing blocks a re-run

    for dotted, key in ((["--refine.k", "-1"], "refine.k"), (["--generate.keep", "some"], "generate.keep"),
                        (["--evaluate.max-tokens", "0"], "evaluate.max_tokens"),
                        (["--collect-errors.max", "0"], "collect_errors.max"),
                        (["--train.template", "nosuch"], "train.template")):
        with pytest.raises(UndoError) as exc:
            run(_config(files, tmp_path, dotted))
        assert key in exc.value.message, (dotted, exc.value.message)
    assert not (tmp_path / "runs").exists()


# --- 12.6: --dry-run --------------------------------------------------------------------------------

def test_dry_run_shows_every_key_with_its_source_and_the_plan(files, tmp_path, capsys):
    from dataclasses import fields

    from undo_cli.loop.plan import dry_run
    from undo_cli.stages.train import TrainConfig

    toml = tmp_path / "run.toml"
    toml.write_text("patience = 2\n[train]\nepochs = 3\n")
    origins: dict[str, str] = {}
    config = _config(files, tmp_path, ["--train.lr", "3e-5"], toml=str(toml), origins=origins, max_iterations=1)
    shown = dry_run(config, origins)
    out = capsys.readouterr().err
    assert origins["train.lr"] == "flag" and origins["max_iterations"] == "flag"
    assert origins["patience"] == "file" and origins["train.epochs"] == "file"
    assert "verify" not in origins and shown["settings"]["verify"] == "strict"
    # every key: the loop's own and each train field the loop does not set itself
    assert {f"train.{f.name}" for f in fields(TrainConfig)} - {"train.student", "train.data", "train.output",
                                                                 "train.resume", "train.overwrite",
                                                                 "train.trust_remote_code"} <= set(shown["settings"])
    stages = [row[0] for row in shown["plan"]]
    assert stages[:5] == ["iter_00/cluster", "iter_00/generate", "iter_00/train", "iter_00/evaluate",
                          "iter_00/collect_errors"]
    assert "iter_01/refine" in stages and "iter_02/refine" not in stages
    assert "train.lr" in out and "flag" in out and "file" in out and "default" in out
    assert not (tmp_path / "runs").exists()  # nothing created, no model loaded (the models do not even exist)


# --- 12.6 / 13.7: resuming with changed settings --------------------------------------------------------

def _open(tmp_path, config, resume=True, overwrite=False):
    from undo_cli.loop.config import affected_stages
    from undo_cli.loop.manifest import RunFolder

    return RunFolder.open(tmp_path / "run", config=config, inputs={}, seeds={}, resume=resume,
                          overwrite=overwrite, affects=affected_stages)


def _stage(folder, key, status, output=None):
    outputs = {}
    if output:
        path = folder.path / output
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial\n")
        outputs = {"out": str(path)}
    folder.manifest["stages"][key] = {"status": status, "outputs": outputs, "seconds": 1.0,
                                      "attempts": [{"outcome": status}]}


def test_resume_reruns_unfinished_stages_whose_settings_changed_and_refuses_finished_ones(tmp_path, capsys):
    original = {"max_iterations": 1, "generate": {"n": 1}, "train": {"lr": -1.0}}
    folder = _open(tmp_path, original, resume=False)
    _stage(folder, "iter_00/generate", "done", "iter_00/rationales.jsonl")
    _stage(folder, "iter_00/train", "failed", "iter_00/student/weights.bin")
    folder.finish("failed")
    folder._lock_fh.close()

    # train.lr only touches iter_00/train, which failed: allowed, and it restarts from scratch.
    fixed = {**original, "train": {"lr": 2e-5}}
    folder = _open(tmp_path, fixed)
    err = capsys.readouterr().err
    assert "train.lr: was -1.0, now 2e-05" in err and "iter_00/train" in err
    assert folder.manifest["stages"]["iter_00/train"]["status"] == "pending"
    assert not (folder.path / "iter_00/student/weights.bin").exists()
    assert (folder.path / "iter_00/rationales.jsonl").exists()  # the teacher's work is kept
    assert folder.manifest["config"] == fixed and folder.manifest["changes"][-1]["rerun"] == ["iter_00/train"]
    folder._lock_fh.close()

    # generate.n would contradict the finished generation: refused, naming the key and the stage.
    with pytest.raises(UndoError) as exc:
        _open(tmp_path, {**fixed, "generate": {"n": 4}})
    assert "generate.n: was 1, now 4" in exc.value.message and "iter_00/generate" in exc.value.message

    # A finished run with only the stopping rule changed: allowed (it continues with more rounds).
    folder = _open(tmp_path, fixed)
    _stage(folder, "iter_00/train", "done")
    folder.finish("done")
    folder._lock_fh.close()
    folder = _open(tmp_path, {**fixed, "max_iterations": 3})
    assert folder.manifest["config"]["max_iterations"] == 3 and folder.manifest["status"] == "running"
    folder._lock_fh.close()


def test_resume_refuses_a_split_that_changed_under_a_finished_stage(tmp_path, files):
    """The manifest keeps the sha256 of each split it read (issue 32: `undo data import` can re-split a folder a
    run was made on): a resume after the validation file changed is refused, naming it."""
    from undo_cli.loop.config import affected_stages
    from undo_cli.loop.manifest import RunFolder
    from undo_cli.records import sha256_file

    def inputs():
        return {split: {"path": files[split], "sha256": sha256_file(files[split])} for split in ("train", "val", "test")}

    folder = RunFolder.open(tmp_path / "run", config={"a": 1}, inputs=inputs(), seeds={}, resume=False)
    _stage(folder, "iter_00/evaluate", "done")
    folder.save()
    folder._lock_fh.close()
    write_jsonl(files["val"], [{"id": "other", "question": "q", "answer": "1"}])  # re-split under the run
    with pytest.raises(UndoError) as exc:
        RunFolder.open(tmp_path / "run", config={"a": 1}, inputs=inputs(), seeds={}, resume=True,
                       affects=affected_stages)
    assert "inputs.val" in exc.value.message and "iter_00/evaluate" in exc.value.message


def test_an_existing_run_says_resume_or_overwrite_and_overwrite_starts_over(tmp_path):
    folder = _open(tmp_path, {"a": 1}, resume=False)
    _stage(folder, "iter_00/generate", "done", "iter_00/rationales.jsonl")
    folder.save()
    folder._lock_fh.close()
    with pytest.raises(UndoError) as exc:
        _open(tmp_path, {"a": 1}, resume=False)
    assert "already exists" in exc.value.message and "--resume" in exc.value.hint and "--overwrite" in exc.value.hint
    folder = _open(tmp_path, {"a": 2}, resume=False, overwrite=True)
    assert folder.manifest["stages"] == {} and folder.manifest["config"] == {"a": 2}
    assert not (folder.path / "iter_00").exists()
    folder._lock_fh.close()


def test_a_failed_iterate_says_how_to_resume(files, tmp_path, tiny_model, capsys):
    from undo_cli.loop.iterate import run

    # The untrained tiny model as teacher verifies nothing: iteration 0 stops with "nothing to train on".
    config = _config(files, tmp_path, ["--generate.max-tokens", "4"], teacher=str(tiny_model),
                     student=str(tiny_model))
    with pytest.raises(UndoError, match="no verified rationale"):
        run(config)
    err = capsys.readouterr().err
    assert "Continue with:" in err and "--resume" in err
    assert json.loads((tmp_path / "runs" / "r" / "manifest.json").read_text())["status"] == "failed"

    # Run by `undo demo`, the loop says the demo's own command (issue 32: it said `undo iterate ... --resume`).
    from undo_cli.demo import DemoConfig, resume_command

    demo = resume_command(DemoConfig(workdir=str(tmp_path / "my demo"), seed=2, max_iterations=1))
    assert demo == f"undo demo --workdir '{tmp_path / 'my demo'}' --seed 2 --max-iterations 1 --resume"
    assert resume_command(DemoConfig()) == "undo demo --resume"
    with pytest.raises(UndoError, match="no verified rationale"):
        run(config, resume=True, resume_with=demo)
    assert f"Continue with: {demo}" in " ".join(capsys.readouterr().err.split())


# --- 12.6: model names that are typos, hubs that cannot be reached ----------------------------------------

def test_a_misspelt_model_folder_fails_at_once_with_the_nearest_one(tmp_path, monkeypatch):
    from undo_cli.stages.evaluate import EvaluateConfig
    from undo_cli.stages.generate import GenerateConfig
    from undo_cli.stages.train import TrainConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "teacher").mkdir(parents=True)
    for build, flag in ((lambda m: GenerateConfig(teacher=m, input="in.jsonl"), "--teacher"),
                        (lambda m: EvaluateConfig(model=m, input="in.jsonl"), "--model"),
                        (lambda m: TrainConfig(student=m, data="d.jsonl", output="out"), "--student")):
        with pytest.raises(UndoError) as exc:
            build("./models/teachr")
        assert exc.value.message == f"{flag} ./models/teachr: no such model folder"
        assert "did you mean ./models/teacher?" in exc.value.hint
    with pytest.raises(UndoError, match="no such model folder") as exc:
        GenerateConfig(teacher="models/teachr", input="in.jsonl")  # models/ exists: a path, not a hub name
    GenerateConfig(teacher="Qwen/Qwen2.5-0.5B-Instruct", input="in.jsonl")  # a hub name: checked when loaded
    GenerateConfig(teacher="./models/teacher", input="in.jsonl")
    GenerateConfig(teacher="./served-name", input="in.jsonl", backend="openai")  # the server's name


def test_an_unreachable_hub_is_one_clear_line(monkeypatch):
    from undo_cli.model_refs import check_hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UndoError) as exc:
        check_hub_reachable("someorg/not-cached-model", "--model")
    assert "--model someorg/not-cached-model: not a local folder, and the Hugging Face Hub" in exc.value.message
    assert "cannot be reached" in exc.value.message
    # the CLI huggingface_hub ships today is `hf` (huggingface-cli is gone from it)
    assert "`hf download someorg/not-cached-model --local-dir not-cached-model`" in exc.value.hint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_hub_reachable("someorg/not-cached-model", "--model")  # offline: transformers' own cache lookup decides


# --- 12.6: --limit, --version, -h, the next command ---------------------------------------------------------

def test_limit_takes_the_first_n_problems(files, tmp_path, tiny_model):
    from undo_cli.stages.evaluate import EvaluateConfig, run

    out = tmp_path / "preds.jsonl"
    summary = run(EvaluateConfig(model=str(tiny_model), input=files["val"], output=str(out), max_tokens=2, limit=1))
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [TAUGHT_PROBLEMS[0]["id"]]
    assert summary["metrics"]["count"] == 1
    with pytest.raises(UndoError, match="--limit 0"):
        EvaluateConfig(model=str(tiny_model), input=files["val"], limit=0)


@pytest.mark.slow
def test_version_and_short_help(undo):
    proc = undo("--version")
    assert proc.returncode == 0
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names[:3] == ["undo", "torch", "transformers"] and "cuda" in names
    for args in (["-h"], ["evaluate", "-h"], ["iterate", "-h"], ["data", "import", "-h"]):
        proc = undo(*args)
        assert proc.returncode == 0 and "Usage:" in proc.stdout, args


def test_a_next_line_is_complete_or_absent(tmp_path, tiny_model, tiny_teacher):
    """No placeholder ever (issue 32): a step that needs what the command never saw is not printed; what the files
    say is filled in (the errors' student -> the data it trained on -> the teacher that wrote it); a next step
    inside a run folder goes where `undo iterate` puts it. tests/test_hints.py runs every one."""
    from types import SimpleNamespace as C

    from undo_cli.guidance import next_command
    from undo_cli.prompts import TRAINING_FORMAT

    for stage, config in (("data", None), ("generate", C(output="out/rationales.jsonl")),
                          ("train", C(output="out/student", student="s", val_data=None)),
                          ("mix", C(output="out/train_data.jsonl")), ("iterate", None)):
        assert next_command(stage, config, {"splits": {"train": {"path": "data/train.jsonl"}}}) is None, stage
    assert next_command("evaluate", C(output="out/val/predictions.jsonl")) == (
        "undo collect-errors out/val/predictions.jsonl --output out/val/errors.jsonl")
    assert next_command("evaluate", C(output="runs/r/iter_02/val/predictions.jsonl")) == (
        "undo collect-errors runs/r/iter_02/val/predictions.jsonl --output runs/r/iter_02/errors.jsonl")
    assert next_command("evaluate", C(output="-")) is None and next_command("evaluate", C(output="/dev/null")) is None
    assert next_command("refine", C(output="runs/r/iter_01/refined.jsonl", targets="runs/r/iter_00/rationales.jsonl")) == (
        "undo mix --base runs/r/iter_00/rationales.jsonl --refined runs/r/iter_01/refined.jsonl "
        "--output runs/r/iter_01/train_data.jsonl")
    assert next_command("iterate", None, {"run_dir": "runs/x"}) == "undo report runs/x"

    # collect-errors -> refine: the teacher and targets from the files, refined.jsonl in the next iteration's folder
    run = tmp_path / "runs" / "r"
    rationales = write_jsonl(run / "iter_00" / "rationales.jsonl", [{**TAUGHT_PROBLEMS[0], "id": "p00#0",
                                                                     "problem_id": "p00", "teacher": str(tiny_teacher),
                                                                     "backend": "hf"}])
    student = run / "iter_00" / "student"
    student.mkdir()
    (student / TRAINING_FORMAT).write_text(json.dumps({"data": str(rationales)}))
    errors = write_jsonl(run / "iter_00" / "errors.jsonl", [{**TAUGHT_PROBLEMS[1], "output": "#### 1", "predicted": "1",
                                                             "correct": False, "model": str(student),
                                                             "error_type": "wrong_answer"}])
    assert next_command("collect-errors", C(output=str(errors)), {"errors": 1}) == (
        f"undo refine --teacher {tiny_teacher} --errors {errors} --targets {rationales} "
        f"--output {run / 'iter_01' / 'refined.jsonl'}")
    assert next_command("collect-errors", C(output=str(errors)), {"errors": 0}) is None  # nothing to refine
    (student / TRAINING_FORMAT).unlink()  # a link missing: no guess
    assert next_command("collect-errors", C(output=str(errors)), {"errors": 1}) is None

    # check: rationales train, problems are answered by the teacher first
    check = C(teacher=str(tiny_teacher), student=str(tiny_model), teacher_url=None, objective=None, data="d.jsonl")
    assert next_command("check", check, {"trainable": True}) == (
        f"undo train --student {tiny_model} --teacher {tiny_teacher} --objective auto --data d.jsonl --output student")
    assert next_command("check", check, {"trainable": False}) == (
        f"undo generate --teacher {tiny_teacher} --input d.jsonl --output rationales.jsonl")


def test_a_setting_added_by_a_later_version_at_its_default_is_no_change(tmp_path, files):
    """A run made before `verify` existed resumes: its manifest lacks the key, which holds its default."""
    from undo_cli.loop.config import affected_stages
    from undo_cli.loop.manifest import RunFolder

    config = _config(files, tmp_path)
    new = config.identity()
    old = {k: v for k, v in new.items() if k != "verify"}
    old["evaluate"] = {k: v for k, v in new["evaluate"].items() if k != "limit"}
    folder = RunFolder.open(tmp_path / "old", config=old, inputs={}, seeds={}, resume=False)
    _stage(folder, "iter_00/evaluate", "done")
    folder.save()
    folder._lock_fh.close()
    folder = RunFolder.open(tmp_path / "old", config=new, inputs={}, seeds={}, resume=True,
                            affects=affected_stages, defaults=config.default_identity())
    folder._lock_fh.close()
    with pytest.raises(UndoError, match="verify: was unset, now 'flexible'"):
        RunFolder.open(tmp_path / "old", config={**new, "verify": "flexible"}, inputs={}, seeds={}, resume=True,
                       affects=affected_stages, defaults=config.default_identity())
