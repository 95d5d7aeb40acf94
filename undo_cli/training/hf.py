"""The Hugging Face side of `undo train`: arguments, loading, LoRA, batching mode, saving, checkpoint counts.

    from undo_cli.training import hf
    args = hf.training_args(config, output)        # also sets up the process group under accelerate launch
    tokenizer, model = hf.load_tokenizer(config), hf.load_student(config)
    ...
    saved = hf.save(trainer, config, output)       # {"model": ..., "adapter": ...}

`batching(padding_free, model)` decides packed or padded rows for the model's attention kernel.
`stages/train.py` keeps the stage (the output folder, the resume plan, the
run, the summary) and calls these. Everything here imports transformers,
torch and peft inside the functions, so importing this module is light.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError
from undo_cli.models import load_pretrained
from undo_cli.records import honour_umask, write_json
from undo_cli.training.config import TrainConfig

STATS_FILE = "undo_stats.json"  # inside each checkpoint: the token counts so far
CHECKPOINTS = "checkpoints"


def training_args(config: TrainConfig, output: Path):
    """transformers' TrainingArguments for this config; checkpoints go to OUTPUT/checkpoints."""
    import dataclasses

    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    # A few arguments were renamed in transformers 5; use whichever this version has.
    versioned: dict[str, Any] = {}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    versioned[checkpointing] = config.gradient_checkpointing
    if config.gradient_checkpointing:  # non-reentrant: works with frozen (LoRA) inputs, recommended by torch
        versioned[f"{checkpointing}_kwargs"] = {"use_reentrant": False}
    if "warmup_ratio" in names:
        versioned["warmup_ratio"] = config.warmup_ratio
    else:  # transformers 5: a float in [0, 1) is a ratio of the total steps
        versioned["warmup_steps"] = config.warmup_ratio
    return TrainingArguments(
        output_dir=str(output / CHECKPOINTS),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        seed=config.seed,
        bf16=bf16,
        fp16=cuda and not bf16,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,  # the newest and the one before: a kill mid-save leaves a complete one
        report_to=[r.strip() for r in config.report_to.split(",") if r.strip() and r.strip() != "none"] or "none",
        remove_unused_columns=False,  # our collators know their fields; Trainer must not drop them
        ddp_find_unused_parameters=False,  # every trainable weight gets a gradient
        dataloader_num_workers=0,
        disable_tqdm=not sys.stderr.isatty(),  # a bar in a terminal, log lines in a log file
        use_cpu=not cuda,
        **versioned,
    )


