"""A practical teacher on a few CPU cores: the real Qwen2.5-Coder-1.5B-Instruct through every route, side by side.

    python bench/teacher_speed.py                                  # every arm (~30 min on 2 idle cores)
    python bench/teacher_speed.py --arms hf-fp32,llamacpp          # some arms (the baseline always runs)
    python bench/teacher_speed.py --arms llamacpp,vllm-server      # the two servers, beside the baseline
    python bench/teacher_speed.py --resume --arms hf-fp32,llamacpp,vllm-server   # these again, the others kept
    python bench/teacher_speed.py --gguf FILE.gguf --folder DIR    # other files of the same model

Every arm generates greedily, MAX_TOKENS new tokens, for the same prompts: the first
problems of examples/arithmetic.jsonl rendered by `undo generate`'s own prompt
(prompts/generate.jinja) and the model's chat template. "1 seq" runs SINGLE
prompts one after another; "batch 8" sends BATCH prompts at once (one generate call
of 8 rows for transformers and vLLM; 8 concurrent requests to a server). The
baseline, transformers fp32 one sequence at a time (the `hf` backend's CPU
default), is measured in the same run (or kept, with its own commit and load
average, by --resume). The transformers arms share one process and one load
(fp32, then the same weights cast to bf16, then back to fp32 and quantized);
llama.cpp and vLLM run in processes of their own. Peak RSS is measured per arm
while it generates (VmHWM reset before each; for a server or vLLM's engine, the
largest process of the tree). Every arm holds /work/models/.qwen.lock while the
model is in memory (machines shared by several users of the 1.5B model take turns).

Arms:
  hf-fp32     transformers through the `hf` backend, float32 (the CPU default)
  hf-bf16     the same weights cast to bfloat16
  hf-int8     float32 weights, then torch.ao.quantization.quantize_dynamic on every nn.Linear (int8 weights,
              activations quantized per batch at run time)
  llamacpp    llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`, from the llama-cpp-python
              source package built on this machine, in its own venv: --llamacpp-python) on the .gguf file
              itself (Q4_K_M), talked to through the `openai` backend, as `undo generate --backend openai`
  vllm        vLLM's CPU build (.venv-vllm, .ci/vllm-venv.sh) in process on the converted folder
  vllm-server the same build's OpenAI-compatible server (`vllm serve FOLDER`, bf16, --max-model-len 2048,
              VLLM_CPU_KVCACHE_SPACE=2) on the converted folder, talked to through the `openai` backend
              like llamacpp

Measured per arm: load seconds, generated tokens, tokens/s (wall), CPU seconds per token (all the
arm's processes: for a server, the server's CPU while it generated), peak RSS. Prints a table on
stderr and writes bench/results/teacher_speed.json (the commit, the load average before and after
each arm, the texts).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
GGUF = "/work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
FOLDER = "/work/models/hf/qwen2.5-coder-1.5b-instruct"
LOCK = "/work/models/.qwen.lock"
LLAMACPP_PYTHON = "/work/venv-llamacpp/bin/python"
SERVED_NAME = "qwen2.5-coder-1.5b-instruct"  # the model name a server arm answers to
# Fixed before the first run: small enough that the slowest arm (fp32, ~0.5 tokens/s on 2 cores, much less on
# a machine shared with other jobs) finishes in minutes; greedy, so every arm computes the same thing.
MAX_TOKENS = 24
SINGLE = 1           # prompts run one after another (tokens/s of one sequence)
BATCH = 8            # prompts sent at once
ARMS = ("hf-fp32", "hf-bf16", "hf-int8", "vllm", "llamacpp", "vllm-server")


def prompts(count: int) -> list[list[dict]]:
    """The first `count` problems of examples/arithmetic.jsonl as `undo generate` renders them."""
    from undo_cli.stages.generate import build_items

    problems = [json.loads(line) for line in (REPO / "examples" / "arithmetic.jsonl").read_text().splitlines()[:count]]
    return [item.messages for item in build_items(problems, "generate", [])]


# -- process accounting from /proc (stdlib only: the vLLM venv has no psutil) -----------------------

def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu(pid: int) -> float:
    """User+system CPU seconds of a process and its living descendants."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for p in _tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def tree_peak_rss_gb(pid: int) -> float:
    """The largest VmHWM (peak resident set) among a process and its living descendants, GB."""
    best = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]))
    return round(best / 2**20, 2)


