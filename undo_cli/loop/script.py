"""`undo iterate`'s settings as shell words, for the loop written out in bash (examples/undo_loop.sh).

    undo iterate --config examples/run.toml --name bash-loop --dry-run --format shell

prints, on stdout, lines a bash script `eval`s:

    TEACHER=undo-demo/models/teacher
    OUT=runs/bash-loop
    MAX_ITERATIONS=3 ...
    TRAIN_ARGS=(--epochs 20.0 --lr 0.003 --batch-size 8 --warmup-ratio 0.05 ...)

Each `<STAGE>_ARGS` array is the stage's flags exactly as `undo iterate` runs it:
the config the loop builds for that stage (`Loop.generate_config()` etc., the
same code path), every field that differs from the stage's own default written
as its flag (`fields.to_flags`), except the per-iteration files, models and
iteration numbers, which the script fills in. So the bash loop trains and
generates with run.toml's settings, not the stages' defaults, and a change to
a stage's options needs no change here. Values are quoted with `shlex.quote`:
the script evaluates our text, never a model's.

What the script cannot do is refused or said: a whole-run teacher budget
(`max_teacher_tokens`, `max_cost`: the loop hands each teacher stage what is
left of it) and `launcher = "slurm"` are `undo iterate`'s own.
"""

from __future__ import annotations

import shlex
from typing import Any

from undo_cli.errors import UndoError

# Per stage: the fields the script sets itself, per call (files, models, iteration numbers, --resume).
PER_CALL = {
    "cluster": ("problems", "output"),
    "generate": ("teacher", "input", "output", "iteration"),
    "train": ("student", "data", "output", "resume"),
    "evaluate": ("model", "adapter", "input", "output", "metrics"),
    "collect_errors": ("predictions", "output"),
    "refine": ("teacher", "errors", "targets", "output", "iteration", "clusters", "previous_errors"),
}
# Economy fields the loop computes per stage from the whole run's budget: not expressible as fixed flags.
_BUDGET = ("max_teacher_tokens", "max_cost")


def shell_settings(config) -> str:
    """The assignments examples/undo_loop.sh evaluates (see the module docstring)."""
    from undo_cli.fields import to_flags
    from undo_cli.loop.plan import Unopened, check_stages
    from undo_cli.loop.rounds import Loop
    from undo_cli.loop.layout import MANIFEST
    from undo_cli.model_refs import to_be_written

    check_stages(config)
    if config.launcher != "local":
        raise UndoError("the bash loop runs every stage here; launcher = slurm is `undo iterate`'s",
                        hint="run undo iterate --launcher slurm (or as a Slurm job: sbatch examples/slurm/loop.sbatch "
                             "with the same flags)")
    if config.max_teacher_tokens is not None or config.max_cost is not None:
        raise UndoError("a teacher budget for the whole run (max_teacher_tokens, max_cost) is kept by `undo iterate`, "
                        "which hands each teacher stage what is left of it; the bash loop cannot",
                        hint="run undo iterate, or drop the budget (each stage also takes its own --max-teacher-tokens)")
    if (config.run_dir / MANIFEST).is_file():
        raise UndoError(f"{config.run_dir} holds an `undo iterate` run",
                        hint="give the bash loop a folder of its own: add --name bash-loop")
    loop = Loop(config, Unopened(config.run_dir))
    with to_be_written(config.run_dir):  # the students of later iterations do not exist yet
        built = {"cluster": loop.cluster_config(), "generate": loop.generate_config(), "train": loop.train_config(0),
                 "evaluate": loop.evaluate_config(0, "val"), "collect_errors": loop.collect_errors_config(0)}
        if config.max_iterations > 0:
            built["refine"] = loop.refine_config(1)
    lora_adapter = bool(built["train"].lora_r) and not built["train"].merge
    values: dict[str, Any] = {
        "TEACHER": config.teacher, "STUDENT": config.student, "TRAIN": config.train_file, "VAL": config.val_file,
        "TEST": config.test_file, "OUT": str(config.run_dir), "MAX_ITERATIONS": config.max_iterations,
        "PATIENCE": config.patience, "MIN_DELTA": config.min_delta, "MIX": config.mix, "INIT": config.init,
        # LoRA without --merge saves only an adapter: evaluate then takes the base model and the adapter.
        "ADAPTER_ONLY": int(lora_adapter),
        # refine --select clusters also reads the errors of the round before (--previous-errors)
        "REFINE_SELECT": built["refine"].select if "refine" in built else "similar",
    }
    lines = [f"{name}={shlex.quote(str(value))}" for name, value in values.items()]
    for stage, cfg in built.items():
        skip = PER_CALL[stage] + (_BUDGET if stage in ("generate", "refine") else ())
        words = to_flags(cfg, skip=skip)
        lines.append(f"{stage.upper()}_ARGS=({' '.join(shlex.quote(w) for w in words)})")
    if "refine" not in built:
        lines.append("REFINE_ARGS=()")
    return "\n".join(lines) + "\n"
