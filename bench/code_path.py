"""Following one sharded `undo generate` through the code: which modules it passes, how often it crosses between them.

    python bench/code_path.py                  # this checkout against main, in one run
    python bench/code_path.py --base 9b866bd   # against another commit

Fixed before the first run (issue 32): a tiny offline teacher (undo_cli/tiny.py, seed 0, 2 layers), 6
problems, `--shard 0/2`, `--max-tokens 4`, one sample each; the stage's own `run(config)` is traced with
`sys.setprofile` (config built beforehand), in a fresh subprocess per checkout (the base is `git archive`d
into a temporary folder and put first on PYTHONPATH), so both are traced the same way in the same run.

Per checkout:

* **stops**: distinct cross-module calls inside `undo_cli` (caller function -> callee function, each once):
  the places a reader following the call path has to jump to another file;
* **modules**: the `undo_cli` modules entered;
* **entries** of `stages/generation_loop.py` and `stages/shards.py`: distinct calls into each from another
  module, and **alternations**: in the time-ordered list of calls that cross into either, how often the
  next one goes to the other (the shard logic woven through the loop shows as many);
* the wall time is not measured (profiling inflates it).

Output: a table on stderr and bench/results/code_path.json with the commit.
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
WATCHED = ("undo_cli/stages/generation_loop.py", "undo_cli/stages/shards.py")

TRACE = r'''
import json, os, sys
from pathlib import Path
root = Path(sys.argv[1]).resolve()
pkg = str(root / "undo_cli") + os.sep
work = Path(sys.argv[2])
from undo_cli.tiny import build_tiny_model, train_tokenizer
model = build_tiny_model(work / "teacher", tokenizer=train_tokenizer([]), seed=0)
problems = work / "problems.jsonl"
problems.write_text("".join(json.dumps({"id": f"p{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(6)))
from undo_cli.stages.generate import GenerateConfig, run
config = GenerateConfig(teacher=str(model), input=str(problems), output=str(work / "out.0.jsonl"), shard="0/2",
                        max_tokens=4, n=1)
import undo_cli
assert undo_cli.__file__.startswith(pkg), undo_cli.__file__
stops, order = {}, []

def name(frame):
    f = frame.f_code.co_filename
    if not f.startswith(pkg):
        return None
    return "undo_cli/" + f[len(pkg):].replace(os.sep, "/"), frame.f_code.co_qualname

def profile(frame, event, arg):
    if event != "call":
        return
    callee = name(frame)
    if callee is None or frame.f_back is None:
        return
    caller = name(frame.f_back)
    if caller is None or caller[0] == callee[0]:
        return
    key = f"{caller[0]}:{caller[1]} -> {callee[0]}:{callee[1]}"
    stops[key] = stops.get(key, 0) + 1
    order.append(callee[0])

sys.setprofile(profile)
try:
    run(config)
finally:
    sys.setprofile(None)
print(json.dumps({"stops": stops, "order": order}))
'''


def commit(ref: str = "HEAD") -> str:
    return subprocess.run(["git", "rev-parse", ref], cwd=REPO, capture_output=True, text=True).stdout.strip()


def trace(root: Path) -> dict:
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "UNDO_NEXT": "0"}
        # cwd: `-c` puts the current folder first on sys.path, before PYTHONPATH
        done = subprocess.run([sys.executable, "-c", TRACE, str(root), work], env=env, cwd=work, capture_output=True,
                              text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"trace in {root} failed:\n{done.stderr[-3000:]}")
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    stops = raw["stops"]
    modules = sorted({k.split(" -> ")[1].split(":")[0] for k in stops} | {k.split(":")[0] for k in stops})
    entries = {m: sorted(k for k in stops if k.split(" -> ")[1].startswith(m + ":")) for m in WATCHED}
    watched = [m for m in raw["order"] if m in WATCHED]
    alternations = sum(a != b for a, b in zip(watched, watched[1:]))
    return {"stops": len(stops), "modules": len(modules), "module_list": modules,
            "entries": {m: len(v) for m, v in entries.items()}, "entry_calls": entries,
            "alternations_loop_shards": alternations, "stop_list": sorted(stops)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main", help="the commit to compare with (default: main)")
    parser.add_argument("--out", default=str(RESULTS / "code_path.json"))
    args = parser.parse_args()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "archive", args.base, "undo_cli", "prompts", "examples"], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        results = {"base": {"commit": commit(args.base), **trace(base)},
                   "this": {"commit": commit() + ("+dirty" if dirty else ""), **trace(REPO)}}
    report = {"bench": "code_path", "commit": results["this"]["commit"], "base": args.base,
              "python": sys.version.split()[0], "load_1min": round(os.getloadavg()[0], 2), **results}
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, width=120)
    table = Table(title="one sharded `undo generate` (--shard 0/2), traced")
    table.add_column("measure")
    for side in ("base", "this"):
        table.add_column(f"{side} {results[side]['commit'][:10]}", justify="right")
    rows = [("stops (distinct cross-module calls)", "stops"), ("modules entered", "modules"),
            ("generation_loop <-> shards alternations", "alternations_loop_shards")]
    for label, key in rows:
        table.add_row(label, *(str(results[s][key]) for s in ("base", "this")))
    for m in WATCHED:
        table.add_row(f"distinct calls into {m.split('/')[-1]}", *(str(results[s]["entries"][m]) for s in ("base", "this")))
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
