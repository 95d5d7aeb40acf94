"""Throughput and padding of `undo train`'s trainer vs TRL's SFTTrainer, on the same model and data.

    python bench/train.py                    # CPU: tiny Llama (hidden 256, 4 layers), 160 rationales
    python bench/train.py --rounds 3         # alternate the variants 3 times, report medians
    python bench/train.py --preset gpu       # CUDA: random-init Qwen2.5-0.5B-sized model, bf16, + peak memory

Variants, each trained for one epoch in its own fresh subprocess (so no variant
warms caches for another), with the same model folder, data, batch size,
learning rate, seed and precision:

* undo          — `undo_cli.stages.train.run`, the code behind `undo train`, as configured
                  by default (hf.batching): on CPU, packed rows with sdpa run once per
                  sequence, drawn in the length-grouped order; on a GPU without a flash
                  kernel, right-padded, length-grouped batches.
* undo-packed   — the same with `--padding-free`: each micro-batch packed into one row,
                  no padding, no attention across examples (sdpa once per sequence,
                  training/packed_attention.py), batches shuffled.
* trl           — TRL `SFTTrainer` in its default configuration for a prompt-completion
                  dataset (the baseline): completion_only_loss, padded batches, no packing.
* trl-pf        — TRL with `padding_free=True` (its docs say FlashAttention only; with
                  transformers 5 sdpa also builds the block-diagonal mask, so it runs on CPU).

Both trainers get the identical prompt text (the `student` template rendered)
and the same rationales; TRL applies the chat template itself. Measured around
`Trainer.train()` only (not loading, tokenising or saving the model): wall time
and the process's CPU time, tokens processed (padding included) and real tokens
(padding excluded), counted from each batch the model actually receives.
Throughput = real tokens per second, because a padded token teaches nothing.

Workers run with one BLAS thread (OMP_NUM_THREADS=1). On a machine shared with
other jobs the wall clock mostly measures the neighbours, so the comparison
column ("vs trl") uses real tokens per CPU-second of the training loop, which
contention barely moves; on an idle machine the two agree. Wall tok/s is shown
too. `--threads N` gives the workers N threads instead.

On a GPU the comparison is on wall tokens/s, and MFU is shown: the model FLOPs of the
epoch (`model_flops`: 6(N - V d) T + 6 V d R + 6 L h sum(s^2), i.e. every weight's
forward and backward on every real token, the lm_head only where a response token is
predicted, causal attention) divided by the wall time and the GPU's dense bf16 peak
(H100/H200: 989 TFLOP/s, or --peak-tflops). Without trl and datasets installed the trl
variants are reported as not measured and the undo ones still run.

Output: a rich table on stderr, JSON in bench/results/train-<preset>.json.
Targets (issue 25): undo >= 1.5x trl and undo-packed >= 1.0x trl in real tokens per CPU-s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
VARIANTS = ("undo", "undo-packed", "trl", "trl-pf")

PRESETS = {
    "cpu": {"examples": 160, "batch_size": 8, "max_length": 512, "max_steps_per_rationale": 10},
    "gpu": {"examples": 2048, "batch_size": 16, "max_length": 1024, "max_steps_per_rationale": 40},
}


# --- data and model ------------------------------------------------------------------------

def make_rationales(n: int, max_steps: int, seed: int = 0) -> list[dict]:
    """Arithmetic word problems whose worked solutions vary a lot in length, as teacher rationales do."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        total = rng.randint(2, 20)
        steps = [f"She starts with {total} marbles."]
        for _ in range(rng.randint(1, max_steps)):
            delta = rng.randint(1, 9)
            if rng.random() < 0.5:
                steps.append(f"Then she finds {delta} more, so {total} + {delta} = {total + delta}.")
                total += delta
            else:
                steps.append(f"Then she gives away {delta}, so {total} - {delta} = {total - delta}.")
                total -= delta
        rows.append({"id": f"r{i}", "problem_id": f"q{i}", "answer": str(total), "task": "math",
                     "question": f"Ana plays a marble game with {len(steps) - 1} rounds. How many marbles are left?",
                     "rationale": " ".join(steps) + f"\n#### {total}"})
    return rows


