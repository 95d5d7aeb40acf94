"""`undo iterate --launcher slurm` on a real one-node Slurm cluster (`bash .ci/slurm.sh start`).

The tiny loop of tests/test_iterate.py runs twice: once with `--launcher local`,
once with `--launcher slurm` and 3 shards per generating stage (job arrays,
training as a job, submitted with submitit). While the Slurm run generates, one
shard task is killed with `scancel` as soon as it runs; the controller must
resubmit that shard alone, and every artifact must still be byte-identical to
the local run's. Tests that need the cluster skip with the reason when there is
none; the off-Slurm error needs none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TAUGHT_PROBLEMS, write_jsonl

pytestmark = pytest.mark.slow

# The smallest loop that still refines: iteration 0, then one UNDO iteration (patience 1 stops it).
STAGE_FLAGS = [
    "--generate.prompt", "student", "--generate.max-tokens", "48",
    "--refine.prompt", "student", "--refine.max-tokens", "48", "--refine.per-error", "4",
    "--train.max-steps", "6", "--train.save-steps", "100", "--train.batch-size", "4", "--train.lr", "3e-3",
    "--evaluate.max-tokens", "8",
]
SLURM_FLAGS = ["--launcher", "slurm", "--slurm.shards", "3", "--slurm.poll-s", "0.5", "--slurm.cpus-per-task", "1",
               "--slurm.time-min", "20", "--slurm.max-retries", "1"]


def slurm_up() -> str | None:
    """None when a Slurm controller answers and a node is usable; else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no Slurm on this machine (bash .ci/slurm.sh start installs and starts a one-node cluster)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if out.returncode != 0 or not any(s.strip() in ("idle", "mix", "alloc") for s in out.stdout.split()):
        return f"Slurm is installed but no node is up (sinfo: {out.stdout.strip() or out.stderr.strip()}); " \
               "run bash .ci/slurm.sh start"
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed (pip install 'undo-cli[slurm]')"
    return None


needs_slurm = pytest.mark.skipif(slurm_up() is not None, reason=str(slurm_up()))



@pytest.fixture(scope="module")
def loop_args(tmp_path_factory, tiny_model, trained_teacher) -> dict:
    root = tmp_path_factory.mktemp("slurm")
    problems = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS]
    files = {"train": write_jsonl(root / "train.jsonl", problems[:8]), "val": write_jsonl(root / "val.jsonl", problems[8:]),
             "test": write_jsonl(root / "test.jsonl", problems[6:])}
    args = ["iterate", "--teacher", trained_teacher, "--student", tiny_model, "--train-file", files["train"],
            "--val-file", files["val"], "--test-file", files["test"], "--runs-dir", root / "runs",
            "--max-iterations", "1", "--patience", "1", "--no-cache", *STAGE_FLAGS]
    return {"root": root, "args": [str(a) for a in args], "teacher": trained_teacher, "student": tiny_model}


def _undo(args: list[str], log: Path, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "undo_cli", *args], stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True, env={**os.environ, "COLUMNS": "200", **(env or {})},
                            cwd=REPO, **kw)


def test_launcher_slurm_off_slurm_is_a_clear_error(loop_args, tmp_path):
    # A PATH with python but without sbatch/squeue/srun: what a laptop looks like.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    log = tmp_path / "err.log"
    proc = _undo([*loop_args["args"], "--name", "nowhere", "--launcher", "slurm"], log,
                 env={"PATH": str(bindir)})
    proc.communicate(timeout=120)
    err = log.read_text()
    assert proc.returncode == 2, err
    assert "this machine has no Slurm" in err and "--launcher local" in err and "Traceback" not in err
    assert not (loop_args["root"] / "runs" / "nowhere").exists()  # no run folder left behind


def _manifest(run: Path) -> dict:
    try:
        return json.loads((run / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _queue() -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True)
    return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)


