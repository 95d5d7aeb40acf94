"""Strong-teacher tokens a teacher cascade saves, on the demo, against the strong teacher alone (same run).

    python bench/cascade.py                    # a fresh `undo demo --setup-only` in a temp folder, both arms
    python bench/cascade.py --workdir /tmp/d   # reuse (or keep) a demo folder: its data and models

What is fixed before any result was seen (this file was committed before its first run):

* The demo of seed 0 (`undo demo --setup-only --seed 0`): its training split (data/train.jsonl),
  its untrained student base (models/student, a copy of examples/student-base) as the cheap
  teacher, and the teacher the demo trains from it (models/teacher) as the strong one.
* Both arms are `undo generate` over every training problem with examples/run.toml's generate
  settings (prompt demo-generate, max_tokens 128, greedy, n 1, --verify steps: the default)
  and `--no-cache` (every answer paid for, so tokens are comparable):
  - baseline: `--teacher models/teacher` (the strong teacher alone);
  - cascade:  `--teacher models/student --cascade models/teacher,name=strong`.
  Both run in this process's machine one after the other, baseline first.
* Reported: per arm, the verified share (problems with a kept rationale / problems, 95% Wilson
  interval) and the paid tokens per teacher (the output's ledger, `<stem>.usage.json`); the
  saving = 1 - (the strong teacher's paid tokens in the cascade) / (its paid tokens alone), with
  a 95% interval from a paired bootstrap over problems (BOOTSTRAP resamples with replacement,
  random.Random(BOOTSTRAP_SEED), percentile), each problem's strong tokens read from the records
  (baseline: `usage`; cascade: `lineage.cascade`). Whether the verified shares are equal is said,
  not assumed: with greedy decoding a row the strong teacher verifies alone it verifies in the
  cascade too, so the cascade's share can only be the same or higher.
* Whatever it shows is reported, a saving of zero included (the cheap teacher may verify nothing).

Output: a rich table on stderr, JSON in bench/results/cascade.json (with the git commit and the load).

    python bench/cascade.py --real --workdir /tmp/cascade-real   # the real models (below), ~30 min on 2 cores

`--real`, fixed before its first run (committed before it, like the rest of this file):

* Problems: REAL_N word problems from examples/make_examples.py's story generator (`event_story`, 1, 2 and
  3 events in turn, random.Random(REAL_SEED)), ids casc-000...; written to data/problems.jsonl and into the
  JSON (the generator may change later; the JSON keeps what was measured).
* Cheap teacher: SmolLM2-135M-Instruct, its .gguf given to `undo` directly (converted once into
  $UNDO_CACHE_DIR/models, here inside the work folder), hf backend, named `cheap`. gemma-3-270m was
  the other candidate; its .gguf is the base model with no chat template, so it cannot be a chat
  teacher (decided from the file's metadata, not from any output).
* Strong teacher: Qwen2.5-Coder-1.5B-Instruct Q4_K_M on llama.cpp's server (bench/real_models.py's
  LlamaCppServer: holds /work/models/.qwen.lock while it runs), openai backend, concurrency 1.
* Both arms: `undo generate` with REAL_GENERATE (prompt generate, max_tokens 192, greedy, n 1) and
  every other setting at its default: --verify steps, stop at the `#### <answer>` line, the repetition
  cut. baseline: the strong teacher alone; cascade: cheap first, then strong for the rows the cheap
  one's answer does not verify. The arms share one fresh teacher cache, baseline first: the cascade's
  strong answers are the baseline's (the same greedy requests, answered from the cache), so the two
  arms differ only in the rows the cheap teacher verified, and the strong teacher is not run twice
  (30 minutes, not 50). Strong tokens are counted per row from the records (baseline: `usage`;
  cascade: `lineage.cascade`, whose tokens count an answer whether paid now or cached); the ledgers
  are reported beside them.
* Reported as for the demo: verified shares with Wilson intervals, strong tokens alone and in the
  cascade, the saving with its paired-bootstrap interval, rows the cheap teacher verified, whether
  the verified shares are equal; and `undo lineage` of one row the cheap teacher could not verify
  (the cascade's output is laid out as a run folder's iteration 0, runs/cascade/). JSON in
  bench/results/cascade-real.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from demo_folder import demo_folder, git_commit, undo  # noqa: E402  (bench/demo_folder.py)

RESULTS = REPO / "bench" / "results"
SEED = 0
BOOTSTRAP, BOOTSTRAP_SEED = 2000, 0
GENERATE = ["--prompt", "demo-generate", "--max-tokens", "128", "--batch-size", "64", "--no-cache"]
# --real (module docstring): fixed before its first run.
REAL_N, REAL_SEED = 32, 30
REAL_GENERATE = ["--prompt", "generate", "--max-tokens", "192", "--temperature", "0", "--n", "1",
                 "--concurrency", "1", "--batch-size", "16"]
CHEAP_GGUF = "/work/models/SmolLM2-135M-Instruct.Q4_1.gguf"
STRONG_GGUF = "/work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
STRONG_NAME = "qwen2.5-coder-1.5b-instruct"  # the model's name on the server (teacher_speed.llamacpp_command)
LLAMACPP_PYTHON = "/work/venv-llamacpp/bin/python"


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _arm(workdir: Path, name: str, teacher_args: list[str], *, out: Path | None = None, problems: Path | None = None,
         flags: list[str] = GENERATE) -> dict:
    out = out or workdir / "bench" / f"{name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    undo("generate", *teacher_args, "--input", problems or workdir / "data" / "train.jsonl", "--output", out,
         "--overwrite", *flags)
    wall = time.perf_counter() - started
    stem = out.name[: -len(".jsonl")]
    kept, rejected = _read(out), _read(out.with_name(f"{stem}.rejected.jsonl"))
    ledger = json.loads(out.with_name(f"{stem}.usage.json").read_text())
    return {"kept": kept, "rejected": rejected, "ledger": ledger, "wall_s": round(wall, 1)}


def _strong_tokens(records: list[dict], strong: str | None) -> dict[str, int]:
    """problem id -> the strong teacher's paid tokens for it (strong None: the record's own usage, a lone teacher)."""
    out: dict[str, int] = {}
    for r in records:
        if strong is None:
            u = r.get("usage") or {}
            out[r["problem_id"]] = out.get(r["problem_id"], 0) + u.get("prompt_tokens", 0) + u.get("completion_tokens", 0)
        else:
            out[r["problem_id"]] = sum(a["tokens"] for a in r["lineage"]["cascade"] if a["teacher"] == strong)
    return out


def _verified(arm: dict, ids: list[str]) -> dict:
    """An arm's verified share: problems with a kept rationale, with a 95% Wilson interval."""
    from undo_cli.loop.run_state import wilson_interval

    verified = {r["problem_id"] for r in arm["kept"]}
    low, high = wilson_interval(len(verified), len(ids))
    return {"verified": len(verified), "problems": len(ids), "verified_share": round(len(verified) / len(ids), 4),
            "ci95": [round(low, 4), round(high, 4)]}


