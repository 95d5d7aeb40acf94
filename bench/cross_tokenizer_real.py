"""Cross-tokenizer distillation on a real pair: `undo check` and a 2-step `undo train --objective auto`, measured.

    python bench/cross_tokenizer_real.py --teacher TEACHER_FOLDER --student STUDENT_FOLDER
    python bench/cross_tokenizer_real.py --teacher T --student S --baseline-ref main --repeats 2
    python bench/cross_tokenizer_real.py --teacher T --student S --breakdown     # where the memory goes, by phase

Measured on Qwen2.5-Coder-1.5B-Instruct (bf16 folder, vocabulary 151,936) -> SmolLM2-135M-Instruct (fp32,
49,152), both converted from the GGUF files of issue 33 (on the shared 2-core machine run it under
`flock /work/models/.qwen.lock`: one process with the 1.5B teacher at a time).

Each run is the command a user types, in a fresh process, with this checkout's code ("after") and with the code
of --baseline-ref ("before", `git archive` of that commit into a temporary folder, on PYTHONPATH), alternating
(before, after, after, before, ...) so that a change of the machine's load falls on both:

    undo check --teacher T --student S --data examples/arithmetic.jsonl --format json
    undo train --student S --teacher T --objective auto --data examples/arithmetic.jsonl \\
        --rationale-field meta.solution --max-steps 2 --batch-size 4 --output TMP

For each: wall time, peak RSS (the child's ru_maxrss from wait4: exact, whatever happens between samples) and an
RSS timeline sampled every 20 ms from /proc/PID/status, each stderr line stamped with the RSS at that moment
(which phase the peak falls in). From train_summary.json: what `auto` chose and why, the shared vocabulary and
its share of the data's response tokens, tokens/s (transformers' train_runtime: the steps, without loading),
examples trained. From `undo check`: the shared vocabulary.

`--breakdown` runs the same `undo train` in process (one fresh process per code version) with the phases
wrapped: loading the student, loading the teacher, the student's forward, the teacher's forward (with its
continuation log-probs), the chunked loss, backward, the optimizer step, saving. Per phase: RSS before and
after and the peak inside it (VmHWM reset by /proc/self/clear_refs at the phase's start), anonymous and
file-backed RSS apart (a memory-mapped safetensors file counts in RSS while its pages are touched).

Settings fixed before the first run: the commands above, seed 0 (undo train's default), 2 repeats, 20 ms
sampling. Output: a rich table on stderr, JSON in bench/results/cross_tokenizer_real.json with the commits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DATA = "examples/arithmetic.jsonl"
SAMPLE_S = 0.02
GIB = 2 ** 30


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def checkout(ref: str, into: Path) -> str:
    """`git archive` of `ref` extracted into `into` (the committed code only): its commit."""
    commit = git("rev-parse", ref)
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return commit


def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in bytes ({} once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return {}
    return out


def measured(cmd: list[str], env: dict[str, str], cwd: Path) -> dict:
    """Run `cmd`; wall time, exit code, peak RSS (wait4), the RSS timeline and stderr lines with their RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, int]] = []
    lines: list[dict] = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss = _status(proc.pid).get("VmRSS")
            if rss is not None:
                samples.append((time.perf_counter() - start, rss))
            time.sleep(SAMPLE_S)

    def read_stderr():
        for line in proc.stderr:
            at = time.perf_counter() - start
            lines.append({"t": round(at, 3), "rss": _status(proc.pid).get("VmRSS"), "line": line.rstrip()[:300]})

    stdout_box: list[str] = []
    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read_stderr, daemon=True),
               threading.Thread(target=lambda: stdout_box.append(proc.stdout.read()), daemon=True)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    for t in threads:
        t.join(timeout=10)
    peak_t, peak_sampled = max(samples, key=lambda s: s[1]) if samples else (None, None)
    before_peak = [ln for ln in lines if peak_t is not None and ln["t"] <= peak_t]
    return {"cmd": cmd, "rc": proc.returncode, "wall_s": round(wall, 2),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_sampled_at_s": peak_t, "peak_sampled_bytes": peak_sampled,
            "peak_after_line": before_peak[-1]["line"] if before_peak else None,
            "stderr": lines, "stdout": stdout_box[0] if stdout_box else "",
            "timeline": [(round(t, 2), r) for t, r in samples[::5]]}


