"""Before any work: every stage's config built and checked, the plan, and the dry run; nothing is created
and no model loads.

    undo iterate --config examples/run.toml --dry-run      # settings with their origin, the plan, a teacher-token bound

`check_stages` is also the first thing a real run does (loop/iterate.py), so a bad value in any table
stops the run before the teacher writes a line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError
from undo_cli.loop.config import IterateConfig
from undo_cli.loop.rounds import Loop
from undo_cli.loop.terms import in_loop_terms


class Unopened:
    """A stand-in for the run folder: the configs only need its path (nothing is created)."""

    def __init__(self, path: Path):
        self.path = path
        self.manifest: dict[str, Any] = {}  # no run yet: no budget spent

    def stage(self, key: str) -> None:  # nothing has run
        return None


def check_stages(config: IterateConfig) -> None:
    """Build every stage's config (iteration 0 and a refinement round) and its templates: fails before any work.

    Each stage checks its own values in its config's `__post_init__`; building them all here means
    `[train] lr = -1` is refused before the teacher has generated anything, in terms of the config
    key (`train.lr`), not of `undo train`'s flag (`--lr`): the error names its settings with `ref`
    (errors.py), and is worded here.
    """
    from undo_cli.model_refs import to_be_written
    from undo_cli.prompts import load_template

    loop = Loop(config, Unopened(config.run_dir))
    builders = [("cluster", loop.cluster_config), ("generate", loop.generate_config),
                ("train", lambda: loop.train_config(0)),
                ("evaluate", lambda: loop.evaluate_config(0, "val")),
                ("collect_errors", lambda: loop.collect_errors_config(0))]
    if config.max_iterations > 0:
        builders += [("refine", lambda: loop.refine_config(1)), ("mix", lambda: loop.mix_config(1)),
                     ("train", lambda: loop.train_config(1))]
    for table, build in builders:
        try:
            with to_be_written(config.run_dir):  # the students of later stages do not exist yet
                cfg = build()
            for attr in ("prompt", "template"):
                if getattr(cfg, attr, None):
                    try:
                        load_template(getattr(cfg, attr))
                    except UndoError as exc:
                        raise UndoError(f"{table}.{attr}: {exc.message}", hint=exc.hint) from None
        except UndoError as exc:
            raise in_loop_terms(table, exc) from None


def plan(config: IterateConfig) -> list[tuple[str, str, str]]:
    """(stage key, what it does, the files it writes) for every stage the run may reach, in order."""
    from undo_cli.model_refs import to_be_written

    with to_be_written(config.run_dir):
        return _plan(config, Loop(config, Unopened(config.run_dir)))


def _plan(config: IterateConfig, loop: "Loop") -> list[tuple[str, str, str]]:
    rows = [("iter_00/cluster", "train_file and val_file's questions in clusters, once", loop.cluster_config().output),
            ("iter_00/generate", "the teacher's rationales for train_file", loop.generate_config().output)]
    for k in range(config.max_iterations + 1):
        if k:
            rows += [(loop.step_key(k, "refine"), f"the teacher re-teaches iteration {k - 1}'s errors",
                      loop.refine_config(k).output),
                     (loop.step_key(k, "mix"), f"refined rationales {config.mix} the old ones", loop.mix_config(k).output)]
        ev = loop.evaluate_config(k, "val")
        rows += [(loop.step_key(k, "train"), "train the student" + (" (from the previous one)" if k and config.init ==
                                                                 "previous" else ""), loop.train_config(k).output),
                 (loop.step_key(k, "evaluate"), f"the student on val_file (--verify {config.student_verify})",
                  f"{ev.output}, {ev.metrics}"),
                 (loop.step_key(k, "collect_errors"), "its validation errors", loop.collect_errors_config(k).output)]
    rows.append(("iter_XX/test", "the best and the iteration-0 students on test_file, once each",
                 str(config.run_dir / "iter_XX" / "test" / "predictions.jsonl")))
    return rows


def dry_run(config: IterateConfig, origins: dict[str, str] | None = None, *, quiet: bool = False) -> dict[str, Any]:
    """Every setting (with where it came from: default, file or flag), the plan and an upper bound of iteration
    0's teacher tokens (economy/estimate.py), printed as tables on stderr unless `quiet`; load no model.
    Returns the same as a dict (`undo iterate --dry-run --format json` prints it)."""
    from undo_cli.loop.settings import STAGES

    check_stages(config)
    origins = origins or {}
    settings: dict[str, Any] = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                                if f.name not in STAGES}
    for table in STAGES:
        for key, value in config.settings(table).items():
            settings[f"{table}.{key}"] = value
    shown = {"settings": settings, "origins": origins, "plan": plan(config),
             "teacher_estimate": estimate_iteration0(config)}
    if not quiet:
        _print_dry_run(config, shown)
    return shown


def _origin(key: str, origins: dict[str, str]) -> str:
    origin = origins.get(key)
    if origin is None and key.endswith(".seed") and key.split(".")[0] not in (
            k.split(".")[0] for k in origins if k.endswith(".seed")):
        return "default (the loop's seed)" if origins.get("seed") is None else "flag/file (the loop's seed)"
    return origin or ("default (from name: <student>-from-<teacher>)" if key == "name" else "default")


def _print_dry_run(config: IterateConfig, shown: dict[str, Any]) -> None:
    from rich.table import Table

    from undo_cli.console import console
    from undo_cli.economy.estimate import describe as describe_estimate
    from undo_cli.economy.estimate import describe_tiers

    def table(title: str, columns: tuple[str, ...], rows) -> None:
        # The first column (a key, a stage) never wraps: a key cut mid-word cannot be searched for or pasted.
        t = Table(title=title, title_justify="left")
        for i, col in enumerate(columns):
            t.add_column(col, no_wrap=i == 0, overflow="fold")
        for row in rows:
            t.add_row(*row)
        console.print(t)

    table(f"undo iterate --dry-run: {config.run_dir}", ("key", "value", "from"),
          [(key, repr(value), _origin(key, shown["origins"])) for key, value in shown["settings"].items()])
    table("plan (stops early when validation accuracy stops improving)", ("stage", "what", "writes"), shown["plan"])
    table("teacher tokens of iteration 0 (generate over train_file): an UPPER BOUND, before any call",
          ("what", "value"), describe_estimate(shown["teacher_estimate"]) + describe_tiers(
              shown["teacher_estimate"].get("tiers") or []))
    if (config.run_dir / "manifest.json").is_file():
        console.print(f"{config.run_dir} already holds a run: add --resume to continue it or --overwrite to start over")
    console.print("nothing was run (--dry-run); drop --dry-run to start; --format json prints all this on stdout")


def estimate_iteration0(config: IterateConfig) -> dict[str, Any]:
    """Upper bound of iteration 0's teacher tokens (and cost, with prices): its generate stage, as the loop runs it."""
    from undo_cli.economy.estimate import estimate_generate
    from undo_cli.model_refs import to_be_written
    from undo_cli.stages.generate import work_items

    with to_be_written(config.run_dir):
        cfg = Loop(config, Unopened(config.run_dir)).generate_config()
    prompts = [item.messages for item in work_items(cfg)[2]]  # what generate would send, in order
    estimate = {"stage": "iter_00/generate", **estimate_generate(
        prompts, cfg, max_teacher_tokens=config.max_teacher_tokens, max_cost=config.max_cost,
        trust_remote_code=config.trust_remote_code)}
    if cfg.cascade:  # a teacher cascade: each tier's bound (economy/estimate.py)
        from undo_cli.economy.estimate import estimate_tiers

        estimate["tiers"] = estimate_tiers(prompts, cfg, trust_remote_code=config.trust_remote_code)
    return estimate
