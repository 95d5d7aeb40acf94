"""The whole UNDO loop in one command: distil, diagnose, re-teach, repeat while the student improves.

    undo iterate --config examples/run.toml
    undo iterate --teacher Qwen/Qwen2.5-7B-Instruct --student Qwen/Qwen2.5-0.5B-Instruct \\
        --train-file data/train.jsonl --val-file data/val.jsonl --test-file data/test.jsonl \\
        --teacher-backend vllm --max-iterations 4 --train.epochs 1 --train.lr 2e-5 --name qwen-gsm8k
    undo iterate --config examples/run.toml --resume          # after a kill, Ctrl-C or a crash
    undo iterate --config examples/run.toml --dry-run         # settings, plan, teacher-token bound; no model
    undo iterate --config examples/run.toml --overwrite       # delete runs/NAME and start over
    undo iterate --config examples/run.toml --launcher slurm --slurm.shards 16   # stages as Slurm job arrays

What it runs (docs/method.md §1), every step a call to the stage's own `run()`:

    iteration 0 (one-shot distillation)     iteration k >= 1 (UNDO)
      cluster    train + val problems, once   refine     teacher re-teaches, from iteration k-1's errors
      generate   teacher rationales, train                (its budget, its targets: [refine] budget, select)
      train      student on them              mix        refined rationales replace (or join) the old ones
      evaluate   student on val               train      student on the mixed data
      collect_errors                          evaluate   student on val
                                              collect_errors

It stops when validation accuracy has not improved by `min_delta` for
`patience` iterations, after `max_iterations` refinement rounds, when the
student makes no validation error left to learn from, or when the teacher
budget (`max_teacher_tokens`, `max_cost`: paid teacher tokens of the whole run)
is reached: the teacher stage that reaches it keeps what it finished and is
marked `budget` in the manifest, and `--resume` with a higher budget continues
it (budgets, prices and the cache folder are not part of the run's identity).
Under `--launcher slurm` a sharded teacher stage shares its part of the budget
out among its shards. The teacher's tokens per iteration (paid and cached, and
cost with prices) go to manifest.json and summary.json under `teacher_usage`
(loop/usage.py).

The best iteration is chosen by a paired test on the same validation items
(loop/choose.py: a later student replaces the kept one only with an exact
McNemar p < choose_alpha and a gain of at least choose_min_gain), and it is
kept, and both its student and the iteration-0 student are evaluated on the
test split, which no decision ever looked at: every run reports UNDO against
one-shot distillation on held-out data.

Options the paper leaves open (docs/method.md, our defaults): `mix = replace|append` (what a
refined rationale does to the old one, see stages/mix.py) and
`init = base|previous` (each iteration fine-tunes the base student on the
current data, or continues from the previous iteration's student).

Everything lands in runs/NAME/ (layout in loop/layout.py), and a run
killed at any point, mid-training or mid-refine included, continues with
`--resume` from the first unfinished stage without recomputing anything that
finished. Between stages the models are released, so the teacher and the
student are never in memory together. Settings: loop/settings.py.
"""

from __future__ import annotations

from typing import Any

from undo_cli.errors import UndoError
from undo_cli.loop.config import IterateConfig, affected_stages
from undo_cli.loop.ending import finish, more_rounds, resume_command, stopped
from undo_cli.loop.plan import check_stages
from undo_cli.loop.rounds import Loop, choice, decide
# The teacher economy of the loop (one budget shared out, usage per iteration): loop/usage.py.
from undo_cli.loop.usage import BudgetReached, record_usage


def _inputs(config: IterateConfig) -> dict[str, Any]:
    from undo_cli.loop.manifest import model_fingerprint
    from undo_cli.prompts import template_file
    from undo_cli.records import sha256_file

    files = {key: {"path": getattr(config, f"{key}_file"), "sha256": sha256_file(getattr(config, f"{key}_file"))}
             for key in ("train", "val", "test")}
    more = {}
    if config.teachers[1:]:  # compared as one fingerprint (manifest.py compares an input's dict)
        from undo_cli.stages.generation_loop import digest

        more = {"teachers": {"fingerprint": digest([model_fingerprint(t["model"]) for t in config.teachers[1:]])}}
    # The templates' text, not only their names: an edited prompts/refine.jinja reruns the refine stages on
    # --resume instead of keeping rationales written under the old words (loop/config.py's _INPUT_AFFECTS).
    prompts = {}
    for name, stage, key in (("generate", "generate", "prompt"), ("refine", "refine", "prompt"),
                             ("student", "train", "template")):
        path = template_file(config.settings(stage)[key])  # settings() fills in the stage's default
        prompts[f"prompt_{name}"] = {"path": str(path), "sha256": sha256_file(path)}
    return {**files, "teacher": model_fingerprint(config.teacher), "student": model_fingerprint(config.student),
            **more, **prompts}  # a cascade's other teachers: retrained weights at the same path rerun the teacher stages