def undo_env(code: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(code), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("COLUMNS", None)
    return env


def undo_cmd() -> list[str]:
    found = shutil.which("undo")  # the console script a user types; PYTHONPATH picks the code version
    return [found] if found else [sys.executable, "-m", "undo_cli"]


def check_run(args, code: Path) -> dict:
    cmd = undo_cmd() + ["check", "--teacher", args.teacher, "--student", args.student, "--data", DATA,
                        "--format", "json"]
    out = measured(cmd, undo_env(code), REPO)
    try:
        facts = json.loads(out["stdout"].strip().splitlines()[-1])["facts"]["tokenizers"]
    except (ValueError, KeyError, IndexError):
        facts = None
    out["tokenizers"] = facts
    out.pop("stdout")
    return out


def train_run(args, code: Path, workdir: Path) -> dict:
    output = Path(tempfile.mkdtemp(prefix="train-", dir=workdir))
    cmd = undo_cmd() + ["train", "--student", args.student, "--teacher", args.teacher, "--objective", "auto",
                        "--data", DATA, "--rationale-field", "meta.solution", "--max-steps", "2",
                        "--batch-size", "4", "--output", str(output), "--overwrite"]
    out = measured(cmd, undo_env(code), REPO)
    out.pop("stdout")
    summary_file = output / "train_summary.json"
    if summary_file.exists():
        s = json.loads(summary_file.read_text())
        o = s["objective"]
        out["summary"] = {"objective": o["name"], "requested": o.get("requested"), "why": o.get("why"),
                          "shared_vocabulary": o.get("shared_vocabulary"),
                          "shared_token_share": o.get("shared_token_share"), "alignment": o.get("alignment"),
                          "kd_first": o.get("kd_first"), "kd_final": o.get("kd_final"), "ce_first": o.get("ce_first"),
                          "first_loss": s["first_loss"], "final_loss": s["final_loss"],
                          "examples": s["tokens_seen"]["examples"], "tokens": s["tokens_seen"]["all"],
                          "tokens_per_s": s["tokens_per_s"], "train_runtime_s": s["train_runtime_s"],
                          "wall_time_s": s["wall_time_s"]}
    shutil.rmtree(output, ignore_errors=True)
    return out


# --- --breakdown: the phases of one `undo train`, in process -------------------------------------

def breakdown_worker(args) -> dict:
    """Runs in a fresh process with the code version first on sys.path: `undo train` with its phases wrapped."""
    sys.path.insert(0, args.code)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from undo_cli import threads

    threads.configure()
    import torch

    phases: list[dict] = []
    state = {"global_peak": 0, "depth": 0}

    def reset_peak():
        state["global_peak"] = max(state["global_peak"], _status(os.getpid()).get("VmHWM", 0))
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")

    def wrap(owner, attr: str, name):
        original = getattr(owner, attr)

        def wrapper(*a, **k):
            if state["depth"]:  # nested: counted in the outer phase
                return original(*a, **k)
            label = name(*a, **k) if callable(name) else name
            reset_peak()
            before = _status(os.getpid())
            start = time.perf_counter()
            state["depth"] += 1
            try:
                return original(*a, **k)
            finally:
                state["depth"] -= 1
                after = _status(os.getpid())
                state["global_peak"] = max(state["global_peak"], after["VmHWM"])
                phases.append({"phase": label, "rss_before": before["VmRSS"], "peak": after["VmHWM"],
                               "rss_after": after["VmRSS"], "anon_after": after["RssAnon"],
                               "file_after": after["RssFile"], "s": round(time.perf_counter() - start, 3)})

        setattr(owner, attr, wrapper)

    from undo_cli.training import cross_teacher, distill, hf

    wrap(hf, "load_student", "load student")
    wrap(distill, "load_frozen", "load teacher")
    wrap(distill.DistillationLoss, "_student", "student forward (hidden states)")
    wrap(cross_teacher.CrossDistillationLoss, "_live", "teacher forward + its continuation log-probs")
    wrap(cross_teacher, "cross_loss", "chunked loss (value + gradients of the head)")
    wrap(torch.autograd, "backward", "backward")
    wrap(torch.optim.AdamW, "step", "optimizer step")
    wrap(hf, "save", "save")
    from undo_cli.cli.app import main as undo_main

    output = tempfile.mkdtemp(prefix="undo-breakdown-")
    start_status = _status(os.getpid())
    reset_peak()
    try:
        undo_main(["train", "--student", args.student, "--teacher", args.teacher, "--objective", "auto",
                   "--data", DATA, "--rationale-field", "meta.solution", "--max-steps", "2", "--batch-size", "4",
                   "--output", output, "--overwrite"])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        shutil.rmtree(output, ignore_errors=True)
    reset_peak()
    return {"rss_at_start": start_status["VmRSS"], "peak": state["global_peak"], "phases": phases}


def breakdown(args, versions: list[tuple[str, Path, str]]) -> list[dict]:
    rows = []
    for label, code, commit in versions:
        cmd = [sys.executable, __file__, "--breakdown-worker", "--code", str(code), "--teacher", args.teacher,
               "--student", args.student]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=undo_env(code))
        if proc.returncode != 0:
            rows.append({"version": label, "commit": commit, "error": proc.stderr.strip().splitlines()[-5:]})
            continue
        rows.append({"version": label, "commit": commit, **json.loads(proc.stdout.strip().splitlines()[-1])})
    return rows


