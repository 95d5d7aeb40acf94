"""Peak memory and time of the cross-tokenizer objectives (uld, gold) vs the same-tokenizer objective.

    python bench/cross_tokenizer.py                    # CPU: hidden 512, vocab 32k / 30k, 4096 tokens
    python bench/cross_tokenizer.py --multi 0.4        # more spans of several tokens
    python bench/cross_tokenizer.py --device cuda      # hidden 4096, vocab 151936 / 128256, 8192 tokens, bf16

One forward + backward of the loss `undo train` runs (gradients for the student's final hidden states and
output layer, none for the teacher), each variant in a fresh process (see bench/objectives.py for how peak
memory is read: VmHWM above the post-setup RSS on a CPU, max_memory_allocated on CUDA):

* same-tokenizer — `fused_linear_divergence` with --kind (default jsd), teacher and student sharing the
                   student's vocabulary: the baseline, measured in the same run;
* uld, gold      — `cross_loss` against a live teacher with another vocabulary (--teacher-vocab), its logits
                   formed per chunk from its hidden states as `undo train` does; spans from a synthetic
                   alignment in which a fraction --multi of the spans has two tokens on one side (half of them
                   on the student's, half on the teacher's), the rest one on each; gold compares a shared
                   vocabulary of --shared x the smaller vocabulary;
* uld-naive      — the plain-autograd reference `cross_tokenizer_divergence` on full logits (what the chunking saves).

Settings are fixed before looking at results (seed 0, two timed steps after the measured cold one). Output: a
rich table on stderr, JSON in bench/results/cross_tokenizer-<device>.json.

    python bench/cross_tokenizer.py --heldout          # does it teach? the tests' tiny pair, before/after

`--heldout` trains the tests' tiny student (byte-level BPE, 512 tokens) against the tests' taught teacher with
another tokenizer (400 tokens, ChatML) for 6 steps (batch 4, lr 3e-3, seed 0) on 8 problems, one run per row,
and reports the divergence on the 4 held-out problems' byte-aligned spans before and after (forward KL over
the shared vocabulary + bucket, and the ULD distance; float64): the mean, and the paired mean difference per
span with a 95% normal interval. `sft` (cross-entropy alone, same steps) is the baseline: the teacher was
taught these very rationales, so imitating the text alone also moves the student towards it.
JSON in bench/results/cross_tokenizer-heldout.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from objectives import CpuPeak  # noqa: E402  (the same peak-memory reading as bench/objectives.py)

PRESETS = {
    "cpu": {"hidden": 512, "vocab": 32_000, "teacher_vocab": 30_000, "tokens": 4096, "dtype": "float32"},
    "cuda": {"hidden": 4096, "vocab": 151_936, "teacher_vocab": 128_256, "tokens": 8192, "dtype": "bfloat16"},
}
VARIANTS = ("same-tokenizer", "uld", "gold", "uld-naive")


def alignment(n_student: int, multi: float, generator):
    """Synthetic spans over n_student student rows: (student SpanRows, teacher SpanRows, teacher row count)."""
    import torch

    from undo_cli.objectives.cross_tokenizer import SpanRows

    draws = torch.rand(n_student, generator=generator).tolist()
    s = {"first": [], "cont": [], "span": []}
    t = {"first": [], "cont": [], "span": []}
    i = j = k = 0
    while i < n_student:
        shape = (2, 1) if draws[i] < multi / 2 and i + 1 < n_student else (1, 2) if draws[i] < multi else (1, 1)
        for side, at, width in ((s, i, shape[0]), (t, j, shape[1])):
            side["first"].append(at)
            side["cont"] += list(range(at + 1, at + width))
            side["span"] += [k] * (width - 1)
        i, j, k = i + shape[0], j + shape[1], k + 1
    rows = []
    for side in (s, t):
        long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        rows.append(SpanRows(long(side["first"]), long(side["cont"]), long(side["span"]),
                             long([0] * len(side["cont"]))))
    return rows[0], rows[1], j


def worker(args) -> dict:
    import torch

    from undo_cli.objectives import fused_linear_divergence
    from undo_cli.objectives.cross_tokenizer import cross_loss, cross_tokenizer_divergence, live_teacher

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    n, h, v, vt = args.tokens, args.hidden, args.vocab, args.teacher_vocab
    s_rows, t_rows, n_teacher = alignment(n, args.multi, g)
    s_rows.cont_target = torch.randint(0, v, s_rows.cont_target.shape, generator=g)
    t_rows.cont_target = torch.randint(0, vt, t_rows.cont_target.shape, generator=g)
    s_rows, t_rows = s_rows.to(device), t_rows.to(device)
    hs = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    ws = (torch.randn(v, h, generator=g) / h ** 0.5).to(device, dtype).requires_grad_()
    teacher_v = v if args.variant == "same-tokenizer" else vt
    ht = torch.randn(n if args.variant == "same-tokenizer" else n_teacher, h, generator=g).to(device, dtype)
    wt = (torch.randn(teacher_v, h, generator=g) / h ** 0.5).to(device, dtype)
    k = int(args.shared * min(v, vt))
    shared = (torch.randperm(v, generator=g)[:k].to(device), torch.randperm(vt, generator=g)[:k].to(device))
    targets = torch.randint(0, v, (n,), generator=g).to(device)

    def teacher_at():  # as `undo train` forms it: a few span rows at a time, reduced to what the objective reads
        return live_teacher(ht, wt, t_rows, args.variant, student_vocab=v, shared_teacher=shared[1], temperature=1.0,
                            chunk_size=args.chunk_size)

    def step():
        if args.variant == "same-tokenizer":
            return fused_linear_divergence(hs, ws, ht, wt, None, args.kind, chunk_size=args.chunk_size)
        if args.variant == "uld-naive":
            return cross_tokenizer_divergence(hs @ ws.T, ht @ wt.T, s_rows, t_rows, "uld")
        loss = cross_loss(hs, ws, targets=targets, rows=s_rows, teacher_at=teacher_at(), kind=args.variant,
                          shared=shared, chunk_size=args.chunk_size)
        return loss / s_rows.count  # a mean over spans, as the naive reference reports it

    def run_once():
        hs.grad = ws.grad = None
        loss = step()
        loss.backward()
        return float(loss.detach())

    if device.type == "cuda":
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
    return {"variant": args.variant, "loss": loss, "peak_bytes": peak, "memory_method": method, "times_s": times,
            "spans": s_rows.count, "student_continuation_rows": int(s_rows.cont.numel()),
            "teacher_rows": n_teacher, "threads": torch.get_num_threads()}


HELDOUT_RUNS = [  # (row, objective, extra TrainConfig settings); fixed before any result was seen
    ("sft (baseline)", "sft", {}),
    ("live auto -> gold", "auto", {}),
    ("live uld", "uld", {}),
    ("live uld + lm 1", "uld", {"lm_weight": 1.0}),
    ("offline gold (top-5)", "gold", {"teacher_logprobs": True}),
    ("offline uld (top-5)", "uld", {"teacher_logprobs": True}),
]


def heldout(console) -> list[dict]:
    """Train the tests' tiny pair with each objective and measure the held-out divergence before and after."""
    import tempfile

    sys.path.insert(0, str(REPO))
    from tests.conftest import TAUGHT_PROBLEMS, overfit
    from tests.test_train_cross_tokenizer import FAST, TRAIN, _rationales, _write, heldout_divergence
    from undo_cli.stages.generate import GenerateConfig, run as generate
    from undo_cli.stages.train import TrainConfig, run as train
    from undo_cli.tiny import build_tiny_model, train_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="undo-xtok-"))
    student = build_tiny_model(folder / "student", tokenizer=train_tokenizer([]), seed=0)
    other = train_tokenizer([p["rationale"] for p in TAUGHT_PROBLEMS] * 3, vocab_size=400, flavor="chatml")
    teacher = overfit(build_tiny_model(folder / "teacher", tokenizer=other, num_layers=2, seed=1), TAUGHT_PROBLEMS)
    data = _write(folder / "rationales.jsonl", _rationales(TRAIN))
    problems = _write(folder / "problems.jsonl", [{k: p[k] for k in ("id", "question", "answer", "task")}
                                                  for p in TRAIN])
    generate(GenerateConfig(teacher=str(teacher), input=str(problems), output=str(folder / "recorded.jsonl"),
                            prompt="student", logprobs=5, max_tokens=48, keep="all", cache=False))
    metrics = {"fkl over shared + bucket": ("gold", 0.0), "uld": ("uld", 0.0)}
    before = {m: heldout_divergence(student, teacher, kind, beta, per_span=True) for m, (kind, beta) in metrics.items()}
    baseline: dict[str, list[float]] = {}
    rows = []
    for i, (name, objective, extra) in enumerate(HELDOUT_RUNS):
        console.print(f"[dim]{name} ...[/dim]")
        source = folder / "recorded.jsonl" if extra.get("teacher_logprobs") else data
        out = folder / f"run{i}"
        teacher_kw = {} if objective == "sft" or extra.get("teacher_logprobs") else {"teacher": str(teacher)}
        summary = train(TrainConfig(student=str(student), data=str(source), output=str(out), objective=objective,
                                    **teacher_kw, **extra, **FAST))
        row = {"run": name, "ran": summary["objective"]["name"]}
        for metric, (kind, beta) in metrics.items():
            after = heldout_divergence(out, teacher, kind, beta, per_span=True)
            baseline.setdefault(metric, after)  # the first run is sft
            row[metric] = {"before": sum(before[metric]) / len(after), "after": sum(after) / len(after),
                           **_paired("change", after, before[metric]), **_paired("vs_sft", after, baseline[metric]),
                           "spans": len(after)}
        rows.append(row)
    return rows


