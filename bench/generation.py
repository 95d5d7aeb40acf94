"""Generation throughput of the three backends, each against a baseline measured in the same run.

    python bench/generation.py                          # every section that can run on this machine
    python bench/generation.py --sections hf --threads 1   # hf batched vs one at a time (issue 25: >= 8x)
    python bench/generation.py --sections hf,openai --prompts 64 --max-tokens 64
    python bench/generation.py --preset gpu             # CUDA: a random-init Qwen2.5-0.5B-sized model, bf16, hf
    python bench/generation.py --threads 1              # a small shared CPU box: avoid OMP oversubscription
    python bench/generation.py --sections openai        # the client: concurrency 256 @ 1 s vs the 256 req/s ceiling
    python bench/generation.py --sections pipeline      # the loop's batches: one stream vs one batch at a time
    python bench/generation.py --sections hf --model M --problems examples/arithmetic.jsonl --end-rules \
        --prompts 32 --single-prompts 32 --max-tokens 256 --batch-size 32   # a real student as `undo evaluate` runs it

Sections:

    hf      the `hf` backend batched (--batch-size prompts per generate call, as the generation
            loop sends them) vs one prompt per call, same backend, same model, same prompts,
            greedy: tokens/s ratio (target >= 8x), per wall second and, on CPU, per CPU second
            of this process (on a machine shared with other jobs the wall clock mostly measures
            the neighbours; bench/train.py compares on CPU time for the same reason). The
            greedy texts of the two arms are compared too. --problems FILE: the questions of a
            problems JSONL in the student's prompt (what `undo evaluate` sends) instead of the
            generated prompts; --end-rules: the stages' default end rules (stop at the answer
            line, cut a repetition of 48+ characters; backends/stopping.py), so rows end at
            different steps as they do in a real run. The split of each arm's CPU time into the
            prompt pass (prefill) and the decode steps is reported beside the ratio: the prefill
            is the same work in both arms, so it bounds the ratio.
    openai  the `openai` backend at --concurrency 256 against bench/latency_server.py (a fixed
            --latency-ms per request, default 1000, no compute), the client pinned to one core and
            the server to the others: requests/s beside the ceiling concurrency / latency (target
            >= 200 req/s of 256) and beside 1 request at a time; plus what the official `openai`
            client costs in CPU per request sending the same requests (why the backend uses httpx2).
    pipeline  the generation loop's batches against a server with stragglers (bench/latency_server.py
            --jitter: log-normal latency, seeded): one `generate` call per batch (the endpoint drains
            while a batch's slowest requests finish: the loop before issue 25) vs one
            `generate_stream` over all batches (the loop now): requests/s, same backend and server,
            arms alternated (--pipeline-rounds, medians).
    vllm    in-process vLLM (run by the vllm venv's python, see .ci/vllm-venv.sh) vs the `hf`
            backend batched, same model and prompts: tokens/s ratio. Model load and the
            first (warm-up) call are excluded from both.

Presets (each value can be overridden by its flag): cpu (default) is a random-init tiny
Llama from undo_cli.tiny, 64 prompts, 64 new tokens, batches of 64; gpu is bench/train.py's
random-init Qwen2.5-0.5B-sized model in bf16, 128 prompts, 128 new tokens, batches of 64,
one at a time on the first 16 prompts, hf section only. Random weights rarely emit eos, so
every prompt generates about --max-tokens tokens and the token counts of the two arms match.
Prints a table on stderr and writes bench/results/generation.json (generation-gpu.json for
the gpu preset).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_prompts(count: int) -> list[list[dict]]:
    """`count` word problems of varied length (so batches need real padding)."""
    prompts = []
    for i in range(count):
        a, b = 3 + i % 17, 2 + (i * 7) % 13
        extra = " Each box also holds some pencils and a few coins." * (i % 4)
        q = f"Sam has {a} apples and buys {b} more.{extra} How many apples does Sam have?"
        prompts.append([{"role": "user", "content": q + "\nSolve it step by step and end with a line \"#### <answer>\"."}])
    return prompts


def problem_prompts(path: str, count: int) -> list[list[dict]]:
    """The first `count` problems of a problems JSONL in the student's prompt (what `undo evaluate` sends)."""
    from undo_cli.prompts import student_messages

    with open(path, encoding="utf-8") as fh:
        problems = [json.loads(line) for line in fh if line.strip()][:count]
    return [student_messages(p) for p in problems]