def run(config: IterateConfig, *, resume: bool = False, overwrite: bool = False,
        command: list[str] | None = None, resume_with: str | None = None) -> dict[str, Any]:
    """Run (or resume) the loop; returns the summary, also written to runs/NAME/summary.json.

    command: `undo iterate`'s arguments that reproduce this run (what `undo demo` runs in process), for the
    commands its hints print; default: this process's command line when it is `undo iterate`.
    resume_with: the command that continues a stopped run, when it is not `undo iterate` (`undo demo --resume`).
    """
    if resume and overwrite:
        raise UndoError("--resume and --overwrite contradict each other",
                        hint="--resume continues the run; --overwrite deletes it and starts over")
    _preflight(config, overwrite=overwrite)
    folder = _open_folder(config, resume=resume, overwrite=overwrite)
    loop = Loop(config, folder, _launcher(config, folder))
    try:
        history, best, stop, budget_stop = _iterate(loop)
        # Held-out test: the best student and the one-shot student, evaluated once each.
        for i in sorted({best, 0}) if best is not None else []:
            loop.evaluate(i, "test")
    except BaseException as exc:
        stopped(folder, exc, resume_with or resume_command(command))
        raise
    summary = finish(folder, best, stop)
    more = more_rounds(config, history, command) if history and not budget_stop else None
    if more:
        from undo_cli.console import console

        console.print(f"more rounds: {more}", markup=False, highlight=False, soft_wrap=True)
    return summary


def _preflight(config: IterateConfig, *, overwrite: bool) -> None:
    """Everything that can be refused before the run folder exists and before any model loads."""
    from undo_cli.model_refs import check_hub_reachable
    from undo_cli.records import read_records

    check_stages(config)  # every table
    from undo_cli.backends import SERVED

    if config.teacher_backend not in SERVED:  # a hub name with the hub unreachable: one line now, not mid-run
        check_hub_reachable(config.teacher, "teacher")
    check_hub_reachable(config.student, "student")
    if config.launcher == "slurm":  # off Slurm, fail without leaving a run folder behind
        from undo_cli.stages.slurm import check_slurm

        check_slurm()
    for path in dict.fromkeys((config.train_file, config.val_file, config.test_file)):
        read_records(path, "problem")  # a bad line fails here, file:line:field
    if overwrite or not (config.run_dir / "manifest.json").is_file():  # before iteration 0: tokenizers, templates,
        from undo_cli.stages.check import preflight                     # context (stages/check.py, `undo check`)

        preflight(config)


def _open_folder(config: IterateConfig, *, resume: bool, overwrite: bool):
    from undo_cli.console import console
    from undo_cli.loop.manifest import RunFolder
    from undo_cli.loop.settings import STAGES

    seeds = {"seed": config.seed, **{t: config.settings(t).get("seed") for t in STAGES}}
    folder = RunFolder.open(config.run_dir, config=config.identity(), inputs=_inputs(config), seeds=seeds,
                            resume=resume, overwrite=overwrite, affects=affected_stages,
                            defaults=config.default_identity())
    # A resumed run has not stopped (yet): the tables printed along the way must not repeat the last reason.
    folder.manifest.pop("stop_reason", None)
    console.print(f"run folder: {folder.path}  (teacher {config.teacher}, student {config.student}, "
                  f"mix {config.mix}, init {config.init})")
    return folder


def _launcher(config: IterateConfig, folder):
    if config.launcher != "slurm":
        return None
    from undo_cli.stages.slurm import SlurmConfig, SlurmLauncher

    return SlurmLauncher(SlurmConfig(**config.slurm), folder)


def _iterate(loop: Loop) -> tuple[list[dict[str, Any]], int | None, str, bool]:
    """Iterations until the stopping rule (or the teacher budget) says stop:
    (each iteration's validation result, the best iteration, why it stopped, whether the budget stopped it)."""
    from undo_cli.console import console
    from undo_cli.loop import report, run_state

    folder, config = loop.folder, loop.config
    history: list[dict[str, Any]] = []
    k, best, budget_stop = 0, None, False
    while True:
        try:
            history.append(loop.iteration(k))
        except BudgetReached as exc:  # what finished is kept; --resume with a higher budget continues
            stop, budget_stop = exc.reason, True
            console.print(f"[bold]stopping:[/bold] {stop}")
            record_usage(folder)
            break
        from undo_cli.loop.stop import describe as describe_round
        from undo_cli.loop.stop import rounds
        from undo_cli.loop.usage import usage_by_iteration

        paid = {r["iteration"]: r["paid"]["tokens"] for r in usage_by_iteration(folder.path)["iterations"]}
        best, stop = decide(history, config, paid)
        table = rounds(history, choice(history, config)[1], paid)
        folder.manifest["stop"] = {"rule": config.stop_rule, "patience": config.patience,
                                   "min_gain_per_ktok": config.stop_min_gain_per_ktok, "rounds": table}
        if stop and loop.finished(k + 1):
            # An earlier attempt, under another stopping rule, finished iteration k+1: a resume never
            # un-counts what finished, so the best is decided over every finished iteration.
            stop = None
        folder.manifest.update(best_iteration=best, iterations_done=k + 1,
                               choice={"alpha": config.choose_alpha, "min_gain": config.choose_min_gain,
                                       "tests": choice(history, config)[1]})
        record_usage(folder)
        state = run_state.collect(folder.path)
        run_state.write_summary(folder.path, state)
        if stop:  # the table comes once, finished, after the test evaluation (finish)
            console.print(f"[bold]stopping:[/bold] {stop}; best iteration: {best} (stop_rule {config.stop_rule})")
            for row in table:  # what each round cost and proved (loop/stop.py)
                console.print("  " + describe_round(row), markup=False, highlight=False, soft_wrap=True)
            break
        if not loop.finished(k + 1):  # a resume replaying finished iterations shows the table once, at the last
            # The rows the decision has seen: an earlier attempt's later iteration is not yet decided on here.
            report.print_table({**state, "rows": [r for r in state["rows"] if r["iteration"] <= k]},
                               title=f"{folder.path.name}: iterations so far")
        k += 1
    folder.manifest["stop_reason"] = stop
    folder.save()
    return history, best, stop, budget_stop
