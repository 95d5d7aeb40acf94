"""`undo train`: fine-tune the student on teacher rationales (see undo_cli/stages/train.py)."""

from __future__ import annotations

from typing import Optional

import typer


def train(
    student: str = typer.Option(..., "--student", help="The model to fine-tune: a local folder or a hub name."),
    data: str = typer.Option(..., "--data", help="Rationale records JSONL from `undo generate` ('-' reads stdin)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder for the model, tokenizer, checkpoints and train_summary.json."),
    epochs: float = typer.Option(2.0, "--epochs", help="Passes over the data (fractions allowed)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate [default: 2e-5; 2e-4 with LoRA]."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per micro-batch on each process."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    max_length: int = typer.Option(1024, "--max-length", help="Tokens per example (prompt + rationale); longer rationales are truncated and counted."),
    warmup_ratio: float = typer.Option(0.03, "--warmup-ratio", help="Fraction of steps warming the lr up from 0."),
    lr_scheduler: str = typer.Option("cosine", "--lr-scheduler", help="cosine, linear, constant, ... (transformers' names)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    seed: int = typer.Option(0, "--seed", help="Seed for data order, LoRA init and dropout."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Less activation memory, ~30% slower."),
    padding_free: Optional[bool] = typer.Option(None, "--padding-free/--no-padding-free", help="Pack micro-batches into one row, no padding (best with flash attention) / pad length-grouped batches (best with sdpa, eager) [default: packed with a flash kernel, else padded]."),
    attn_implementation: Optional[str] = typer.Option(None, "--attn-implementation", help="sdpa, eager, flash_attention_2, ... [default: transformers' choice]."),
    lora_r: int = typer.Option(0, "--lora-r", help="LoRA rank; 0 = full fine-tuning."),
    lora_alpha: Optional[int] = typer.Option(None, "--lora-alpha", help="LoRA alpha [default: 2 x rank]."),
    lora_dropout: float = typer.Option(0.05, "--lora-dropout", help="Dropout on the LoRA path."),
    lora_target_modules: Optional[str] = typer.Option(None, "--lora-target-modules", help="Comma-separated module names [default: all linear layers of attention and MLP]."),
    merge: bool = typer.Option(False, "--merge", help="With LoRA: save the adapter merged into a plain model."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the previous run in --output and start over."),
    save_steps: int = typer.Option(200, "--save-steps", help="Checkpoint every N optimizer steps."),
    logging_steps: int = typer.Option(10, "--logging-steps", help="Print the loss every N optimizer steps."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N optimizer steps (overrides --epochs)."),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help="Keep OUTPUT/checkpoints after the run finished."),
    template: str = typer.Option("student", "--template", help="Student prompt template; must match `undo evaluate`'s."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow models that ship their own code (runs it)."),
    report_to: str = typer.Option("none", "--report-to", help="Also log to tensorboard, wandb, ... (comma-separated)."),
    objective: str = typer.Option("sft", "--objective", help="sft, or a white-box divergence to the teacher (shared tokenizer): fkl, rkl, jsd, skl, srkl, tvd."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Live teacher for a white-box objective (same tokenizer), loaded frozen."),
    teacher_logprobs: bool = typer.Option(False, "--teacher-logprobs", help="Offline teacher: the top-K log-probs in --data (`undo generate --logprobs K`)."),
    alpha: float = typer.Option(0.1, "--alpha", help="Skew of skl/srkl (DistiLLM: 0.1)."),
    beta: float = typer.Option(0.5, "--beta", help="jsd interpolation: 0 = fkl, 1 = rkl, 0.5 = JSD (GKD/TRL)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Divides both models' logits in the divergence."),
    kd_weight: float = typer.Option(1.0, "--kd-weight", help="Weight of the divergence term."),
    lm_weight: float = typer.Option(0.0, "--lm-weight", help="Weight of cross-entropy on the same tokens, added (DistiLLM: 1.0)."),
    kd_chunk_size: int = typer.Option(1024, "--kd-chunk-size", help="Tokens per chunk of the divergence (bounds its memory)."),
    student_outputs: str = typer.Option("off", "--student-outputs", help="off | on-policy (GKD) | adaptive (DistiLLM): also train on the student's own samples, scored by a live --teacher."),
    lmbda: float = typer.Option(0.5, "--lmbda", help="on-policy: probability a step trains on student samples (GKD: 0.5)."),
    sample_temperature: Optional[float] = typer.Option(None, "--sample-temperature", help="Temperature of the student's samples [default: 0.9 on-policy, 1 adaptive/minillm]."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Most tokens per sampled response."),
    buffer_size: int = typer.Option(1000, "--buffer-size", help="adaptive: replay buffer capacity, in sequences."),
    phi_init: float = typer.Option(0.0, "--phi-init", help="adaptive: starting threshold phi (DistiLLM: 0)."),
    val_data: Optional[str] = typer.Option(None, "--val-data", help="adaptive: held-out rationales; phi grows when the loss on them rises."),
    eval_steps: Optional[int] = typer.Option(None, "--eval-steps", help="adaptive: validate every N optimizer steps [default: once per epoch]."),
    method: str = typer.Option("sft", "--method", help="sft (token-level) or minillm (sequence-level reverse KL by policy gradient; start from an SFT student)."),
    teacher_mix: float = typer.Option(0.2, "--teacher-mix", help="minillm: sample from a*teacher + (1-a)*student."),
    clip_eps: float = typer.Option(0.2, "--clip-eps", help="minillm: PPO clipping of the importance ratio."),
    lm_data: Optional[str] = typer.Option(None, "--lm-data", help="minillm: text ('text' lines) or rationales for the LM term (with --lm-weight)."),
) -> None:
    """Fine-tune the student on question -> rationale (loss on the rationale only).

    Example: undo train --student Qwen/Qwen2.5-0.5B-Instruct --data rationales.jsonl --output runs/student

    Several GPUs: accelerate launch --num_processes 4 -m undo_cli train --student ... --data ... --output ...

    White-box (same tokenizer): undo train --objective skl --lm-weight 1 --teacher T --student S --data ... --output ...

    The student's own outputs: undo train --objective srkl --student-outputs adaptive --val-data VAL --teacher T ...
    or: undo train --method minillm --teacher T --student SFT_STUDENT --data ... --output ...
    """
    from undo_cli.stages.train import TrainConfig, run

    run(TrainConfig(
        student=student, data=data, output=output, epochs=epochs, lr=lr, batch_size=batch_size,
        grad_accum=grad_accum, max_length=max_length, warmup_ratio=warmup_ratio, lr_scheduler=lr_scheduler,
        weight_decay=weight_decay, seed=seed, gradient_checkpointing=gradient_checkpointing,
        padding_free=padding_free, attn_implementation=attn_implementation, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, lora_target_modules=lora_target_modules, merge=merge, resume=resume,
        overwrite=overwrite, save_steps=save_steps, logging_steps=logging_steps, max_steps=max_steps,
        keep_checkpoints=keep_checkpoints, template=template, trust_remote_code=trust_remote_code,
        report_to=report_to, objective=objective, teacher=teacher, teacher_logprobs=teacher_logprobs, alpha=alpha,
        beta=beta, temperature=temperature, kd_weight=kd_weight, lm_weight=lm_weight, kd_chunk_size=kd_chunk_size,
        student_outputs=student_outputs, lmbda=lmbda, sample_temperature=sample_temperature,
        max_new_tokens=max_new_tokens, buffer_size=buffer_size, phi_init=phi_init, val_data=val_data,
        eval_steps=eval_steps, method=method, teacher_mix=teacher_mix, clip_eps=clip_eps, lm_data=lm_data,
    ))
