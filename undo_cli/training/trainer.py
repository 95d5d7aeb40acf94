"""UndoTrainer: transformers' `Trainer` with a pluggable loss and honest token accounting.

Why `Trainer` and not TRL's `SFTTrainer`: everything SFTTrainer adds on top of
`Trainer` is dataset preparation (applying the chat template, tokenising,
completion masks, packing) and a loss. We must not use its preparation: the
student has to see token-for-token the prompt that `undo evaluate` gives it,
and that prompt comes from `prompts.encode_example`, the one function shared by
training and evaluation. What is left, the loss, is the part the white-box
objectives replace. So we subclass `Trainer` directly, keep everything
`accelerate launch` needs for DDP / FSDP / DeepSpeed (the Trainer does it),
and avoid depending on the fastest-moving API in the stack (SFTConfig's fields
change between TRL minor versions). bench/train.py measures both.

EXTENSION POINT: the loss. `UndoTrainer(..., loss_fn=fn)` where

    fn(model, inputs) -> (loss_sum, metrics)

* `inputs` is the collated batch on the right device: `input_ids`, `labels`
  (-100 on prompt and separator positions), and either packed `position_ids`
  (padding-free: the whole micro-batch is one row) or an `attention_mask`
  (padded, length-grouped). Extra per-token fields of the dataset examples
  (e.g. offline teacher log-probabilities) arrive there too (see collate.py).
* `loss_sum` is a scalar tensor: the loss SUMMED over the response tokens of
  this micro-batch (positions where the shifted labels are not -100). The
  trainer divides it by the number of response tokens in the whole optimizer
  step (all gradient-accumulation micro-batches, all processes: transformers'
  `num_items_in_batch`), so every token weighs the same however the batch was
  split. Add terms that are sums too (e.g. DistiLLM's skl + 1.0 x LM loss).
* `metrics` maps names to floats or 0-d tensors (per-micro-batch means); they
  are averaged over micro-batches and processes and logged every logging step.

`response_logits(model, inputs)` gives the student's logits at exactly the
positions that predict a response token, plus those tokens, without building
logits for the prompt (transformers' `logits_to_keep` with a boolean mask). A
token-level KD loss calls it for the student and compares with the teacher's
distribution at the same positions. A loss that needs a teacher can be a
callable object holding it (put the teacher on `trainer.accelerator.device`).

SECOND EXTENSION POINT: the batches. `UndoTrainer(..., batch_hook=hook)` where
`hook(trainer, batches) -> batches` receives one optimizer step's collated
micro-batches (on the device) and may replace them, e.g. by the student's own
samples (training/student_outputs.py). It runs before Trainer counts the
step's response tokens, so the loss is normalised by what is really trained on.

THIRD: `UndoTrainer(..., prefetch=fn)`, `fn(batches)` returning at once: it is
handed the NEXT optimizer step's micro-batches (taken from the data one step
early) and, after the batch hook, the step's final ones, so a remote teacher can
score them while this step's forward and backward run (training/served_teacher.py).
It may store a pending result in a batch under a key of its own. A batch hook
with `next_step_uses_data() -> bool` saves it the look-ahead of steps that will
train on something else.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

from undo_cli.training.collate import IGNORE_INDEX, LengthGroupedSampler, batch_token_counts

LossFn = Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]]
BatchHook = Callable[[Any, list[dict[str, Any]]], list[dict[str, Any]]]
Prefetch = Callable[[list[dict[str, Any]]], None]


def _take(iterator, n: int) -> list:
    """Up to n items from `iterator` (fewer at its end)."""
    out = []
    for _ in range(max(n, 0)):
        try:
            out.append(next(iterator))
        except StopIteration:
            break
    return out

# What the model's forward gets from a batch; the rest (labels, extras) is for the loss.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids",
                    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / DeepSpeed / PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


_KEEP_SUPPORT: dict[type, bool] = {}


def _supports_keep_mask(model: torch.nn.Module) -> bool:
    """Does forward accept a boolean `logits_to_keep` mask? True for transformers' own models.

    Remote-code models may have the argument but only slice the last n positions,
    so for them we compute all logits and select afterwards.
    """
    cls = type(unwrap(model))
    if cls not in _KEEP_SUPPORT:
        import transformers.modeling_utils as mu

        # The class that defines forward (FSDP2 swaps in a subclass named FSDP<Model> that does not).
        owner = next((c for c in cls.__mro__ if "forward" in vars(c)), cls)
        own = owner.__module__.startswith("transformers.") and hasattr(mu, "slice_logits_to_keep")
        _KEEP_SUPPORT[cls] = own and "logits_to_keep" in inspect.signature(owner.forward).parameters
    return _KEEP_SUPPORT[cls]


def response_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): keep[b, t] is True where position t predicts a response token labels[b, t+1]."""
    next_labels = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = next_labels != IGNORE_INDEX
    return keep, next_labels[next_labels != IGNORE_INDEX]


