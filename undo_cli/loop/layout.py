"""The run folder of the UNDO loop, defined once: where every stage of every iteration writes.

    runs/NAME/
      manifest.json  summary.json  .lock  report.png
      clusters.json              the train + val problems in clusters, made once before iteration 0 (undo cluster)
      iter_00/rationales.jsonl  (+ rationales.rejected.jsonl)   the teacher's verified rationales
      iter_NN/refined.jsonl      (k >= 1) the teacher's re-teaching of iteration k-1's errors
      iter_NN/train_data.jsonl   (k >= 1) the rationales mixed with the refined ones: what student k trains on
      iter_NN/student/           the trained student (train_summary.json inside)
      iter_NN/val/predictions.jsonl  iter_NN/val/predictions.metrics.json   (test/ for the best and one-shot students)
      iter_NN/errors.jsonl       the validation failures refine k+1 starts from

    layout = RunLayout(Path("runs/qwen-gsm8k"))
    layout.training_data(2)          # runs/qwen-gsm8k/iter_02/train_data.jsonl
    layout.step_key(2, "train")      # "iter_02/train": the stage's name in manifest.json

`undo iterate` (loop/iterate.py) writes through it, its manifest
(loop/manifest.py) names steps with it, and `undo report`
(loop/report.py) reads through it. examples/undo_loop.sh writes the same
layout in bash; tests/test_iterate.py checks that the script uses exactly
these names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
SUMMARY = "summary.json"
LOCK = ".lock"
REPORT_PLOT = "report.png"
RATIONALES = "rationales.jsonl"
REJECTED = "rationales.rejected.jsonl"  # written by `undo generate --keep correct` beside its output
REFINED = "refined.jsonl"
CLUSTERS = "clusters.json"
TRAIN_DATA = "train_data.jsonl"
ERRORS = "errors.jsonl"
STUDENT = "student"
PREDICTIONS = "predictions.jsonl"
METRICS = "predictions.metrics.json"  # `undo evaluate` names metrics after the predictions
SPLITS = ("val", "test")
ITERATION = "iter_{:02d}"  # two digits: iter_02 sorts before iter_10 as a person expects
_ITERATION = re.compile(r"iter_(\d+)")


def run_mark(run_dir: str | Path) -> str:
    """What a report of this run carries (the PNG's `Source` text chunk, the HTML page's `undo-run` meta; ASCII
    whatever the path): `undo report --plot/--html PATH` replaces a file at PATH only when it carries the same
    mark, or with --overwrite."""
    import hashlib

    return "undo report " + hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def iteration_name(k: int) -> str:
    """iter_00, iter_01, ..."""
    return ITERATION.format(k)


def parse_iteration(name: str) -> int | None:
    """The k of a folder name `iter_NN` or a step key `iter_NN/stage`; None for anything else."""
    m = _ITERATION.fullmatch(name.split("/", 1)[0])
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def report_plot(self) -> Path:
        return self.root / REPORT_PLOT

    @property
    def clusters(self) -> Path:
        return self.root / CLUSTERS

    def iteration_dir(self, k: int) -> Path:
        return self.root / iteration_name(k)

    def iterations(self) -> list[int]:
        """The k of every iter_NN folder on disk."""
        found = (parse_iteration(p.name) for p in self.root.glob("iter_*") if p.is_dir())
        return sorted(k for k in found if k is not None)

    @staticmethod
    def step_key(k: int, stage: str) -> str:
        return f"{iteration_name(k)}/{stage}"

    def rationales(self) -> Path:
        return self.iteration_dir(0) / RATIONALES

    def rejected(self) -> Path:
        return self.iteration_dir(0) / REJECTED

    def refined(self, k: int) -> Path:
        return self.iteration_dir(k) / REFINED

    def train_data(self, k: int) -> Path:
        return self.iteration_dir(k) / TRAIN_DATA

    def training_data(self, k: int) -> Path:
        """What the student of iteration k trains on (and what refine k+1 re-teaches)."""
        return self.rationales() if k == 0 else self.train_data(k)

    def student(self, k: int) -> Path:
        return self.iteration_dir(k) / STUDENT

    def predictions(self, k: int, split: str) -> Path:
        return self.iteration_dir(k) / split / PREDICTIONS

    def metrics(self, k: int, split: str) -> Path:
        return self.iteration_dir(k) / split / METRICS

    def errors(self, k: int) -> Path:
        return self.iteration_dir(k) / ERRORS