@contextlib.contextmanager
def qwen_lock():
    """The machine's turn-taking lock for the 1.5B model (flock(2), the same lock as `flock LOCK cmd`)."""
    with open(LOCK, "a") as handle:
        t = time.perf_counter()
        fcntl.flock(handle, fcntl.LOCK_EX)
        waited = time.perf_counter() - t
        if waited > 1:
            print(f"  (waited {waited:.0f} s for {LOCK})", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tokens(results) -> int:
    return sum(c.completion_tokens for per_prompt in results for c in per_prompt)


def _timed(pid: int, fn):
    """Run fn(); wall seconds and the CPU seconds of process `pid`'s tree while it ran."""
    cpu, t = tree_cpu(pid), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t, tree_cpu(pid) - cpu


def _phases(llm, sampling, pid: int, single_one_by_one: bool = True) -> dict:
    """Warm-up, then SINGLE prompts one at a time, then BATCH prompts in one call, on backend `llm`."""
    ps = prompts(BATCH)
    from undo_cli.backends import SamplingConfig

    llm.generate(ps[:1], SamplingConfig(max_tokens=4))  # warm-up: lazy imports, allocator, kernels
    out = {}
    single, s_wall, s_cpu = _timed(pid, lambda: [llm.generate([p], sampling)[0] for p in ps[:SINGLE]])
    batched, b_wall, b_cpu = _timed(pid, lambda: llm.generate(ps, sampling))
    for name, res, wall, cpu in (("single", single, s_wall, s_cpu), ("batch", batched, b_wall, b_cpu)):
        tok = _tokens(res)
        out[name] = {"prompts": len(res), "tokens": tok, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                     "tok_s": round(tok / wall, 3), "cpu_s_per_token": round(cpu / tok, 3),
                     "texts": [c[0].text for c in res]}
    return out


# -- workers: each arm's model lives in a process of its own ------------------------------------------

HF_ARMS = ("hf-fp32", "hf-bf16", "hf-int8")


def _rss_now_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 2**20, 2)
    return 0.0


def _reset_peak() -> None:
    """Linux: make VmHWM (peak RSS) start again from the current RSS (`5` to /proc/self/clear_refs)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def worker_hf(arms: list[str], folder: str, out_file: str) -> None:
    """The hf arms in one process, one load: fp32, then the same weights cast to bf16, then back to fp32 (the
    folder holds bf16 weights, so nothing is lost) and quantized to int8. Peak RSS is measured per arm while it
    generates (VmHWM reset before each), and the load's own peak separately."""
    from undo_cli import threads

    threads.configure()
    import torch

    from undo_cli.backends import BackendConfig, SamplingConfig, open_backend

    t = time.perf_counter()
    out = {}
    with open_backend(BackendConfig(backend="hf", model=folder, dtype="float32", batch_size=BATCH)) as llm:
        load_s = time.perf_counter() - t
        load_peak = tree_peak_rss_gb(os.getpid())
        for arm in HF_ARMS:
            if arm not in arms:
                continue
            t = time.perf_counter()
            if arm == "hf-bf16":
                llm.hf_model = llm.hf_model.to(torch.bfloat16)
            elif arm == "hf-int8":
                llm.hf_model = llm.hf_model.to(torch.float32)
                llm.hf_model = torch.ao.quantization.quantize_dynamic(llm.hf_model, {torch.nn.Linear},
                                                                      dtype=torch.qint8, inplace=True)
            convert_s = time.perf_counter() - t
            _reset_peak()
            res = _phases(llm, SamplingConfig(max_tokens=MAX_TOKENS), os.getpid())
            res.update(load_s=round(load_s + convert_s, 1), load_peak_rss_gb=load_peak,
                       peak_rss_gb=tree_peak_rss_gb(os.getpid()), rss_after_gb=_rss_now_gb(),
                       torch_threads=torch.get_num_threads())
            out[arm] = res
            Path(out_file).write_text(json.dumps(out))  # after each arm: a timeout keeps the finished ones


