"""Step time and the share spent generating: off / on-policy / adaptive / minillm on one tiny pair.

    python bench/student_outputs.py                 # CPU, tiny Llama pair, ~2 minutes
    python bench/student_outputs.py --steps 60      # longer runs

Every variant is a real `undo train` run in its own subprocess (as a user runs
it), on the same student, the same teacher, the same rationales, batch size,
learning rate, seed and number of optimizer steps:

* off          — `--objective srkl` on the teacher's rationales only (the baseline: no sampling)
* on-policy    — GKD: `--objective jsd --student-outputs on-policy --lmbda 0.5`
* on-policy-1  — GKD with λ = 1: every step samples (the on-policy methods DistiLLM compares with)
* adaptive     — DistiLLM: `--objective srkl --student-outputs adaptive --val-data ...`, φ from 0
* adaptive-0.5 — the same schedule started at `--phi-init 0.5` (φ rarely grows in a short run)
* minillm      — `--method minillm` (teacher-mixed sampling, policy gradient), from the same student

The teacher is a tiny Llama (4 layers, hidden 192) first fine-tuned with `undo
train` (SFT) on the rationales, so it has something to teach; the student (2
layers, hidden 128) gets a short SFT too, since these methods refine an SFT
student. Measured from each run's
train_summary.json: the training loop's time per optimizer step, the share of
it spent in `generate`, and how many steps trained on fresh / replayed /
ground-truth batches; then, for quality, the student's reverse KL to the teacher
on held-out prompts (exact per-token KL(q‖p) along the student's own samples,
fixed seed), before and after.

Output: a rich table on stderr and bench/results/student_outputs.json, with our
adaptive-vs-on-policy speed ratio (DistiLLM reports 2.5–4.3× for its adaptive
schedule against on-policy methods, at better quality).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def rationales(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b, c = rng.randint(2, 9), rng.randint(1, 8), rng.randint(1, 5)
        rows.append({"id": f"r{seed}-{i}", "problem_id": f"q{seed}-{i}", "task": "math", "answer": str(a + b - c),
                     "question": f"Sam has {a} apples, buys {b} more and eats {c}. How many apples are left?",
                     "rationale": f"Sam starts with {a} apples. He buys {b} more, so {a} + {b} = {a + b}. "
                                  f"He eats {c}, so {a + b} - {c} = {a + b - c}.\n#### {a + b - c}"})
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def undo_train(*args: object) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "undo_cli", "train", *map(str, args)], capture_output=True,
                         text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"undo train failed ({res.returncode}):\n{res.stderr[-3000:]}")
    out = Path(args[list(args).index("--output") + 1])
    return json.loads((out / "train_summary.json").read_text())


def held_out_reverse_kl(student_dir: Path, teacher_dir: Path, problems: list[dict], *, max_new_tokens: int,
                        seed: int = 0) -> float:
    """Mean per-token KL(q‖p) along the student's own samples (temperature 1, no top-k), fixed seed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from undo_cli.prompts import encode_prompt, student_messages
    from undo_cli.training.student_outputs import eos_ids_of, sample_responses

    tok = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    prompts = [encode_prompt(tok, student_messages(p)) for p in problems]
    torch.manual_seed(seed)
    total, count = 0.0, 0
    with torch.no_grad():
        responses = sample_responses(student, prompts, tokenizer=tok, eos_ids=eos_ids_of(student, tok),
                                     temperature=1.0, max_new_tokens=max_new_tokens, max_length=1024)
        for prompt, response in zip(prompts, responses):
            ids = torch.tensor([prompt + response])
            lq = torch.log_softmax(student(ids).logits[0, len(prompt) - 1: -1].float(), -1)
            lp = torch.log_softmax(teacher(ids).logits[0, len(prompt) - 1: -1].float(), -1)
            total += float((lq.exp() * (lq - lp)).sum())
            count += len(response)
    return total / max(count, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per variant")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the runs and this process alike

    sys.path.insert(0, str(REPO))
    from rich.console import Console
    from rich.table import Table

    from undo_cli.tiny import build_tiny_model, train_tokenizer

    console = Console(stderr=True, width=None if sys.stderr.isatty() else 110)
    work = Path(tempfile.mkdtemp(prefix="bench-student-outputs-"))
    train, val, held_out = rationales(96, 0), rationales(16, 1), rationales(16, 2)
    data, val_data = write(work / "train.jsonl", train), write(work / "val.jsonl", val)
    tok = train_tokenizer([r["question"] + " " + r["rationale"] for r in train])
    base_student = build_tiny_model(work / "student-init", tokenizer=tok, seed=0)
    base_teacher = build_tiny_model(work / "teacher-init", tokenizer=tok, num_layers=4, hidden_size=192,
                                    num_heads=6, seed=1)
    console.print(f"fine-tuning the teacher on {len(train)} rationales (undo train, SFT) in {work}")
    teacher = work / "teacher"
    undo_train("--student", base_teacher, "--data", data, "--output", teacher, "--epochs", 12, "--lr", 3e-3,
               "--batch-size", 16, "--lr-scheduler", "constant", "--warmup-ratio", 0, "--logging-steps", 50)
    # Every method here refines an SFT student (MiniLLM and DistiLLM start from one): a short SFT first.
    student = work / "student"
    undo_train("--student", base_student, "--data", data, "--output", student, "--epochs", 2, "--lr", 3e-3,
               "--batch-size", 16, "--lr-scheduler", "constant", "--warmup-ratio", 0, "--logging-steps", 50)

    common = ["--student", student, "--teacher", teacher, "--data", data, "--max-steps", args.steps,
              "--batch-size", args.batch_size, "--lr", args.lr, "--lr-scheduler", "constant", "--warmup-ratio", 0,
              "--max-new-tokens", args.max_new_tokens, "--logging-steps", 1000, "--seed", 0]
    variants = {
        "off": ["--objective", "srkl"],
        "on-policy": ["--objective", "jsd", "--student-outputs", "on-policy", "--lmbda", 0.5],
        "on-policy-1": ["--objective", "jsd", "--student-outputs", "on-policy", "--lmbda", 1.0],
        "adaptive": ["--objective", "srkl", "--student-outputs", "adaptive", "--val-data", val_data,
                     "--eval-steps", max(args.steps // 8, 1), "--buffer-size", 4 * args.batch_size],
        "adaptive-0.5": ["--objective", "srkl", "--student-outputs", "adaptive", "--val-data", val_data,
                         "--eval-steps", max(args.steps // 8, 1), "--buffer-size", 4 * args.batch_size,
                         "--phi-init", 0.5],
        "minillm": ["--method", "minillm"],
    }
    before = held_out_reverse_kl(student, teacher, held_out, max_new_tokens=args.max_new_tokens)
    results: dict[str, dict] = {}
    for name, extra in variants.items():
        console.print(f"[{name}] undo train {' '.join(map(str, extra))}", markup=False)
        summary = undo_train(*common, *extra, "--output", work / name)
        so = summary.get("student_outputs") or {}
        steps = summary["steps"]
        results[name] = {
            "flags": [str(x) for x in extra], "steps": steps, "train_runtime_s": summary["train_runtime_s"],
            "s_per_step": summary["train_runtime_s"] / max(steps, 1),
            "generation_share": so.get("generation_share", 0.0),
            "sources": so.get("steps", {"ground_truth": steps}),
            "phi_final": so.get("phi_final"),
            "held_out_rkl_after": held_out_reverse_kl(work / name, teacher, held_out, max_new_tokens=args.max_new_tokens),
        }

    base = results["on-policy"]["s_per_step"]
    table = Table(title=f"student outputs: {args.steps} steps, batch {args.batch_size}, "
                        f"{args.max_new_tokens} new tokens (held-out reverse KL before: {before:.4f})",
                  title_justify="left")
    for col in ("variant", "s/step", "speed vs on-policy", "generating", "steps: fresh/replay/data", "φ end",
                "held-out RKL"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, r in results.items():
        src = r["sources"]
        table.add_row(name, f"{r['s_per_step']:.3f}", f"{base / r['s_per_step']:.2f}x",
                      f"{r['generation_share']:.0%}",
                      f"{src.get('fresh', 0)}/{src.get('replay', 0)}/{src.get('ground_truth', 0)}",
                      "" if r["phi_final"] is None else f"{r['phi_final']:.1f}", f"{r['held_out_rkl_after']:.4f}")
    console.print(table)
    ratios = {name: base / results[name]["s_per_step"] for name in ("adaptive", "adaptive-0.5")}
    console.print("adaptive vs on-policy (λ=0.5) speed: "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
                  + f"; vs on-policy λ=1: "
                  + ", ".join(f"{k} {results['on-policy-1']['s_per_step'] / results[k]['s_per_step']:.2f}x"
                              for k in ratios) + " (DistiLLM reports 2.5-4.3x)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "student_outputs.json"
    out.write_text(json.dumps({"settings": vars(args), "held_out_rkl_before": before, "variants": results,
                               "adaptive_speedup_vs_on_policy": ratios}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