def _tokens(results) -> int:
    return sum(c.completion_tokens for per_prompt in results for c in per_prompt)


def bench_hf(model: str, prompts, max_tokens: int, batch_size: int, single_prompts: int | None = None,
             end_rules: bool = False) -> dict:
    """Batched (batch_size prompts per generate call, as the generation loop sends them) vs one prompt per
    call, through the same backend: wall and CPU seconds of each (and of its prompt passes), greedy texts
    compared."""
    from undo_cli.backends import BackendConfig, SamplingConfig, open_backend
    from undo_cli.stages.options import STOP_REPETITION_CHARS

    sampling = SamplingConfig(max_tokens=max_tokens, stop_at_answer=end_rules,
                              repetition_cut=STOP_REPETITION_CHARS if end_rules else 0)
    alone_prompts = prompts[: single_prompts or len(prompts)]
    with open_backend(BackendConfig(backend="hf", model=model, batch_size=batch_size)) as llm:
        llm.generate(prompts[:2], sampling)  # warm-up: lazy imports, allocator, kernels
        _sync()
        prefill = _PrefillClock(llm.hf_model)
        t, cpu = time.perf_counter(), time.process_time()
        batched = llm.generate(prompts, sampling)
        _sync()
        batched_s, batched_cpu = time.perf_counter() - t, time.process_time() - cpu
        batched_prefill = prefill.take()
        t, cpu = time.perf_counter(), time.process_time()
        single = [llm.generate([p], sampling)[0] for p in alone_prompts]
        _sync()
        single_s, single_cpu = time.perf_counter() - t, time.process_time() - cpu
        single_prefill = prefill.take()
        prefill.close()
        device = llm.device
    same = sum(a[0].text == b[0].text for a, b in zip(batched, single))
    b_tok, s_tok = _tokens(batched), _tokens(single)
    return {
        "device": device, "prompts": len(prompts), "single_prompts": len(alone_prompts), "batch_size": batch_size,
        "max_tokens": max_tokens,
        "batched_tokens": b_tok, "batched_s": round(batched_s, 3), "batched_cpu_s": round(batched_cpu, 3),
        "batched_tok_s": round(b_tok / batched_s, 1), "batched_tok_cpu_s": round(b_tok / batched_cpu, 1),
        "single_tokens": s_tok, "single_s": round(single_s, 3), "single_cpu_s": round(single_cpu, 3),
        "single_tok_s": round(s_tok / single_s, 1), "single_tok_cpu_s": round(s_tok / single_cpu, 1),
        "ratio": round((b_tok / batched_s) / (s_tok / single_s), 2),
        "ratio_cpu": round((b_tok / batched_cpu) / (s_tok / single_cpu), 2),
        "same_greedy_text": f"{same}/{len(alone_prompts)}",
        "end_rules": end_rules, "load_avg_1m_after": os.getloadavg()[0],
        "finish_reasons": dict(sorted(Counter(c[0].finish_reason for c in batched).items())),
        # The prompt passes' CPU seconds (the rest is decode steps): the same work in both arms.
        "batched_prefill_cpu_s": round(batched_prefill, 3), "single_prefill_cpu_s": round(single_prefill, 3),
        "texts": [c[0].text for c in batched],
    }


class _PrefillClock:
    """CPU seconds the model spends in prompt passes (forward calls over more than one position)."""

    def __init__(self, model):
        self.cls, self.forward, self.cpu = type(model), type(model).forward, 0.0
        forward = self.forward

        def timed(model_self, input_ids=None, **kwargs):
            if input_ids is None or input_ids.shape[-1] == 1:
                return forward(model_self, input_ids=input_ids, **kwargs)
            cpu = time.process_time()
            try:
                return forward(model_self, input_ids=input_ids, **kwargs)
            finally:
                self.cpu += time.process_time() - cpu

        self.cls.forward = timed

    def take(self) -> float:
        cpu, self.cpu = self.cpu, 0.0
        return cpu

    def close(self) -> None:
        self.cls.forward = self.forward


def _commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return head + ("-dirty" if dirty else "")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


PRESETS = {
    "cpu": {"sections": "hf,openai,vllm", "prompts": 64, "max_tokens": 64, "batch_size": 64},
    # A 0.5B model on one GPU: 128 prompts in 2 batches of 64, 128 new tokens; one at a time on 16 of them
    # (each ~128 steps of a Python-bound decode loop) keeps the section near a minute.
    "gpu": {"sections": "hf", "prompts": 128, "max_tokens": 128, "batch_size": 64, "single_prompts": 16},
}