def response_logits(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits [n_response, vocab] at the positions predicting response tokens, and those tokens [n]."""
    keep, targets = response_positions(inputs["labels"])
    model_inputs = {k: inputs[k] for k in MODEL_INPUT_KEYS if k in inputs}
    if _supports_keep_mask(model):
        logits = model(**model_inputs, logits_to_keep=keep, use_cache=False).logits
    else:
        logits = model(**model_inputs, use_cache=False).logits[keep]
    if logits.shape[0] != targets.shape[0]:  # a model that ignored the mask: select ourselves
        logits = logits.reshape(*keep.shape, -1)[keep]
    return logits, targets


def sft_loss(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Cross-entropy on the response tokens, summed (the default loss_fn: plain SFT)."""
    logits, targets = response_logits(model, inputs)
    # float32 softmax: bf16 logits lose the small probabilities that carry the gradient.
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == targets).float().mean() if targets.numel() else logits.new_zeros(())
    return loss_sum, {"token_accuracy": accuracy}


class TokenMeter:
    """Counts what training processed, summed over processes once per optimizer step.

    Per micro-batch the counts stay on the device (no host sync); at the end of
    each optimizer step one small all-reduce makes every process agree on the
    totals. `totals` is what checkpoints store and a resumed run starts from.
    """

    COUNTS = ("tokens", "padding_tokens", "response_tokens", "examples")

    def __init__(self) -> None:
        self.totals: dict[str, Any] = {k: 0 for k in self.COUNTS}
        self.totals.update(epoch_loss={}, first_step_loss=None, last_step_loss=None, steps=0)
        self.session = {k: 0 for k in self.COUNTS}
        self._counts: torch.Tensor | None = None
        self._loss = 0.0
        self._metrics: dict[str, Any] = {}
        self._micro = 0
        self._window: dict[str, list[float]] = {}

    def add(self, inputs: dict[str, Any], loss_sum: torch.Tensor, metrics: dict[str, Any]) -> None:
        counts = batch_token_counts(inputs)
        self._counts = counts if self._counts is None else self._counts + counts
        self._loss = self._loss + loss_sum.detach().double()
        for name, value in metrics.items():
            value = torch.as_tensor(value, device=counts.device).detach().double()
            self._metrics[name] = self._metrics.get(name, 0.0) + value
        self._micro += 1

    def end_step(self, accelerator, epoch: float | None) -> None:
        """Called by every process at the end of an optimizer step: sum over processes, update totals."""
        if self._counts is None:
            return
        names = sorted(self._metrics)
        local = torch.cat([self._counts.double(), torch.as_tensor(self._loss, device=self._counts.device).view(1),
                           torch.stack([self._metrics[n] for n in names]) if names else self._counts.new_zeros(0).double(),
                           self._counts.new_tensor([self._micro]).double()])
        total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
        values = total.tolist()  # the one host sync per optimizer step
        for i, key in enumerate(self.COUNTS):
            self.totals[key] += int(values[i])
            self.session[key] += int(values[i])
        loss_sum, response = values[4], values[2]
        step_loss = loss_sum / max(response, 1)
        if self.totals["first_step_loss"] is None:
            self.totals["first_step_loss"] = step_loss
        self.totals["last_step_loss"] = step_loss
        self.totals["steps"] += 1
        index = str(max(math.ceil((epoch or 0.0) - 1e-9) - 1, 0))
        so_far = self.totals["epoch_loss"].setdefault(index, [0.0, 0])
        so_far[0] += loss_sum
        so_far[1] += int(response)
        micro = max(values[-1], 1)
        for i, name in enumerate(names):
            self._window.setdefault(name, []).append(values[5 + i] / micro)
        self._counts, self._loss, self._metrics, self._micro = None, 0.0, {}, 0

    def pop_window(self) -> dict[str, float]:
        """Metric means since the last log line."""
        window = {name: sum(v) / len(v) for name, v in self._window.items() if v}
        self._window = {}
        return window

    def epoch_losses(self) -> list[float]:
        return [s / max(n, 1) for _, (s, n) in sorted(self.totals["epoch_loss"].items(), key=lambda kv: int(kv[0]))]


