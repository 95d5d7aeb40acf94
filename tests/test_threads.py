"""undo_cli/threads.py: the CPUs a process may use (affinity, cgroup quota), what configure() sets and never
overrides, and the thread count a model's size gets."""

from __future__ import annotations

import os

import pytest

from undo_cli import threads


@pytest.fixture
def cgroup(tmp_path, monkeypatch):
    """A fake /sys/fs/cgroup and /proc/self/cgroup: write(v2_path=..., files={relative: text})."""
    root, proc = tmp_path / "cgroup", tmp_path / "proc-cgroup"
    root.mkdir()
    monkeypatch.setattr(threads, "_CGROUP", root)
    monkeypatch.setattr(threads, "_PROC_CGROUP", proc)

    def write(proc_text: str, files: dict[str, str]) -> None:
        proc.write_text(proc_text)
        for relative, text in files.items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_text(text)

    return write


def test_cgroup_v2_quota_is_the_tightest_along_the_path(cgroup):
    cgroup("0::/job/step\n", {"cpu.max": "max 100000\n", "job/cpu.max": "300000 100000\n",
                              "job/step/cpu.max": "150000 100000\n"})
    assert threads.cpu_quota() == 1.5


def test_cgroup_v2_without_a_limit_and_v1_quota(cgroup):
    cgroup("0::/free\n", {"free/cpu.max": "max 100000\n"})
    assert threads.cpu_quota() is None
    cgroup("4:cpu,cpuacct:/\n", {"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert threads.cpu_quota() == 0.5
    cgroup("4:cpu,cpuacct:/\n", {"cpu/cpu.cfs_quota_us": "-1\n"})
    assert threads.cpu_quota() is None


def test_usable_cpus_is_affinity_capped_by_the_quota_rounded_up(cgroup, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    cgroup("0::/\n", {"cpu.max": "250000 100000\n"})
    assert threads.usable_cpus() == 3  # 2.5 CPUs of quota: a third thread still gets half a core
    cgroup("0::/\n", {"cpu.max": "20000 100000\n"})
    assert threads.usable_cpus() == 1  # never 0
    cgroup("0::/\n", {"cpu.max": "max 100000\n"})
    assert threads.usable_cpus() == 4


def test_configure_sets_passive_waiting_and_the_count_but_never_overrides(cgroup, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    cgroup("0::/\n", {"cpu.max": "200000 100000\n"})
    env: dict[str, str] = {}
    assert threads.configure(env) == 2
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                   "OPENBLAS_NUM_THREADS": "2"}
    mine = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "7"}
    assert threads.configure(mine) == 7  # what the user exported wins, and the BLAS ones follow it
    assert mine["OMP_WAIT_POLICY"] == "ACTIVE" and mine["MKL_NUM_THREADS"] == "7"


def test_a_model_gets_threads_by_its_size():
    assert threads.for_size(300_000, allowed=2) == 1  # the demo's tiny models: a second thread does not pay
    assert threads.for_size(threads.PARAMS_PER_THREAD * 3, allowed=2) == 2  # never more than allowed
    assert threads.for_size(0, allowed=4) == 1


def test_fit_sets_torch_threads_up_and_down(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    try:
        assert threads.fit(torch.nn.Linear(10, 10)) == 1 and torch.get_num_threads() == 1
        big = torch.nn.Linear(1, threads.PARAMS_PER_THREAD * 2)  # 4M parameters, no compute
        assert threads.fit(big) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_command_line_configures_threads_for_every_command(undo_here, monkeypatch):
    """main() sets the variables before the command runs, so a stage that imports torch finds them set."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    env["OMP_NUM_THREADS"] = "1"  # as the test suite runs (conftest): kept
    monkeypatch.setattr(os, "environ", env)
    code, _ = undo_here("--help")
    assert code == 0 and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "1"