def worker_vllm(folder: str, out_file: str) -> None:
    from undo_cli import threads

    threads.configure()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache: 8 x (prompt + 32) tokens need far less
    from undo_cli.backends import BackendConfig, SamplingConfig, open_backend

    t = time.perf_counter()
    with open_backend(BackendConfig(backend="vllm", model=folder, dtype="bfloat16", max_model_len=1024)) as llm:
        load_s = time.perf_counter() - t
        res = _phases(llm, SamplingConfig(max_tokens=MAX_TOKENS), os.getpid())
        res["peak_rss_gb"] = tree_peak_rss_gb(os.getpid())  # vLLM's engine runs in a child process
    res["load_s"] = round(load_s, 1)
    Path(out_file).write_text(json.dumps(res))


def run_worker(python: str, args: list[str], timeout: float, partial: bool = False) -> dict:
    """This script as a worker in a fresh process (under `python`), with wall/CPU/peak RSS from wait4."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        log = Path(tmp) / "log"
        with log.open("w") as sink:
            proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", *args, "--worker-out",
                                     str(out)], env=env, stdout=sink, stderr=sink)
            try:
                _, status, usage = _wait4(proc, timeout)
            except TimeoutError:
                proc.kill()
                proc.wait()
                failed = {"error": f"timed out after {timeout:.0f} s", "log": log.read_text()[-3000:]}
                return {**json.loads(out.read_text()), **failed} if partial and out.exists() else failed
        if os.waitstatus_to_exitcode(status) != 0 or not out.exists():
            failed = {"error": f"exit code {os.waitstatus_to_exitcode(status)}", "log": log.read_text()[-3000:]}
            return {**json.loads(out.read_text()), **failed} if partial and out.exists() else failed
        res = json.loads(out.read_text())
        if partial:
            return res
    res.setdefault("peak_rss_gb", round(usage.ru_maxrss / 2**20, 2))
    res["process_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
    return res


def _wait4(proc, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return pid, status, usage
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llamacpp_command(python: str, gguf: str, port: int, threads: int) -> list[str]:
    """The documented server command (README): all usable cores, one slot per concurrent request."""
    return [python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096",
            "--model_alias", SERVED_NAME]


def llamacpp_ready(python: str, wait_s: float) -> bool:
    """Whether llama_cpp.server imports under `python`, polling up to wait_s seconds (a build still running)."""
    deadline = time.monotonic() + wait_s
    while not Path(python).is_file() or subprocess.run([python, "-c", "import llama_cpp.server"],
                                                       capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(20)
    return True


def arm_llamacpp(python: str, gguf: str, timeout: float) -> dict:
    """llama.cpp's server on the .gguf, driven through the `openai` backend (concurrency 1, then 8)."""
    from undo_cli import threads

    if not llamacpp_ready(python, 0):
        return {"error": f"no llama_cpp.server under {python} (pip install 'llama-cpp-python[server]' there)"}
    cores = threads.usable_cpus()
    return served_arm(lambda port: llamacpp_command(python, gguf, port, cores), {}, timeout,
                      server_threads=cores, command=" ".join(llamacpp_command("python", "MODEL.gguf", 8080, cores)))


def vllm_serve_command(python: str, folder: str, port: int) -> list[str]:
    """`vllm serve FOLDER` as the module entry point (the console script of vllm-cpu 0.32.0 looks up the
    distribution `vllm`, which is installed as `vllm-cpu`, and exits); bf16 weights, 2048 positions."""
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "2048",
            "--served-model-name", SERVED_NAME]


VLLM_SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}  # GiB of KV cache: 8 x (prompt + 24) tokens need far less