class _StepEnd(TrainerCallback):
    """After each optimizer step, on every process: sum the counts; skip the checkpoint of the last step.

    The last step's checkpoint (weights + optimizer, ~3x the model) would be
    deleted a moment later: the final model is saved into OUTPUT instead.
    """

    def __init__(self, trainer: "UndoTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.meter.end_step(self.trainer.accelerator, state.epoch)
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_save = False


class StopOnInterrupt(TrainerCallback):
    """Ctrl-C during training: finish the optimizer step, save a checkpoint, stop (a second Ctrl-C stops at once).

    A KeyboardInterrupt raised wherever Python happens to be (the forward pass, or halfway through the
    optimizer's update of the weights) would leave no checkpoint of the steps since the last --save-steps,
    or one of half-updated weights. So the first SIGINT only sets a flag; at the end of the current
    optimizer step the Trainer saves a regular checkpoint (weights, optimizer, scheduler, RNG, our counts)
    and stops, and `interrupted_at` says at which step. With several processes the flag is summed over
    them at every step end, so all stop at the same step. Installed only in the main thread (signal
    handlers live there) and only where SIGINT is not ignored (`nohup`, a background job).
    """

    def __init__(self, accelerator: Any = None) -> None:
        self.accelerator = accelerator  # several processes: the flag is summed over them
        self.requested = False
        self.interrupted_at: int | None = None
        self._previous: Any = None

    def __enter__(self) -> "StopOnInterrupt":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:  # the second Ctrl-C: stop now (the last complete checkpoint stays on disk)
            raise KeyboardInterrupt
        self.requested = True
        from undo_cli.console import console

        console.print("\n[yellow]Ctrl-C: stopping after this optimizer step and saving a checkpoint "
                      "(Ctrl-C again stops at once, without one)[/yellow]", highlight=False)

    def on_step_end(self, args, state, control, **kwargs):
        flag, accelerator = self.requested, self.accelerator
        if accelerator is not None and accelerator.num_processes > 1:  # every process stops at the same step
            flag = bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item())
        if flag and state.global_step < state.max_steps:  # at the last step the final model is saved anyway
            control.should_save = True
            control.should_training_stop = True
            self.interrupted_at = state.global_step


