"""The run folder of `undo iterate`: its manifest, its lock, and what resume may trust.

    runs/NAME/
      manifest.json        config, versions, seeds, input hashes, every stage's status/timings/outputs
      summary.json         per-iteration numbers, the best iteration, test accuracy best vs one-shot
      iter_00/ iter_01/ …  each stage's JSONL, metrics and the trained student (loop/layout.py)

`undo iterate` calls stage `run()` functions; this module is the bookkeeping
around those calls, so that a run killed at any moment can be picked up again
without redoing what finished:

* Every stage is a named step (`iter_01/refine`, `iter_01/train`, …) whose
  status goes pending -> running -> done (or failed). The manifest is written
  atomically (`records.write_json`) before a stage starts and after it ends, so
  on disk it is always one complete version, never a torso.
* `--resume` skips steps marked done and calls every other step again. That is
  safe because each stage resumes by itself: generate/evaluate/refine append to
  an `AppendLog` and skip finished ids, `undo train --resume` continues from its
  last checkpoint (or returns at once when it had finished but the manifest
  never heard), collect-errors and mix rewrite small files atomically.
* The config of a run is part of its identity. Resuming with a different
  config, or with input files whose sha256 changed, would silently mix two
  experiments in one folder, so it is refused with the keys that differ and
  the finished stages they would contradict. A change that only touches
  stages that have not finished (`affects` names them per key) is allowed:
  those stages (re)run with the new settings, from scratch if an earlier
  attempt left partial outputs, and the manifest records the change. A change
  of the stopping rule alone touches no stage, so a finished run can be
  extended with `--resume --max-iterations N`.
* One process per run folder: an advisory lock (`.lock`, flock) refuses a
  second `undo iterate` on the same run; the kernel drops it when the holder
  dies, even by SIGKILL, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from undo_cli.console import compact_summaries, console, warn
from undo_cli.errors import UndoError
from undo_cli.models import library_versions, release_memory
from undo_cli.loop.layout import LOCK, MANIFEST

FORMAT = 1


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def model_fingerprint(model: str) -> dict[str, Any]:
    """What identifies a model: a local folder's config.json hash and file sizes, a GGUF file's sha256, or a hub
    name as given.

    Hashing multi-GB weights on every start would cost minutes; the config plus
    the names and sizes of the files catches a retrained or swapped folder. A GGUF
    file is hashed once per path, size and mtime (undo_cli/gguf_models.py).
    """
    from undo_cli.gguf_models import identity as gguf_identity

    gguf = gguf_identity(model)
    if gguf is not None:
        return gguf
    p = Path(model)
    if not p.is_dir():
        return {"name": model}
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        if f.is_file() and "checkpoints" not in f.relative_to(p).parts:
            h.update(f"{f.relative_to(p)}:{f.stat().st_size}\n".encode())
    config = p / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    return {"path": str(p), "fingerprint": h.hexdigest()}


class RunFolder:
    """runs/NAME with its manifest; `step()` runs one stage with status, timings and skip-if-done."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self._lock_fh = None

    # --- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, config: dict[str, Any], inputs: dict[str, Any],
             seeds: dict[str, Any], resume: bool, overwrite: bool = False,
             affects: Callable[[str], frozenset[str] | set[str]] | None = None,
             defaults: dict[str, Any] | None = None) -> "RunFolder":
        """Create a new run folder, or reopen one with --resume after checking it is the same run.

        overwrite: delete an existing run (a folder holding a manifest) and start over.
        affects: the stage names (`train`, `test`) a config key or input changes; None = every stage.
        defaults: flattened keys -> default values; a key the old manifest lacks (a setting added by a
            later version of undo) that holds its default is no change.
        """
        path = Path(path)
        exists = cls._check_place(path, resume=resume, overwrite=overwrite)
        path.mkdir(parents=True, exist_ok=True)
        folder = cls(path, {})
        folder._lock()  # before deleting anything: never under a run that is still going
        if exists and overwrite:
            folder._delete_run()
            exists = False
        if exists:
            folder._reopen(config, inputs, affects, defaults)
        else:
            if resume:
                warn(f"{path}: nothing to resume yet; starting a new run")
            folder.manifest = {
                "format": FORMAT, "name": path.name, "status": "running", "created": now(), "updated": now(),
                "config": config, "inputs": inputs, "seeds": seeds, "versions": library_versions(),
                "host": {"platform": platform.platform(), "python": sys.executable}, "current": None, "stages": {},
            }
        folder.save()
        return folder

    @staticmethod
    def _check_place(path: Path, *, resume: bool, overwrite: bool) -> bool:
        """Refuse a path that is not (or not yet) a run folder; True when it holds a run."""
        if path.exists() and not path.is_dir():
            raise UndoError(f"{path}: is a file, not a run folder", hint="choose another --name or --runs-dir")
        exists = (path / MANIFEST).is_file()
        if exists and not resume and not overwrite:
            raise UndoError(f"{path}: a run with this name already exists",
                            hint="add --resume to continue it (changed settings are allowed for stages that have "
                                 "not finished), --overwrite to delete it and start over, or pick another --name")
        if not exists and path.is_dir() and any(p.name != LOCK for p in path.iterdir()):
            raise UndoError(f"{path}: the folder exists but holds no {MANIFEST}, so it is not an `undo iterate` run",
                            hint="choose another --name or --runs-dir, or empty the folder yourself")
        return exists

    def _delete_run(self) -> None:
        for child in self.path.iterdir():
            if child.name == LOCK:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        console.print(f"--overwrite: deleted the previous run in {self.path}; starting over")

    def _reopen(self, config: dict[str, Any], inputs: dict[str, Any],
                affects: Callable[[str], frozenset[str] | set[str]] | None, defaults: dict[str, Any] | None) -> None:
        from undo_cli.records import read_json

        self.manifest = read_json(self.path / MANIFEST)
        try:
            self._check_same_run(config, inputs, affects, defaults)
        except BaseException:
            if self._lock_fh is not None:  # refused: let the next attempt lock it at once
                self._lock_fh.close()
            raise
        self._mark_killed_attempts()
        self.manifest["status"] = "running"
        self.manifest["current"] = None
        self.manifest["resumed"] = self.manifest.get("resumed", 0) + 1
        console.print(f"resuming {self.path} (resume #{self.manifest['resumed']})")

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks, one run at a time is on the user
            return
        fh = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise UndoError(f"{self.path}: another `undo iterate` is running on this run right now",
                            hint="wait for it to finish (or stop it), then resume with --resume") from None
        self._lock_fh = fh  # held for the life of the process; the kernel releases it on exit

    def _check_same_run(self, config: dict[str, Any], inputs: dict[str, Any],
                        affects: Callable[[str], frozenset[str] | set[str]] | None = None,
                        defaults: dict[str, Any] | None = None) -> None:
        """Refuse changes that contradict finished stages; rerun the unfinished stages a change touches.

        What counts as a change is undo_cli/identity.py's rule: a key the old manifest lacks holds its default,
        and a key only the old manifest has no longer identifies a run.
        """
        from undo_cli.identity import changes, describe, flatten

        old = self.manifest
        found = changes(old.get("config", {}), config, flatten(defaults or {}))
        found += changes(_hashes(old.get("inputs", {})), _hashes(inputs))
        changed = [(key, line) for (key, _, _), line in zip(found, describe(found))]
        if not changed:
            return
        stages = self.manifest.get("stages", {})
        blocking, rerun = [], []
        for key, line in changed:
            names = affects(key) if affects else None  # None: assume every stage depends on it
            hit = [s for s in stages if names is None or s.partition("/")[2] in names]
            done = [s for s in hit if stages[s].get("status") == "done"]
            if done:
                blocking.append(f"{line} (already used by {', '.join(done[:3])}{', ...' if len(done) > 3 else ''})")
            rerun += [s for s in hit if s not in rerun]
        if blocking:
            shown = "\n  ".join(blocking[:12]) + ("\n  ..." if len(blocking) > 12 else "")
            raise UndoError(f"{self.path}: --resume cannot change settings that finished stages already used:\n  "
                            f"{shown}",
                            hint="resume with the original values (manifest.json, under 'config'), --overwrite to "
                                 "start over, or a new run with another --name")
        lines = [line for _, line in changed]
        console.print("settings changed since the last attempt:\n  " + "\n  ".join(lines), markup=False,
                      highlight=False)
        restarted = []
        for key in rerun:
            if stages[key].get("attempts"):  # partial outputs of the old settings: start that stage afresh
                self._reset_stage(key)
                restarted.append(key)
        if rerun:
            console.print(f"these stages will rerun with the new settings: {', '.join(rerun)}"
                          + (f" ({', '.join(restarted)} from scratch)" if restarted else "")
                          + ", and every stage after them", markup=False, highlight=False)
        else:
            console.print("no finished or started stage depends on them: the run continues with the new settings",
                          highlight=False)
        self.manifest["config"], self.manifest["inputs"] = config, inputs
        self.manifest.setdefault("changes", []).append({"at": now(), "changed": lines, "rerun": rerun})

    def _reset_stage(self, key: str) -> None:
        """Forget an unfinished stage and delete what it wrote (only inside the run folder)."""
        stage = self.manifest["stages"][key]
        root = self.path.resolve()
        from undo_cli.records.sidecars import sidecar_paths

        for value in (stage.get("outputs") or {}).values():
            p = Path(value)
            # An output's sidecars (rejected samples, run record, ledger) belong to it.
            targets = [p] + ([Path(s) for s in sidecar_paths(p)] if p.suffix == ".jsonl" else [])
            for t in targets:
                if not t.exists() or root not in t.resolve().parents:
                    continue
                if t.is_dir():
                    shutil.rmtree(t)
                else:
                    t.unlink()
        stage.update(status="pending", seconds=0.0)
        stage.pop("error", None)
        stage.pop("summary", None)

    def _mark_killed_attempts(self) -> None:
        """A stage still 'running' in the manifest was killed: say so, and it runs again (resuming itself)."""
        for key, stage in self.manifest.get("stages", {}).items():
            if stage.get("status") == "running":
                stage["status"] = "interrupted"
                if stage.get("attempts"):
                    stage["attempts"][-1]["outcome"] = "killed"
                console.print(f"  {key} was interrupted; it resumes where it stopped")

    # --- bookkeeping --------------------------------------------------------------------

    def save(self) -> None:
        from undo_cli.records import write_json

        self.manifest["updated"] = now()
        write_json(self.path / MANIFEST, self.manifest)

    def stage(self, key: str) -> dict[str, Any] | None:
        return self.manifest["stages"].get(key)

    def plan(self, keys: list[str], outputs: dict[str, dict[str, str]]) -> None:
        """Record the stages of an iteration as pending (so a person sees what is coming)."""
        for key in keys:
            self.manifest["stages"].setdefault(key, {"status": "pending", "outputs": outputs.get(key, {}),
                                                     "seconds": 0.0, "attempts": []})
        self.save()

    def step(self, key: str, fn: Callable[[], dict[str, Any]], *, outputs: dict[str, str],
             keep: Callable[[dict[str, Any]], dict[str, Any]] = lambda s: s) -> dict[str, Any]:
        """Run one stage unless it is done: status, timing and the (trimmed) summary go to the manifest.

        keep: picks what of the stage's summary is worth keeping in the manifest.
        """
        stage = self.manifest["stages"].setdefault(key, {"status": "pending", "seconds": 0.0, "attempts": []})
        stage["outputs"] = outputs
        if stage["status"] == "done":
            missing = [p for p in outputs.values() if p and not Path(p).exists()]
            if missing:
                raise UndoError(f"{key} is marked done in {self.path / MANIFEST} but {missing[0]} is gone",
                                hint="restore the file, or start a new run (deleting outputs of a finished stage "
                                     "would make the later stages disagree with it)")
            console.print(f"[dim]{key}: done earlier, skipped[/dim]")
            return stage.get("summary", {})
        iteration, _, name = key.partition("/")
        self.manifest["current"] = {"step": key, "since": now()}
        stage["status"] = "running"
        stage["attempts"].append({"started": now(), "outcome": "running"})
        self.save()
        console.rule(f"[bold]{iteration}[/bold] · {name}")
        started = time.perf_counter()
        try:
            with compact_summaries():  # the loop's table says it after the iteration; one line per stage here
                summary = fn()
        except BaseException as exc:
            seconds = time.perf_counter() - started
            interrupted = isinstance(exc, KeyboardInterrupt)
            # An exception may name its own status: a teacher stage stopped by the budget is "budget", not
            # failed (usage.BudgetReached), and carries the summary of what it finished.
            stage["status"] = "interrupted" if interrupted else getattr(exc, "stage_status", "failed")
            stage["seconds"] = round(stage["seconds"] + seconds, 3)
            stage["attempts"][-1].update(outcome=stage["status"], seconds=round(seconds, 3))
            if getattr(exc, "summary", None) is not None:
                stage["summary"] = keep(exc.summary)
            if not interrupted:
                stage["error"] = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            self.manifest["status"] = stage["status"]
            self.save()
            raise
        finally:
            release_memory()
        seconds = time.perf_counter() - started
        stage.pop("error", None)
        stage.update(status="done", seconds=round(stage["seconds"] + seconds, 3), finished=now(),
                     summary=keep(summary))
        stage["attempts"][-1].update(outcome="done", seconds=round(seconds, 3))
        self.manifest["current"] = None
        self.save()
        return stage["summary"]

    def finish(self, status: str, **fields: Any) -> None:
        self.manifest.update(status=status, finished=now(), **fields)
        self.manifest["current"] = None
        self.save()


def _hashes(inputs: dict[str, Any]) -> dict[str, Any]:
    """The part of `inputs` that identifies them (hashes and fingerprints, not record counts)."""
    return {f"inputs.{name}": v.get("sha256") or v.get("fingerprint") or v.get("name")
            for name, v in inputs.items() if isinstance(v, dict)}