def build_model(folder: Path, args) -> str:
    """The preset's random-init model: a tiny Llama (cpu), bench/train.py's Qwen2.5-0.5B-sized one (gpu)."""
    if args.preset == "gpu":
        from train import build_model as build_train_model, make_rationales  # bench/train.py, beside this file

        build_train_model(folder, "gpu", make_rationales(200, 10))
        return str(folder)
    from undo_cli.tiny import build_tiny_model

    return str(build_tiny_model(folder, hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads))


def _pin(cpus: set[int]) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def bench_openai(prompts, latency_ms: float, concurrency: int, one_core: bool) -> dict:
    """The openai backend at `concurrency` vs its ceiling (concurrency / latency) and vs 1 request at a time,
    beside the official `openai` client's own cost at the same concurrency."""

    from undo_cli.backends import BackendConfig, SamplingConfig, open_backend

    from tests.servers import free_port, serve

    sampling = SamplingConfig(max_tokens=64)
    latency = latency_ms / 1000
    out = {"requests": len(prompts), "latency_ms": latency_ms, "concurrency": concurrency,
           "ceiling_req_s": round(concurrency / latency, 1)}
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    # The server runs in its own process (in this one it would compete with the client for the GIL) and,
    # with --one-core, on the other cores: the client gets exactly one.
    cmd = [sys.executable, str(HERE / "latency_server.py"), "--port", str(port), "--latency-ms", str(latency_ms)]
    with tempfile.TemporaryDirectory() as tmp, serve(cmd, port, "latency", Path(tmp) / "server.log", timeout=60) as srv:
        if one_core and len(cpus) > 1:
            os.sched_setaffinity(srv.proc.pid, set(cpus[:-1]))
            _pin({cpus[-1]})
            out["client_cpus"] = 1
        try:
            for label, c, work in (("c1", 1, prompts[: max(4, int(4 / latency))]), ("undo", concurrency, prompts)):
                config = BackendConfig(backend="openai", model="latency", base_url=url, concurrency=c)
                with open_backend(config) as llm:
                    llm.generate(prompts[: min(c, len(prompts))], sampling)  # warm-up: connections, imports
                    t, cpu = time.perf_counter(), time.process_time()
                    # Chunks of batch_hint through one stream, exactly as stages/generation_loop.py sends them.
                    chunks = [work[start : start + llm.batch_hint] for start in range(0, len(work), llm.batch_hint)]
                    for _ in llm.generate_stream(chunks, sampling):
                        pass
                    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
                out[f"{label}_req_s"] = round(len(work) / seconds, 2)
                out[f"{label}_cpu_ms_per_request"] = round(1000 * cpu / len(work), 3)
            out["official"] = asyncio.run(_official_client(url, prompts, concurrency))
        finally:
            _pin(set(cpus)) if cpus else None
    out["ratio_vs_ceiling"] = round(out["undo_req_s"] / out["ceiling_req_s"], 3)
    # What one core would sustain if the client had it to itself (the wall figure above shares it).
    out["undo_cpu_bound_req_s"] = round(1000 / out["undo_cpu_ms_per_request"], 0)
    out["load_avg_1m_after"] = os.getloadavg()[0]
    out["ratio_vs_c1"] = round(out["undo_req_s"] / out["c1_req_s"], 1)
    return out


