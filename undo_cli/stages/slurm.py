"""`undo iterate --launcher slurm`: every sharded stage a Slurm job array, training one job, the loop waits.

    undo iterate --config run.toml --launcher slurm            # on a login node, inside tmux/screen
    undo iterate --config run.toml --launcher slurm --resume   # after the controller itself died

run.toml:

    [slurm]
    shards = 16              # tasks per generate/evaluate/refine array (--shard K/16 in task K)
    max_parallel = 8         # at most 8 tasks at once (sbatch --array=0-15%8)
    partition = "gpu"
    account = "my-project"
    time_min = 240
    gpus_per_task = 1        # each shard task loads (or serves) its own copy of the model
    cpus_per_task = 8
    mem_gb = 64
    train_nodes = 1          # training: one job; > 1 node or > 1 GPU runs torchrun under srun
    train_gpus_per_node = 8
    max_retries = 2          # a failed or preempted shard is resubmitted alone, at most this often
    setup = ["source ~/venvs/undo/bin/activate"]
    sbatch = { qos = "high", constraint = "h100" }   # any other sbatch option

What runs where. The controller (`undo iterate`, light: no model) keeps the
run folder, submits, polls `squeue` and merges. `generate`, `evaluate` (val and
test) and `refine` run as one array per stage: task K runs the stage's own
`run()` with `--shard K/N` into `iter_NN/shards/<name>.K-of-N.jsonl`, and when
all N are complete the controller merges them (`undo merge`, stages/shards.py)
into exactly the file a local run writes. `train` is one job. `mix` and
`collect-errors` are a few seconds of JSON and run in the controller.

Jobs are submitted with submitit (https://github.com/facebookincubator/submitit):
it writes the sbatch script, pickles the call, and keeps each task's logs under
`runs/NAME/slurm/`. Their state is read with `squeue` and the shard's own
completion marker (its `.shard.json` sidecar says `complete`), not with
submitit's watcher: that one asks `sacct`, which needs Slurm's accounting
daemon, and many clusters (and CI) run without it. A task that has left the
queue without completing its shard (failed, cancelled, preempted, timed out,
node failure) is resubmitted alone, up to `max_retries` times; the shard resumes
where it stopped (AppendLog), so nothing is generated twice.

The manifest records each shard's job id and attempts. A controller that dies
(SIGKILL, a lost ssh session) is restarted with `--resume`: finished shards are
kept, shards whose job is still queued or running are waited for, the rest are
resubmitted.

The teacher budget (`max_teacher_tokens`, `max_cost` of the run, loop/usage.py)
is shared out among a teacher stage's shards: each may spend, on its own ledger,
what it has spent so far plus an equal share of what the stage has left, so the
shards together never exceed it. A teacher cascade's own budget per tier
(`[[teachers]]` max_teacher_tokens / max_cost) is shared out the same way, from
that tier's row of the shards' ledgers (`allowances`). A shard the budget stops says so in its
sidecar and is not resubmitted as if it had failed; once every shard is complete
or stopped, the stage returns what they spent and how many items are left
(`left_by_budget`), and `undo iterate` stops with the reason `budget`. A resume
with a larger budget gives the stopped shards their new shares.

What a task runs, what counts as the stage's items and what the summary of its
merged shards is comes from the stage's StageSpec (stages/spec.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.console import console, warn
from undo_cli.economy.cascade import BUDGET_KEYS
from undo_cli.errors import UndoError

# squeue states after which a task will not write anything more.
_ALIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
          "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "PREEMPTED"}


@dataclass
class SlurmConfig:
    """The [slurm] table of run.toml (`undo iterate --launcher slurm`)."""

    shards: int = field(default=4, metadata={"help": "Tasks per sharded stage (job array size N; task K runs --shard K/N)."})
    max_parallel: int | None = field(default=None, metadata={"help": "At most this many tasks of an array at once (sbatch --array=...%M)."})
    partition: str | None = field(default=None, metadata={"help": "sbatch --partition."})
    account: str | None = field(default=None, metadata={"help": "sbatch --account."})
    time_min: int = field(default=240, metadata={"help": "sbatch --time, in minutes, per task and for training."})
    gpus_per_task: int = field(default=0, metadata={"help": "GPUs for each shard task (sbatch --gpus-per-node)."})
    cpus_per_task: int | None = field(default=None, metadata={"help": "sbatch --cpus-per-task for every job."})
    mem_gb: float | None = field(default=None, metadata={"help": "sbatch --mem, in GB, for every job."})
    train_nodes: int = field(default=1, metadata={"help": "Nodes for the training job (> 1: torchrun rendezvous under srun)."})
    train_gpus_per_node: int = field(default=0, metadata={"help": "GPUs per node for training (> 1: one torchrun process each)."})
    train_procs_per_node: int | None = field(default=None, metadata={
        "help": "Training processes per node (default: train_gpus_per_node, at least 1); e.g. 2 for a gloo test on CPUs."})
    max_retries: int = field(default=2, metadata={"help": "Resubmit a failed or preempted shard (alone) at most this often."})
    poll_s: float = field(default=10.0, metadata={"help": "Seconds between two looks at the queue."})
    setup: list[str] = field(default_factory=list, metadata={"help": "Shell lines run before each task (module load, venv activation)."})
    sbatch: dict[str, Any] = field(default_factory=dict, metadata={"help": "Any other sbatch options, e.g. {qos = \"high\", constraint = \"h100\"}."})

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise UndoError(f"slurm.shards = {self.shards}: must be at least 1")
        if self.max_parallel is not None and self.max_parallel < 1:
            raise UndoError(f"slurm.max_parallel = {self.max_parallel}: must be at least 1")
        if self.max_retries < 0 or self.train_nodes < 1 or self.time_min < 1 or self.poll_s <= 0:
            raise UndoError("slurm: max_retries must be >= 0, train_nodes >= 1, time_min >= 1 and poll_s > 0")
        if not isinstance(self.sbatch, dict):
            raise UndoError("slurm.sbatch must be a table of sbatch options", hint='sbatch = { qos = "high" }')

    @property
    def train_procs(self) -> int:
        return self.train_procs_per_node or max(1, self.train_gpus_per_node)


def check_slurm() -> None:
    """`--launcher slurm` needs sbatch and a controller that answers; say so plainly otherwise."""
    missing = [c for c in ("sbatch", "squeue", "srun") if shutil.which(c) is None]
    if missing:
        raise UndoError(f"--launcher slurm: this machine has no Slurm ({', '.join(missing)} not found on PATH)",
                        hint="run `undo iterate` on a Slurm login node, or use --launcher local (the default)")
    try:
        subprocess.run(["squeue", "-h", "-o", "%i", "--me"], check=True, capture_output=True, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        err = getattr(exc, "stderr", b"") or b""
        raise UndoError(f"--launcher slurm: the Slurm controller does not answer (squeue: "
                        f"{err.decode(errors='replace').strip() or exc})",
                        hint="check `sinfo`; or use --launcher local") from None
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UndoError("--launcher slurm needs the submitit package",
                        hint="pip install 'undo-cli[slurm]' (or pip install submitit)") from None


def queue_states() -> dict[str, str] | None:
    """job id (array tasks as '12_3') -> state, for this user's jobs Slurm still knows; None if squeue failed."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "--me", "-o", "%i|%T"], capture_output=True, text=True,
                             timeout=120)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:  # a busy controller: unknown, not "everything died"; the next poll asks again
        return None
    states = {}
    for line in out.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job:
            states[job] = state
    return states


