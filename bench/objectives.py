"""Peak memory and time of the chunked fused objective vs the naive full-logits loss.

    python bench/objectives.py                       # CPU: hidden 512, vocab 32k, 4096 tokens
    python bench/objectives.py --kinds fkl,rkl,jsd,skl,srkl,tvd
    python bench/objectives.py --device cuda         # hidden 4096, vocab 151936, 8192 tokens, bf16 (+ Liger)

What is measured, for one forward + backward of the distillation loss of a
student against a teacher on N scored tokens (gradients w.r.t. the student's
final hidden states and output layer, none for the teacher):

* naive   — both models' full [N × V] logits, then `undo_cli.objectives.divergence`
            (plain log_softmax + autograd over the whole tensors).
* chunked — `fused_linear_divergence`: hidden states in, logits formed and
            differentiated per chunk of `--chunk-size` tokens.
* liger   — Liger-Kernel's `LigerFusedLinearJSDLoss` (jsd only, CUDA only,
            when `liger_kernel` imports). Its β weighs the two KL terms the other
            way round (m = β·q + (1−β)·p); at the default β = 0.5 both are the
            same symmetric JSD.

Each variant runs in its own fresh subprocess, so allocator caches and lazy
initialisation of one cannot help or hurt another; variants alternate over
`--rounds` rounds and times are medians.

How peak memory is measured:
* CPU: torch has no CPU allocator statistics, and tracemalloc does not see
  torch's allocations. We use the kernel's own peak-RSS counter: after the
  inputs are built, the worker writes "5" to /proc/self/clear_refs, which resets
  VmHWM (peak resident set) to the current RSS, reads the current RSS as the
  baseline, runs forward + backward once and reports VmHWM − baseline. This is
  everything the step touched: tensors, autograd buffers, allocator slack.
  Where clear_refs cannot be written, it falls back to ru_maxrss − baseline
  (which can only over-count setup transients, never under-count the step).
* CUDA: torch.cuda.reset_peak_memory_stats() after setup, then
  max_memory_allocated() − memory_allocated() before the step.
The first (cold) step is the one measured for memory; timing uses the next
`--repeats` steps.

Output: a rich table on stderr, JSON in bench/results/objectives-<device>.json.
Target (issue 7): chunked ≤ 0.25× naive peak memory at ≤ 1.2× naive time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

PRESETS = {
    "cpu": {"hidden": 512, "vocab": 32_000, "tokens": 4096, "dtype": "float32"},
    "cuda": {"hidden": 4096, "vocab": 151_936, "tokens": 8192, "dtype": "bfloat16"},
}


# --- the worker: one variant in a fresh process --------------------------------------

def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class CpuPeak:
    """Peak resident memory of a code block above the RSS at its start (see the module docstring)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss"
        self.base = _rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.method == "ru_maxrss":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            peak = _rss_bytes("VmHWM")
        self.peak = max(peak - self.base, 0)


def worker(args) -> dict:
    import torch

    from undo_cli.objectives import divergence, fused_linear_divergence

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    # Scaled like a trained model's final hidden states and head: logits of O(1-10).
    student_hidden = torch.randn(n, h, device=device, dtype=dtype).requires_grad_()
    student_weight = (torch.randn(v, h, device=device, dtype=dtype) / h ** 0.5).requires_grad_()
    teacher_hidden = torch.randn(n, h, device=device, dtype=dtype)
    teacher_weight = torch.randn(v, h, device=device, dtype=dtype) / h ** 0.5
    mask = torch.ones(n, dtype=torch.bool, device=device)
    params = {"alpha": args.alpha, "beta": args.beta, "temperature": args.temperature}

    if args.variant == "naive":
        def step():
            student_logits = student_hidden @ student_weight.T
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
            return divergence(student_logits, teacher_logits, mask, args.kind, **params)
    elif args.variant == "chunked":
        def step():
            return fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                                           args.kind, chunk_size=args.chunk_size, **params)
    elif args.variant == "liger":
        import inspect

        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # Liger mixes m = β·q + (1−β)·p (ours: β·p + (1−β)·q); equal at the default β = 0.5.
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=args.beta,
                                        temperature=args.temperature)
        labels = torch.zeros(n, dtype=torch.long, device=device)
        extra = (None, None) if "student_bias" in inspect.signature(liger.forward).parameters else ()

        def step():
            return liger(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *extra)
    else:
        raise SystemExit(f"unknown variant {args.variant}")

    def run_once():
        student_hidden.grad = None
        student_weight.grad = None
        loss = step()
        loss.backward()
        return float(loss)

    if device.type == "cuda":
        torch.cuda.synchronize()
        if args.variant == "liger":
            run_once()  # torch.compile warm-up; memory is then steady-state for all variants alike
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = run_once()
        torch.cuda.synchronize()
        peak, method = torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
    else:
        with CpuPeak() as meter:
            loss = run_once()
        peak, method = meter.peak, meter.method

    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run_once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"variant": args.variant, "kind": args.kind, "loss": loss, "peak_bytes": peak, "memory_method": method,
            "times_s": times, "threads": torch.get_num_threads()}