@pytest.fixture(scope="module")
def both_runs(loop_args) -> dict:
    """The loop run locally, and on Slurm with one shard task scancelled while it runs."""
    root = loop_args["root"]
    local = _undo([*loop_args["args"], "--name", "local"], root / "local.log")
    out, _ = local.communicate(timeout=900)
    assert local.returncode == 0, (root / "local.log").read_text()[-4000:]

    run = root / "runs" / "slurm"
    log = root / "slurm.log"
    proc = _undo([*loop_args["args"], "--name", "slurm", *SLURM_FLAGS], log)
    killed = None
    deadline = time.monotonic() + 600
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        tasks = _manifest(run).get("stages", {}).get("iter_00/generate", {}).get("slurm", {}).get("tasks", {})
        job = tasks.get("0", {}).get("job_id")
        if job and _queue().get(job) == "RUNNING":
            subprocess.run(["scancel", job], check=True)
            killed = job
        time.sleep(0.1)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log.read_text()[-4000:]
    assert killed, "never saw shard 0 of iter_00/generate running"
    return {"local": root / "runs" / "local", "slurm": run, "killed": killed, "log": log.read_text(),
            "stdout": out}


ARTIFACTS = ["iter_00/rationales.jsonl", "iter_00/rationales.rejected.jsonl", "iter_00/val/predictions.jsonl",
             "iter_00/val/predictions.metrics.json", "iter_00/errors.jsonl", "iter_01/refined.jsonl",
             "iter_01/train_data.jsonl", "iter_01/val/predictions.jsonl", "iter_01/val/predictions.metrics.json",
             "iter_01/errors.jsonl", "iter_00/test/predictions.jsonl", "iter_00/test/predictions.metrics.json",
             "iter_00/student/model.safetensors", "iter_01/student/model.safetensors"]


@needs_slurm
def test_slurm_loop_writes_the_artifacts_of_the_local_loop(both_runs):
    local, slurm = both_runs["local"], both_runs["slurm"]
    for name in ARTIFACTS:
        assert (local / name).exists(), name
        # Records name the model they came from (a path inside the run folder): the runs differ by name only.
        assert (slurm / name).read_bytes().replace(str(slurm).encode(), str(local).encode()) == \
            (local / name).read_bytes(), name
    manifest = _manifest(slurm)
    assert manifest["status"] == "done" and list(manifest["stages"]) == list(_manifest(local)["stages"])
    gen = manifest["stages"]["iter_00/generate"]
    assert gen["slurm"]["n"] == 3 and set(gen["slurm"]["tasks"]) == {"0", "1", "2"}
    assert manifest["stages"]["iter_00/train"]["slurm"]["tasks"]["0"]["job_id"]
    assert gen["summary"]["kept_total"] == _manifest(local)["stages"]["iter_00/generate"]["summary"]["kept_total"]
    assert json.loads(both_runs["stdout"])["status"] == "done"


@needs_slurm
def test_a_scancelled_shard_is_resubmitted_alone(both_runs):
    tasks = _manifest(both_runs["slurm"])["stages"]["iter_00/generate"]["slurm"]["tasks"]
    assert tasks["0"]["attempts"] == 2 and tasks["0"]["job_id"] != both_runs["killed"]
    assert tasks["1"]["attempts"] == 1 and tasks["2"]["attempts"] == 1  # the others ran once
    assert f"shard 0/3 (job {both_runs['killed']}) left the queue unfinished; resubmitting it" in both_runs["log"]


@needs_slurm
def test_the_loop_as_a_slurm_job_reads_the_runs_settings(loop_args, tmp_path):
    """examples/slurm/loop.sbatch: `undo iterate --launcher slurm` as a Slurm job, given `undo iterate`'s flags (so
    run.toml's settings, not environment variables); the same artifacts as the local loop."""
    out = loop_args["root"] / "runs" / "sbatch-loop"
    env = {**os.environ, "UNDO": f"{sys.executable} -m undo_cli", "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    proc = subprocess.run(["sbatch", "--wait", "--parsable", "--output", str(tmp_path / "loop-%j.out"),
                           str(REPO / "examples" / "slurm" / "loop.sbatch"), *loop_args["args"][1:], "--name",
                           "sbatch-loop", *SLURM_FLAGS, "--max-iterations", "0"], env=env, capture_output=True,
                          text=True, timeout=1200, cwd=REPO)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("loop-*.out"))
    assert proc.returncode == 0, proc.stderr + logs[-4000:]
    manifest = _manifest(out)
    assert manifest["status"] == "done" and len(manifest["stages"]["iter_00/generate"]["slurm"]["tasks"]) == 3
    local = loop_args["root"] / "runs" / "local"
    if (local / "iter_00" / "rationales.jsonl").exists():
        assert (out / "iter_00" / "rationales.jsonl").read_bytes() == (local / "iter_00" / "rationales.jsonl").read_bytes()


