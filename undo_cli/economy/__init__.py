"""Teacher economy: never pay twice for a teacher's answer, and know what every run cost.

    undo generate --teacher M --input train.jsonl --output r.jsonl --max-teacher-tokens 2000000 \\
        --price-input 0.15 --price-output 0.60
    undo cache stats
    undo cache prune --older-than 30

* `cache.py`: the content-addressed SQLite cache of teacher completions (key,
  model identity, concurrency, network filesystems).
* `accounting.py`: the per-output ledger of paid and cached tokens, prices, budgets.
* `backend.py`: the wrapper the shared generation loop (stages/generation_loop.py) puts
  around the teacher's backend, so every backend gets all of it once.
* `options.py`: the config fields (= flags) of the teacher stages.
* `estimate.py`: before any call, an upper bound of generate's teacher tokens (`undo iterate --dry-run`).
"""