# --- what the tasks run (imported by submitit on the compute node) ---------------------------------


def run_shard(stage: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One shard task: the stage's own run() with --shard K/N (settings holds every config field)."""
    from undo_cli.stages.spec import stage as spec_of

    spec = spec_of(stage)
    return _plain(spec.run(spec.config(**settings)))


def run_train(settings: dict[str, Any], nnodes: int, nproc: int, port: int) -> dict[str, Any]:
    """The training job: train.run() in one process, or torchrun on every node of the allocation."""
    from undo_cli.stages import train

    if nnodes * nproc == 1:
        return _plain(train.run(train.TrainConfig(**settings)))
    import submitit

    env = submitit.JobEnvironment()
    spec = Path(settings["output"]).with_name(Path(settings["output"]).name + ".train.json")
    if env.global_rank == 0:
        from undo_cli.records import atomic_write_text

        atomic_write_text(spec, json.dumps(settings))  # atomic: the other nodes may read it the moment it exists
    else:  # the other nodes wait for the spec (a shared file system, as submitit itself needs)
        while not spec.exists():
            time.sleep(0.5)
    # One torchrun per node; the c10d rendezvous on the first node joins them (docs/scale.md).
    # c10d assigns the node ranks, so every task runs the same command.
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint={env.hostnames[0]}:{port}", f"--rdzv-id={env.job_id}",
           "-m", "undo_cli.stages.slurm", "train", str(spec)]
    subprocess.run(cmd, check=True)
    summary = Path(settings["output"]) / "train_summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {}


