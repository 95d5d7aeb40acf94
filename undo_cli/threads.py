"""How many CPU threads torch and BLAS use: decided in one place, before torch loads.

    from undo_cli import threads
    threads.configure()          # cli/app.py, for every command, before any stage imports torch
    threads.fit(model)           # models.load_pretrained, once a model's size is known

Why it matters: a CPU run of torch is a team of OpenMP threads that wait for
each other at every operation. GNU OpenMP's default makes a waiting thread
spin, so on a machine shared with other jobs a spinning thread burns the core
its team-mate needs: the same `undo demo` used 122 s of CPU on 2 idle cores
and 749 s beside other test runs (load 4), and with 2 threads a tiny model's
training step took 3x longer than with 1. Three decisions, each overridable by
exporting the variable yourself (an exported value is never changed):

* `OMP_WAIT_POLICY=PASSIVE`: waiting threads sleep instead of spinning. Set in
  the environment before torch is imported (OpenMP reads it once, at start),
  so child processes (a vLLM worker, `transformers serve`) inherit it.
* `OMP_NUM_THREADS` (and MKL's, OpenBLAS's): the CPUs this process may
  really use, not `os.cpu_count()` (the whole machine): its affinity mask
  (`taskset`, Slurm, cpusets) and its cgroup's CPU quota (`docker --cpus`,
  Kubernetes limits; cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`).
* the work's size (`fit`): a small model's matrices are too small to split —
  below about `PARAMS_PER_THREAD` parameters per thread, a second thread adds
  synchronisation, not speed (bench/demo.py measures the demo both ways) — so
  torch gets one thread per `PARAMS_PER_THREAD` parameters, at least one, at
  most what `configure` allowed. A GPU run is untouched (its CPU threads only feed it).

Limits: the quota is read once at start; a machine whose load changes later
is not re-measured; an exported `OMP_NUM_THREADS` wins even where it is larger
than the CPUs available (the user asked for it).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Parameters per torch thread below which another thread does not pay (measured on the demo's models, see docstring).
PARAMS_PER_THREAD = 1_000_000
_CGROUP = Path("/sys/fs/cgroup")
_PROC_CGROUP = Path("/proc/self/cgroup")


def _quota_v2(relative: str) -> float | None:
    """CPUs allowed by cgroup v2's cpu.max ("max 100000" = no limit) along this process's cgroup path."""
    folder, best = _CGROUP / relative.lstrip("/"), None
    for path in [folder, *folder.parents]:
        text = _read(path / "cpu.max")
        if text and not text.startswith("max"):
            quota, period = (float(x) for x in text.split()[:2])
            best = min(best or math.inf, quota / period)
        if path == _CGROUP:
            break
    return best


def _quota_v1() -> float | None:
    """CPUs allowed by cgroup v1's cfs quota (-1 = no limit)."""
    quota, period = _read(_CGROUP / "cpu" / "cpu.cfs_quota_us"), _read(_CGROUP / "cpu" / "cpu.cfs_period_us")
    if quota and period and int(quota) > 0 and int(period) > 0:
        return int(quota) / int(period)
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def cpu_quota() -> float | None:
    """The cgroup CPU quota of this process in CPUs (e.g. 1.5), or None when there is none."""
    for line in (_read(_PROC_CGROUP) or "").splitlines():
        if line.startswith("0::"):  # cgroup v2: "0::/the/path"
            return _quota_v2(line[3:])
    return _quota_v1()


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by its cgroup quota (rounded up, at least 1)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota - 1e-9)))
    return max(1, count)


def configure(environ: dict[str, str] | None = None) -> int:
    """Set the OpenMP/BLAS variables that are not set yet; returns the thread count in force.

    Call before torch is imported (later, OpenMP has already read them). Cheap: no import of torch.
    """
    env = os.environ if environ is None else environ
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    count = env.get("OMP_NUM_THREADS") or str(usable_cpus())
    for var in THREAD_VARS:
        env.setdefault(var, count)
    try:
        return max(1, int(count))
    except ValueError:  # a malformed user value: OpenMP ignores it too
        return usable_cpus()


def for_size(params: int, allowed: int) -> int:
    """Threads for a model of `params` parameters when `allowed` may be used: one per PARAMS_PER_THREAD, 1..allowed."""
    return max(1, min(allowed, math.ceil(params / PARAMS_PER_THREAD)))


def fit(model) -> int:
    """Set torch's thread count to what a model of this size can use (CPU models only); returns it.

    Up or down: in one process (`undo iterate`) a tiny student may follow a larger teacher.
    """
    import torch

    try:
        if next(model.parameters()).device.type != "cpu":
            return torch.get_num_threads()
        params = sum(p.numel() for p in model.parameters())
    except (AttributeError, StopIteration, TypeError):
        return torch.get_num_threads()
    wanted = for_size(params, configure())  # configure(): the allowed count (sets nothing already set)
    if wanted != torch.get_num_threads():
        torch.set_num_threads(wanted)
    return wanted
