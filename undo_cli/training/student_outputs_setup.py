"""Wiring student outputs into `undo train`: setup, adaptive's validation, checkpoint state.

    undo train --student S --teacher T --objective srkl --student-outputs adaptive \\
        --val-data val_rationales.jsonl --eval-steps 50 --data rationales.jsonl --output out

`setup(config, objective, ...)` turns the TrainConfig into the trainer's batch
hook, its loss and a callback; the stage then only attaches them
(stages/train.py). The schedules themselves are in student_outputs.py, MiniLLM
in minillm.py. The callback does two things:

* **validation** (adaptive only): the student's mean cross-entropy on the
  `--val-data` rationales (encoded exactly like `--data`; without the flag,
  `hold_out` keeps a seeded 5% of `--data` aside), once before the first
  step and every `--eval-steps` optimizer steps (default: once per epoch, as
  DistiLLM's eval-interval -1), sharded over processes and summed, so every
  process gets the same loss and grows φ in step;
* **resume**: the hook's state (φ and its history, the replay buffer, the random
  streams, the counts) goes into every checkpoint, one file per process, and a
  resumed run reads it back, so it continues the same schedule.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from undo_cli.console import console, warn
from undo_cli.errors import UndoError
from undo_cli.training.config import TrainConfig
from undo_cli.training.student_outputs import (STATE_FILE, AdaptiveSchedule, OnPolicySchedule, SourceAwareLoss,
                                               StudentOutputs, default_temperature, eos_ids_of, split_examples)


# --- validation (adaptive's φ) and checkpoints ------------------------------------------

HOLD_OUT_SHARE, HOLD_OUT_MAX = 0.05, 256


def hold_out(config: TrainConfig, examples: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training, validation) examples. Adaptive without --val-data keeps a seeded 5% of the
    training examples (1 to 256) aside for its validation loss, as DistiLLM validates on a dev
    split: the loss on examples it trains on would only fall, and φ would never grow."""
    if config.student_outputs != "adaptive" or config.val_data:
        return examples, []
    import random

    if len(examples) < 2:
        raise UndoError("--student-outputs adaptive: one training example, none to hold out for the validation "
                        "loss that grows φ", hint="add --val-data VAL_RATIONALES.jsonl")
    n = min(HOLD_OUT_MAX, max(1, round(HOLD_OUT_SHARE * len(examples))))
    chosen = set(random.Random(config.seed).sample(range(len(examples)), n))
    warn(f"no --val-data: holding out {n} of the {len(examples)} training examples (seeded) for the adaptive "
         "schedule's validation loss; pass --val-data to train on all of them")
    return [e for i, e in enumerate(examples) if i not in chosen], [examples[i] for i in sorted(chosen)]


def validation_batches(config: TrainConfig, tokenizer, collator, held_out: list[dict] | None = None) -> list[dict]:
    """--val-data read and encoded like --data (or the held-out examples), in batches of --batch-size."""
    from undo_cli.training.data import check_rationales, encode_records, read_training_records

    if config.val_data:
        records = read_training_records(config.val_data, config.rationale_field)  # --data's reader, every shape
        check_rationales(records, config.val_data)
        examples, _ = encode_records(records, tokenizer, max_length=config.max_length, template=config.template,
                                     path=config.val_data)
    else:
        examples = held_out or []
    size = config.batch_size
    return [collator(examples[i: i + size]) for i in range(0, len(examples), size)]


def validation_loss(trainer, batches: list[dict]) -> float:
    """The student's mean cross-entropy on the validation rationales, over all processes."""
    import torch
    import torch.nn.functional as F

    from undo_cli.training.trainer import response_logits

    acc = trainer.accelerator
    model = trainer.model_wrapped
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=acc.device)
    try:
        with torch.no_grad():
            for batch in batches[acc.process_index:: acc.num_processes]:
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                logits, targets = response_logits(model, batch)
                total[0] += F.cross_entropy(logits.float(), targets, reduction="sum").double()
                total[1] += targets.numel()
    finally:
        if was_training:
            model.train()
    if acc.num_processes > 1:
        total = acc.reduce(total, reduction="sum")
    return float(total[0] / total[1].clamp(min=1))


def state_path(checkpoint: Path, rank: int) -> Path:
    return Path(checkpoint) / STATE_FILE.format(rank=rank)


def restore(hook, checkpoint: Path, rank: int) -> None:
    """Load the hook's state saved in `checkpoint` (a run resumed from it continues the same schedule)."""
    from undo_cli.records import read_json

    path = state_path(checkpoint, rank)
    if path.is_file():
        hook.load_state_dict(read_json(path))
    else:
        warn(f"{path}: missing (the run was killed while saving): the schedule restarts empty at this step")


