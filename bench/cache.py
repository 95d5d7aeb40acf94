"""What the teacher cache costs per record: insert and lookup of 10k cached records, against an in-memory dict.

    python bench/cache.py                    # 10,000 records, batches of 64, text only and with top-5 logprobs
    python bench/cache.py --records 50000 --batch 256

What is measured, per record, for the exact calls the generation loop makes
(`undo_cli/economy/backend.py`), each batch of `--batch` prompts at a time:

* key      — `request_key`: sha256 of the canonical JSON of model + messages + sampling.
* insert   — `TeacherCache.put_many`: encode (zlib'd JSON) + one SQLite write transaction per batch
             (WAL, synchronous=NORMAL), into an initially empty file.
* lookup   — `TeacherCache.get_many` of keys that are all present: SELECT, decode, and the one write
             transaction that counts the hits and dates them.
* miss     — `get_many` of keys that are absent (what a first run pays before calling the teacher).

Baseline, measured in the same run on the same records: a Python dict holding the
Completion objects (no encoding, no disk): the least any cache could cost.
Records look like teacher rationales: ~1,500-character prompts, ~1,200-character
answers (~300 tokens); the `logprobs` variant adds top-5 log-probabilities for
each of 300 tokens (what `--logprobs 5` stores). Times are the median of
`--rounds` rounds, each on a fresh cache file.

Output: a rich table on stderr, JSON in bench/results/cache.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"


def make_records(count: int, logprobs: bool, seed: int = 0):
    from undo_cli.backends.base import Completion, SamplingConfig, TokenLogprobs

    rng = random.Random(seed)
    words = "the of apples Sam buys more how many total each then so we add subtract answer step".split()
    sampling = SamplingConfig(n=1, temperature=0.0, max_tokens=512, logprobs=5 if logprobs else None)
    # A pool of log-prob lists: drawing 10k x 1,800 random numbers would take longer than the benchmark.
    pool = [[TokenLogprobs(rng.randrange(50000), -rng.random(), [(rng.randrange(50000), -rng.random())
                                                                 for _ in range(5)]) for _ in range(300)]
            for _ in range(50)] if logprobs else None
    records = []
    for i in range(count):
        question = f"Problem {i}: " + " ".join(rng.choice(words) for _ in range(250))
        messages = [{"role": "system", "content": "You are a careful teacher. Solve step by step."},
                    {"role": "user", "content": question[:1450]}]
        text = " ".join(rng.choice(words) for _ in range(240)) + f"\n#### {i}"
        lps = pool[i % len(pool)] if pool else None
        records.append((messages, [Completion(text, "stop", 380, 300, lps)]))
    return sampling, records


def _per_record_us(seconds: float, count: int) -> float:
    return 1e6 * seconds / count


def one_round(records, sampling, batch: int) -> dict[str, float]:
    from undo_cli.economy.cache import TeacherCache, request_key

    identity = {"name": "bench-teacher", "digest": "b" * 64}
    n = len(records)
    out: dict[str, float] = {}

    t = time.perf_counter()
    keys = [request_key(identity["digest"], messages, sampling) for messages, _ in records]
    out["key"] = _per_record_us(time.perf_counter() - t, n)

    # Baseline: a dict of the Completion objects themselves.
    t = time.perf_counter()
    table = {}
    for start in range(0, n, batch):
        for k, (_, completions) in zip(keys[start : start + batch], records[start : start + batch]):
            table[k] = completions
    out["dict_insert"] = _per_record_us(time.perf_counter() - t, n)
    t = time.perf_counter()
    for start in range(0, n, batch):
        found = {k: table[k] for k in keys[start : start + batch] if k in table}
        assert len(found) == len(keys[start : start + batch])
    out["dict_lookup"] = _per_record_us(time.perf_counter() - t, n)

    with tempfile.TemporaryDirectory(prefix="undo-cache-bench-") as folder:
        with TeacherCache(folder, quiet=True) as cache:
            absent = [k[::-1] for k in keys]
            t = time.perf_counter()
            for start in range(0, n, batch):
                cache.get_many(absent[start : start + batch])
            out["sqlite_miss"] = _per_record_us(time.perf_counter() - t, n)

            t = time.perf_counter()
            for start in range(0, n, batch):
                cache.put_many((k, identity, completions) for k, (_, completions)
                               in zip(keys[start : start + batch], records[start : start + batch]))
            out["sqlite_insert"] = _per_record_us(time.perf_counter() - t, n)

            t = time.perf_counter()
            for start in range(0, n, batch):
                found = cache.get_many(keys[start : start + batch])
                assert len(found) == len(keys[start : start + batch])
            out["sqlite_lookup"] = _per_record_us(time.perf_counter() - t, n)
            out["file_bytes_per_record"] = cache.stats()["bytes"] / n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=64, help="prompts per generate call (the openai backend's default hint)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    results = []
    for variant in ("text", "logprobs"):
        sampling, records = make_records(args.records, logprobs=variant == "logprobs")
        rounds = [one_round(records, sampling, args.batch) for _ in range(args.rounds)]
        row = {"variant": variant, **{k: statistics.median(r[k] for r in rounds) for k in rounds[0]}}
        row["lookup_vs_dict"] = (row["key"] + row["sqlite_lookup"]) / (row["key"] + row["dict_lookup"])
        row["insert_vs_dict"] = (row["key"] + row["sqlite_insert"]) / (row["key"] + row["dict_insert"])
        results.append(row)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"teacher cache: µs per record ({args.records:,} records, batches of {args.batch}, "
                        f"median of {args.rounds})", title_justify="left")
    for col in ("records", "key", "dict insert", "dict lookup", "sqlite insert", "sqlite lookup", "sqlite miss",
                "bytes/record", "lookup ×dict", "insert ×dict"):
        table.add_column(col, justify="left" if col == "records" else "right")
    for r in results:
        table.add_row(r["variant"], f"{r['key']:.1f}", f"{r['dict_insert']:.2f}", f"{r['dict_lookup']:.2f}",
                      f"{r['sqlite_insert']:.1f}", f"{r['sqlite_lookup']:.1f}", f"{r['sqlite_miss']:.1f}",
                      f"{r['file_bytes_per_record']:,.0f}", f"{r['lookup_vs_dict']:.1f}", f"{r['insert_vs_dict']:.1f}")
    Console(stderr=True).print(table)
    Console(stderr=True).print("×dict ratios include the key computation on both sides (a dict cache needs the key too).")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "cache.json"
    out.write_text(json.dumps({"config": vars(args), "unit": "microseconds per record", "results": results},
                              indent=2) + "\n")
    Console(stderr=True).print(f"written to {out}")


if __name__ == "__main__":
    main()
