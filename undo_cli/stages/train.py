"""Step 2 of the UNDO loop: fine-tune the student on the teacher's rationales (SFT).

    undo train --student Qwen/Qwen2.5-0.5B-Instruct --data rationales.jsonl --output runs/it0/student
    undo train --student ./student --data rationales.jsonl --output out --lora-r 16 --merge
    accelerate launch --num_processes 4 -m undo_cli train --student ... --data ... --output ...

The student learns question -> rationale: cross-entropy on the rationale tokens
only, the prompt masked, and the prompt built by the same function that builds
it for `undo evaluate` (`prompts.encode_example`), so the student is trained on
exactly the text it will be tested with.

This module is the stage: the output folder, the resume plan, the run and its
summary. The settings are `training/config.py` (`TrainConfig`); the Hugging
Face plumbing (TrainingArguments, loading, LoRA, saving and merging,
checkpoint counts) is `training/hf.py`.

How it runs:

* `training.trainer.UndoTrainer` (transformers' Trainer) does the loop, so the
  same command runs on a CPU, one GPU, or several through `accelerate launch`
  (DDP, FSDP or DeepSpeed from an accelerate config) with no code change. bf16
  mixed precision on a GPU, float32 on a CPU.
* Batches without padding waste (`training.collate`). With a varlen attention
  kernel (`--attn-implementation flash_attention_2`) the examples of a
  micro-batch are packed end to end in one row, attending only within
  themselves: no token is padding. sdpa and eager (the defaults) have no varlen
  path and would attend over the whole packed row under a mask, quadratic in
  its length, so there the batches are right-padded and length-grouped instead
  (a few percent padding). `--padding-free/--no-padding-free` forces either.
* LoRA through peft with `--lora-r N`: by default every linear projection of
  attention and MLP (peft's "all-linear", which leaves the LM head alone); the
  QLoRA paper found adapting all of them is what matches full fine-tuning.
  `--merge` saves a plain model with the adapter folded in (and the adapter in
  OUTPUT/adapter); without it OUTPUT holds the adapter, which `undo evaluate
  --model BASE --adapter OUTPUT` or transformers' AutoModelForCausalLM load.
* Checkpoints go to OUTPUT/checkpoints every --save-steps. `--resume` continues
  a killed run from the last complete one: same seeded data order, optimizer,
  scheduler and RNG states, so it ends where an uninterrupted run ends. They are
  deleted once the run finished (unless --keep-checkpoints).
* OUTPUT/train_run.json identifies the run (the config's identifying fields,
  undo_cli/identity.py, + data hash): an OUTPUT that holds a different run is
  refused unless --overwrite; --resume of a finished run returns its summary
  without training again. Logging, saving, the served teacher's address and
  patience may change on --resume (their fields say `identity: False`).

* White-box distillation with `--objective fkl|rkl|jsd|skl|srkl|tvd` and a live
  `--teacher T`, a teacher on a vLLM server (`--teacher T --teacher-url URL`,
  training/served_teacher.py) or `--teacher-logprobs` (training/distill.py,
  docs/objectives.md).
* The student's own outputs, scored by a live teacher: `--student-outputs
  on-policy` (GKD) or `adaptive` (DistiLLM), or `--method minillm`
  (training/student_outputs.py, training/minillm.py).

Output: the model (or adapter) + tokenizer in OUTPUT, and OUTPUT/train_summary.json
(steps, losses, tokens, tokens/s, padding fraction, wall time, config, versions).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from undo_cli.console import console, print_stage_summary, warn
from undo_cli.errors import UndoError
from undo_cli.gguf_models import sources as gguf_sources
from undo_cli.models import library_versions, load_error, release_memory
from undo_cli.records import read_json, write_json
from undo_cli.stages.spec import StageSpec, keep_keys
from undo_cli.training import hf
from undo_cli.training.config import TrainConfig
from undo_cli.training.hf import CHECKPOINTS, STATS_FILE

RUN_FILE = "train_run.json"
SUMMARY_FILE = "train_summary.json"


def _identity(config: TrainConfig, data_hash: str) -> dict[str, Any]:
    """What train_run.json records: the fields that identify a run (undo_cli/identity.py) and the data's hash."""
    from undo_cli.identity import identity

    return {**identity(config), "data_sha256": data_hash}


def complete_checkpoints(output: Path) -> tuple[list[Path], list[Path]]:
    """(complete, torn) checkpoint folders, oldest first. Complete = the Trainer's state and our counts were written."""
    folder = output / CHECKPOINTS
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1])) if folder.is_dir() else []
    done = [p for p in found if (p / "trainer_state.json").is_file() and (p / STATS_FILE).is_file()]
    return done, [p for p in found if p not in done]