def _plain(summary: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(summary, default=str))  # picklable and small: no config objects, no Paths


# --- the controller side -------------------------------------------------------------------------------


def allowances(config: Any, parts: list[Path], complete: list[bool]) -> list[dict[str, Any]]:
    """Each shard's share of a teacher stage's budget, as the limits of its own ledger (which counts every run of
    that shard): what it has spent so far plus an equal share of what the stage has left. The shares add up to
    the stage's budget, so N shards never spend N times it. The same for each cascade tier's own budget
    (economy/cascade.py), from that tier's row of the shards' ledgers, under `tiers`. The form is what a shard
    the budget stopped records (`TeacherEconomy.limits`). No budget: no limits ({})."""
    tiers = own_budgets_of(config)
    limits = {name: getattr(config, name, None) for name in BUDGET_KEYS}
    if all(value is None for value in limits.values()) and not tiers:
        return [{} for _ in parts]
    from undo_cli.economy.accounting import read_ledger
    from undo_cli.records.sidecars import USAGE, sidecar_path

    ledgers = [read_ledger(sidecar_path(p, USAGE)) or {} for p in parts]
    open_shards = max(1, sum(not c for c in complete))

    def shares(limit: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """rows: per shard, the ledger (or its row of one tier) that the limit counts."""
        spent = {"max_teacher_tokens": [(r.get("paid") or {}).get("tokens", 0) for r in rows],
                 "max_cost": [r.get("cost") or 0.0 for r in rows]}
        out: list[dict[str, Any]] = [{} for _ in parts]
        for name in BUDGET_KEYS:
            left = None if limit[name] is None else max(0, limit[name] - sum(spent[name]))
            share = None if left is None else (left // open_shards if name == "max_teacher_tokens" else left / open_shards)
            for k in range(len(parts)):
                out[k][name] = None if share is None else spent[name][k] + (0 if complete[k] else share)
        return out

    out = shares(limits, ledgers)
    for tier, limit in tiers.items():
        rows = [((d.get("by_backend") or {}).get(tier) or {}) for d in ledgers]
        for k, share in enumerate(shares(limit, rows)):
            out[k].setdefault("tiers", {})[tier] = share
    return out


def own_budgets_of(config: Any) -> dict[str, dict[str, Any]]:
    """A stage config's cascade tiers that have their own budget (economy/cascade.py), by name, sorted."""
    from undo_cli.economy.cascade import own_budgets

    return dict(sorted(own_budgets(getattr(config, "cascade", None)).items()))


def budget_settings(config: Any, budget: dict[str, Any]) -> dict[str, Any]:
    """The config fields that give a shard its share (`allowances`): the output's budget, and the cascade's
    values with each tier's share as that tier's own budget."""
    if not budget:
        return {}
    from undo_cli.economy.cascade import with_budgets

    out = {name: budget[name] for name in BUDGET_KEYS}
    if budget.get("tiers"):
        out["cascade"] = with_budgets(config.cascade, budget["tiers"])
    return out



class SlurmLauncher:
    """Submits a run's stages to Slurm and waits for them; state lives in the run's manifest."""

    def __init__(self, config: SlurmConfig, folder):
        self.c = config
        self.folder = folder
        self.logs = folder.path / "slurm"

    def _executor(self, name: str, **overrides: Any):
        import submitit

        # max_num_timeout=0: submitit does not requeue by itself; the loop resubmits (bounded) instead.
        ex = submitit.SlurmExecutor(folder=str(self.logs / name / "%j"), max_num_timeout=0)
        params: dict[str, Any] = {"job_name": f"undo-{self.folder.path.name}-{name}", "time": self.c.time_min}
        for key, value in (("partition", self.c.partition), ("account", self.c.account),
                           ("cpus_per_task", self.c.cpus_per_task)):
            if value is not None:
                params[key] = value
        if self.c.mem_gb is not None:
            params["mem"] = f"{int(self.c.mem_gb * 1024)}MB"
        if self.c.setup:
            params["setup"] = list(self.c.setup)
        if self.c.sbatch:
            params["additional_parameters"] = {str(k).replace("-", "_"): v for k, v in self.c.sbatch.items()}
        params.update(overrides)
        ex.update_parameters(**params)
        return ex

    # One sharded stage ------------------------------------------------------------------------------

    def run_sharded(self, key: str, stage: str, config: Any) -> dict[str, Any]:
        """All N shards of `config` (an unsharded config of stage `stage`, writing config.output), then the merge.

        A teacher stage's budget (config.max_teacher_tokens / max_cost: what is left of the run's) is shared
        out among the shards (`_allowances`). When the budget stops shards, nothing is merged: the summary
        says how many items are left (`left_by_budget`) and what the shards spent, and a later call with
        more budget resumes them.
        """
        import dataclasses

        from undo_cli.stages import shards
        from undo_cli.stages.spec import stage as spec_of

        spec, n = spec_of(stage), self.c.shards
        out = Path(config.output)
        parts = [out.parent / "shards" / f"{out.name[: -len('.jsonl')]}.{k}-of-{n}.jsonl" for k in range(n)]
        expected = json.loads(json.dumps(shards.shard_meta(spec, shards.Shard(0, n), config)["settings"], default=str))
        sidecars = [self._sidecar(part, k, expected) for k, part in enumerate(parts)]
        budgets = allowances(config, parts, [bool(m and m.get("complete")) for m in sidecars])
        settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        per_shard = [{**settings, "output": str(p), "shard": f"{k}/{n}", **budget_settings(config, budgets[k]),
                      **({"metrics": None} if "metrics" in settings else {})} for k, p in enumerate(parts)]

        def outcome(k: int) -> str | None:
            """complete, budget (stopped by the budget it was given now), or None: not finished."""
            meta = self._sidecar(parts[k], k, expected)
            if meta and meta.get("complete"):
                return "complete"
            stopped = meta and meta.get("stopped") == "budget" and meta.get("budget") == budgets[k]
            return "budget" if stopped else None

        stage_state = self.folder.stage(key)
        state = stage_state.setdefault("slurm", {})
        if state.get("n") != n:
            state.clear()
            state.update(n=n, tasks={})
        self._wait(key, n, state["tasks"], outcome, lambda ks: self._submit_shards(spec.name, key, ks, per_shard))
        stopped = [k for k in range(n) if outcome(k) == "budget"]
        if stopped:
            return self._stopped_summary(config, parts, stopped)
        merged = shards.merge(shards.MergeConfig(output=str(out), shards=[str(p) for p in parts],
                                                 metrics=getattr(config, "metrics", None)))
        summary: dict[str, Any] = {"shards": merged["shards"], "merge_s": merged["wall_s"]}
        if spec.merged_summary is not None:
            summary.update(spec.merged_summary(config, merged))
        if "teacher_usage" in merged:
            summary.update(teacher_usage=merged["teacher_usage"], left_by_budget=0)
        return summary

    @staticmethod
    def _sidecar(part: Path, k: int, expected: dict[str, Any]) -> dict[str, Any] | None:
        """Shard k's sidecar when it belongs to this run (same settings, same k), else None."""
        from undo_cli.stages import shards

        meta = shards.read_sidecar(part) if part.exists() else None
        return meta if meta and meta.get("k") == k and meta.get("settings") == expected else None

    @staticmethod
    def _stopped_summary(config: Any, parts: list[Path], stopped: list[int]) -> dict[str, Any]:
        """The summary of a stage whose shards the budget stopped: items left, and what the shards spent."""
        from undo_cli.economy.accounting import sum_ledgers
        from undo_cli.records.sidecars import USAGE, sidecar_path
        from undo_cli.stages import shards

        left = sum(int((shards.read_sidecar(parts[k]) or {}).get("left_by_budget") or 0) for k in stopped)
        usage = sum_ledgers([sidecar_path(p, USAGE) for p in parts])
        return {"shards": len(parts), "left_by_budget": max(1, left), "stopped_shards": len(stopped),
                **({"teacher_usage": usage} if usage else {}),
                "budget": {"max_teacher_tokens": config.max_teacher_tokens, "max_cost": config.max_cost,
                           "stopped": True, "items_left": left}}

    def _submit_shards(self, stage: str, key: str, ks: list[int], per_shard: list[dict[str, Any]]) -> dict[int, str]:
        params: dict[str, Any] = {}
        if self.c.gpus_per_task:
            params["gpus_per_node"] = self.c.gpus_per_task
        if self.c.max_parallel:
            params["array_parallelism"] = self.c.max_parallel
        ex = self._executor(key.replace("/", "-"), **params)
        jobs = ex.map_array(run_shard, [stage] * len(ks), [per_shard[k] for k in ks])
        return {k: job.job_id for k, job in zip(ks, jobs)}

    def _wait(self, key: str, n: int, tasks: dict[str, dict[str, Any]], finished, submit) -> None:
        """Submit what is neither finished nor queued, resubmit what left the queue unfinished, until all finished.

        finished(k): what shard k ended with (complete, stopped by the budget), or None while it has not.
        """
        first = True
        while True:
            states = queue_states()
            if states is None:
                time.sleep(self.c.poll_s)
                continue
            done = [k for k in range(n) if finished(k)]
            todo = []
            for k in range(n):
                if k in done:
                    continue
                task = tasks.get(str(k))
                if task and states.get(task["job_id"]) in _ALIVE:
                    continue  # queued or running (after a controller restart too): wait for it
                if task and task.get("attempts", 0) > self.c.max_retries:
                    what = f"shard {k}/{n}" if n > 1 else "the job"
                    raise UndoError(f"{key}: {what} failed {task['attempts']} times (last job "
                                    f"{task['job_id']}){self._last_error(task)}",
                                    hint=f"read {task.get('log')}; fix the cause, then `undo iterate ... --resume` "
                                         "(finished shards are kept)")
                if task:
                    what = f"shard {k}/{n}" if n > 1 else "the job"
                    warn(f"{key}: {what} (job {task['job_id']}) left the queue unfinished; resubmitting it "
                         f"(attempt {task['attempts'] + 1} of {self.c.max_retries + 1})")
                todo.append(k)
            if todo:
                ids = submit(todo)
                for k, job_id in ids.items():
                    old = tasks.get(str(k), {})
                    tasks[str(k)] = {"job_id": job_id, "attempts": old.get("attempts", 0) + 1,
                                     "log": str(self._log(key, job_id)), "submitted": time.strftime("%H:%M:%S")}
                self.folder.save()
                console.print(f"{key}: submitted " + (", ".join(f"shard {k}/{n} (job {ids[k]})" for k in todo)
                                                      if n > 1 else f"job {ids[0]}"))
            elif len(done) == n:
                for k in done:
                    if str(k) in tasks:
                        tasks[str(k)]["state"] = str(finished(k))
                self.folder.save()
                return
            elif first:
                console.print(f"{key}: waiting for {n - len(done)} of {n} task(s) already in the queue")
            first = False
            time.sleep(self.c.poll_s)

    def _log(self, key: str, job_id: str) -> Path:
        return self.logs / key.replace("/", "-") / job_id / f"{job_id}_0_log.err"

    @staticmethod
    def _last_error(task: dict[str, Any]) -> str:
        log = Path(task.get("log") or "")
        if log.is_file():
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            if lines:
                return f": {lines[-1][:300]}"
        return ""

    # Training -----------------------------------------------------------------------------------------

    def run_train(self, key: str, config: Any) -> dict[str, Any]:
        """One job (several nodes/GPUs through torchrun under srun); resubmitted like a shard when it dies."""
        import dataclasses
        import random

        settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        out = Path(config.output)
        nnodes, nproc = self.c.train_nodes, self.c.train_procs
        params: dict[str, Any] = {"nodes": nnodes, "ntasks_per_node": 1}
        if self.c.train_gpus_per_node:
            params["gpus_per_node"] = self.c.train_gpus_per_node
        port = 29500 + random.Random(str(out)).randrange(2000)

        def complete(_k: int) -> str | None:
            return "complete" if (out / "train_summary.json").is_file() and self._result_ok(key) else None

        def submit(_ks: list[int]) -> dict[int, str]:
            job = self._executor(key.replace("/", "-"), **params).submit(run_train, settings, nnodes, nproc, port)
            return {0: job.job_id}

        state = self.folder.stage(key).setdefault("slurm", {"n": 1, "tasks": {}})
        self._wait(key, 1, state["tasks"], complete, submit)
        return json.loads((out / "train_summary.json").read_text())

    def _result_ok(self, key: str) -> bool:
        """The training job's submitit result says success (a summary alone could be a stale one)."""
        task = (self.folder.stage(key).get("slurm") or {}).get("tasks", {}).get("0")
        if not task:
            return False
        result = self.logs / key.replace("/", "-") / task["job_id"] / f"{task['job_id']}_0_result.pkl"
        if not result.is_file():
            return False
        import pickle

        with result.open("rb") as fh:
            outcome, _ = pickle.load(fh)
        return outcome == "success"


def _main(argv: list[str]) -> None:
    """`python -m undo_cli.stages.slurm train SPEC.json`: what torchrun starts on each node of a training job."""
    if len(argv) != 2 or argv[0] != "train":
        sys.exit("usage: python -m undo_cli.stages.slurm train SPEC.json")
    from undo_cli.stages import train

    train.run(train.TrainConfig(**json.loads(Path(argv[1]).read_text())))


if __name__ == "__main__":
    _main(sys.argv[1:])