def load_tokenizer(config: TrainConfig):
    tokenizer = load_pretrained("tokenizer", config.student, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token is None:  # only the padded collator needs it; eos is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_student(config: TrainConfig):
    """The student with float32 weights (bf16 base under LoRA on GPU), LoRA-wrapped when asked."""
    import torch
    from transformers import set_seed

    # Full fine-tuning keeps float32 master weights (bf16 autocast on GPU does the speed);
    # LoRA freezes the base, so a GPU run can hold it in bf16 (peft keeps the adapter in float32).
    dtype = torch.bfloat16 if (config.lora_r and torch.cuda.is_available() and torch.cuda.is_bf16_supported()) \
        else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    set_seed(config.seed)
    model = load_pretrained("model", config.student, trust_remote_code=config.trust_remote_code, **kwargs)
    model.config.use_cache = False  # no KV cache while training (and it conflicts with checkpointing)
    if config.lora_r:
        from peft import LoraConfig, get_peft_model

        targets = [m.strip() for m in config.lora_target_modules.split(",")] if config.lora_target_modules \
            else "all-linear"
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha or 2 * config.lora_r,
                          lora_dropout=config.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:
            raise UndoError(f"--lora-target-modules: {str(exc).splitlines()[0]}",
                            hint="name modules that exist in the model (e.g. q_proj,v_proj), or leave the flag "
                                 "out for all linear layers") from None
    return model


@dataclass(frozen=True)
class Batching:
    """How micro-batches are formed: packed or padded rows, the sampler's order, what the collator adds."""

    packed: bool
    length_grouped: bool  # batches drawn from length-sorted mega-batches (collate.LengthGroupedSampler)
    seq_lens: bool  # the packed collator adds cu_seq_lens_* (flash kernels read them)
    kernel: str  # the attention implementation that runs

    def summary(self) -> dict[str, str]:
        """The train summary's fields: batching (as before), the attention kernel and the batch order."""
        return {"batching": "packed" if self.packed else "padded, length-grouped", "attention": self.kernel,
                "batch_order": "length-grouped" if self.length_grouped else "shuffled"}


def batching(padding_free: bool | None, model) -> Batching:
    """Resolve --padding-free (None = auto) for `model`; switches it to per-sequence sdpa when packing on sdpa.

    Auto packs when the kernel attends within each packed sequence: a flash kernel (varlen), or on CPU
    sdpa run per sequence (training/packed_attention.py): there packing beats length-grouped padded
    batches (no padded position anywhere, the same attention work; bench/train.py). On a GPU without a
    flash kernel auto stays padded, as before: there one sdpa call per sequence and layer is small work
    per kernel launch (`bench/train.py --preset gpu` measures both; `--padding-free` chooses packing).
    Batches are drawn length-grouped unless packing was asked for or a flash kernel packs, as before:
    a seeded default run trains on the same batches whatever the kernel.
    """
    import torch

    from undo_cli.training import packed_attention

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kernel = str(getattr(base.config, "_attn_implementation", "") or "")
    flash = "flash" in kernel
    per_sequence = packed_attention.supports(model)
    packed = padding_free if padding_free is not None else \
        flash or (per_sequence and not torch.cuda.is_available())
    if packed and per_sequence:
        packed_attention.enable(model)
        kernel = str(base.config._attn_implementation)
    # Padded rows are always length-grouped; packed ones too when auto chose packing without a flash kernel.
    grouped = not packed or (padding_free is None and not flash)
    # Only flash kernels need cu_seq_lens; per-sequence sdpa reads the restarts of position_ids, so the batch
    # keeps the keys it always had (the student-output and served-teacher code moves every value to the device).
    return Batching(packed=packed, length_grouped=grouped, seq_lens=packed and flash, kernel=kernel)


def save(trainer, config: TrainConfig, output: Path) -> dict[str, str | None]:
    """Model (or adapter) + tokenizer into OUTPUT; with --merge, a merged model there and the adapter in OUTPUT/adapter.

    Every file written honours the umask: safetensors creates its files 0600 (records.honour_umask).
    """
    saved = _save(trainer, config, output)
    if trainer.is_world_process_zero():
        honour_umask(output)
    return saved


def _save(trainer, config: TrainConfig, output: Path) -> dict[str, str | None]:
    if not config.lora_r:
        trainer.save_model(str(output))
        return {"model": str(output), "adapter": None}
    adapter_dir = output / "adapter" if config.merge else output
    trainer.save_model(str(adapter_dir))
    if not config.merge:
        return {"model": None, "adapter": str(adapter_dir)}
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        # Merge from the saved adapter into a freshly loaded base: the same code path
        # whatever sharded the weights during training (DDP, FSDP, DeepSpeed).
        from peft import PeftModel

        base = load_pretrained("model", config.student, trust_remote_code=config.trust_remote_code, dtype="auto")
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(str(output))
        trainer.processing_class.save_pretrained(str(output))
        del base, merged
    return {"model": str(output), "adapter": str(adapter_dir)}


def attach_checkpoint_counts(trainer) -> None:
    """Write the token counts into every checkpoint, so a resumed run's summary covers the whole run."""
    from transformers.trainer_callback import TrainerCallback

    class _SaveCounts(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    write_json(folder / STATS_FILE, trainer.meter.totals)
                    honour_umask(folder)  # the checkpoint's safetensors are 0600 as written

    trainer.add_callback(_SaveCounts())
