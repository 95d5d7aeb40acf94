"""Step time with the teacher on a vLLM server vs the same teacher loaded in the training process.

    python bench/served_teacher.py                                 # CPU, tiny Llama pair, a few minutes
    python bench/served_teacher.py --steps 24 --vllm-python .venv-vllm/bin/python

One tiny pair (student: 2 layers, hidden 128; teacher: 4 layers, hidden 192, the
same tokenizer), one vLLM OpenAI server on 127.0.0.1 serving the teacher
(`python -m vllm.entrypoints.openai.api_server`, float32, eager), and real
`undo train` runs in their own subprocesses, same data, seed and steps:

* live fkl         — `--objective fkl --teacher T` (the baseline: the teacher in process)
* served fkl       — the same with `--teacher-url URL` (top-20 log-probs from the server)
* live on-policy   — `--objective jsd --student-outputs on-policy --lmbda 1` (every step samples)
* served on-policy — the same with `--teacher-url URL`

Measured from each run's train_summary.json: the training loop's seconds per
optimizer step, and for the served runs the time the loop stood still waiting for
the server (`wait_s`) against the server's round trips in the background
(`request_s`). On a CPU machine the server shares the cores with the trainer, so
a served teacher here is not on hardware of its own: the ratio is a pessimistic
bound of what a teacher on separate GPUs costs.

Output: a rich table on stderr and bench/results/served_teacher.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))

from bench.student_outputs import rationales, undo_train, write  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per variant (12 = one epoch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--vllm-python", default=os.environ.get("UNDO_VLLM_PYTHON"),
                        help="python of a virtualenv with vLLM (default: $UNDO_VLLM_PYTHON, then .venv-vllm)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from rich.console import Console
    from rich.table import Table

    from tests.servers import free_port, serve, vllm_python, vllm_serve_cmd
    from undo_cli.tiny import build_tiny_model, train_tokenizer

    python = args.vllm_python or vllm_python()
    if not python:
        raise SystemExit("no vLLM virtualenv: pass --vllm-python or set UNDO_VLLM_PYTHON (.ci/vllm-venv.sh builds one)")
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 110)
    work = Path(tempfile.mkdtemp(prefix="bench-served-teacher-"))
    train = rationales(12 * args.batch_size, 0)
    data = write(work / "train.jsonl", train)
    tok = train_tokenizer([r["question"] + " " + r["rationale"] for r in train])
    student = build_tiny_model(work / "student", tokenizer=tok, seed=0)
    teacher = build_tiny_model(work / "teacher", tokenizer=tok, num_layers=4, hidden_size=192, num_heads=6, seed=1)

    common = ["--student", student, "--teacher", teacher, "--data", data, "--max-steps", args.steps,
              "--batch-size", args.batch_size, "--lr", 1e-3, "--lr-scheduler", "constant", "--warmup-ratio", 0,
              "--max-new-tokens", args.max_new_tokens, "--logging-steps", 1000, "--seed", 0]
    kinds = {"fkl": ["--objective", "fkl"],
             "on-policy": ["--objective", "jsd", "--student-outputs", "on-policy", "--lmbda", 1.0]}
    results: dict[str, dict] = {}
    port = free_port()
    cmd = vllm_serve_cmd(python, teacher, port)
    console.print(f"starting the vLLM server for the teacher on port {port} (log in {work})")
    with serve(cmd, port, str(teacher), work / "vllm.log", timeout=900) as server:
        for kind, flags in kinds.items():
            for where in ("live", "served"):
                name = f"{where} {kind}"
                extra = flags + (["--teacher-url", server.base_url] if where == "served" else [])
                console.print(f"[{name}] undo train {' '.join(map(str, extra))}", markup=False)
                summary = undo_train(*common, *extra, "--output", work / name.replace(" ", "-"))
                served = summary["objective"].get("served") or {}
                steps = summary["steps"]
                results[name] = {"flags": [str(x) for x in extra], "steps": steps,
                                 "train_runtime_s": summary["train_runtime_s"],
                                 "s_per_step": summary["train_runtime_s"] / max(steps, 1),
                                 "wait_s": served.get("wait_s"), "wait_share": served.get("wait_share"),
                                 "request_s": served.get("request_s"), "requests": served.get("requests"),
                                 "sequences": served.get("sequences")}

    table = Table(title=f"served vs live teacher: {args.steps} steps, batch {args.batch_size}, CPU "
                        f"({args.threads} thread(s) per run; the server shares the machine)", title_justify="left")
    for col in ("variant", "s/step", "x live", "waiting on server", "wait share", "server round trips"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, r in results.items():
        base = results[name.replace("served", "live")]["s_per_step"]
        served = r["wait_s"] is not None
        table.add_row(name, f"{r['s_per_step']:.3f}", f"{r['s_per_step'] / base:.2f}",
                      f"{r['wait_s']:.2f} s" if served else "", f"{r['wait_share']:.1%}" if served else "",
                      f"{r['requests']} req, {r['request_s']:.2f} s" if served else "")
    console.print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "served_teacher.json"
    ratios = {kind: results[f"served {kind}"]["s_per_step"] / results[f"live {kind}"]["s_per_step"] for kind in kinds}
    out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "vllm_python"},
                               "variants": results, "served_over_live_step_time": ratios}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