def build_model(folder: Path, preset: str, rows: list[dict]) -> None:
    from undo_cli.tiny import build_tiny_model, train_tokenizer

    tok = train_tokenizer([r["question"] + " " + r["rationale"] for r in rows[:200]])
    if preset == "cpu":
        build_tiny_model(folder, tokenizer=tok, hidden_size=256, num_layers=4, num_heads=4, seed=0)
        return
    # A Qwen2.5-0.5B-sized model (random init): real layer shapes and a real 151936-token
    # vocabulary, with the small offline tokenizer (its ids are a subset of the vocabulary).
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def model_flops(model_dir: Path, data: Path, max_length: int) -> dict:
    """Model FLOPs of one epoch of training on `data` (what MFU counts), from the model's shapes.

    Per example of s tokens of which r are response tokens (undo's encoding: prompt + rationale):
      matmuls   6 * (N - V*d) * s    forward 2, backward 4 FLOPs per weight and token; N counts every
                                     parameter once (the tied embedding is the lm_head's matmul) ...
              + 6 * V * d * r        ... but the lm_head is only needed where a response token is predicted
      attention 6 * L * h * s^2      QK^T and AV, 2 FLOPs each per query-key pair and head dim, halved by
                                     causality, x3 for forward + backward (h = heads x head_dim)
    Padding and prompt logits some implementations compute anyway are waste, not model FLOPs.
    """
    import json as _json

    from transformers import AutoTokenizer

    from undo_cli.records import read_records
    from undo_cli.training.data import encode_records

    config = _json.loads((model_dir / "config.json").read_text())
    d, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    attn_width = heads * config.get("head_dim", d // heads)
    from safetensors import safe_open

    params = 0  # a tied embedding / lm_head is stored once
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            params += sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples, stats = encode_records(read_records(data, "rationale"), tok, max_length=max_length,
                                     template="student", path=str(data))
    tokens = sum(len(e["input_ids"]) for e in examples)
    squares = sum(len(e["input_ids"]) ** 2 for e in examples)
    flops = 6 * (params - vocab * d) * tokens + 6 * vocab * d * stats.response_tokens + 6 * layers * attn_width * squares
    return {"params": params, "tokens": tokens, "response_tokens": stats.response_tokens, "sum_sq_lengths": squares,
            "flops_per_epoch": flops, "formula": "6(N - V d) T + 6 V d R + 6 L h sum(s^2)"}


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= int(x)
    return n


# Dense bf16 peak of the GPUs we know (no sparsity), TFLOP/s: NVIDIA's datasheets (SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(name: str | None) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if name and k in name), None)


# --- one variant in a fresh process ------------------------------------------------------------

class CountingCollator:
    """Wraps a collator and counts what the model is given: all positions, and the padded ones."""

    def __init__(self, inner):
        self.inner, self.processed, self.padding = inner, 0, 0

    def __call__(self, features):
        batch = self.inner(features)
        self.processed += int(batch["input_ids"].numel())
        if "attention_mask" in batch:
            self.padding += int((batch["attention_mask"] == 0).sum())
        return batch


def _peak_memory() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _time_train(cls, timing: dict) -> None:
    """Record wall and CPU seconds of `cls.train` (the training loop, nothing around it)."""
    original = cls.train

    def timed(self, *args, **kwargs):
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            timing.update(cpu_s=time.process_time() - cpu, wall_s=time.perf_counter() - wall)

    cls.train = timed


def worker(variant: str, model: Path, data: Path, work: Path, settings: dict) -> dict:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timing: dict = {}
    if variant.startswith("undo"):
        from undo_cli.stages.train import TrainConfig, run
        from undo_cli.training.trainer import UndoTrainer

        _time_train(UndoTrainer, timing)

        summary = run(TrainConfig(student=str(model), data=str(data), output=str(work / variant), epochs=1,
                                  lr=2e-5, batch_size=settings["batch_size"], max_length=settings["max_length"],
                                  warmup_ratio=0.0, lr_scheduler="linear", seed=0, save_steps=10**6,
                                  logging_steps=10**6, padding_free=True if variant == "undo-packed" else None))
        tokens = summary["tokens_seen"]
        return {"processed": tokens["all"], "padding": tokens["padding"], **timing, "steps": summary["steps"],
                "mean_loss": summary["epoch_losses"][0], "batching": summary["batching"], "peak_gib": _peak_memory()}

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    _time_train(SFTTrainer, timing)

    from undo_cli.prompts import student_messages
    from undo_cli.records import read_records

    rows = read_records(data, "rationale")
    dataset = Dataset.from_list([{"prompt": student_messages(r), "completion": [{"role": "assistant",
                                  "content": r["rationale"]}]} for r in rows])
    cuda = torch.cuda.is_available()
    padding_free = variant == "trl-pf"
    args = SFTConfig(output_dir=str(work / variant), num_train_epochs=1, learning_rate=2e-5,
                     per_device_train_batch_size=settings["batch_size"], lr_scheduler_type="linear",
                     warmup_steps=0, seed=0, bf16=cuda, use_cpu=not cuda, gradient_checkpointing=False,
                     save_strategy="no", logging_steps=10**6, report_to="none", disable_tqdm=True,
                     dataloader_num_workers=0, padding_free=padding_free,
                     # TRL refuses max_length with padding_free and no packing; nothing here is longer anyway
                     max_length=None if padding_free else settings["max_length"])
    tok = AutoTokenizer.from_pretrained(model)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), args=args,
                         train_dataset=dataset, processing_class=tok)
    trainer.data_collator = counter = CountingCollator(trainer.data_collator)
    result = trainer.train()
    return {"processed": counter.processed, "padding": counter.padding, **timing,
            "steps": trainer.state.global_step, "batching": "packed" if padding_free else "padded",
            "mean_loss": float(result.metrics["train_loss"]),
            "peak_gib": _peak_memory()}