def _bootstrap(per_base: dict[str, int], per_casc: dict[str, int], ids: list[str]) -> list[float]:
    """The saving 1 - strong tokens in the cascade / alone, over BOOTSTRAP resamples of the problems (sorted)."""
    rng = random.Random(BOOTSTRAP_SEED)
    savings = []
    for _ in range(BOOTSTRAP):
        sample = [rng.choice(ids) for _ in ids]
        alone = sum(per_base.get(i, 0) for i in sample)
        savings.append(1 - sum(per_casc.get(i, 0) for i in sample) / alone if alone else 0.0)
    return sorted(savings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", help="a demo folder to reuse or create (default: a temporary one); with "
                                          "--real, the work folder (kept)")
    parser.add_argument("--real", action="store_true", help="the real models (module docstring) instead of the demo")
    args = parser.parse_args()
    load_before, started = os.getloadavg()[0], time.perf_counter()
    if args.real:
        measure_real(Path(args.workdir or tempfile.mkdtemp(prefix="undo-cascade-real-")), load_before)
        return
    with demo_folder(args.workdir, seed=SEED, prefix="undo-cascade-") as workdir:
        measure(workdir, time.perf_counter() - started, load_before)


def real_problems() -> list[dict]:
    """REAL_N word problems of 1, 2, 3 events in turn (module docstring; bench/real_models.py draws them)."""
    sys.path.insert(0, str(REPO / "examples"))
    from real_models import stories

    return [{"id": f"casc-{i:03d}", "question": d["question"], "answer": str(d["answer"]), "task": "math"}
            for i, d in enumerate(stories(REAL_SEED, REAL_N))]


