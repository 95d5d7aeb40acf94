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
from undo_cli.errors import SettingError, UndoError, ref, word
from undo_cli.objectives.options import CROSS_KINDS, DESCRIPTIONS, KINDS
from undo_cli.prompts import STUDENT_TEMPLATE

MODES = ("off", "on-policy", "adaptive")
METHODS = {"sft": "token-level training, the default", "minillm": "MiniLLM's policy gradient"}
RUNTIME = {"identity": False}  # changes nothing that is trained (undo_cli/identity.py): may differ on --resume


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
        "help": "True: pack each micro-batch into one row, no padding, no attention across examples (flash_attention_2/3 "
                "run each example by itself, and so does sdpa: undo runs it once per example). False: right-padded, "
                "length-grouped batches (a few % padding). None (default): packed with a flash kernel or with sdpa on "
                "CPU (in the length-grouped order), padded with sdpa on a GPU or with eager."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel (sdpa, eager, flash_attention_2, ...); default: transformers' choice (sdpa)."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps (overrides --epochs)."})

    def check_training(self) -> None:
        if self.epochs <= 0:
            raise SettingError("epochs", self.epochs, "must be positive",
                               hint=f"use e.g. {ref('epochs')} 2, or {ref('max_steps')} N")
        if self.lr is not None and self.lr <= 0:
            raise SettingError("lr", self.lr, "must be positive",
                               hint="leave it out for the default (2e-5, or 2e-4 with LoRA)")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise SettingError(name, getattr(self, name), "must be at least 1", hint=f"use {ref(name)} 1 or more")
        if self.max_length < 2:
            raise SettingError("max_length", self.max_length, "too small",
                               hint="a prompt and a rationale need hundreds of tokens")
        if not 0 <= self.warmup_ratio < 1:
            raise SettingError("warmup_ratio", self.warmup_ratio, "must be in [0, 1)", hint="use e.g. 0.03")
        if self.max_steps is not None and self.max_steps < 1:
            raise SettingError("max_steps", self.max_steps, "must be at least 1",
                               hint=f"leave it out to train for {ref('epochs')}")


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
            raise SettingError("lora_r", self.lora_r, "must be >= 0", hint="0 trains all weights; 8-64 are usual LoRA ranks")
        if not 0 <= self.lora_dropout < 1:
            raise SettingError("lora_dropout", self.lora_dropout, "must be in [0, 1)", hint="use e.g. 0.05")
        if self.lora_r == 0 and (self.merge or self.lora_alpha is not None or self.lora_target_modules):
            raise UndoError(f"{ref('merge')} / {ref('lora_alpha')} / {ref('lora_target_modules')} only apply to LoRA",
                            setting="lora_r",
                            hint=f"add {ref('lora_r')} 16 (for example), or drop those flags for full fine-tuning")