class StderrProgress(TrainerCallback):
    """Progress on stderr (Trainer prints dicts to stdout, which belongs to JSONL).

    In a terminal: a rich bar with steps, elapsed time, ETA, the loss of the latest optimizer step and
    tokens/s, and every --logging-steps a log line (loss averaged since the last one, lr, grad norm,
    the objective's metrics) above the bar. Without one (a log file, a batch job) one kind of line,
    `console.PlainProgress`'s (`train: step 40/150 (27%)  elapsed ...  eta ...`): every
    --logging-steps with the log line's metrics, a plain one when 30 s pass without any (and at each
    10% when log lines come less often than that), and the last at 100% with the final step's loss,
    which is the `final loss` of the summary. Only the main process reports.
    """

    def __init__(self, meter: "TokenMeter"):
        self.meter = meter
        self.bar = None
        self.task = None
        self.plain = None
        self.started = 0.0

    def _status(self) -> tuple[float | None, float]:
        import time

        loss = self.meter.totals.get("last_step_loss")
        return loss, self.meter.session["tokens"] / max(time.perf_counter() - self.started, 1e-9)

    def on_train_begin(self, args, state, control, **kwargs):
        import time

        if not state.is_world_process_zero:
            return
        from undo_cli.console import PlainProgress, console

        self.started = time.perf_counter()
        if console.is_terminal and not args.disable_tqdm:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                console=console, transient=False)
            self.task = self.bar.add_task("train", total=state.max_steps, completed=state.global_step,
                                          loss="-", tps="-")
            self.bar.start()
        else:  # log lines at least every 10% of the steps are the progress: no 10% lines between them
            every = args.logging_steps if args.logging_steps >= 1 else args.logging_steps * state.max_steps
            self.plain = PlainProgress("train", state.max_steps, unit="step ", deciles=10 * every > state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        loss, tps = self._status()
        shown = "-" if loss is None else f"{loss:.4f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step, loss=shown, tps=f"{tps:,.0f}")
        elif self.plain is not None:
            self.plain.update(state.global_step, f"loss {shown} (this step)  {tps:,.0f} tok/s")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        from undo_cli.console import console

        parts = [] if self.plain is not None else [f"step {state.global_step}/{state.max_steps}"]
        for key, label, fmt in (("epoch", "epoch", "{:.2f}"), ("loss", "loss", "{:.4f}"),
                                ("learning_rate", "lr", "{:.2e}"), ("grad_norm", "grad_norm", "{:.3f}")):
            if key in logs:
                parts.append(f"{label} {fmt.format(logs[key])}")
        skip = {"epoch", "loss", "learning_rate", "grad_norm", "total_flos"}
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items() if k not in skip]
        if self.plain is not None:  # off a terminal: one kind of progress line, this one with the log's metrics
            self.plain.update(state.global_step, "  ".join(parts) + f"  {self._status()[1]:,.0f} tok/s", force=True)
            return
        console.print("  ".join(parts), markup=False, highlight=False, soft_wrap=True)  # above a live bar