# --- the driver ------------------------------------------------------------------------------

def _round_ratios(mine: list[dict], trl: list[dict], seconds: str) -> tuple[list[float], list[float] | None]:
    """Per round, this variant's throughput over trl's (the same tokens, so a ratio of seconds), and a 95%
    t-interval of their mean (None for fewer than 2 rounds). Rounds alternate the order of the variants."""
    ratios = [t[seconds] / m[seconds] for m, t in zip(mine, trl)]
    if len(ratios) < 2:
        return ratios, None
    mean, sd = statistics.mean(ratios), statistics.stdev(ratios)
    t975 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}.get(len(ratios), 2.0)
    half = t975 * sd / len(ratios) ** 0.5
    return ratios, [mean - half, mean + half]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--rounds", type=int, default=1, help="alternate all variants this many times; medians")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--examples", type=int, help="override the preset's number of rationales")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads per worker (default 1, see above)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak for MFU (default: known from its name, e.g. H100/H200 989)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = dict(PRESETS[args.preset])
    if args.examples:
        settings["examples"] = args.examples

    if args.worker:
        result = worker(args.worker, Path(args.model), Path(args.data), Path(args.work), settings)
        print("RESULT " + json.dumps(result), flush=True)
        return

    from rich.console import Console
    from rich.table import Table

    from undo_cli.records import write_json, write_records

    console = Console(stderr=True, width=None if sys.stderr.isatty() else 130)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    import importlib.util

    missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    errors: dict[str, str] = {}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="undo-bench-train-") as tmp:
        tmp_path = Path(tmp)
        rows = make_rationales(settings["examples"], settings["max_steps_per_rationale"])
        data = tmp_path / "rationales.jsonl"
        write_records(data, rows)
        console.print(f"building the {args.preset} model ...")
        build_model(tmp_path / "model", args.preset, rows)
        flops = model_flops(tmp_path / "model", data, settings["max_length"])
        for variant in variants:
            if variant.startswith("trl") and missing:
                errors[variant] = f"not installed here: {', '.join(missing)}"
        for r in range(args.rounds):
            for variant in (variants if r % 2 == 0 else variants[::-1]):
                if variant in errors:
                    continue
                console.print(f"round {r + 1}/{args.rounds}: {variant}")
                proc = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--worker", variant,
                                       "--model", str(tmp_path / "model"), "--data", str(data),
                                       "--work", str(tmp_path / f"work{r}"), "--examples", str(settings["examples"])],
                                      capture_output=True, text=True, env=env)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                    errors[variant] = tail[:300]
                    console.print(f"[yellow]{variant} failed:[/yellow] {tail[:300]}")
                    continue
                runs[variant].append(json.loads(line[len("RESULT "):]))

    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    peak = args.peak_tflops or peak_tflops(gpu)
    table = Table(title=f"undo train vs TRL SFTTrainer ({args.preset}, {settings['examples']} rationales, "
                        f"batch {settings['batch_size']}, {args.threads} thread(s), median of {args.rounds}"
                        + (f", {gpu}" if gpu else "") + ")")
    for col in ("variant", "batches", "steps", "real tokens", "padding", "tok/s wall", "tok/CPU-s", "vs trl",
                "95% CI", "mean loss", "peak GiB", "MFU"):
        table.add_column(col, justify="left" if col in ("variant", "batches") else "right")
    summary: dict[str, dict] = {}
    for variant in variants:
        if not runs[variant]:
            continue
        first = runs[variant][0]
        real = first["processed"] - first["padding"]
        wall = statistics.median(x["wall_s"] for x in runs[variant])
        cpu = statistics.median(x["cpu_s"] for x in runs[variant])
        summary[variant] = {"batching": first["batching"], "steps": first["steps"],
                            "processed_tokens": first["processed"], "real_tokens": real,
                            "padding_fraction": first["padding"] / max(first["processed"], 1),
                            "wall_s": wall, "cpu_s": cpu, "real_tokens_per_s": real / wall,
                            "real_tokens_per_cpu_s": real / cpu, "mean_loss": first["mean_loss"],
                            "peak_gib": first["peak_gib"], "runs": runs[variant],
                            # model FLOPs of the epoch / wall time / the GPU's peak (None on CPU)
                            "mfu": flops["flops_per_epoch"] / wall / (peak * 1e12) if peak and gpu else None}
    cuda = any(s.get("peak_gib") is not None for s in summary.values())
    key = "real_tokens_per_s" if cuda else "real_tokens_per_cpu_s"  # a GPU's CPU time says nothing
    base = summary.get("trl", {}).get(key)
    for variant, s in summary.items():
        s["vs_trl_per_round"], s["vs_trl_ci95"] = _round_ratios(runs[variant], runs.get("trl", []),
                                                                "cpu_s" if key.endswith("cpu_s") else "wall_s")
        ci = s["vs_trl_ci95"]
        table.add_row(variant, s["batching"], str(s["steps"]), f"{s['real_tokens']:,}", f"{s['padding_fraction']:.1%}",
                      f"{s['real_tokens_per_s']:,.0f}", f"{s['real_tokens_per_cpu_s']:,.0f}",
                      f"{s[key] / base:.2f}x" if base else "-", f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "-",
                      f"{s['mean_loss']:.4f}",
                      f"{s['peak_gib']:.2f}" if s["peak_gib"] is not None else "-",
                      f"{s['mfu']:.1%}" if s["mfu"] is not None else "-")
        s["vs_trl"] = s[key] / base if base else None
    console.print(table)
    for variant, message in errors.items():
        console.print(f"[yellow]{variant}: not measured[/yellow] ({message})")

    if gpu:
        console.print(f"MFU = model FLOPs of the epoch / wall s / peak; FLOPs = {flops['formula']} = "
                      f"{flops['flops_per_epoch']:.3g} (N = {flops['params']:,} parameters, T = {flops['tokens']:,} "
                      f"tokens, R = {flops['response_tokens']:,} response tokens); peak = "
                      + (f"{peak:g} TFLOP/s dense bf16 ({gpu})" if peak else "unknown: pass --peak-tflops"))
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def _version(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    out = RESULTS / f"train-{args.preset}.json"
    write_json(out, {"preset": args.preset, "settings": settings, "rounds": args.rounds, "threads": args.threads,
                     "compared_on": key, "results": summary, "model_flops": flops, "peak_tflops": peak,
                     "errors": errors, "wall_s": round(time.time() - started, 1),
                     "load_avg_1m_after": os.getloadavg()[0],
                     "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                 "platform": platform.platform(), "gpu": gpu},
                     "versions": {n: _version(n) for n in ("torch", "transformers", "trl", "accelerate", "peft")}})
    console.print(f"wrote {out.relative_to(REPO)} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