@dataclass
class _Plan:
    action: str  # "fresh" | "resume" | "done"
    checkpoint: Path | None = None
    wipe: bool = False


def plan_output(config: TrainConfig, identity: dict[str, Any]) -> _Plan:
    """What to do with --output: start, resume, report a finished run, or refuse (read-only; every process runs it)."""
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise UndoError(f"--output {out}: is a file", hint="--output is a folder (it will hold the model)")
    for parent in out.parents:  # `-o ok.jsonl/student` would fail at mkdir, after the model loaded
        if parent.exists():
            if not parent.is_dir():
                raise UndoError(f"--output {out}: {parent} is a file, not a folder",
                                hint="choose a folder path whose parents are folders (they are created if missing)")
            break
    if not out.exists() or not any(out.iterdir()):
        return _Plan("fresh")
    if not (out / RUN_FILE).is_file():
        raise UndoError(f"--output {out}: the folder exists and is not an `undo train` output",
                        hint="choose a new --output folder, or empty this one yourself")
    previous = read_json(out / RUN_FILE).get("identity", {})
    finished = (out / SUMMARY_FILE).is_file()
    if config.overwrite:
        return _Plan("fresh", wipe=True)
    if not config.resume:
        raise UndoError(f"--output {out}: already holds a{' finished' if finished else 'n unfinished'} training run",
                        hint="pass --resume to continue it, --overwrite to start over, or choose another --output")
    from undo_cli.identity import changes, defaults, describe

    changed = describe(changes(previous, identity, defaults(TrainConfig)))
    if changed:
        what = "; ".join(changed[:4])
        raise UndoError(f"--output {out}: --resume needs the same run, but {what}",
                        hint="resume with the flags and data of the original run, or pass --overwrite to start over")
    if finished:
        return _Plan("done")
    done, _ = complete_checkpoints(out)
    return _Plan("resume", checkpoint=done[-1] if done else None)


def run(config: TrainConfig) -> dict[str, Any]:
    """Train the student; returns the summary (also written to OUTPUT/train_summary.json)."""
    started = time.time()
    records, identity, plan = _prepare(config)
    output = Path(config.output)
    if plan.action == "done":
        console.print(f"{output}: this run already finished; nothing to do (see {output / SUMMARY_FILE})",
                      soft_wrap=True)
        return read_json(output / SUMMARY_FILE)
    run = _setup(config, records, identity, plan)
    result = _train(run, plan)
    saved = hf.save(run.trainer, run.config, output)
    summary = _summary(run, result, saved, started)
    _finish(run, summary, records)
    return summary


def _train(run: "_Run", plan: _Plan):
    """trainer.train(), stopped cleanly by Ctrl-C at a checkpoint (StopOnInterrupt) with where to resume."""
    from undo_cli.training.trainer import StopOnInterrupt

    trainer = run.trainer
    stop = StopOnInterrupt(trainer.accelerator)
    trainer.add_callback(stop)
    try:
        with stop:
            result = trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)
        if stop.interrupted_at is not None:  # Ctrl-C: the Trainer saved a checkpoint at this step and stopped
            raise KeyboardInterrupt
    except BaseException as exc:
        if run.objective:  # stop asking a served teacher for batches nobody will train on
            run.objective.close()
        if isinstance(exc, KeyboardInterrupt) and run.state.is_main_process:
            _say_where_to_resume(run.output, stop.interrupted_at, trainer.state.max_steps)
        raise
    return result


def _prepare(config: TrainConfig) -> tuple[list[dict[str, Any]], dict[str, Any], _Plan]:
    """Read and check the data and the output folder before anything heavy: (records, identity, plan)."""
    from undo_cli.model_refs import check_hub_reachable
    from undo_cli.training.data import check_rationales, fingerprint, read_training_records

    student = Path(config.student).expanduser()
    if config.student.startswith((".", "/", "~")) and not student.exists():  # fail before importing torch
        raise load_error(config.student, FileNotFoundError(f"no such folder: {student}"))
    # Any accepted shape (rationales, problems + --rationale-field, messages, prompt/completion) as rationale
    # records; file:line:field errors, empty file refused.
    records = read_training_records(config.data, config.rationale_field)
    check_hub_reachable(config.student, "--student")  # before torch's imports: an unreachable hub is fast
    check_rationales(records, config.data)
    identity = _identity(config, fingerprint(records))
    return records, identity, plan_output(config, identity)  # refuse a foreign or different run before loading


