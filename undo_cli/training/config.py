"""`undo train`'s settings: `TrainConfig`, made of option groups that each check themselves.

    from undo_cli.training.config import TrainConfig
    TrainConfig(student="Qwen/Qwen2.5-0.5B-Instruct", data="rationales.jsonl", output="out", lora_r=16)

Every field is a flag of `undo train` (cli/builder.py makes `--lora-r` from
`lora_r`) and a key of `undo iterate`'s [train] table; each group is a section
of `undo train --help` (its `help_group`). A group owns the checks of its own
fields, so a wrong value fails in a fraction of a second, before torch is
imported, with a message that names the fix:

    TrainingOptions       epochs, lr, batches, sequence length, schedule, kernels
    LoraOptions           LoRA rank, alpha, dropout, targets, --merge
    ObjectiveOptions      the white-box divergence and its teacher (docs/objectives.md)
    StudentOutputOptions  on-policy / adaptive / MiniLLM: training on the student's own samples
                          (docs/method.md; training/student_outputs.py, training/minillm.py)
    OutputOptions         checkpoints, logging, --resume / --overwrite

The student-output checks read the objective and batch fields too (a schedule
needs a live teacher and a white-box objective), so they run on the whole
config. Only the standard library and light modules here: `undo train --help`
imports this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from undo_cli.console import warn
from undo_cli.errors import UndoError
from undo_cli.objectives.options import CROSS_KINDS, DESCRIPTIONS, KINDS, OBJECTIVES
from undo_cli.prompts import STUDENT_TEMPLATE

MODES = ("off", "on-policy", "adaptive")
METHODS = ("sft", "minillm")


@dataclass(kw_only=True)
class TrainingOptions:
    """The optimisation itself."""

    help_group = "Training"

    epochs: float = field(default=2.0, metadata={"help": "Passes over the data (fractions allowed)."})
    lr: float | None = field(default=None, metadata={
        "help": "Peak learning rate (default: 2e-5 for full fine-tuning, 2e-4 with LoRA)."})
    batch_size: int = field(default=8, metadata={"help": "Examples per micro-batch on each process."})
    grad_accum: int = field(default=1, metadata={
        "help": "Micro-batches per optimizer step; the effective batch is batch_size x grad_accum x processes."})
    max_length: int = field(default=1024, metadata={
        "help": "Token limit per example (prompt + rationale): longer rationales are truncated and counted."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of the steps spent warming the lr up from 0."})
    lr_scheduler: str = field(default="cosine", metadata={
        "help": "Learning-rate schedule after warmup: any transformers scheduler name (cosine, linear, constant)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    seed: int = field(default=0, metadata={"help": "Seed for the data order, LoRA init and dropout; same seed, same run."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward pass: less memory, about 30% slower."})
    padding_free: bool | None = field(default=None, metadata={
        "help": "True: pack each micro-batch into one row, no padding, no attention across examples (fast with a "
                "varlen kernel: flash_attention_2/3). False: right-padded, length-grouped batches (a few % padding; "
                "faster with sdpa/eager, which attend over a packed row quadratically). None (default): packed "
                "with a flash kernel, else padded."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel (sdpa, eager, flash_attention_2, ...); default: transformers' choice (sdpa)."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps (overrides --epochs)."})

    def check_training(self) -> None:
        def bad(flag: str, why: str, hint: str) -> UndoError:
            return UndoError(f"{flag}: {why}", hint=hint)

        if self.epochs <= 0:
            raise bad(f"--epochs {self.epochs}", "must be positive", "use e.g. --epochs 2, or --max-steps N")
        if self.lr is not None and self.lr <= 0:
            raise bad(f"--lr {self.lr}", "must be positive", "leave it out for the default (2e-5, or 2e-4 with LoRA)")
        for flag, value in (("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum)):
            if value < 1:
                raise bad(f"{flag} {value}", "must be at least 1", f"use {flag} 1 or more")
        if self.max_length < 2:
            raise bad(f"--max-length {self.max_length}", "too small", "a prompt and a rationale need hundreds of tokens")
        if not 0 <= self.warmup_ratio < 1:
            raise bad(f"--warmup-ratio {self.warmup_ratio}", "must be in [0, 1)", "use e.g. 0.03")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad(f"--max-steps {self.max_steps}", "must be at least 1", "leave it out to train for --epochs")


@dataclass(kw_only=True)
class LoraOptions:
    """LoRA through peft (lora_r 0 = full fine-tuning)."""

    help_group = "LoRA"

    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights (full fine-tuning)."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA scaling alpha (default: 2 x lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: str | None = field(default=None, metadata={
        "help": "Comma-separated module names to adapt (e.g. q_proj,v_proj); default: all linear layers of "
                "attention and MLP (peft's all-linear)."})
    merge: bool = field(default=False, metadata={
        "help": "With LoRA: save a plain model with the adapter merged in (the adapter goes to OUTPUT/adapter)."})

    def check_lora(self) -> None:
        if self.lora_r < 0:
            raise UndoError(f"--lora-r {self.lora_r}: must be >= 0", hint="0 trains all weights; 8-64 are usual LoRA ranks")
        if not 0 <= self.lora_dropout < 1:
            raise UndoError(f"--lora-dropout {self.lora_dropout}: must be in [0, 1)", hint="use e.g. 0.05")
        if self.lora_r == 0 and (self.merge or self.lora_alpha is not None or self.lora_target_modules):
            raise UndoError("--merge / --lora-alpha / --lora-target-modules only apply to LoRA",
                            hint="add --lora-r 16 (for example), or drop those flags for full fine-tuning")


@dataclass(kw_only=True)
class ObjectiveOptions:
    """White-box distillation: a divergence to the teacher's token distribution (training/distill.py)."""

    help_group = "White-box objective"

    objective: str = field(default="sft", metadata={"choices": OBJECTIVES, 
        "help": "sft (cross-entropy on the rationale, any teacher) or a white-box divergence to the teacher's token "
                "distribution: fkl, rkl, jsd, skl, srkl, tvd (a shared tokenizer); uld, gold (any tokenizer: "
                "byte-aligned spans); auto (skl when the tokenizers are identical, else gold or uld)."})
    teacher: str | None = field(default=None, metadata={
        "help": "Live teacher for a white-box objective (folder or hub name; another tokenizer needs uld, gold or "
                "auto), loaded frozen."})
    teacher_logprobs: bool = field(default=False, metadata={
        "help": "Offline teacher: use the top-K log-probs recorded in --data by `undo generate --logprobs K`."})
    teacher_url: str | None = field(default=None, metadata={
        "help": "Served teacher: URL of an OpenAI-compatible vLLM server serving --teacher (e.g. "
                "http://127.0.0.1:8000/v1); its top-K log-probs at every trained token come from the completions "
                "endpoint (prompt_logprobs), nothing is loaded here."})
    teacher_top_k: int = field(default=20, metadata={
        "help": "Served teacher: K log-probs per token (the server's --max-logprobs must allow it; vLLM's default is "
                "20); also the k of the logged top-k overlap of teacher and student."})
    teacher_api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "Served teacher: NAME of the environment variable that holds its API key (none needed on loopback)."})
    teacher_timeout: float = field(default=300.0, metadata={
        "help": "Served teacher: seconds per scoring request before it is retried."})
    teacher_max_retries: int = field(default=5, metadata={
        "help": "Served teacher: retries of a failed request (backoff with jitter, as the openai backend) before the "
                "run stops; --resume continues it."})
    alpha: float = field(default=0.1, metadata={"help": "Skew of skl/srkl (DistiLLM: 0.1)."})
    beta: float = field(default=0.5, metadata={"help": "jsd interpolation (GKD/TRL: 0 = fkl, 1 = rkl, 0.5 = JSD)."})
    temperature: float = field(default=1.0, metadata={"help": "Divides both models' logits in the divergence."})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the divergence term."})
    lm_weight: float = field(default=0.0, metadata={
        "help": "Weight of cross-entropy on the same response tokens, added to the divergence (DistiLLM: 1.0)."})
    kd_chunk_size: int = field(default=1024, metadata={
        "help": "Tokens per chunk of the divergence: bounds its float32 memory to chunk x vocabulary."})

    def check_objective(self) -> None:
        """Refuse meaningless combinations of --objective/--teacher/--teacher-logprobs/--alpha/... (UndoError)."""
        objective = self.objective
        live, offline = self.teacher is not None, bool(self.teacher_logprobs)
        served = bool(self.teacher_url)
        if objective not in OBJECTIVES:
            raise UndoError(f"--objective {objective}: unknown objective",
                            hint="use one of: " + "; ".join(f"{k} = {v}" for k, v in DESCRIPTIONS.items()))
        if served and not live:
            raise UndoError("--teacher-url needs --teacher NAME: the model name the server serves",
                            hint="add --teacher with the name listed by the server's /v1/models")
        if objective == "sft":
            if served:
                raise UndoError("--teacher-url only matters for a white-box objective; --objective sft trains on the "
                                "rationale text alone",
                                hint=f"add --objective skl (or one of {', '.join(KINDS)}), or drop --teacher-url")
            if live or offline:
                raise UndoError(f"{'--teacher' if live else '--teacher-logprobs'} only matters for a white-box "
                                "objective; --objective sft trains on the rationale text alone",
                                hint=f"add --objective skl (or one of {', '.join(KINDS)}), or drop the teacher flag")
            return
        if live and offline:
            raise UndoError("--teacher and --teacher-logprobs contradict each other",
                            hint="use a live --teacher MODEL, or the log-probs recorded in --data (--teacher-logprobs)")
        if not (live or offline):
            raise UndoError(f"--objective {objective} needs --teacher MODEL or --teacher-logprobs",
                            hint="--teacher loads a teacher here (any tokenizer with uld, gold or auto); --teacher-logprobs "
                                 "uses rationales generated with `undo generate --logprobs K`; --objective sft needs "
                                 "neither")
        if not 0.0 <= self.alpha < 1.0:
            raise UndoError(f"--alpha {self.alpha}: must be in [0, 1)",
                            hint="DistiLLM uses 0.1; 0 turns skl into fkl and srkl into rkl; 1 makes both identically 0")
        if not 0.0 <= self.beta <= 1.0:
            raise UndoError(f"--beta {self.beta}: must be in [0, 1]",
                            hint="0 = forward KL, 1 = reverse KL, 0.5 (default, GKD/TRL) = symmetric JSD")
        if not self.temperature > 0.0:
            raise UndoError(f"--temperature {self.temperature}: must be > 0", hint="1 (default) leaves the logits as they are")
        if offline and self.temperature != 1.0:
            raise UndoError(f"--temperature {self.temperature} needs a live --teacher",
                            hint="the recorded top-K log-probs do not say how the teacher's tail reshapes at another "
                                 "temperature; drop --temperature or use --teacher MODEL")
        if served and self.temperature != 1.0:
            raise UndoError(f"--temperature {self.temperature} with --teacher-url",
                            hint="the server's top-K log-probs do not say how the teacher's tail reshapes at another "
                                 "temperature; drop --temperature or load the teacher here (--teacher MODEL alone)")
        for flag, value, ok, hint in (
                ("--teacher-top-k", self.teacher_top_k, self.teacher_top_k >= 1,
                 "at least 1; 20 is vLLM's default --max-logprobs"),
                ("--teacher-timeout", self.teacher_timeout, self.teacher_timeout > 0,
                 "a positive number of seconds, e.g. 300"),
                ("--teacher-max-retries", self.teacher_max_retries, self.teacher_max_retries >= 0, "0 or more, e.g. 5")):
            if not ok:
                raise UndoError(f"{flag} {value}: out of range", hint=f"use {hint}")
        if not self.kd_weight > 0.0:
            raise UndoError(f"--kd-weight {self.kd_weight}: must be > 0",
                            hint="use --objective sft for cross-entropy alone")
        if self.lm_weight < 0.0:
            raise UndoError(f"--lm-weight {self.lm_weight}: must be >= 0",
                            hint="0 (default) trains on the divergence alone; DistiLLM adds 1.0")
        if self.kd_chunk_size < 1:
            raise UndoError(f"--kd-chunk-size {self.kd_chunk_size}: must be at least 1",
                            hint="1024 tokens per chunk bounds the float32 work to ~1024 x vocab values")