def measure_real(workdir: Path, load_before: float) -> None:
    import hashlib
    import subprocess

    from real_models import LlamaCppServer  # bench/real_models.py: the server, under the machine's Qwen lock

    started = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["UNDO_CACHE_DIR"] = str(workdir / "undo-cache")  # the converted .gguf and the teacher cache
    rows = real_problems()
    data = workdir / "data" / "problems.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = [r["id"] for r in rows]
    runs = workdir / "runs"
    with LlamaCppServer(LLAMACPP_PYTHON, STRONG_GGUF, workdir / "llamacpp.log") as server:
        strong = f"{STRONG_NAME},name=strong,backend=openai,base_url={server.url}"
        base = _arm(workdir, "baseline", ["--teacher", STRONG_NAME, "--backend", "openai", "--base-url", server.url],
                    out=runs / "baseline" / "iter_00" / "rationales.jsonl", problems=data, flags=REAL_GENERATE)
        casc = _arm(workdir, "cascade", ["--teacher", CHEAP_GGUF, "--cascade", f"{CHEAP_GGUF},name=cheap",
                                         "--cascade", strong],
                    out=runs / "cascade" / "iter_00" / "rationales.jsonl", problems=data, flags=REAL_GENERATE)
        server_info = dict(server.info)
    arms = {}
    for name, arm in (("baseline", base), ("cascade", casc)):
        by = arm["ledger"]["by_backend"]
        arms[name] = {**_verified(arm, ids), "ledger_paid_by_teacher": {k: v["paid"]["tokens"] for k, v in by.items()},
                      "ledger_cached_by_teacher": {k: v["cached"]["tokens"] for k, v in by.items()},
                      "wall_s": arm["wall_s"]}
    per_base = _strong_tokens(base["kept"] + base["rejected"], None)
    per_casc = _strong_tokens(casc["kept"] + casc["rejected"], "strong")
    cheap_tokens = sum(a["tokens"] for r in casc["kept"] + casc["rejected"] for a in r["lineage"]["cascade"]
                       if a["teacher"] == "cheap")
    strong_alone, strong_cascade = sum(per_base.values()), sum(per_casc.values())
    savings = _bootstrap(per_base, per_casc, ids)
    saving = 1 - strong_cascade / strong_alone if strong_alone else 0.0
    by_cheap = sorted(r["problem_id"] for r in casc["kept"] if r["lineage"]["teacher"]["id"] == "cheap")
    both = {r["problem_id"] for r in base["kept"]} & {r["problem_id"] for r in casc["kept"]}
    # The lineage printout of one row: the first (in id order) that went to both teachers.
    row = next((r for r in sorted(casc["kept"] + casc["rejected"], key=lambda r: r["id"])
                if len(r["lineage"]["cascade"]) > 1), None)
    printout = None
    if row is not None:
        shown = subprocess.run([sys.executable, "-m", "undo_cli", "lineage", str(runs / "cascade"), row["id"]],
                               text=True, capture_output=True, env={**os.environ, "COLUMNS": "150"})
        printout = {"command": f"undo lineage {runs / 'cascade'} {row['id']}", "exit": shown.returncode,
                    "table": shown.stderr, "lineage": row["lineage"]}
    commit = git_commit()
    report = {
        "commit": commit, "mode": "real", "problems_seed": REAL_SEED, "n": len(ids),
        "problems_sha256": hashlib.sha256(data.read_bytes()).hexdigest(), "problems": rows,
        "generate_flags": REAL_GENERATE, "cheap": CHEAP_GGUF + " (hf backend, converted by undo)",
        "strong": f"{STRONG_GGUF} on llama.cpp's server (openai backend)", "server": server_info,
        "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
        "wall_s": round(time.perf_counter() - started, 1), "arms": arms,
        "rows_verified_by_the_cheap_teacher": len(by_cheap), "rows_verified_by_the_cheap_teacher_ids": by_cheap,
        "rows_verified_in_both_arms": len(both),
        "equal_verified_share": arms["baseline"]["verified"] == arms["cascade"]["verified"],
        "strong_tokens_alone": strong_alone, "strong_tokens_in_cascade": strong_cascade,
        "cheap_tokens_in_cascade": cheap_tokens, "strong_tokens_saved": strong_alone - strong_cascade,
        "saving": round(saving, 4),
        "saving_ci95": [round(savings[int(0.025 * BOOTSTRAP)], 4), round(savings[int(0.975 * BOOTSTRAP) - 1], 4)],
        "bootstrap": {"resamples": BOOTSTRAP, "seed": BOOTSTRAP_SEED, "unit": "fraction of the strong teacher's tokens"},
        "lineage_printout": printout,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cascade-real.json").write_text(json.dumps(report, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"teacher cascade on real models ({len(ids)} word problems, SmolLM2-135M -> Qwen2.5-Coder-1.5B), "
                        f"commit {commit[:10]}")
    for col in ("arm", "verified (95% CI)", "strong tokens", "cheap tokens", "wall s"):
        table.add_column(col)
    for name, a in arms.items():
        table.add_row(name, f"{a['verified']}/{a['problems']} ({a['ci95'][0]:.2f}-{a['ci95'][1]:.2f})",
                      f"{strong_alone if name == 'baseline' else strong_cascade:,}",
                      f"{0 if name == 'baseline' else cheap_tokens:,}", f"{a['wall_s']}")
    console = Console(stderr=True)
    console.print(table)
    console.print(f"strong-teacher tokens saved: {report['strong_tokens_saved']:,} ({saving:.1%}, 95% CI "
                  f"{report['saving_ci95'][0]:.1%} to {report['saving_ci95'][1]:.1%}); the cheap teacher verified "
                  f"{len(by_cheap)} rows; equal verified share: {report['equal_verified_share']}; "
                  f"load {report['load_before']} -> {report['load_after']}")
    if printout:
        console.print(f"{printout['command']}\n{printout['table']}", markup=False, highlight=False)
    console.print(f"JSON: {RESULTS / 'cascade-real.json'}")