@dataclass
class _Run:
    """What a training run is made of once set up (`_setup`): the pieces `run` trains, saves and summarises."""

    config: TrainConfig
    output: Path
    trainer: Any
    state: Any
    args: Any
    data_stats: Any
    objective: Any
    own: Any
    resumed_from: int | None
    batching: Any  # hf.Batching: packed or padded rows, the sampler's order, the attention kernel


def _setup(config: TrainConfig, records: list[dict[str, Any]], identity: dict[str, Any], plan: _Plan) -> _Run:
    """Tokenizer, examples, objective, arguments, the output folder, the model and the trainer."""
    from accelerate import PartialState

    from undo_cli.training.data import encode_records
    from undo_cli.training.objective import prepare_objective

    tokenizer = hf.load_tokenizer(config)
    examples, data_stats = encode_records(records, tokenizer, max_length=config.max_length,
                                          template=config.template, path=config.data)
    # White-box objectives: the teacher's tokenizer / the recorded log-probs are checked before anything is written.
    objective = prepare_objective(config, records=records, examples=examples, tokenizer=tokenizer,
                                  record_index=data_stats.record_index)  # None for sft
    if config.val_data or config.lm_data:  # their errors too come before anything is written
        from undo_cli.training.student_outputs_setup import preflight

        preflight(config)
    output = Path(config.output)
    args = hf.training_args(config, output)  # also sets up the process group under accelerate launch
    state = PartialState()
    _claim_output(config, output, identity, plan, args, state)
    model = hf.load_student(config)
    # Resolve padding_free=None (auto) now that the attention kernel is known; the objective's
    # collator and the summary see what actually runs (the run identity keeps the flag as given).
    batching = hf.batching(config.padding_free, model)
    config = replace(config, padding_free=batching.packed)
    trainer, own = _trainer(config, model, tokenizer, examples, args, objective, batching)
    resumed_from = _resume(trainer, own, plan, state)
    run = _Run(config, output, trainer, state, args, data_stats, objective, own, resumed_from, batching)
    if state.is_main_process:
        _describe(run)
    return run


