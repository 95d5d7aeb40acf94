"""`undo iterate`: the whole UNDO loop, resumable (see undo_cli/stages/iterate.py and stages/run_config.py)."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer


def iterate(
    ctx: typer.Context,
    config: Optional[str] = typer.Option(None, "--config", "-c", help="TOML file with the run's settings (flags override it)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in runs_dir/name from its first unfinished stage."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher: a model folder, a hub name, or the model name on the server."),
    student: Optional[str] = typer.Option(None, "--student", help="Base student: a model folder or a hub name."),
    train_file: Optional[str] = typer.Option(None, "--train-file", help="Training problems JSONL."),
    val_file: Optional[str] = typer.Option(None, "--val-file", help="Validation problems JSONL (diagnosis and convergence)."),
    test_file: Optional[str] = typer.Option(None, "--test-file", help="Test problems JSONL (best vs one-shot, never for decisions)."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name: the folder under --runs-dir [default: <student>-from-<teacher>]."),
    runs_dir: Optional[str] = typer.Option(None, "--runs-dir", help="Where run folders go [default: runs]."),
    teacher_backend: Optional[str] = typer.Option(None, "--teacher-backend", help="hf, openai or vllm [default: hf]."),
    teacher_base_url: Optional[List[str]] = typer.Option(None, "--teacher-base-url", help="openai teacher backend: server URL; repeat it for several replicas."),
    teacher_api_key_env: Optional[str] = typer.Option(None, "--teacher-api-key-env", help="openai teacher backend: NAME of the env variable with the key."),
    student_backend: Optional[str] = typer.Option(None, "--student-backend", help="Evaluates each trained student: hf or vllm [default: hf]."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code/--no-trust-remote-code", help="Run code shipped with the models (opt-in)."),
    max_iterations: Optional[int] = typer.Option(None, "--max-iterations", help="Most refinement rounds after iteration 0 [default: 3]."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Stop after N iterations without a min-delta gain [default: 1]."),
    min_delta: Optional[float] = typer.Option(None, "--min-delta", help="Smallest validation accuracy gain (0-1) that counts [default: 0]."),
    mix: Optional[str] = typer.Option(None, "--mix", help="replace: refined rationales replace old ones by id; append: added [default: replace]."),
    init: Optional[str] = typer.Option(None, "--init", help="base: train the base student each iteration; previous: continue [default: base]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for every stage unless a table sets its own [default: 0]."),
) -> None:
    """Run the UNDO loop: generate -> train -> evaluate -> collect errors -> refine -> train ... until the
    student stops improving on validation; then test the best and the one-shot student.

    Settings come from --config run.toml (see examples/run.toml), overridden by flags. Stage settings are
    dotted flags onto the stage's own options, any of them: --generate.n 4 --train.lr 2e-5 --train.lora-r 16
    --train.merge --evaluate.max-tokens 256 --refine.k 0 --collect-errors.max 200 (see `undo train --help`
    etc. for the fields; values are TOML: 2e-5, true, "text").

    Example: undo iterate --config examples/run.toml --name my-run; after a kill: the same command + --resume
    """
    from undo_cli.stages.iterate import IterateConfig, run
    from undo_cli.stages.run_config import resolve

    flags = dict(teacher=teacher, student=student, train_file=train_file, val_file=val_file, test_file=test_file,
                 name=name, runs_dir=runs_dir, teacher_backend=teacher_backend, teacher_base_url=teacher_base_url or None,
                 teacher_api_key_env=teacher_api_key_env, student_backend=student_backend,
                 trust_remote_code=trust_remote_code, max_iterations=max_iterations, patience=patience,
                 min_delta=min_delta, mix=mix, init=init, seed=seed)
    summary = run(resolve(IterateConfig, config, flags, list(ctx.args)), resume=resume)
    # One JSON line on stdout (people read stderr): `undo iterate ... | jq .test` works.
    sys.stdout.write(json.dumps({k: summary[k] for k in ("name", "run_dir", "status", "best_iteration",
                                                          "best_student", "stop_reason", "test")}) + "\n")


# Dotted stage flags (--train.lr 2e-5) are not declared: they arrive in ctx.args (see stages/run_config.py).
iterate.context_settings = {"allow_extra_args": True, "ignore_unknown_options": True}