@dataclass(kw_only=True)
class StudentOutputOptions:
    """Training on the student's own samples, scored by a live teacher (GKD, DistiLLM, MiniLLM)."""

    help_group = "Student outputs"

    student_outputs: str = field(default="off", metadata={"choices": MODES, 
        "help": "off; on-policy (GKD: with probability --lmbda a step trains on the student's samples); adaptive "
                "(DistiLLM: fresh samples / a replay buffer / the data, by a threshold grown from --val-data)."})
    lmbda: float = field(default=0.5, metadata={"help": "on-policy: probability a step uses student samples (GKD/TRL: 0.5)."})
    sample_temperature: float | None = field(default=None, metadata={
        "help": "Temperature of the student's samples (default: 0.9 on-policy as TRL's GKD, 1 adaptive and minillm)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Most tokens per sampled response."})
    buffer_size: int = field(default=1000, metadata={"help": "adaptive: replay buffer capacity in sequences (DistiLLM: 1000)."})
    phi_init: float = field(default=0.0, metadata={"help": "adaptive: the threshold phi at the start (DistiLLM: 0)."})
    val_data: str | None = field(default=None, metadata={
        "help": "adaptive: held-out rationales; phi grows by 0.1 when the student's loss on them rises by >= 0.1."})
    eval_steps: int | None = field(default=None, metadata={
        "help": "adaptive: validate every this many optimizer steps (default: once per epoch)."})
    method: str = field(default="sft", metadata={"choices": METHODS, 
        "help": "sft (token-level: --objective on the batch) or minillm (sequence-level reverse KL by policy "
                "gradient, MiniLLM; start from an SFT student; implies --objective rkl)."})
    teacher_mix: float = field(default=0.2, metadata={"help": "minillm: sample from a*teacher + (1-a)*student (0.2)."})
    clip_eps: float = field(default=0.2, metadata={"help": "minillm: PPO clipping of the importance ratio (0.2)."})
    lm_data: str | None = field(default=None, metadata={
        "help": "minillm: plain text ('text' lines) or rationales for the language-model term, weighted by --lm-weight."})

    def check_student_outputs(self) -> None:
        """Refuse settings that cannot work, naming the fix (reads the objective and batch fields too)."""
        c = self
        mode, method = c.student_outputs, c.method
        if mode not in MODES:
            raise UndoError(f"--student-outputs {mode}: unknown", hint=f"use one of: {', '.join(MODES)}")
        if method not in METHODS:
            raise UndoError(f"--method {method}: unknown", hint="use sft (token-level training, the default) or minillm")
        if mode == "off" and method == "sft":
            if c.lm_data:
                raise UndoError("--lm-data is MiniLLM's language-model term", hint="use it with --method minillm, or drop it")
            if c.val_data:
                warn("--val-data is only used by --student-outputs adaptive (for φ); ignored")
            return
        what = "--method minillm" if method == "minillm" else f"--student-outputs {mode}"
        if method == "minillm" and mode != "off":
            raise UndoError(f"--method minillm with --student-outputs {mode}: MiniLLM samples its own (teacher-mixed) "
                            "outputs", hint="drop --student-outputs, or use --method sft with it")
        if c.teacher_logprobs:
            raise UndoError(f"{what} with --teacher-logprobs: an offline teacher cannot score the student's new samples",
                            hint="load the teacher live with --teacher MODEL (same tokenizer as the student)")
        if not c.teacher:
            raise UndoError(f"{what} needs a live --teacher of the same tokenizer (it scores the student's samples)",
                            hint="add --teacher MODEL; for a teacher with another tokenizer use plain --objective sft")
        objective = c.objective
        if objective in CROSS_KINDS:
            raise UndoError(f"{what} with --objective {objective}: scoring the student's own samples needs a teacher "
                            "with the student's tokenizer",
                            hint="use an exact-vocabulary objective (jsd, srkl, ...) with a teacher of the same "
                                 "tokenizer, or train on the data alone (drop the flag)")
        if method == "sft" and objective == "sft":
            raise UndoError(f"{what} needs a white-box --objective: cross-entropy on the student's own samples "
                            "teaches it nothing new", hint="use --objective jsd (GKD) or srkl (DistiLLM)")
        if method == "minillm" and c.teacher_url and c.teacher_mix > 0:
            raise UndoError(f"--method minillm --teacher-mix {c.teacher_mix:g} with --teacher-url: teacher-mixed "
                            "sampling needs the teacher's distribution at every generated token, one server round "
                            "trip each",
                            hint="pass --teacher-mix 0 (sample from the student alone; the served teacher scores the "
                                 "samples), or load the teacher here (--teacher MODEL without --teacher-url)")
        if method == "minillm" and objective not in ("sft", "rkl"):
            raise UndoError(f"--method minillm with --objective {objective}: MiniLLM optimises the sequence-level "
                            "reverse KL itself", hint="drop --objective (or use --objective rkl)")
        checks = [("--lmbda", c.lmbda, 0.0 <= c.lmbda <= 1.0, "a probability in [0, 1], e.g. 0.5"),
                  ("--phi-init", c.phi_init, 0.0 <= c.phi_init <= 1.0, "a probability in [0, 1]; DistiLLM starts at 0"),
                  ("--buffer-size", c.buffer_size, mode != "adaptive" or c.buffer_size >= c.batch_size,
                   f"at least --batch-size ({c.batch_size}) sequences; DistiLLM keeps 1000"),
                  ("--max-new-tokens", c.max_new_tokens, c.max_new_tokens >= 1, "at least 1, e.g. 512"),
                  ("--teacher-mix", c.teacher_mix, 0.0 <= c.teacher_mix < 1.0, "in [0, 1); MiniLLM uses 0.2"),
                  ("--clip-eps", c.clip_eps, 0.0 < c.clip_eps < 1.0, "in (0, 1); MiniLLM uses 0.2")]
        if c.sample_temperature is not None:
            checks.append(("--sample-temperature", c.sample_temperature, c.sample_temperature > 0, "positive, e.g. 0.9"))
        if c.eval_steps is not None:
            checks.append(("--eval-steps", c.eval_steps, c.eval_steps >= 1, "at least 1 (or leave it out: once per epoch)"))
        for flag, value, ok, hint in checks:
            if not ok:
                raise UndoError(f"{flag} {value}: out of range", hint=f"use {hint}")
        if method == "minillm" and c.sample_temperature not in (None, 1.0):
            raise UndoError(f"--sample-temperature {c.sample_temperature} with --method minillm: its importance weights "
                            "and policy gradient assume samples from the model's own distribution",
                            hint="drop --sample-temperature (MiniLLM samples at temperature 1)")
        if method == "minillm" and c.temperature != 1.0:
            raise UndoError(f"--temperature {c.temperature} with --method minillm: its rewards and single-step KL are "
                            "on the models' own distributions", hint="drop --temperature")
        if c.lm_data and method != "minillm":
            raise UndoError("--lm-data is MiniLLM's language-model term", hint="use it with --method minillm, or drop it")
        lm_weight = c.lm_weight
        if method == "minillm" and bool(c.lm_data) != (lm_weight > 0):
            raise UndoError("--method minillm: --lm-weight weighs the cross-entropy on --lm-data, so they go together",
                            hint="pass both (MiniLLM uses --lm-weight 1 --lm-data TEXT.jsonl) or neither")
        if c.val_data and mode != "adaptive":
            warn(f"--val-data is only used by --student-outputs adaptive (for φ); ignored with {what}")