def measure(workdir: Path, setup_s: float, load_before: float) -> None:
    cheap, strong = workdir / "models" / "student", workdir / "models" / "teacher"
    problems = _read(workdir / "data" / "train.jsonl")
    base = _arm(workdir, "baseline", ["--teacher", strong])
    casc = _arm(workdir, "cascade", ["--teacher", cheap, "--cascade", f"{strong},name=strong"])

    ids = [p["id"] for p in problems]
    arms = {}
    for name, arm in (("baseline", base), ("cascade", casc)):
        by = arm["ledger"]["by_backend"]
        arms[name] = {**_verified(arm, ids), "paid_tokens": arm["ledger"]["paid"]["tokens"],
                      "paid_by_teacher": {k: v["paid"]["tokens"] for k, v in by.items()}, "wall_s": arm["wall_s"]}
    strong_alone = arms["baseline"]["paid_tokens"]
    strong_cascade = arms["cascade"]["paid_by_teacher"].get("strong", 0)
    per_base = _strong_tokens(base["kept"] + base["rejected"], None)
    per_casc = _strong_tokens(casc["kept"] + casc["rejected"], "strong")
    savings = _bootstrap(per_base, per_casc, ids)
    saving = 1 - strong_cascade / strong_alone if strong_alone else 0.0
    first_tier = {r["problem_id"] for r in casc["kept"] if r["lineage"]["teacher"]["id"] != "strong"}
    both = {r["problem_id"] for r in base["kept"]} & {r["problem_id"] for r in casc["kept"]}
    example = next((r for r in casc["kept"] if len(r["lineage"]["cascade"]) > 1), casc["kept"][0] if casc["kept"] else None)
    commit = git_commit()
    report = {
        "commit": commit, "seed": SEED, "setup_s": round(setup_s, 1), "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2), "generate_flags": GENERATE,
        "cheap": "models/student (the untrained student base)", "strong": "models/teacher (the demo's trained teacher)",
        "arms": arms, "rows_verified_by_the_cheap_teacher": len(first_tier),
        "rows_verified_in_both_arms": len(both),
        "equal_verified_share": arms["baseline"]["verified"] == arms["cascade"]["verified"],
        "strong_tokens_alone": strong_alone, "strong_tokens_in_cascade": strong_cascade,
        "strong_tokens_saved": strong_alone - strong_cascade, "saving": round(saving, 4),
        "saving_ci95": [round(savings[int(0.025 * BOOTSTRAP)], 4), round(savings[int(0.975 * BOOTSTRAP) - 1], 4)],
        "bootstrap": {"resamples": BOOTSTRAP, "seed": BOOTSTRAP_SEED, "unit": "fraction of the strong teacher's paid tokens"},
        "example_lineage": example["lineage"] if example else None,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cascade.json").write_text(json.dumps(report, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"teacher cascade on the demo (seed {SEED}, {len(ids)} training problems), commit {commit[:10]}")
    for col in ("arm", "verified (95% CI)", "strong tokens paid", "cheap tokens paid", "all tokens paid", "wall s"):
        table.add_column(col)
    for name, a in arms.items():
        strong_paid = a["paid_tokens"] if name == "baseline" else a["paid_by_teacher"].get("strong", 0)
        cheap_paid = 0 if name == "baseline" else a["paid_by_teacher"].get(str(cheap), 0)
        table.add_row(name, f"{a['verified']}/{a['problems']} ({a['ci95'][0]:.2f}-{a['ci95'][1]:.2f})",
                      f"{strong_paid:,}", f"{cheap_paid:,}", f"{a['paid_tokens']:,}", f"{a['wall_s']}")
    console = Console(stderr=True)
    console.print(table)
    console.print(f"strong-teacher tokens saved: {report['strong_tokens_saved']:,} ({saving:.1%}, 95% CI "
                  f"{report['saving_ci95'][0]:.1%} to {report['saving_ci95'][1]:.1%}); the cheap teacher verified "
                  f"{len(first_tier)} rows; equal verified share: {report['equal_verified_share']}; "
                  f"load {report['load_before']} -> {report['load_after']}")
    console.print(f"JSON: {RESULTS / 'cascade.json'}")


if __name__ == "__main__":
    main()