@needs_slurm
def test_two_slurm_tasks_train_one_model_with_torchrun_rendezvous(tiny_model, tmp_path):
    """examples/slurm/train.sbatch with 2 tasks: two torchruns meet by c10d rendezvous, as two nodes would (gloo)."""
    from tests.test_train import _rationales

    data = write_jsonl(tmp_path / "rationales.jsonl", _rationales())
    out = tmp_path / "student"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "STUDENT": str(tiny_model), "DATA": str(data), "OUTPUT": str(out), "PROCS_PER_NODE": "1",
           "TRAIN_ARGS": "--epochs 1 --batch-size 4 --logging-steps 1"}
    log = tmp_path / "train.out"
    proc = subprocess.run(["sbatch", "--wait", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={log}",
                           str(REPO / "examples" / "slurm" / "train.sbatch")], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, proc.stderr + text[-4000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2  # one world of two processes, not two separate trainings
    assert summary["steps"] == 16 // (4 * 2)
    assert " ".join(text.split()).count("undo train:") == 1  # one summary table, from the main process
    assert sorted(p.name for p in out.glob("train_summary*")) == ["train_summary.json"]

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


CONTROLLER = """
import sys
from undo_cli.stages.generate import GenerateConfig
from undo_cli.loop.manifest import RunFolder
from undo_cli.stages.slurm import SlurmConfig, SlurmLauncher

run, teacher, train, resume = sys.argv[1:5]
folder = RunFolder.open(run, config={}, inputs={}, seeds={}, resume=resume == "1")
launcher = SlurmLauncher(SlurmConfig(shards=3, poll_s=0.5, cpus_per_task=1, time_min=20), folder)
cfg = GenerateConfig(teacher=teacher, input=train, output=run + "/iter_00/rationales.jsonl", prompt="student",
                     max_tokens=48, cache=False)
folder.step("iter_00/generate", lambda: launcher.run_sharded("iter_00/generate", "generate", cfg),
            outputs={"rationales": cfg.output})
"""


@needs_slurm
def test_a_killed_controller_resumes_waiting_for_its_queued_shards(loop_args, trained_teacher, tmp_path):
    """SIGKILL the controller right after it submitted; the restarted one waits for those jobs, submits none."""
    run = tmp_path / "run"
    args = [sys.executable, "-c", CONTROLLER, str(run), str(trained_teacher), str(loop_args["root"] / "train.jsonl")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    first = subprocess.Popen([*args, "0"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _manifest(run).get("stages", {}).get("iter_00/generate", {}).get("slurm", {}).get("tasks"):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
        time.sleep(0.05)
    first.kill()
    first.wait()
    jobs = {k: t["job_id"] for k, t in _manifest(run)["stages"]["iter_00/generate"]["slurm"]["tasks"].items()}
    assert any(_queue().get(j) in ("PENDING", "RUNNING") for j in jobs.values())  # still in the queue
    second = subprocess.run([*args, "1"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    tasks = _manifest(run)["stages"]["iter_00/generate"]["slurm"]["tasks"]
    assert {k: t["job_id"] for k, t in tasks.items()} == jobs  # nothing resubmitted
    assert all(t["attempts"] == 1 for t in tasks.values())
    assert "already in the queue" in second.stderr and "submitted" not in second.stderr
    assert _manifest(run)["stages"]["iter_00/generate"]["status"] == "done"
    assert (run / "iter_00" / "rationales.jsonl").read_text().count("\n") == 8


TRAINER = """
import sys
from undo_cli.loop.manifest import RunFolder
from undo_cli.stages.slurm import SlurmConfig, SlurmLauncher
from undo_cli.stages.train import TrainConfig

run, student, data = sys.argv[1:4]
folder = RunFolder.open(run, config={}, inputs={}, seeds={}, resume=False)
launcher = SlurmLauncher(SlurmConfig(poll_s=0.5, cpus_per_task=2, time_min=20, train_procs_per_node=2), folder)
cfg = TrainConfig(student=student, data=data, output=run + "/iter_00/student", epochs=1, batch_size=4,
                  logging_steps=1)
folder.step("iter_00/train", lambda: launcher.run_train("iter_00/train", cfg), outputs={"student": cfg.output})
"""


@needs_slurm
def test_launcher_training_job_runs_torchrun_in_the_allocation(tiny_model, tmp_path):
    """`[slurm] train_procs_per_node = 2`: the training job starts torchrun (c10d) itself; one world, one model."""
    from tests.test_train import _rationales

    data = write_jsonl(tmp_path / "rationales.jsonl", _rationales())
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", TRAINER, str(run), str(tiny_model), str(data)],
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "iter_00" / "student" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 16 // (4 * 2)
    stage = _manifest(run)["stages"]["iter_00/train"]
    assert stage["status"] == "done" and stage["slurm"]["tasks"]["0"]["attempts"] == 1

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "iter_00" / "student")


@needs_slurm
def test_the_teacher_budget_holds_across_shards_and_a_resume_with_more_finishes(loop_args, tmp_path):
    """`--launcher slurm` with max_teacher_tokens: the shards together stay within it, a shard stopped by the
    budget is not resubmitted as failed, the stage stops with the reason `budget` and its usage; `--resume`
    with a larger budget (not a different run) finishes it, and the merge writes the stage's ledger."""
    from undo_cli.loop.config import IterateConfig, affected_stages
    from undo_cli.loop.rounds import Loop
    from undo_cli.loop.usage import BudgetReached, record_usage
    from undo_cli.loop.manifest import RunFolder
    from undo_cli.loop.settings import resolve
    from undo_cli.stages.slurm import SlurmConfig, SlurmLauncher

    def loop(budget: int, resume: bool):
        flags = {"teacher": str(loop_args["teacher"]), "student": str(loop_args["student"]),
                 "train_file": str(loop_args["root"] / "train.jsonl"), "val_file": str(loop_args["root"] / "val.jsonl"),
                 "test_file": str(loop_args["root"] / "test.jsonl"), "runs_dir": str(tmp_path), "name": "budget",
                 "cache": False, "max_teacher_tokens": budget, "launcher": "slurm"}
        config = resolve(IterateConfig, None, flags, [*STAGE_FLAGS, *SLURM_FLAGS[2:]])
        folder = RunFolder.open(config.run_dir, config=config.identity(), inputs={}, seeds={}, resume=resume,
                                affects=affected_stages, defaults=config.default_identity())
        return Loop(config, folder, SlurmLauncher(SlurmConfig(**config.slurm), folder)), folder

    budget = 400  # a few of the 8 problems' upper bounds (prompt + 48 completion tokens each): not all of them
    first, folder = loop(budget, resume=False)
    with pytest.raises(BudgetReached):
        first.generate()
    stage = folder.manifest["stages"]["iter_00/generate"]
    shards = sorted((tmp_path / "budget" / "iter_00" / "shards").glob("rationales.*-of-3.usage.json"))
    paid = [json.loads(p.read_text())["paid"]["tokens"] for p in shards]
    assert stage["status"] == "budget" and len(paid) == 3 and 0 < sum(paid) <= budget
    assert stage["summary"]["teacher_usage"]["paid"]["tokens"] == sum(paid)
    assert 0 < stage["summary"]["left_by_budget"] < 8
    assert all(t["attempts"] == 1 for t in stage["slurm"]["tasks"].values())  # stopped, not failed: none resubmitted
    folder._lock_fh.close()

    more, folder = loop(10_000_000, resume=True)  # a larger budget is not another run
    summary = more.generate()
    record_usage(folder)
    merged = json.loads((tmp_path / "budget" / "iter_00" / "rationales.usage.json").read_text())
    paid = sum(json.loads(p.read_text())["paid"]["tokens"] for p in shards)
    assert folder.manifest["stages"]["iter_00/generate"]["status"] == "done" and summary["kept_total"] > 0
    assert merged["paid"]["tokens"] == paid == summary["teacher_usage"]["paid"]["tokens"]
    assert folder.manifest["teacher_usage"]["iterations"][0]["paid"]["tokens"] == paid
    folder._lock_fh.close()