def bench_pipeline(latency_ms: float, jitter: float, concurrency: int, batches: int, rounds: int) -> dict:
    """The generation loop's two ways of sending batches to one server with stragglers (log-normal latency,
    seeded): one `generate` call per batch, which lets the endpoint's slots drain while a batch's slowest
    requests finish (the loop before issue 25), against one `generate_stream` over all batches (the loop now),
    same backend and server, the two arms alternated `rounds` times (medians)."""
    import math
    import statistics

    from undo_cli.backends import BackendConfig, SamplingConfig, open_backend

    from bench.latency_server import LatencyServer

    sampling = SamplingConfig(max_tokens=64)
    mean_latency = latency_ms / 1000 * math.exp(jitter ** 2 / 2)  # the log-normal's mean
    out: dict = {"latency_ms_median": latency_ms, "jitter_sigma": jitter, "concurrency": concurrency,
                 "ceiling_req_s": round(concurrency / mean_latency, 1)}
    arms: dict[str, list[float]] = {"one_batch_at_a_time": [], "stream": []}
    with LatencyServer(latency_ms / 1000, jitter=jitter, seed=0) as server:
        config = BackendConfig(backend="openai", model="latency", base_url=server.base_url, concurrency=concurrency)
        with open_backend(config) as llm:
            work = make_prompts(batches * llm.batch_hint)
            chunks = [work[i : i + llm.batch_hint] for i in range(0, len(work), llm.batch_hint)]
            out.update(requests=len(work), batch=llm.batch_hint, batches=len(chunks))
            llm.generate(work[:concurrency], sampling)  # warm-up: connections, imports
            for r in range(rounds):
                for arm in (("one_batch_at_a_time", "stream") if r % 2 == 0 else ("stream", "one_batch_at_a_time")):
                    t = time.perf_counter()
                    if arm == "stream":
                        for _ in llm.generate_stream(chunks, sampling):
                            pass
                    else:
                        for chunk in chunks:
                            llm.generate(chunk, sampling)
                    arms[arm].append(len(work) / (time.perf_counter() - t))
    for arm, values in arms.items():
        out[f"{arm}_req_s"] = round(statistics.median(values), 1)
        out[f"{arm}_req_s_all"] = [round(v, 1) for v in values]
    out["ratio"] = round(out["stream_req_s"] / out["one_batch_at_a_time_req_s"], 3)
    out["load_avg_1m_after"] = os.getloadavg()[0]
    return out


async def _official_client(url: str, prompts, concurrency: int) -> dict:
    """The official client (`openai.AsyncOpenAI`, no retries) sending the same requests: what it costs."""
    try:
        import openai
    except ImportError:
        return {"skipped": "openai package not installed"}
    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0)
    slots = asyncio.Semaphore(concurrency)

    async def one(messages):
        async with slots:
            r = await client.chat.completions.create(model="latency", messages=messages, max_tokens=64,
                                                     temperature=0.0)
            return r.choices[0].message.content

    await asyncio.gather(*(one(m) for m in prompts[:concurrency]))  # warm-up
    t, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(m) for m in prompts))
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    await client.close()
    return {"req_s": round(len(prompts) / seconds, 2), "cpu_ms_per_request": round(1000 * cpu / len(prompts), 3),
            "version": openai.__version__}


def vllm_worker(model: str, prompts_file: str, max_tokens: int, out_file: str) -> None:
    """Runs inside the vllm venv (spawned by bench_vllm): load, warm up, time one generate call."""
    from undo_cli.backends import BackendConfig, SamplingConfig, open_backend

    prompts = json.loads(Path(prompts_file).read_text())
    sampling = SamplingConfig(max_tokens=max_tokens)
    t = time.perf_counter()
    with open_backend(BackendConfig(backend="vllm", model=model, max_model_len=1024)) as llm:
        load_s = time.perf_counter() - t
        llm.generate(prompts[:2], sampling)
        t = time.perf_counter()
        results = llm.generate(prompts, sampling)
        seconds = time.perf_counter() - t
    Path(out_file).write_text(json.dumps({
        "load_s": round(load_s, 1), "tokens": _tokens(results), "seconds": round(seconds, 3),
        "tok_s": round(_tokens(results) / seconds, 1), "texts": [c[0].text for c in results],
    }))