def print_breakdown(console, rows: list[dict]) -> None:
    from rich.table import Table

    for row in rows:
        if "error" in row:
            console.print(f"[red]{row['version']}: {row['error']}[/red]")
            continue
        table = Table(title=f"{row['version']} ({row['commit'][:10]}): undo train phases, RSS in GiB "
                            f"(start {row['rss_at_start'] / GIB:.2f}, peak {row['peak'] / GIB:.2f})")
        for col in ("phase", "before", "peak inside", "after", "anon / file after", "s"):
            table.add_column(col, justify="left" if col == "phase" else "right")
        for p in row["phases"]:
            table.add_row(p["phase"], f"{p['rss_before'] / GIB:.2f}", f"{p['peak'] / GIB:.2f}",
                          f"{p['rss_after'] / GIB:.2f}", f"{p['anon_after'] / GIB:.2f} / {p['file_after'] / GIB:.2f}",
                          f"{p['s']:.2f}")
        console.print(table)


# --- main -----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="the teacher's model folder (Qwen2.5-Coder-1.5B-Instruct)")
    parser.add_argument("--student", required=True, help="the student's model folder (SmolLM2-135M-Instruct)")
    parser.add_argument("--baseline-ref", default="main", help="the code measured as 'before'")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each command per code version")
    parser.add_argument("--breakdown", action="store_true", help="the phases of one undo train per version instead")
    parser.add_argument("--only", choices=["before", "after"], help="measure one code version only")
    parser.add_argument("--breakdown-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.teacher, args.student = str(Path(args.teacher).resolve()), str(Path(args.student).resolve())
    if args.breakdown_worker:
        print(json.dumps(breakdown_worker(args)))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    workdir = Path(tempfile.mkdtemp(prefix="undo-xtok-real-"))
    try:
        baseline = workdir / "baseline"
        baseline.mkdir()
        base_commit = checkout(args.baseline_ref, baseline)
        head = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        versions = [("before", baseline, base_commit), ("after", REPO, head + ("+dirty" if dirty else ""))]
        versions = [v for v in versions if args.only in (None, v[0])]
        meta = {"teacher": args.teacher, "student": args.student, "baseline_ref": args.baseline_ref,
                "commits": {label: commit for label, _, commit in versions}, "cpus": os.cpu_count(),
                "load_average_start": os.getloadavg(), "repeats": args.repeats}
        if args.breakdown:
            rows = breakdown(args, versions)
            print_breakdown(console, rows)
            meta["load_average_end"] = os.getloadavg()
            _write("cross_tokenizer_real-breakdown.json", {**meta, "versions": rows}, console)
            return
        runs = []
        order = []
        for r in range(args.repeats):
            order += versions if r % 2 == 0 else versions[::-1]
        for label, code, commit in order:
            console.print(f"[dim]{label}: undo check ...[/dim]")
            runs.append({"version": label, "command": "check", **check_run(args, code)})
            console.print(f"[dim]{label}: undo train --objective auto --max-steps 2 --batch-size 4 ...[/dim]")
            runs.append({"version": label, "command": "train", **train_run(args, code, workdir)})
        meta["load_average_end"] = os.getloadavg()
        table = Table(title="undo check / undo train --objective auto --max-steps 2 --batch-size 4 on "
                            f"{Path(args.teacher).name} -> {Path(args.student).name}; load "
                            f"{meta['load_average_start'][0]:.1f} -> {meta['load_average_end'][0]:.1f}")
        for col in ("version", "command", "rc", "wall s", "peak RSS GiB", "peak after (stderr line)",
                    "auto chose", "tokens/s", "examples"):
            table.add_column(col, justify="left" if col in ("version", "command", "peak after (stderr line)",
                                                            "auto chose") else "right")
        for run in runs:
            s = run.get("summary") or {}
            chose = f"{s['objective']} ({s['shared_token_share']:.0%} shared)" if s else (
                f"{run['tokenizers']['shared']} shared" if run.get("tokenizers") else "")
            table.add_row(run["version"], run["command"], str(run["rc"]), f"{run['wall_s']:.1f}",
                          f"{run['peak_rss_bytes'] / GIB:.2f}", (run["peak_after_line"] or "")[:50], chose,
                          f"{s['tokens_per_s']:.1f}" if s else "", str(s.get("examples", "")))
        console.print(table)
        _write("cross_tokenizer_real.json", {**meta, "runs": runs}, console)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _write(name: str, payload: dict, console) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / name
    out.write_text(json.dumps(payload, indent=1) + "\n")
    console.print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