@dataclass(kw_only=True)
class OutputOptions:
    """What is written to --output and when; none of these change what is trained."""

    help_group = "Output and resume"

    resume: bool = field(default=False, metadata={
        "help": "Continue the run in OUTPUT from its last complete checkpoint (a finished run is left as is)."})
    overwrite: bool = field(default=False, metadata={"help": "Delete the previous `undo train` run in OUTPUT and start over."})
    save_steps: int = field(default=200, metadata={"help": "Write a checkpoint every this many optimizer steps."})
    logging_steps: int = field(default=10, metadata={"help": "Print the loss every this many optimizer steps."})
    keep_checkpoints: bool = field(default=False, metadata={"help": "Keep OUTPUT/checkpoints after a finished run."})
    report_to: str = field(default="none", metadata={
        "help": "Also log to these trackers (comma-separated: tensorboard, wandb, ...; transformers' report_to)."})

    def check_output(self) -> None:
        for flag, value in (("--save-steps", self.save_steps), ("--logging-steps", self.logging_steps)):
            if value < 1:
                raise UndoError(f"{flag} {value}: must be at least 1", hint=f"use {flag} 1 or more")
        if self.resume and self.overwrite:
            raise UndoError("--resume and --overwrite contradict each other",
                            hint="--resume continues the run in --output; --overwrite deletes it and starts over")