def make_callback(hook, *, val_batches: list[dict] | None, eval_steps: int | None):
    """A TrainerCallback: validation for the adaptive φ, and the hook's state in every checkpoint.

    Set `callback.trainer` once the trainer exists (validation runs the model it trains).
    """
    from transformers.trainer_callback import TrainerCallback

    from undo_cli.records import write_json

    adaptive = bool(val_batches) and isinstance(hook.schedule, AdaptiveSchedule)

    class StudentOutputsCallback(TrainerCallback):
        trainer = None
        every = 1

        def on_train_begin(self, args, state, control, **kwargs):
            # Default: once per epoch, as DistiLLM (eval-interval -1). max_steps / epochs is the
            # steps per epoch whether the run was sized by --epochs or by --max-steps.
            self.every = eval_steps or max(1, round(state.max_steps / max(state.num_train_epochs, 1)))
            if adaptive and hook.schedule.reference is None:  # not on resume: the reference is restored
                self._validate(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if adaptive and state.global_step % self.every == 0:
                self._validate(state.global_step)

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_json(state_path(folder, args.process_index), hook.state_dict())

        def _validate(self, step: int) -> None:
            loss = validation_loss(self.trainer, val_batches)
            before = hook.schedule.phi
            grew = hook.schedule.record_validation(step, loss)
            if self.trainer.is_world_process_zero():
                change = f"φ {before:.1f} -> {hook.schedule.phi:.1f}" if grew else f"φ stays {hook.schedule.phi:.1f}"
                console.print(f"step {step}: validation loss {loss:.4f} "
                              f"(recorded {hook.schedule.reference:.4f}): {change}", soft_wrap=True)

    return StudentOutputsCallback()


def preflight(config: TrainConfig) -> None:
    """Read --val-data and --lm-data before anything is written or loaded: a bad line fails at once."""
    from undo_cli.training.data import check_rationales, read_training_records

    if config.val_data and config.student_outputs == "adaptive":
        check_rationales(read_training_records(config.val_data, config.rationale_field), config.val_data)
    if config.lm_data and config.method == "minillm":
        from undo_cli.training.minillm import lm_records

        lm_records(config.lm_data)


# --- setup: the TrainConfig -> hook, loss, callback ------------------------------------------

class StudentOutputsRun:
    """What `undo train` attaches to its trainer for --student-outputs / --method minillm."""

    def __init__(self, hook, loss, callback, description: str, validation: dict[str, Any] | None = None):
        self.hook, self.loss, self.callback, self.description = hook, loss, callback, description
        self.validation = validation

    def attach(self, trainer) -> None:
        """Add the callback (before the stage's own checkpoint callback, so a complete checkpoint has our state)."""
        self.callback.trainer = trainer
        trainer.add_callback(self.callback)

    def restore(self, checkpoint: Path, rank: int) -> None:
        restore(self.hook, checkpoint, rank)

    def summary(self, runtime_s: float) -> dict[str, Any]:
        found = self.hook.summary(runtime_s)
        if self.validation is not None:
            found["validation"] = self.validation
        return found


def setup(config: TrainConfig, objective, *, tokenizer, collator, model,
          held_out: list[dict] | None = None) -> StudentOutputsRun:
    """Build the batch hook, the loss and the callback from the config and issue 7's live-teacher objective."""
    from undo_cli.training.trainer import unwrap

    mode, method = config.student_outputs, config.method
    temperature = default_temperature(mode, method, config.sample_temperature)
    common = dict(tokenizer=tokenizer, collator=collator, eos_ids=eos_ids_of(unwrap(model), tokenizer),
                  temperature=temperature, max_new_tokens=config.max_new_tokens, max_length=config.max_length,
                  seed=config.seed)
    if method == "minillm":
        from undo_cli.training.minillm import MiniLLMLoss, MiniLLMRollout, lm_examples

        sampler = StudentOutputs(OnPolicySchedule(1.0, seed=config.seed), buffer_size=None, **common)
        lm = lm_examples(config.lm_data, tokenizer, max_length=config.max_length,
                         template=config.template) if config.lm_data else None
        hook = MiniLLMRollout(sampler, teacher=objective.loss.teacher, vocab=objective.vocab,
                              alpha=config.teacher_mix, collator=collator, lm_data=lm, seed=config.seed,
                              served=objective.served, packed=config.padding_free)
        loss = MiniLLMLoss(objective.loss, clip_eps=config.clip_eps, lm_weight=config.lm_weight,
                           chunk_size=config.kd_chunk_size)
        what = (f"MiniLLM: teacher-mixed sampling (alpha {config.teacher_mix:g}), clipped policy gradient "
                f"(eps {config.clip_eps:g}) + single-step reverse KL"
                + (f" + {config.lm_weight:g} x cross-entropy on {config.lm_data}" if lm else ""))
        return StudentOutputsRun(hook, loss, make_callback(hook, val_batches=None, eval_steps=None), what)

    adaptive = mode == "adaptive"
    schedule = AdaptiveSchedule(config.phi_init, seed=config.seed) if adaptive \
        else OnPolicySchedule(config.lmbda, seed=config.seed)
    hook = StudentOutputs(schedule, buffer_size=config.buffer_size if adaptive else None, **common)
    # On the student's own samples the loss is the divergence alone (see student_outputs.py).
    sampled = copy.copy(objective.loss)
    sampled.lm_weight = 0.0
    val = validation_batches(config, tokenizer, collator, held_out) if adaptive else None
    what = (f"adaptive student outputs (DistiLLM): phi from {config.phi_init:g}, replay buffer of "
            f"{config.buffer_size}, validation on {config.val_data or f'{len(held_out or [])} held-out examples'}"
            if adaptive
            else f"on-policy student outputs (GKD): lambda {config.lmbda:g}")
    validation = {"source": config.val_data or "held out from --data",
                  "examples": sum(len(split_examples(b)) for b in val)} if adaptive else None
    return StudentOutputsRun(hook, SourceAwareLoss(objective.loss, sampled),
                             make_callback(hook, val_batches=val, eval_steps=config.eval_steps),
                             f"{what}, sampling at temperature {temperature:g}, up to {config.max_new_tokens} new tokens",
                             validation)