@dataclass(kw_only=True)
class ObjectiveOptions:
    """White-box distillation: a divergence to the teacher's token distribution (training/distill.py)."""

    help_group = "White-box objective"

    objective: str = field(default="sft", metadata={"choices": DESCRIPTIONS,
        "help": "sft (cross-entropy on the rationale, any teacher) or a white-box divergence to the teacher's token "
                "distribution: fkl, rkl, jsd, skl, srkl, tvd (a shared tokenizer); uld, gold (any tokenizer: "
                "byte-aligned spans); auto (skl when the tokenizers are identical, else gold or uld)."})
    teacher: str | None = field(default=None, metadata={
        "help": "Live teacher for a white-box objective (folder, hub name or .gguf file; another tokenizer needs uld, gold or "
                "auto), loaded frozen."})
    teacher_logprobs: bool = field(default=False, metadata={
        "help": "Offline teacher: use the top-K log-probs recorded in --data by `undo generate --logprobs K`."})
    teacher_url: str | None = field(default=None, metadata={**RUNTIME,
        "help": "Served teacher: URL of an OpenAI-compatible vLLM server serving --teacher (e.g. "
                "http://127.0.0.1:8000/v1); its top-K log-probs at every trained token come from the completions "
                "endpoint (prompt_logprobs), nothing is loaded here."})
    teacher_top_k: int = field(default=20, metadata={
        "help": "Served teacher: K log-probs per token (the server's --max-logprobs must allow it; vLLM's default is "
                "20); also the k of the logged top-k overlap of teacher and student."})
    teacher_api_key_env: str = field(default="OPENAI_API_KEY", metadata={**RUNTIME,
        "help": "Served teacher: NAME of the environment variable that holds its API key (none needed on loopback)."})
    teacher_timeout: float = field(default=300.0, metadata={**RUNTIME,
        "help": "Served teacher: seconds per scoring request before it is retried."})
    teacher_max_retries: int = field(default=5, metadata={**RUNTIME,
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
        if served and not live:
            raise UndoError(f"{ref('teacher_url')} needs {ref('teacher')} NAME: the model name the server serves",
                            setting="teacher_url",
                            hint=f"add {ref('teacher')} with the name listed by the server's /v1/models")
        if objective == "sft":
            if live or offline or served:
                which = ref("teacher_url") if served else ref("teacher") if live else ref("teacher_logprobs")
                raise UndoError(f"{which} only matters for a white-box objective; {ref('objective')} sft trains on "
                                "the rationale text alone", setting="objective",
                                hint=f"add {ref('objective')} skl (or one of {', '.join(KINDS)}), or drop {which}")
            return
        if live and offline:
            raise UndoError(f"{ref('teacher')} and {ref('teacher_logprobs')} contradict each other", setting="teacher",
                            hint=f"use a live {ref('teacher')} MODEL, or the log-probs recorded in {ref('data')} "
                                 f"({ref('teacher_logprobs')})")
        if not (live or offline):
            raise UndoError(f"{ref('objective')} {objective} needs {ref('teacher')} MODEL or {ref('teacher_logprobs')}",
                            setting="objective",
                            hint=f"{ref('teacher')} loads a teacher here (any tokenizer with uld, gold or auto); "
                                 f"{ref('teacher_logprobs')} uses rationales generated with `undo generate --logprobs "
                                 f"K`; {ref('objective')} sft needs neither")
        self._check_objective_values(offline, served)

    def _check_objective_values(self, offline: bool, served: bool) -> None:
        if not 0.0 <= self.alpha < 1.0:
            raise SettingError("alpha", self.alpha, "must be in [0, 1)",
                               hint="DistiLLM uses 0.1; 0 turns skl into fkl and srkl into rkl; 1 makes both "
                                    "identically 0")
        if not 0.0 <= self.beta <= 1.0:
            raise SettingError("beta", self.beta, "must be in [0, 1]",
                               hint="0 = forward KL, 1 = reverse KL, 0.5 (default, GKD/TRL) = symmetric JSD")
        if not self.temperature > 0.0:
            raise SettingError("temperature", self.temperature, "must be > 0",
                               hint="1 (default) leaves the logits as they are")
        if (offline or served) and self.temperature != 1.0:
            where = ("the server's top-K log-probs", f"load the teacher here ({ref('teacher')} MODEL alone)") if served \
                else ("the recorded top-K log-probs", f"use {ref('teacher')} MODEL")
            why = f"with {ref('teacher_url')}" if served else f"needs a live {ref('teacher')}"
            raise UndoError(f"{ref('temperature')} {self.temperature} {why}", setting="temperature",
                            hint=f"{where[0]} do not say how the teacher's tail reshapes at another temperature; "
                                 f"drop {ref('temperature')} or {where[1]}")
        for name, ok, hint in (
                ("teacher_top_k", self.teacher_top_k >= 1, "at least 1; 20 is vLLM's default --max-logprobs"),
                ("teacher_timeout", self.teacher_timeout > 0, "a positive number of seconds, e.g. 300"),
                ("teacher_max_retries", self.teacher_max_retries >= 0, "0 or more, e.g. 5")):
            if not ok:
                raise SettingError(name, getattr(self, name), "out of range", hint=f"use {hint}")
        if not self.kd_weight > 0.0:
            raise SettingError("kd_weight", self.kd_weight, "must be > 0",
                               hint=f"use {ref('objective')} sft for cross-entropy alone")
        if self.lm_weight < 0.0:
            raise SettingError("lm_weight", self.lm_weight, "must be >= 0",
                               hint="0 (default) trains on the divergence alone; DistiLLM adds 1.0")
        if self.kd_chunk_size < 1:
            raise SettingError("kd_chunk_size", self.kd_chunk_size, "must be at least 1",
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
        "help": "adaptive: held-out training data, in any shape --data takes (with --rationale-field too); phi grows "
                "by 0.1 when the student's loss on it rises by >= 0.1."})
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
        if mode == "off" and method == "sft":
            if c.lm_data:
                raise UndoError(f"{ref('lm_data')} is MiniLLM's language-model term", setting="lm_data",
                                hint=f"use it with {ref('method')} minillm, or drop it")
            if c.val_data:
                warn("--val-data is only used by --student-outputs adaptive (for φ); ignored")
            return
        what = f"{ref('method')} minillm" if method == "minillm" else f"{ref('student_outputs')} {mode}"
        if method == "minillm" and mode != "off":
            raise UndoError(f"{ref('method')} minillm with {ref('student_outputs')} {mode}: MiniLLM samples its own "
                            "(teacher-mixed) outputs", setting="method",
                            hint=f"drop {ref('student_outputs')}, or use {ref('method')} sft with it")
        if c.teacher_logprobs:
            raise UndoError(f"{what} with {ref('teacher_logprobs')}: an offline teacher cannot score the student's new "
                            "samples", setting="teacher_logprobs",
                            hint=f"load the teacher live with {ref('teacher')} MODEL (same tokenizer as the student)")
        if not c.teacher:
            raise UndoError(f"{what} needs a live {ref('teacher')} of the same tokenizer (it scores the student's "
                            "samples)", setting="teacher",
                            hint=f"add {ref('teacher')} MODEL; for a teacher with another tokenizer use plain "
                                 f"{ref('objective')} sft")
        if c.objective in CROSS_KINDS:
            raise UndoError(f"{what} with {ref('objective')} {c.objective}: scoring the student's own samples needs a "
                            "teacher with the student's tokenizer", setting="objective",
                            hint="use an exact-vocabulary objective (jsd, srkl, ...) with a teacher of the same "
                                 "tokenizer, or train on the data alone (drop the flag)")
        if method == "sft" and c.objective == "sft":
            raise UndoError(f"{what} needs a white-box {ref('objective')}: cross-entropy on the student's own samples "
                            "teaches it nothing new", setting="objective",
                            hint=f"use {ref('objective')} jsd (GKD) or srkl (DistiLLM)")
        if method == "minillm":
            self._check_minillm()
        self._check_student_output_values()
        if c.val_data and mode != "adaptive":
            warn(f"--val-data is only used by --student-outputs adaptive (for φ); ignored with {word(what)}")

    def _check_minillm(self) -> None:
        c = self
        if c.teacher_url and c.teacher_mix > 0:
            raise UndoError(f"{ref('method')} minillm {ref('teacher_mix')} {c.teacher_mix:g} with {ref('teacher_url')}: "
                            "teacher-mixed sampling needs the teacher's distribution at every generated token, one "
                            "server round trip each", setting="teacher_mix",
                            hint=f"pass {ref('teacher_mix')} 0 (sample from the student alone; the served teacher "
                                 f"scores the samples), or load the teacher here ({ref('teacher')} MODEL without "
                                 f"{ref('teacher_url')})")
        if c.objective not in ("sft", "rkl"):
            raise UndoError(f"{ref('method')} minillm with {ref('objective')} {c.objective}: MiniLLM optimises the "
                            "sequence-level reverse KL itself", setting="objective",
                            hint=f"drop {ref('objective')} (or use {ref('objective')} rkl)")
        if c.sample_temperature not in (None, 1.0):
            raise UndoError(f"{ref('sample_temperature')} {c.sample_temperature} with {ref('method')} minillm: its "
                            "importance weights and policy gradient assume samples from the model's own distribution",
                            setting="sample_temperature",
                            hint=f"drop {ref('sample_temperature')} (MiniLLM samples at temperature 1)")
        if c.temperature != 1.0:
            raise UndoError(f"{ref('temperature')} {c.temperature} with {ref('method')} minillm: its rewards and "
                            "single-step KL are on the models' own distributions", setting="temperature",
                            hint=f"drop {ref('temperature')}")
        if bool(c.lm_data) != (c.lm_weight > 0):
            raise UndoError(f"{ref('method')} minillm: {ref('lm_weight')} weighs the cross-entropy on "
                            f"{ref('lm_data')}, so they go together", setting="lm_weight",
                            hint=f"pass both (MiniLLM uses {ref('lm_weight')} 1 {ref('lm_data')} TEXT.jsonl) or "
                                 "neither")

    def _check_student_output_values(self) -> None:
        c = self
        checks = [("lmbda", 0.0 <= c.lmbda <= 1.0, "a probability in [0, 1], e.g. 0.5"),
                  ("phi_init", 0.0 <= c.phi_init <= 1.0, "a probability in [0, 1]; DistiLLM starts at 0"),
                  ("buffer_size", c.student_outputs != "adaptive" or c.buffer_size >= c.batch_size,
                   f"at least {ref('batch_size')} ({c.batch_size}) sequences; DistiLLM keeps 1000"),
                  ("max_new_tokens", c.max_new_tokens >= 1, "at least 1, e.g. 512"),
                  ("teacher_mix", 0.0 <= c.teacher_mix < 1.0, "in [0, 1); MiniLLM uses 0.2"),
                  ("clip_eps", 0.0 < c.clip_eps < 1.0, "in (0, 1); MiniLLM uses 0.2"),
                  ("sample_temperature", c.sample_temperature is None or c.sample_temperature > 0, "positive, e.g. 0.9"),
                  ("eval_steps", c.eval_steps is None or c.eval_steps >= 1,
                   "at least 1 (or leave it out: once per epoch)")]
        for name, ok, hint in checks:
            if not ok:
                raise SettingError(name, getattr(c, name), "out of range", hint=f"use {hint}")
        if c.lm_data and c.method != "minillm":
            raise UndoError(f"{ref('lm_data')} is MiniLLM's language-model term", setting="lm_data",
                            hint=f"use it with {ref('method')} minillm, or drop it")


@dataclass(kw_only=True)
class OutputOptions:
    """What is written to --output and when; none of these change what is trained."""

    help_group = "Output and resume"

    resume: bool = field(default=False, metadata={**RUNTIME,
        "help": "Continue the run in OUTPUT from its last complete checkpoint (a finished run is left as is)."})
    overwrite: bool = field(default=False, metadata={**RUNTIME, "help": "Delete the previous `undo train` run in OUTPUT and start over."})
    save_steps: int = field(default=200, metadata={**RUNTIME, "help": "Write a checkpoint every this many optimizer steps."})
    logging_steps: int = field(default=10, metadata={**RUNTIME, "help": "Print the loss every this many optimizer steps."})
    keep_checkpoints: bool = field(default=False, metadata={**RUNTIME, "help": "Keep OUTPUT/checkpoints after a finished run."})
    report_to: str = field(default="none", metadata={**RUNTIME,
        "help": "Also log to these trackers (comma-separated: tensorboard, wandb, ...; transformers' report_to)."})

    def check_output(self) -> None:
        for name in ("save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise SettingError(name, getattr(self, name), "must be at least 1", hint=f"use {ref(name)} 1 or more")
        if self.resume and self.overwrite:
            raise UndoError("--resume and --overwrite contradict each other",
                            hint="--resume continues the run in --output; --overwrite deletes it and starts over")


@dataclass
class TrainConfig(OutputOptions, StudentOutputOptions, ObjectiveOptions, LoraOptions, TrainingOptions):
    """Everything `undo train` needs (the CLI flags, one to one)."""

    student: str = field(metadata={"help": "The model to fine-tune: a local folder, a hub name or a .gguf file."})
    data: str = field(metadata={"help": "Training data JSONL ('-' reads stdin): rationales from `undo generate`/`undo "
                                        "refine`, problems with --rationale-field, {\"messages\": [...]} or {\"prompt\", "
                                        "\"completion\"} lines (docs/artifacts.md, 'training data')."})
    output: str = field(metadata={**RUNTIME, "short": "-o", "help": "Folder for the trained model, tokenizer, checkpoints and train_summary.json."})
    template: str = field(default=STUDENT_TEMPLATE, metadata={
        "help": "Student prompt template (name or .jinja path; what each template receives: prompts/README.md); "
                "must match the one `undo evaluate` uses."})
    rationale_field: str | None = field(default=None, metadata={
        "help": "Train on problems' own worked solutions: the field that holds them, dotted for nested ones "
                "(e.g. meta.solution, what `undo data import --preset gsm8k` writes)."})
    trust_remote_code: bool = field(default=False, metadata={**RUNTIME,
        "help": "Allow models that ship their own Python code (runs that code: only for sources you trust)."})

    def __post_init__(self) -> None:
        from undo_cli.fields import check_choices

        check_choices(self)  # objective, student_outputs, method
        self.check_training()
        self.check_lora()
        self.check_output()
        self.check_student_outputs()
        if self.method == "minillm" and self.objective == "sft":
            self.objective = "rkl"  # MiniLLM's single-step term is the token-level reverse KL
        self.check_objective()
        from undo_cli.model_refs import check_model_ref  # a misspelt folder fails now, not after imports

        check_model_ref(self.student, ref("student"))
        check_model_ref(self.teacher, ref("teacher"))

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora_r else 2e-5)