@dataclass
class TrainConfig(OutputOptions, StudentOutputOptions, ObjectiveOptions, LoraOptions, TrainingOptions):
    """Everything `undo train` needs (the CLI flags, one to one)."""

    student: str = field(metadata={"help": "The model to fine-tune: a local folder or a hub name."})
    data: str = field(metadata={"help": "Training data JSONL ('-' reads stdin): rationales from `undo generate`/`undo "
                                        "refine`, problems with --rationale-field, {\"messages\": [...]} or {\"prompt\", "
                                        "\"completion\"} lines (docs/artifacts.md, 'training data')."})
    output: str = field(metadata={"short": "-o", "help": "Folder for the trained model, tokenizer, checkpoints and train_summary.json."})
    template: str = field(default=STUDENT_TEMPLATE, metadata={
        "help": "Student prompt template (name or .jinja path; what each template receives: prompts/README.md); "
                "must match the one `undo evaluate` uses."})
    rationale_field: str | None = field(default=None, metadata={
        "help": "Train on problems' own worked solutions: the field that holds them, dotted for nested ones "
                "(e.g. meta.solution, what `undo data import --preset gsm8k` writes)."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow models that ship their own Python code (runs that code: only for sources you trust)."})

    def __post_init__(self) -> None:
        self.check_training()
        self.check_lora()
        self.check_output()
        self.check_student_outputs()
        if self.method == "minillm" and self.objective == "sft":
            self.objective = "rkl"  # MiniLLM's single-step term is the token-level reverse KL
        self.check_objective()
        from undo_cli.model_refs import check_model_ref  # a misspelt folder fails now, not after imports

        check_model_ref(self.student, "--student")
        check_model_ref(self.teacher, "--teacher")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora_r else 2e-5)