def bench_vllm(python: str, model: str, prompts, max_tokens: int, hf: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file, out_file = Path(tmp) / "prompts.json", Path(tmp) / "out.json"
        prompts_file.write_text(json.dumps(prompts))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([python, str(Path(__file__).resolve()), "--worker", "vllm", "--model", model,
                               "--prompts-file", str(prompts_file), "--max-tokens", str(max_tokens),
                               "--worker-out", str(out_file)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": proc.stderr[-2000:]}
        res = json.loads(out_file.read_text())
    same = sum(a == b for a, b in zip(res.pop("texts"), hf["texts"]))
    return {**res, "hf_batched_tok_s": hf["batched_tok_s"], "ratio": round(res["tok_s"] / hf["batched_tok_s"], 2),
            "same_greedy_text_as_hf": f"{same}/{len(prompts)}"}


def find_vllm_python() -> str | None:
    for c in (os.environ.get("UNDO_VLLM_PYTHON"), str(REPO / ".venv-vllm/bin/python")):
        if c and Path(c).is_file():
            return c
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description="generation throughput benchmarks")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="cpu: a tiny Llama; gpu: a random-init Qwen2.5-0.5B-sized model, hf section only")
    parser.add_argument("--sections", default=None, help="default: hf,openai,vllm (cpu preset), hf (gpu preset)")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--single-prompts", type=int, default=None,
                        help="hf: time one-at-a-time generation on the first N of the prompts (default: all)")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--model", default=None, help="a model folder (default: the preset's random-init model)")
    parser.add_argument("--problems", default=None,
                        help="hf: the first --prompts problems of this JSONL in the student's prompt "
                             "(not generated prompts)")
    parser.add_argument("--end-rules", action="store_true",
                        help="hf: the stages' default end rules (stop at the answer line, cut repetitions)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=1000.0)
    parser.add_argument("--openai-requests", type=int, default=2048)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--pipeline-concurrency", type=int, default=64)
    parser.add_argument("--pipeline-latency-ms", type=float, default=200.0, help="pipeline: the median latency")
    parser.add_argument("--pipeline-jitter", type=float, default=0.5, help="pipeline: log-normal sigma of the latency")
    parser.add_argument("--pipeline-batches", type=int, default=8)
    parser.add_argument("--pipeline-rounds", type=int, default=3)
    parser.add_argument("--all-cores", action="store_true",
                        help="openai: let the client use every core (default: pinned to one, the server to the rest)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (and OMP in the vLLM worker); default: torch's choice. "
                             "On a small shared machine 1 can be many times faster than oversubscribed threads")
    parser.add_argument("--out", default=None, help="default: bench/results/generation[-gpu].json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():  # the preset fills what the command line left out
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or str(HERE / "results" / ("generation-gpu.json" if args.preset == "gpu" else "generation.json"))
    from undo_cli import threads

    threads.configure()  # what every undo command does first (cli/app.py): its thread count, no OpenMP spinning
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the vLLM worker and the servers
        import torch

        torch.set_num_threads(args.threads)
    if args.worker == "vllm":
        vllm_worker(args.model, args.prompts_file, args.max_tokens, args.worker_out)
        return

    from rich.table import Table

    from undo_cli.console import console

    sections = set(args.sections.split(","))
    prompts = problem_prompts(args.problems, args.prompts) if args.problems else make_prompts(args.prompts)
    import torch

    results: dict = {"commit": _commit(), "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                 "torch_threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
                                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                                 "platform": platform.platform()}, "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None and sections & {"hf", "vllm"}:
            model = build_model(Path(tmp) / "model", args)
        results["model"] = model if args.model else (
            "random-init Qwen2.5-0.5B-sized model (bench/train.py's gpu model), bf16" if args.preset == "gpu"
            else f"random tiny Llama (hidden {args.hidden_size}, {args.layers} layers)")
        if torch.cuda.is_available():
            results["machine"]["gpu"] = torch.cuda.get_device_name()
        if sections & {"hf", "vllm"}:
            console.print("[bold]hf[/bold]: batched vs one prompt at a time ...")
            results["hf"] = bench_hf(model, prompts, args.max_tokens, args.batch_size, args.single_prompts,
                                     args.end_rules)
        if "openai" in sections:
            console.print(f"[bold]openai[/bold]: concurrency {args.concurrency} vs its ceiling, 1 at a time and the "
                          "official client ...")
            results["openai"] = bench_openai(make_prompts(args.openai_requests), args.latency_ms, args.concurrency,
                                             one_core=not args.all_cores)
        if "pipeline" in sections:
            console.print(f"[bold]pipeline[/bold]: batches one at a time vs one stream, concurrency "
                          f"{args.pipeline_concurrency}, stragglers (log-normal sigma {args.pipeline_jitter}) ...")
            results["pipeline"] = bench_pipeline(args.pipeline_latency_ms, args.pipeline_jitter,
                                                 args.pipeline_concurrency, args.pipeline_batches, args.pipeline_rounds)
        if "vllm" in sections:
            python = find_vllm_python()
            if python is None:
                results["vllm"] = {"skipped": "no vllm venv (.ci/vllm-venv.sh or UNDO_VLLM_PYTHON)"}
            else:
                console.print("[bold]vllm[/bold]: in-process vLLM vs hf batched ...")
                results["vllm"] = bench_vllm(python, model, prompts, args.max_tokens, results["hf"])
    if "hf" in results:  # the texts themselves stay out; their digest lets two runs be compared
        import hashlib

        texts = results["hf"].pop("texts", None)
        if texts is not None:
            results["hf"]["texts_sha256"] = hashlib.sha256(json.dumps(texts).encode()).hexdigest()

    table = Table(title="generation throughput (baseline measured in the same run)", title_justify="left")
    for col in ("benchmark", "baseline", "measured", "ratio", "target"):
        table.add_column(col, justify="left" if col == "benchmark" else "right")
    if "hf" in results and "hf" in sections:
        h = results["hf"]
        what = (f"hf batched ({h['batch_size']}/batch, {h['prompts']} prompts) vs 1 at a time ({h['single_prompts']} "
                f"of them), {h['device']}, greedy texts equal {h['same_greedy_text']}")
        table.add_row(what + ": tokens per wall second", f"{h['single_tok_s']:,.0f} tok/s",
                      f"{h['batched_tok_s']:,.0f} tok/s", f"{h['ratio']:.1f}x", ">= 8x")
        if h["device"] == "cpu":  # a GPU's CPU time says nothing
            table.add_row("the same, tokens per CPU second (what load on a shared machine moves least)",
                          f"{h['single_tok_cpu_s']:,.0f} tok/s", f"{h['batched_tok_cpu_s']:,.0f} tok/s",
                          f"{h['ratio_cpu']:.1f}x", ">= 8x")
            table.add_row("of which prompt passes (prefill), CPU s: the same work in both arms",
                          f"{h['single_prefill_cpu_s']:.1f} of {h['single_cpu_s']:.1f}",
                          f"{h['batched_prefill_cpu_s']:.1f} of {h['batched_cpu_s']:.1f}", "-", "-")
    if "openai" in results:
        o = results["openai"]
        where = (f"{o['requests']} requests @ {o['latency_ms']:.0f} ms, client on {o.get('client_cpus', 'all')} "
                 f"core(s), load avg {o['load_avg_1m_after']:.1f} on {os.cpu_count()} cores")
        table.add_row(f"openai backend, concurrency {o['concurrency']} vs the ceiling (concurrency / latency), {where}",
                      f"{o['ceiling_req_s']:.0f} req/s", f"{o['undo_req_s']:.1f} req/s", f"{o['ratio_vs_ceiling']:.2f}x",
                      ">= 200 req/s")
        table.add_row("openai backend, concurrency 1 (same server)", f"{o['c1_req_s']:.2f} req/s",
                      f"{o['undo_req_s']:.1f} req/s", f"{o['ratio_vs_c1']:.0f}x", "-")
        off = o.get("official", {})
        if "req_s" in off:
            table.add_row(f"client CPU per request: official openai {off['version']} client vs undo's httpx2 path",
                          f"{off['cpu_ms_per_request']:.2f} ms", f"{o['undo_cpu_ms_per_request']:.2f} ms",
                          f"{off['cpu_ms_per_request'] / o['undo_cpu_ms_per_request']:.2f}x", "-")
            table.add_row("undo's client alone on one core (1 / CPU per request)", f"{o['ceiling_req_s']:.0f} req/s",
                          f"{o['undo_cpu_bound_req_s']:.0f} req/s", f"{o['undo_cpu_bound_req_s'] / o['ceiling_req_s']:.1f}x",
                          ">= 200 req/s")
            table.add_row(f"official openai client alone, concurrency {o['concurrency']}", f"{o['ceiling_req_s']:.0f} req/s",
                          f"{off['req_s']:.1f} req/s", f"{off['req_s'] / o['ceiling_req_s']:.2f}x", "-")
    if "pipeline" in results:
        q = results["pipeline"]
        table.add_row(f"generation loop, {q['batches']} batches of {q['batch']} at concurrency {q['concurrency']}, "
                      f"latency median {q['latency_ms_median']:.0f} ms (log-normal sigma {q['jitter_sigma']}): "
                      f"one stream vs one batch at a time (ceiling {q['ceiling_req_s']:.0f} req/s)",
                      f"{q['one_batch_at_a_time_req_s']:.1f} req/s", f"{q['stream_req_s']:.1f} req/s",
                      f"{q['ratio']:.2f}x", "no drain")
    v = results.get("vllm", {})
    if "ratio" in v:
        table.add_row(f"vllm (in-process, load {v['load_s']:.0f} s) vs hf batched", f"{v['hf_batched_tok_s']:,.0f} tok/s",
                      f"{v['tok_s']:,.0f} tok/s", f"{v['ratio']:.1f}x", "-")
    elif v:
        table.add_row("vllm vs hf", "-", "-", "-", v.get("skipped") or "failed (see JSON)")
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":  # vLLM spawns processes: everything must stay under this guard
    main()
