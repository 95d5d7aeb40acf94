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
* OUTPUT/train_run.json identifies the run (config + data hash): an OUTPUT that
  holds a different run is refused unless --overwrite; --resume of a finished
  run returns its summary without training again.

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

from undo_cli.console import console, warn
from undo_cli.errors import UndoError
from undo_cli.models import library_versions, load_error, release_memory
from undo_cli.records import read_json, read_records, write_json
from undo_cli.training.config import TrainConfig
from undo_cli.training.hf import CHECKPOINTS, STATS_FILE

RUN_FILE = "train_run.json"
SUMMARY_FILE = "train_summary.json"


# Flags that change what is trained; the rest (logging, saving, resume) may differ on --resume.
_NOT_IDENTITY = {"output", "resume", "overwrite", "logging_steps", "save_steps", "report_to", "keep_checkpoints",
                 # where the served teacher lives and how patiently we ask: a restarted server may move
                 "teacher_url", "teacher_api_key_env", "teacher_timeout", "teacher_max_retries"}


def _identity(config: TrainConfig, data_hash: str) -> dict[str, Any]:
    ident = {k: v for k, v in asdict(config).items() if k not in _NOT_IDENTITY}
    return {**ident, "data_sha256": data_hash}


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
    changed = [k for k in sorted(set(previous) | set(identity)) if previous.get(k) != identity.get(k)]
    if changed:
        what = "; ".join(f"{k}: was {previous.get(k)!r}, now {identity.get(k)!r}" for k in changed[:4])
        raise UndoError(f"--output {out}: --resume needs the same run, but {what}",
                        hint="resume with the flags and data of the original run, or pass --overwrite to start over")
    if finished:
        return _Plan("done")
    done, _ = complete_checkpoints(out)
    return _Plan("resume", checkpoint=done[-1] if done else None)