# --- the driver -----------------------------------------------------------------------

def run_variant(args, variant: str, kind: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--kind", kind]
    for name in ("device", "tokens", "hidden", "vocab", "dtype", "chunk_size", "repeats", "alpha", "beta",
                 "temperature"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"variant": variant, "kind": kind, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def liger_available() -> bool:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except Exception:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--kinds", default="jsd", help="comma-separated objectives to measure")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per worker (after the measured cold step)")
    parser.add_argument("--rounds", type=int, default=1, help="workers per variant, alternating variants")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in PRESETS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.worker:
        print(json.dumps(worker(args)))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    variants = ["naive", "chunked"]
    if args.device == "cuda" and liger_available():
        variants.append("liger")
    rows = []
    for kind in args.kinds.split(","):
        runs: dict[str, list[dict]] = {v: [] for v in variants if v != "liger" or kind == "jsd"}
        for round_ in range(args.rounds):
            for variant in runs:
                console.print(f"[dim]{kind} {variant} round {round_ + 1}/{args.rounds} ...[/dim]")
                runs[variant].append(run_variant(args, variant, kind))
        naive = _summary(runs["naive"])
        for variant, results in runs.items():
            row = {"kind": kind, **_summary(results)}
            if naive.get("peak_bytes") and row.get("peak_bytes") is not None:
                row["memory_vs_naive"] = row["peak_bytes"] / naive["peak_bytes"]
                row["time_vs_naive"] = row["time_s"] / naive["time_s"]
            rows.append(row)

    table = Table(title=f"distillation loss, forward + backward: {args.tokens} tokens, hidden {args.hidden}, "
                        f"vocab {args.vocab}, {args.dtype}, {args.device}, chunk {args.chunk_size}")
    for col in ("objective", "variant", "peak memory", "× naive", "time (median)", "× naive", "loss"):
        table.add_column(col, justify="left" if col in ("objective", "variant") else "right")
    for row in rows:
        if "error" in row:
            table.add_row(row["kind"], row["variant"], "[red]failed[/red]", "", "", "", str(row["error"])[:60])
            continue
        table.add_row(row["kind"], row["variant"], f"{row['peak_bytes'] / 2**20:,.0f} MiB",
                      f"{row.get('memory_vs_naive', 1):.2f}", f"{row['time_s']:.2f} s",
                      f"{row.get('time_vs_naive', 1):.2f}", f"{row['loss']:.5f}")
    console.print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"objectives-{args.device}.json"
    import torch

    config = {k: getattr(args, k) for k in ("device", "tokens", "hidden", "vocab", "dtype", "chunk_size", "repeats",
                                             "rounds", "alpha", "beta", "temperature")}
    config.update(torch=torch.__version__, cpus=os.cpu_count(),
                  gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
                  memory_method=next((r.get("memory_method") for r in rows if "memory_method" in r), None))
    out.write_text(json.dumps({"config": config, "results": rows}, indent=2) + "\n")
    console.print(f"wrote {out.relative_to(REPO)}")


def _summary(results: list[dict]) -> dict:
    errors = [r for r in results if "error" in r]
    if errors:
        return {"variant": errors[0]["variant"], "error": errors[0]["error"]}
    times = [t for r in results for t in r["times_s"]]
    return {"variant": results[0]["variant"], "peak_bytes": statistics.median(r["peak_bytes"] for r in results),
            "time_s": statistics.median(times), "times_s": times, "loss": results[0]["loss"],
            "memory_method": results[0]["memory_method"], "threads": results[0]["threads"]}


if __name__ == "__main__":
    main()