def _claim_output(config: TrainConfig, output: Path, identity: dict[str, Any], plan: _Plan, args, state) -> None:
    """The main process prepares OUTPUT (wipe, torn checkpoints, train_run.json) while the others wait."""
    import torch

    state.wait_for_everyone()  # every process has planned before the main one writes
    if state.is_main_process:
        if plan.wipe:
            shutil.rmtree(output)
        for torn in complete_checkpoints(output)[1]:
            warn(f"{torn}: an incomplete checkpoint (the run was killed while saving it); deleting it")
            shutil.rmtree(torn, ignore_errors=True)
        if config.resume and plan.checkpoint is None and plan.action == "resume":
            warn(f"{output}: no complete checkpoint to resume from; starting from step 0")
        write_json(output / RUN_FILE, {"identity": identity, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    state.wait_for_everyone()
    if torch.cuda.device_count() > 1 and state.num_processes == 1:
        warn(f"{torch.cuda.device_count()} GPUs visible but one process: training on the first. "
             "Use `accelerate launch --num_processes N -m undo_cli train ...` to use them all")
        args._n_gpu = 1  # Trainer would otherwise wrap the model in DataParallel, which packed rows do not suit
    if not state.is_main_process:  # one set of loading/saving bars is enough
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _trainer(config: TrainConfig, model, tokenizer, examples, args, objective, batching):
    """The collator (packed or padded), the objective's loss, the student-output hook: (trainer, own)."""
    from undo_cli.training.collate import PackedCollator, PaddedCollator
    from undo_cli.training.trainer import UndoTrainer

    collator = PackedCollator(flash_attention=batching.seq_lens) if config.padding_free \
        else PaddedCollator(tokenizer.pad_token_id)
    loss_fn = None
    if objective:  # loads a live teacher next to the student; the collator carries recorded log-probs
        loss_fn = objective.attach(model, args.device, packed=config.padding_free)
        collator = objective.collator(collator, packed=config.padding_free)
    own = None  # the student's own outputs: a batch hook, its loss, a callback (training/student_outputs_setup.py)
    if config.student_outputs != "off" or config.method == "minillm":
        from undo_cli.training.student_outputs_setup import hold_out, setup

        examples, held_out = hold_out(config, examples)  # adaptive without --val-data validates on a held-out 5%
        own = setup(config, objective, tokenizer=tokenizer, collator=collator, model=model, held_out=held_out)
    try:
        trainer = UndoTrainer(model=model, args=args, train_dataset=examples, processing_class=tokenizer,
                              data_collator=collator, loss_fn=own.loss if own else loss_fn,
                              length_grouped=batching.length_grouped, batch_hook=own.hook if own else None,
                              prefetch=objective.prefetch(config.padding_free) if objective else None)
    except ValueError as exc:  # transformers refuses to fine-tune every weight of a quantized checkpoint
        if "quantized" not in str(exc):
            raise
        quant = getattr(model.config, "quantization_config", None)
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        method = getattr(method, "value", method)  # an enum in transformers' config objects: "gguf", "bitsandbytes"
        raise UndoError(f"--student {config.student}: a quantized checkpoint ({method}); full fine-tuning cannot "
                        "update its weights", hint="train LoRA adapters on top of it (--lora-r 16), or give a dense "
                        "checkpoint (for a .gguf file, pass the file itself: undo dequantizes it)") from None
    if own:
        own.attach(trainer)  # before the counts: a checkpoint with counts also has the schedule's state
    hf.attach_checkpoint_counts(trainer)
    return trainer, own


def _resume(trainer, own, plan: _Plan, state) -> int | None:
    """A resumed run continues its token counts and its student-output schedule: the step it resumes from."""
    if plan.checkpoint is None:
        return None
    trainer.meter.totals = read_json(plan.checkpoint / STATS_FILE)
    if own:
        own.restore(plan.checkpoint, state.process_index)
    if state.is_main_process:
        console.print(f"resuming from {plan.checkpoint} (step {plan.checkpoint.name.split('-')[-1]})", soft_wrap=True)
    return int(plan.checkpoint.name.split("-")[-1])


def _describe(run: _Run) -> None:
    config = run.config
    lora = f"LoRA r={config.lora_r}" if config.lora_r else "full fine-tuning"
    console.print(f"training {config.student} on {run.data_stats.examples} examples from {config.data} "
                  f"({lora}, {'packed' if config.padding_free else 'padded'} batches, "
                  f"{run.state.num_processes} process(es), {run.args.device.type})", soft_wrap=True)
    if run.objective and config.method != "minillm":  # minillm's own line says what its loss is
        console.print(run.objective.describe(), soft_wrap=True)
    if run.own:
        console.print(run.own.description, soft_wrap=True)


def _summary(run: _Run, result, saved: dict[str, Any], started: float) -> dict[str, Any]:
    config, trainer, data_stats, args = run.config, run.trainer, run.data_stats, run.args
    meter = trainer.meter
    totals, session = meter.totals, meter.session
    runtime = float(result.metrics.get("train_runtime", 0.0)) or 1e-9
    return {
        "student": config.student,
        **gguf_sources(student=config.student, teacher=config.teacher),  # a .gguf's path and sha256
        "data": config.data,
        "output": str(run.output),
        "saved": saved,
        "records": data_stats.records,
        "examples": data_stats.examples,
        "truncated_examples": data_stats.truncated,
        "skipped_examples": data_stats.skipped,
        "empty_rationales_skipped": data_stats.empty,
        "longest_example_tokens": data_stats.longest,
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0.0), 4),
        "first_loss": totals.get("first_step_loss"),
        "final_loss": totals["last_step_loss"],
        # Which loss that is: the progress bar / the last progress line shows it (log lines average steps).
        "final_loss_is": "the loss of the last optimizer step, as the last progress line shows it",
        "epoch_losses": meter.epoch_losses(),
        "tokens_seen": {"all": totals["tokens"], "response": totals["response_tokens"],
                        "padding": totals["padding_tokens"], "examples": totals["examples"]},
        "padding_fraction": totals["padding_tokens"] / max(totals["tokens"], 1),
        "tokens_per_s": session["tokens"] / runtime,
        "response_tokens_per_s": session["response_tokens"] / runtime,
        "train_runtime_s": round(runtime, 3),
        "wall_time_s": round(time.time() - started, 3),
        "resumed_from_step": run.resumed_from,
        **run.batching.summary(),
        "processes": run.state.num_processes,
        "device": args.device.type,
        "precision": "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32"),
        "learning_rate": config.learning_rate,
        "objective": run.objective.summary(runtime) if run.objective else {"name": "sft"},
        "student_outputs": run.own.summary(runtime) if run.own else None,
        "config": asdict(config),
        "versions": library_versions(("torch", "transformers", "peft", "accelerate")),
    }