def arm_vllm_server(python: str | None, folder: str, timeout: float) -> dict:
    """vLLM's CPU build serving the converted folder (`vllm serve`), driven through the `openai` backend."""
    if python is None:
        return {"error": "no vLLM venv (.ci/vllm-venv.sh)"}
    env = " ".join(f"{k}={v}" for k, v in VLLM_SERVER_ENV.items())
    return served_arm(lambda port: vllm_serve_command(python, folder, port), VLLM_SERVER_ENV, timeout,
                      command=f"{env} " + " ".join(vllm_serve_command("python", "FOLDER", 8000)))


def served_arm(start, env: dict, timeout: float, **facts) -> dict:
    """A server started by start(port) (a command line) with `env` added, on 127.0.0.1, driven through the
    `openai` backend (concurrency 1, then BATCH); its CPU and peak RSS are its whole process tree's."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    t = time.perf_counter()
    server = subprocess.Popen(start(port), stdout=log, stderr=log, env={**os.environ, **env}, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        while True:
            if server.poll() is not None:
                return {"error": f"server exited {server.returncode}", "log": Path(log.name).read_text()[-3000:]}
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/models", timeout=2).read()
                break
            if time.perf_counter() - t > timeout:
                return {"error": "server did not start", "log": Path(log.name).read_text()[-3000:]}
            time.sleep(0.5)
        load_s = time.perf_counter() - t
        from undo_cli.backends import BackendConfig, SamplingConfig, open_backend

        res = {}
        for concurrency in (1, BATCH):
            cfg = BackendConfig(backend="openai", model=SERVED_NAME, base_url=[url], concurrency=concurrency,
                                request_timeout=timeout)
            with open_backend(cfg) as llm:
                phases = _phases(llm, SamplingConfig(max_tokens=MAX_TOKENS), server.pid)
            res["single" if concurrency == 1 else "batch"] = phases["single" if concurrency == 1 else "batch"]
        res.update(load_s=round(load_s, 1), peak_rss_gb=tree_peak_rss_gb(server.pid), **facts)
        return res
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, 15)  # its own process group: vLLM's engine core is a child process
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)
        if server.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, 9)
            server.wait()


def find_vllm_python() -> str | None:
    for c in (os.environ.get("UNDO_VLLM_PYTHON"), str(REPO / ".venv-vllm/bin/python"), "/work/main/.venv-vllm/bin/python"):
        if c and Path(c).is_file():
            return c
    return None


def commit() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO).returncode != 0
        return sha + ("-dirty" if dirty else "")
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", default=None, help=f"comma-separated, of {', '.join(ARMS)} (default: all)")
    parser.add_argument("--gguf", default=GGUF)
    parser.add_argument("--folder", default=FOLDER, help="the model converted to a transformers folder")
    parser.add_argument("--llamacpp-python", default=LLAMACPP_PYTHON)
    parser.add_argument("--timeout", type=float, default=1500, help="seconds per arm")
    parser.add_argument("--wait-llamacpp", type=float, default=0,
                        help="seconds to wait for llama_cpp.server to become importable (a build still running)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the arms bench/results/teacher_speed.json already holds (each with its commit and "
                             "load average) and run only the others, and those named in --arms again")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="hf-fp32", help=argparse.SUPPRESS)  # the worker's hf arms
    args = parser.parse_args()
    if args.worker == "hf":
        return worker_hf(args.dtype.split(","), args.folder, args.worker_out)
    if args.worker == "vllm":
        return worker_vllm(args.folder, args.worker_out)

    named = args.arms is not None
    wanted = [a.strip() for a in (args.arms or ",".join(ARMS)).split(",") if a.strip()]
    unknown = set(wanted) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    path = RESULTS / "teacher_speed.json"
    earlier = {}
    if args.resume and path.exists():
        old = json.loads(path.read_text())
        earlier = {arm: {"commit": old["commit"], **res} for arm, res in old["arms"].items()}
    if "hf-fp32" not in wanted and "hf-fp32" not in earlier:
        wanted.insert(0, "hf-fp32")  # the baseline, always in the same run (or kept from the one resumed)
    report = {"commit": commit(), "model": {"gguf": args.gguf, "folder": args.folder},
              "max_tokens": MAX_TOKENS, "single_prompts": SINGLE, "batch_prompts": BATCH,
              "prompts": "examples/arithmetic.jsonl, first problems, prompts/generate.jinja + chat template, greedy",
              "cpus": os.cpu_count(), "platform": platform.platform(), "arms": dict(earlier)}
    todo = [a for a in wanted if named or not (a in earlier and "error" not in earlier[a])]
    hf_todo = [a for a in HF_ARMS if a in todo]
    for arm in todo:
        if arm in HF_ARMS and arm != hf_todo[0]:
            continue  # the hf arms run together, in one process, with the first of them
        if arm == "llamacpp" and args.wait_llamacpp:
            llamacpp_ready(args.llamacpp_python, args.wait_llamacpp)  # before taking the lock
        before = round(os.getloadavg()[0], 2)
        group = hf_todo if arm in HF_ARMS else [arm]
        print(f"{', '.join(group)} ... (load {before})", file=sys.stderr, flush=True)
        with qwen_lock():
            if arm in HF_ARMS:
                res = run_worker(sys.executable, ["hf", "--dtype", ",".join(group), "--folder", args.folder],
                                 args.timeout * len(group), partial=True)
            elif arm == "llamacpp":
                res = {arm: arm_llamacpp(args.llamacpp_python, args.gguf, args.timeout)}
            elif arm == "vllm-server":
                res = {arm: arm_vllm_server(find_vllm_python(), args.folder, args.timeout)}
            else:
                python = find_vllm_python()
                res = {arm: run_worker(python, ["vllm", "--folder", args.folder], args.timeout) if python else
                       {"error": "no vLLM venv (.ci/vllm-venv.sh)"}}
        for name in group:
            one = res.get(name) or {"error": res.get("error", "not reached"), "log": res.get("log", "")}
            one["load_avg"] = [before, round(os.getloadavg()[0], 2)]
            one["commit"], one["finished"] = report["commit"], time.strftime("%Y-%m-%d %H:%M:%S")
            report["arms"][name] = one
            print(f"  {name}: {_summary(one)}", file=sys.stderr, flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")  # after each arm
    _table(report)


def _summary(res: dict) -> str:
    if "error" in res:
        return f"error: {res['error']}"
    s, b = res["single"], res["batch"]
    return f"1 seq {s['tok_s']:.2f} tok/s, batch {b['tok_s']:.2f} tok/s, peak {res['peak_rss_gb']} GB"


def _table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    base = (report["arms"].get("hf-fp32") or {}).get("single", {}).get("tok_s")
    table = Table(title=f"Qwen2.5-Coder-1.5B-Instruct, {MAX_TOKENS} new tokens greedy, {report['cpus']} CPUs "
                        f"(baseline: transformers fp32, one sequence)")
    for col in ("route", "load s", "1 seq tok/s", "CPU s/tok", f"batch {BATCH} tok/s", "CPU s/tok", "x baseline",
                "peak RSS GB", "load avg"):
        table.add_column(col, justify="right")
    for arm, res in report["arms"].items():
        if "error" in res:
            table.add_row(arm, "", "", "", "", "", "", "", str(res["load_avg"]), end_section=False)
            table.add_row("", f"[red]{res['error']}[/red]", "", "", "", "", "", "", "")
            continue
        s, b = res["single"], res["batch"]
        best = max(s["tok_s"], b["tok_s"])
        table.add_row(arm, f"{res['load_s']:.0f}", f"{s['tok_s']:.2f}", f"{s['cpu_s_per_token']:.2f}",
                      f"{b['tok_s']:.2f}", f"{b['cpu_s_per_token']:.2f}", f"{best / base:.1f}x" if base else "-",
                      f"{res['peak_rss_gb']:.2f}", str(res["load_avg"]))
    console = Console(stderr=True)
    console.print(table)
    console.print(f"commit {report['commit']}; JSON: {RESULTS / 'teacher_speed.json'}")


if __name__ == "__main__":
    main()
