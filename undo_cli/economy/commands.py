"""`undo cache stats|prune`: the teacher cache (see undo_cli/economy/cache.py).

    undo cache stats                        # entries, size, hits and tokens saved, per model
    undo cache stats --json | jq .tokens_saved
    undo cache prune --older-than 30        # entries unused for 30 days
    undo cache prune --model Qwen/Qwen2.5-7B-Instruct
    undo cache prune --all
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError

_CACHE_DIR_HELP = "Teacher cache folder (default: $UNDO_CACHE_DIR, else $XDG_CACHE_HOME/undo or ~/.cache/undo)."


@dataclass
class CacheStatsConfig:
    """What `undo cache stats` needs."""

    cache_dir: str | None = field(default=None, metadata={"help": _CACHE_DIR_HELP})
    json: bool = field(default=False, metadata={"help": "Print the numbers as one JSON object on stdout."})


@dataclass
class CachePruneConfig:
    """What `undo cache prune` needs: at least one of older_than, model, all."""

    cache_dir: str | None = field(default=None, metadata={"help": _CACHE_DIR_HELP})
    older_than: float | None = field(default=None, metadata={"help": "Drop entries not used for this many days."})
    model: str | None = field(default=None, metadata={"help": "Drop the entries of this model name (as given to --teacher)."})
    all: bool = field(default=False, metadata={"help": "Drop every entry."})


def _open(cache_dir: str | None):
    from undo_cli.economy.cache import FILENAME, TeacherCache, default_cache_dir

    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if not (folder / FILENAME).is_file():
        raise UndoError(f"no teacher cache in {folder}", hint="`undo generate` and `undo refine` create it; "
                                                             "or pass the folder you used with --cache-dir")
    return TeacherCache(folder, quiet=True)


def stats(config: CacheStatsConfig) -> dict[str, Any]:
    with _open(config.cache_dir) as cache:
        data = cache.stats()
    if config.json:
        sys.stdout.write(json.dumps(data) + "\n")
        return data
    from rich.table import Table

    from undo_cli.console import console

    table = Table(title=f"teacher cache: {data['path']}", title_justify="left")
    for col in ("model", "entries", "hits", "tokens stored", "tokens saved"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in data["models"]:
        table.add_row(m["model"], f"{m['entries']:,}", f"{m['hits']:,}", f"{m['tokens_stored']:,}",
                      f"{m['tokens_saved']:,}")
    console.print(table)
    console.print(f"{data['entries']:,} entries, {data['bytes'] / 1e6:.1f} MB on disk ({data['journal_mode']} journal, "
                  f"{data['filesystem'] or 'unknown'} filesystem); {data['tokens_saved']:,} teacher tokens saved")
    return data


def prune(config: CachePruneConfig) -> int:
    from undo_cli.console import console

    with _open(config.cache_dir) as cache:
        removed = cache.prune(older_than_days=config.older_than, model=config.model, everything=config.all)
        left = cache.stats()
    console.print(f"removed {removed:,} entries; {left['entries']:,} left ({left['bytes'] / 1e6:.1f} MB)")
    return removed
