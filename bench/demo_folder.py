"""What bench/cascade.py and bench/stop_rule.py share: `undo` as a user runs it, a demo folder, the commit.

    from demo_folder import demo_folder, git_commit, undo
    with demo_folder("--workdir from argv or None", seed=0, prefix="undo-x-") as workdir:  # data/ and models/
        undo("generate", ...)
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def undo(*args: object) -> str:
    """`python -m undo_cli ARGS` in a fresh process; its stdout, or exit with its stderr's tail."""
    proc = subprocess.run([sys.executable, "-m", "undo_cli", *map(str, args)], text=True, capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"undo {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


@contextlib.contextmanager
def demo_folder(workdir: str | None, *, seed: int, prefix: str) -> Iterator[Path]:
    """A demo folder with data/ and models/ (`undo demo --setup-only --seed SEED`, reused when there): `workdir`,
    kept, or a temporary one removed afterwards."""
    tmp = None if workdir else tempfile.TemporaryDirectory(prefix=prefix)
    path = Path(workdir or tmp.name)
    try:
        if not (path / "models" / "teacher" / "train_summary.json").is_file():
            undo("demo", "--workdir", path, "--setup-only", "--seed", seed)
        yield path
    finally:
        if tmp is not None:
            tmp.cleanup()


def git_commit() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], text=True, capture_output=True).stdout.strip()
