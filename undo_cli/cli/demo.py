"""`undo demo`'s command: the stage (undo_cli/demo.py), then one JSON line on stdout, like `undo iterate`."""

from __future__ import annotations

import json
import sys
from typing import Any


def run(config: Any) -> None:
    from undo_cli.demo import run as run_demo

    result = run_demo(config)
    summary = result.get("summary") or {}
    # People read stderr; stdout carries one JSON line: `undo demo | jq .test` works.
    sys.stdout.write(json.dumps({"workdir": result["workdir"], "setup_s": result["setup_s"],
                                 "wall_s": result.get("wall_s"), "run_dir": summary.get("run_dir"),
                                 "best_iteration": summary.get("best_iteration"), "test": summary.get("test"),
                                 "plot": result.get("plot")}) + "\n")