def run(config: TrainConfig) -> dict[str, Any]:
    """Train the student; returns the summary (also written to OUTPUT/train_summary.json)."""
    from undo_cli.training.data import check_rationales, encode_records, fingerprint, read_training_records

    started = time.time()
    student = Path(config.student).expanduser()
    if config.student.startswith((".", "/", "~")) and not student.exists():  # fail before importing torch
        raise load_error(config.student, FileNotFoundError(f"no such folder: {student}"))
    # Any accepted shape (rationales, problems + --rationale-field, messages, prompt/completion) as rationale
    # records; file:line:field errors, empty file refused.
    records = read_training_records(config.data, config.rationale_field)
    from undo_cli.model_refs import check_hub_reachable

    check_hub_reachable(config.student, "--student")  # before torch's imports: an unreachable hub is fast
    check_rationales(records, config.data)
    identity = _identity(config, fingerprint(records))
    output = Path(config.output)
    plan = plan_output(config, identity)  # refuse a foreign or different run before loading anything heavy
    if plan.action == "done":
        console.print(f"{output}: this run already finished; nothing to do (see {output / SUMMARY_FILE})",
                      soft_wrap=True)
        return read_json(output / SUMMARY_FILE)

    import torch
    from accelerate import PartialState

    from undo_cli.training.collate import PackedCollator, PaddedCollator
    from undo_cli.training.trainer import StopOnInterrupt, UndoTrainer

    from undo_cli.training import hf

    tokenizer = hf.load_tokenizer(config)
    examples, data_stats = encode_records(records, tokenizer, max_length=config.max_length,
                                          template=config.template, path=config.data)
    from undo_cli.training.distill import prepare_objective

    # White-box objectives: the teacher's tokenizer / the recorded log-probs are checked before anything is written.
    objective = prepare_objective(config, records=records, examples=examples, tokenizer=tokenizer,
                                  record_index=data_stats.record_index)  # None for sft
    if config.val_data or config.lm_data:  # their errors too come before anything is written
        from undo_cli.training.student_outputs_setup import preflight

        preflight(config)
    args = hf.training_args(config, output)  # also sets up the process group under accelerate launch
    state = PartialState()
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
    model = hf.load_student(config)
    # Resolve padding_free=None (auto) now that the attention kernel is known; the objective's
    # collator and the summary see what actually runs (the run identity keeps the flag as given).
    config = replace(config, padding_free=hf.resolve_padding_free(config.padding_free, model))
    flash = "flash" in (config.attn_implementation or "")
    collator = PackedCollator(flash_attention=flash) if config.padding_free else PaddedCollator(tokenizer.pad_token_id)
    if objective:  # loads a live teacher next to the student; the collator carries recorded log-probs
        loss_fn = objective.attach(model, args.device, packed=config.padding_free)
        collator = objective.collator(collator, packed=config.padding_free)
    own = None  # the student's own outputs: a batch hook, its loss, a callback (training/student_outputs_setup.py)
    if config.student_outputs != "off" or config.method == "minillm":
        from undo_cli.training.student_outputs_setup import hold_out, setup

        examples, held_out = hold_out(config, examples)  # adaptive without --val-data validates on a held-out 5%
        own = setup(config, objective, tokenizer=tokenizer, collator=collator, model=model, held_out=held_out)
    trainer = UndoTrainer(model=model, args=args, train_dataset=examples, processing_class=tokenizer,
                          data_collator=collator, loss_fn=own.loss if own else (loss_fn if objective else None),
                          length_grouped=not config.padding_free, batch_hook=own.hook if own else None,
                          prefetch=objective.prefetch(config.padding_free) if objective else None)
    if own:
        own.attach(trainer)  # before the counts: a checkpoint with counts also has the schedule's state
    hf.attach_checkpoint_counts(trainer)
    resumed_from = None
    if plan.checkpoint is not None:
        trainer.meter.totals = read_json(plan.checkpoint / STATS_FILE)
        resumed_from = int(plan.checkpoint.name.split("-")[-1])
        if own:
            own.restore(plan.checkpoint, state.process_index)
        if state.is_main_process:
            console.print(f"resuming from {plan.checkpoint} (step {resumed_from})", soft_wrap=True)
    if state.is_main_process:
        lora = f"LoRA r={config.lora_r}" if config.lora_r else "full fine-tuning"
        console.print(f"training {config.student} on {data_stats.examples} examples from {config.data} "
                      f"({lora}, {'packed' if config.padding_free else 'padded'} batches, "
                      f"{state.num_processes} process(es), {args.device.type})", soft_wrap=True)
        if objective and config.method != "minillm":  # minillm's own line says what its loss is
            console.print(objective.describe(), soft_wrap=True)
        if own:
            console.print(own.description, soft_wrap=True)

    stop = StopOnInterrupt()
    stop.accelerator = trainer.accelerator
    trainer.add_callback(stop)
    try:
        with stop:
            result = trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)
        if stop.interrupted_at is not None:  # Ctrl-C: the Trainer saved a checkpoint at this step and stopped
            raise KeyboardInterrupt
    except BaseException as exc:
        if objective:  # stop asking a served teacher for batches nobody will train on
            objective.close()
        if isinstance(exc, KeyboardInterrupt) and state.is_main_process:
            _say_where_to_resume(output, stop.interrupted_at, trainer.state.max_steps)
        raise
    saved = hf.save(trainer, config, output)
    meter = trainer.meter
    totals, session = meter.totals, meter.session
    runtime = float(result.metrics.get("train_runtime", 0.0)) or 1e-9
    summary = {
        "student": config.student,
        "data": config.data,
        "output": str(output),
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
        "resumed_from_step": resumed_from,
        "batching": "packed" if config.padding_free else "padded, length-grouped",
        "processes": state.num_processes,
        "device": args.device.type,
        "precision": "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32"),
        "learning_rate": config.learning_rate,
        "objective": objective.summary(runtime) if objective else {"name": "sft"},
        "student_outputs": own.summary(runtime) if own else None,
        "config": asdict(config),
        "versions": library_versions(("torch", "transformers", "peft", "accelerate")),
    }
    if trainer.is_world_process_zero():
        for folder in {output, Path(saved["adapter"] or output)}:  # Trainer's pickled args: the summary has them
            (folder / "training_args.bin").unlink(missing_ok=True)
        _record_prompt_format(records, config, output, saved)
        write_json(output / SUMMARY_FILE, summary)
        if not config.keep_checkpoints:
            shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
        _print_summary(summary)
    state.wait_for_everyone()
    if objective:
        objective.close()
    del trainer, model, objective, own
    release_memory()
    return summary


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

    from undo_cli.guidance import rerun

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
    console.print(table)