def _finish(run: _Run, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """The main process writes the summary and the prompt format, drops the checkpoints; every process lets go
    of the models."""
    output, trainer = run.output, run.trainer
    if trainer.is_world_process_zero():
        for folder in {output, Path(summary["saved"]["adapter"] or output)}:  # Trainer's pickled args: in the summary
            (folder / "training_args.bin").unlink(missing_ok=True)
        _record_prompt_format(records, run.config, output, summary["saved"])
        write_json(output / SUMMARY_FILE, summary)
        if not run.config.keep_checkpoints:
            shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
        _print_summary(summary)
    run.state.wait_for_everyone()
    if run.objective:
        run.objective.close()
    run.trainer = run.objective = run.own = None
    release_memory()


def _record_prompt_format(records: list[dict[str, Any]], config: TrainConfig, output: Path,
                          saved: dict[str, Any]) -> None:
    """OUTPUT/undo_training.json: the prompt format the model learnt, so `undo evaluate` asks it the same way."""
    from undo_cli.prompts import TRAINING_FORMAT, prompt_format

    recorded = {"prompt": prompt_format(records, config.template), "data": config.data,
                "note": "written by `undo train`; `undo evaluate --model THIS_FOLDER` prompts the model this way"}
    for folder in {output, Path(saved.get("adapter") or output)}:
        write_json(folder / TRAINING_FORMAT, recorded)


def _say_where_to_resume(output: Path, stopped_at: int | None, max_steps: int) -> None:
    """After Ctrl-C: which checkpoint is on disk, and the exact command that continues from it."""
    from rich.markup import escape

    from undo_cli.invocation import rerun

    done, _ = complete_checkpoints(output)
    if stopped_at is not None and done:
        where = f"training stopped at step {stopped_at} of {max_steps}; checkpoint saved: {done[-1]}"
    elif done:
        where = f"training stopped mid-step; the last checkpoint on disk is {done[-1]}"
    else:
        where = "training stopped before its first checkpoint: --resume starts again from step 0"
    command = rerun("train", drop={"--resume": False, "--overwrite": False}, add=["--resume"])
    # Inside `undo iterate` or `undo demo` their own message says how to continue the whole run.
    console.print(f"[yellow]{escape(where)}[/yellow]"
                  + (f"\n[yellow]continue with:[/yellow] {escape(command)}" if command else ""),
                  highlight=False, soft_wrap=True)


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"undo train: {summary['output']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    losses = ", ".join(f"{x:.4f}" for x in summary["epoch_losses"])
    tokens = summary["tokens_seen"]
    rows = [
        ("examples", f"{summary['examples']} ({summary['truncated_examples']} truncated, "
                     f"{summary['skipped_examples']} skipped)"),
        ("steps / epochs", f"{summary['steps']} / {summary['epochs']:g}"),
        ("loss, first -> last step", f"{summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
         if summary["first_loss"] is not None else f"{summary['final_loss']:.4f}"),
        ("loss per epoch", losses),
        ("tokens (response / all)", f"{tokens['response']:,} / {tokens['all']:,}"),
        ("padding fraction", f"{summary['padding_fraction']:.1%}"),
        ("tokens/s", f"{summary['tokens_per_s']:,.0f} ({summary['response_tokens_per_s']:,.0f} response)"),
        ("wall time", f"{summary['wall_time_s']:.1f} s"
                      + (f" (resumed from step {summary['resumed_from_step']})" if summary["resumed_from_step"] else "")),
        ("saved", summary["saved"]["model"] or f"adapter {summary['saved']['adapter']}"),
    ]
    own = summary.get("student_outputs")
    if own:  # which steps trained on what, and what sampling cost
        steps = own["steps"]
        rows.insert(4, (f"steps: {own['mode']}", f"{steps['fresh']} student samples / {steps['replay']} replayed / "
                                                 f"{steps['ground_truth']} data; {own['generation_share']:.0%} of the "
                                                 "time generating" + (f"; phi {own['phi_final']:g}"
                                                                      if "phi_final" in own else "")))
    for key, value in rows:
        table.add_row(key, value)
    shown = dict(rows)
    print_stage_summary(table, f"undo train: {summary['steps']} steps / {summary['epochs']:g} epochs, loss "
                               f"{shown['loss, first -> last step']}, {summary['wall_time_s']:.1f} s, saved {shown['saved']}")


SPEC = StageSpec(
    name="train", config=TrainConfig, run=run, records=None, heavy=True,
    keep=keep_keys("student", "examples", "records", "truncated_examples", "steps", "epochs", "first_loss", "final_loss",
                   "epoch_losses", "train_runtime_s", "wall_time_s", "resumed_from_step", "saved", "device",
                   "precision", "learning_rate"))