class UndoTrainer(Trainer):
    """`Trainer` whose loss is `loss_fn(model, inputs) -> (loss_sum, metrics)` (see the module docstring)."""

    # compute_loss already normalises over the whole accumulated batch (num_items_in_batch).
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, loss_fn: LossFn | None = None, meter: TokenMeter | None = None,
                 length_grouped: bool = False, batch_hook: BatchHook | None = None,
                 prefetch: Prefetch | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.length_grouped = length_grouped
        self.batch_hook = batch_hook
        self.prefetch = prefetch
        self._ahead: list[dict[str, Any]] = []  # the next optimizer step's micro-batches, already prefetched
        self._ahead_of = None  # ... taken from this epoch iterator
        self.loss_fn: LossFn = loss_fn or sft_loss
        self.meter = meter or TokenMeter()
        # Makes Trainer count the response tokens of each optimizer step (over all
        # micro-batches and processes) and pass them to compute_loss as num_items_in_batch.
        self.model_accepts_loss_kwargs = True
        # Trainer reports through ProgressCallback or, without a terminal, PrinterCallback (to stdout,
        # which belongs to JSONL): one stderr reporter replaces both.
        self.remove_callback(ProgressCallback)
        self.remove_callback(PrinterCallback)
        self.add_callback(_StepEnd(self))  # first: the progress shows the loss this step just summed
        self.add_callback(StderrProgress(self.meter))

    def train(self, *args: Any, **kwargs: Any):
        """Trainer.train, with the objects that exist before it frozen out of Python's cyclic collector.

        After importing torch and transformers ~450k objects exist; every full collection walks them
        all for nothing (they live until exit), and Trainer ends with one (accelerate's free_memory):
        0.3 s, 4% of a 20-step CPU run in bench/train.py. `gc.freeze` is the standard library's answer;
        they are unfrozen afterwards (unless someone froze before us), so they stay collectable.
        """
        import gc

        frozen_before = gc.get_freeze_count()
        gc.freeze()
        try:
            return super().train(*args, **kwargs)
        finally:
            if not frozen_before:
                gc.unfreeze()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """One optimizer step's micro-batches, through the batch hook if any (then counted again).

        With `prefetch`, the next step's micro-batches are taken from the iterator one step early
        and handed to it, so their teacher requests run during this step's forward and backward;
        the step's final batches (e.g. the student's fresh samples) are handed to it as well.
        """
        if self.prefetch is None:
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        else:
            if self._ahead_of is not epoch_iterator:  # a new epoch: nothing taken ahead from it yet
                self._ahead, self._ahead_of = [], epoch_iterator
            batches, self._ahead = self._ahead[:num_batches], self._ahead[num_batches:]
            batches += _take(epoch_iterator, num_batches - len(batches))
            self._ahead += _take(epoch_iterator, self.args.gradient_accumulation_steps - len(self._ahead))
            num_items = self._get_num_items_in_batch(batches, device)
        if self.batch_hook is not None and batches:
            batches = self.batch_hook(self, batches)
            num_items = self._get_num_items_in_batch(batches, device)
        if self.prefetch is not None:
            self.prefetch(batches)  # no-op for batches already requested a step ago
            # The next step's data, unless the hook knows it will train on something else (its samples).
            uses_data = getattr(self.batch_hook, "next_step_uses_data", None)
            if self._ahead and (uses_data is None or uses_data()):
                self.prefetch(self._ahead)
        return batches, num_items

    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped batches seeded by (seed, epoch) when asked (see collate.LengthGroupedSampler)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.length_grouped:
            return super()._get_train_sampler(dataset)
        lengths = [len(example["input_ids"]) for example in dataset]
        group = self.args.train_batch_size * self.args.gradient_accumulation_steps
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(lengths, group, seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss_sum, metrics = self.loss_fn(model, inputs)
        if model.training:
            self.meter.add(inputs, loss_sum, metrics)
        if num_items_in_batch is None:  # not counted by Trainer (e.g. evaluation): a local mean
            local = (inputs["labels"][..., 1:] != IGNORE_INDEX).sum().clamp(min=1)
            loss = loss_sum / local
            if model.training:
                loss = loss / self.current_gradient_accumulation_steps
        else:
            loss = loss_sum / torch.as_tensor(num_items_in_batch, device=loss_sum.device).clamp(min=1)
            # num_items_in_batch counts every process's tokens and DDP averages gradients
            # over processes, so scale back up (the same correction Trainer.compute_loss makes).
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """Resuming: a tied LM head (its weights are the embeddings') is not stored in a checkpoint, so it is
        "missing" on load by design; Trainer warns about it only when the model lists it in
        `_keys_to_ignore_on_save`, which current transformers models no longer do. Re-tie and keep quiet about
        those; any other missing or unexpected key is still reported."""
        model = unwrap(self.model)
        tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ())
        if not getattr(model.config, "tie_word_embeddings", False) or not tied:
            return super()._issue_warnings_after_load(load_result)
        missing = [k for k in load_result.missing_keys if k not in tied]
        if len(missing) != len(load_result.missing_keys):
            model.tie_weights()
        return super()._issue_warnings_after_load(type(load_result)(missing, load_result.unexpected_keys))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.meter.pop_window())
        super().log(logs, start_time)