def _paired(name: str, a: list[float], b: list[float]) -> dict:
    """Mean of a − b over spans and a 95% normal interval (spans of 4 problems are not independent: optimistic)."""
    import math

    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1))
    half = 1.96 * sd / math.sqrt(len(diffs))
    return {name: mean, f"{name}_ci95": [mean - half, mean + half]}


def print_heldout(console, rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="held-out divergence to the teacher (4 problems, 84 byte-aligned spans): before -> after; "
                        "paired change per span vs before and vs sft [95% CI]")
    table.add_column("run")
    metrics = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    for metric in metrics:
        table.add_column(metric, justify="right")

    def ci(r, name):
        lo, hi = r[f"{name}_ci95"]
        return f"{r[name]:+.3f} [{lo:+.3f}, {hi:+.3f}]"

    for row in rows:
        table.add_row(row["run"], *[f"{r['before']:.3f} -> {r['after']:.3f}\n{ci(r, 'change')}\nvs sft {ci(r, 'vs_sft')}"
                                    for r in (row[m] for m in metrics)])
    console.print(table)


def run_variant(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--variant", variant]
    for name in ("device", "tokens", "hidden", "vocab", "teacher_vocab", "dtype", "chunk_size", "repeats", "kind",
                 "multi", "shared"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"variant": variant, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    for name in ("tokens", "hidden", "vocab", "teacher_vocab"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--kind", default="jsd", help="the same-tokenizer objective of the baseline")
    parser.add_argument("--multi", type=float, default=0.2, help="share of spans with two tokens on one side")
    parser.add_argument("--shared", type=float, default=0.8, help="shared vocabulary, x the smaller vocabulary")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per worker (after the measured cold step)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--heldout", action="store_true", help="train the tests' tiny pair and report the held-out "
                                                               "divergence before/after instead")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
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
    if args.heldout:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        rows = heldout(console)
        print_heldout(console, rows)
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / "cross_tokenizer-heldout.json"
        out.write_text(json.dumps({"runs": rows, "load_average": os.getloadavg()}, indent=2) + "\n")
        console.print(f"wrote {out.relative_to(REPO)}")
        return
    rows = []
    for variant in args.variants.split(","):
        console.print(f"[dim]{variant} ...[/dim]")
        rows.append(run_variant(args, variant))
    base = next((r for r in rows if r.get("variant") == "same-tokenizer" and "error" not in r), None)
    for row in rows:
        if "error" not in row:
            row["time_s"] = statistics.median(row["times_s"])
            if base:
                row["memory_vs_same_tokenizer"] = row["peak_bytes"] / base["peak_bytes"]
                row["time_vs_same_tokenizer"] = row["time_s"] / statistics.median(base["times_s"])
    table = Table(title=f"forward + backward: {args.tokens} student tokens, hidden {args.hidden}, vocab {args.vocab} "
                        f"(teacher {args.teacher_vocab}), {args.dtype}, {args.device}, chunk {args.chunk_size}, "
                        f"{args.multi:.0%} multi-token spans")
    for col in ("variant", "peak memory", "× same-tok.", "time (median)", "× same-tok.", "loss"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for row in rows:
        if "error" in row:
            table.add_row(row["variant"], "[red]failed[/red]", "", "", "", str(row["error"])[:60])
            continue
        name = f"{row['variant']} ({args.kind})" if row["variant"] == "same-tokenizer" else row["variant"]
        table.add_row(name, f"{row['peak_bytes'] / 2**20:,.0f} MiB", f"{row.get('memory_vs_same_tokenizer', 1):.2f}",
                      f"{row['time_s']:.2f} s", f"{row.get('time_vs_same_tokenizer', 1):.2f}", f"{row['loss']:.5f}")
    console.print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"cross_tokenizer-{args.device}.json"
    config = {k: getattr(args, k) for k in ("device", "tokens", "hidden", "vocab", "teacher_vocab", "dtype", "kind",
                                             "multi", "shared", "chunk_size", "repeats")}
    config.update(cpus=os.cpu_count(), load_average=os.getloadavg())
    out.write_text(json.dumps({"config": config, "results": rows}, indent=2) + "\n")
    console.print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
