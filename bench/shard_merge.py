"""What sharding costs as the work grows: `undo merge` time and memory, sidecar and manifest sizes.

    python bench/shard_merge.py                                  # 10k, 100k and 1M records
    python bench/shard_merge.py --sizes 10000,100000 --records-per-shard 5000

For each size R (synthetic problems, synthetic evaluate predictions of a
realistic size, ~0.9 kB a line) the script writes S = R / --records-per-shard
shard outputs with real sidecars (`stages/shards.py`), then, each in a fresh
subprocess so memory is its own:

* baseline — concatenating the shard files into one (a byte copy: the floor
             any merge pays), measured in the same run;
* merge    — `undo merge` in-process: check the sidecars, hash the input, re-read
             the input for the order, k-way merge in input order, and recompute
             metrics.json from the merged predictions.

It also reports the sidecar size per shard and the size (and atomic save time)
of an `undo iterate --launcher slurm` manifest for a 4-iteration run with S
shards per sharded stage (10 sharded stages: generate, 3 refine, 4 val and 2
test evaluations), built with the launcher's own per-task entries.

Output: a rich table on stderr, JSON in bench/results/shard_merge.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))


def _problem(i: int) -> dict:
    return {"id": f"prob-{i:07d}", "question": f"Ben has {i % 97} books. He buys {i % 13} packs with 4 books in each "
            "pack, then gives 10 books to Zoe. How many books does Ben have now?", "answer": str(i % 89),
            "task": "math"}


def _prediction(p: dict) -> dict:
    text = ("The packs hold 5 * 4 = 20 books. Now Ben has 2 + 20 = 22 books. After giving 10 to Zoe, he has "
            "22 - 10 = 12 books. ") * 4 + f"#### {p['answer']}"
    return {**p, "output": text, "predicted": p["answer"], "correct": True, "finish_reason": "stop",
            "model": "student", "usage": {"prompt_tokens": 91, "completion_tokens": 130}}


def prepare(folder: Path, records: int, shards: int) -> dict:
    """The input and S complete shards with sidecars, as `undo evaluate --shard K/S` leaves them."""
    from undo_cli.stages import shards as sh
    from undo_cli.stages.evaluate import SPEC, EvaluateConfig

    folder.mkdir(parents=True, exist_ok=True)
    inp = folder / "val.jsonl"
    outs = [folder / "shards" / f"predictions.{k}-of-{shards}.jsonl" for k in range(shards)]
    outs[0].parent.mkdir(exist_ok=True)
    handles = [o.open("w") for o in outs]
    counts = [0] * shards
    with inp.open("w") as fh:
        for i in range(records):
            p = _problem(i)
            fh.write(json.dumps(p) + "\n")
            k = sh.shard_of(p["id"], shards)
            handles[k].write(json.dumps(_prediction(p), ensure_ascii=False) + "\n")
            counts[k] += 1
    for h in handles:
        h.close()
    for k, out in enumerate(outs):
        cfg = EvaluateConfig(model="student", input=str(inp), output=str(out), shard=f"{k}/{shards}")
        sh.finish(str(out), sh.shard_meta(SPEC, sh.Shard(k, shards), cfg), records=counts[k])
    return {"input": str(inp), "shards": [str(o) for o in outs],
            "input_mb": inp.stat().st_size / 1e6, "shards_mb": sum(o.stat().st_size for o in outs) / 1e6,
            "sidecar_bytes": sh.sidecar_path(outs[0]).stat().st_size}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(kind: str, spec: dict, out: str) -> dict:
    started = time.perf_counter()
    if kind == "baseline":
        with open(out, "wb") as dst:
            for p in spec["shards"]:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
    else:
        from undo_cli.stages.shards import MergeConfig, merge

        merge(MergeConfig(output=out, shards=spec["shards"]))
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": _peak_mb()}


def manifest_size(folder: Path, shards: int) -> dict:
    """An iterate manifest with the launcher's per-task entries for S shards x 10 sharded stages."""
    from undo_cli.records import write_json

    task = {"job_id": "12345678_123", "attempts": 1, "log": "runs/name/slurm/iter_03-evaluate/12345678_123/"
            "12345678_123_0_log.err", "submitted": "12:34:56", "state": "complete"}
    stages = {}
    names = ["iter_00/generate"] + [f"iter_{k:02d}/refine" for k in (1, 2, 3)] + \
            [f"iter_{k:02d}/evaluate" for k in range(4)] + ["iter_00/test", "iter_03/test"]
    for name in names:
        stages[name] = {"status": "done", "seconds": 1234.5, "attempts": [{"started": "x", "outcome": "done"}],
                        "outputs": {"predictions": f"runs/name/{name}.jsonl"},
                        "slurm": {"n": shards, "tasks": {str(k): dict(task) for k in range(shards)}}}
    path = folder / "manifest.json"
    started = time.perf_counter()
    write_json(path, {"format": 1, "stages": stages})
    return {"manifest_kb": path.stat().st_size / 1e3, "save_ms": 1000 * (time.perf_counter() - started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--records-per-shard", type=int, default=10_000)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, spec, out = args.worker
        print(json.dumps(worker(kind, json.loads(Path(spec).read_text()), out)))
        return

    from rich.console import Console
    from rich.table import Table

    rows = []
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    for records in (int(s) for s in args.sizes.split(",")):
        shards = max(1, records // args.records_per_shard)
        with tempfile.TemporaryDirectory(prefix="undo-bench-merge-") as tmp:
            folder = Path(tmp)
            spec = prepare(folder, records, shards)
            (folder / "spec.json").write_text(json.dumps(spec))
            row = {"records": records, "shards": shards, **{k: v for k, v in spec.items() if k not in ("input", "shards")}}
            for kind in ("baseline", "merge"):
                res = subprocess.run([sys.executable, __file__, "--worker", kind, str(folder / "spec.json"),
                                      str(folder / f"{kind}.jsonl")], capture_output=True, text=True, env=env)
                if res.returncode != 0:
                    sys.exit(res.stderr[-3000:])
                got = json.loads(res.stdout.strip().splitlines()[-1])
                row[f"{kind}_s"], row[f"{kind}_peak_rss_mb"] = got["seconds"], got["peak_rss_mb"]
            assert (folder / "merge.jsonl").stat().st_size == (folder / "baseline.jsonl").stat().st_size
            row.update(manifest_size(folder, shards))
        row["merge_vs_baseline"] = row["merge_s"] / max(row["baseline_s"], 1e-9)
        row["merge_us_per_record"] = 1e6 * row["merge_s"] / records
        rows.append(row)

    table = Table(title="undo merge: evaluate shards (one per %d records)" % args.records_per_shard,
                  title_justify="left")
    for col in ("records", "shards", "shards MB", "cat s (baseline)", "merge s", "× cat", "µs/record",
                "merge peak RSS MB", "sidecar B", "manifest kB", "manifest save ms"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['records']:,}", str(r["shards"]), f"{r['shards_mb']:.0f}", f"{r['baseline_s']:.2f}",
                      f"{r['merge_s']:.2f}", f"{r['merge_vs_baseline']:.1f}", f"{r['merge_us_per_record']:.1f}",
                      f"{r['merge_peak_rss_mb']:.0f}", str(r["sidecar_bytes"]), f"{r['manifest_kb']:.0f}",
                      f"{r['save_ms']:.1f}")
    Console(stderr=True, width=200).print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "shard_merge.json"
    out.write_text(json.dumps({"records_per_shard": args.records_per_shard, "cpu_count": os.cpu_count(),
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
