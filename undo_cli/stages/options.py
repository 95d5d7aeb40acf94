"""The backend and sampling settings shared by `undo generate`, `undo evaluate` and `undo refine`.

    @dataclass
    class GenerateConfig(GenerationOptions):
        teacher: str = field(metadata={"help": ...})
        ...
        def __post_init__(self) -> None:
            self.check_generation_options(n=self.n)

The three stages all send prompts to one model through `undo_cli.backends`, so
they take the same flags for it: which backend, how to sample, where the
server is, how wide to batch. Those fields, their checks and the two objects
built from them (`BackendConfig`, `SamplingConfig`) live here once, and each
stage's config inherits them. The fields are keyword-only, so a stage's own
required fields (`teacher`, `input`, ...) can still come first, and
`dataclasses.fields()` lists them like any other field: `undo iterate` finds
`--generate.temperature` through it without knowing this class exists.

What a stage adds (`n`, `logprobs`, `adapter`, its paths) and the checks of
those stay in the stage. The CLI flags are these fields (cli/builder.py makes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from undo_cli.backends import BACKENDS, BATCH_BACKENDS, SERVED
from undo_cli.errors import SettingError, UndoError, ref

# The default of --repetition-cut: a loop is cut once it covers this many characters (docs/method.md,
# "When a generation stops": SmolLM2's `\n############` lines are cut after 4 copies, 52 characters,
# while a repeating decimal or a markdown table rule shorter than this is left alone).
STOP_REPETITION_CHARS = 48

RUNTIME = {"identity": False}  # changes no record: not part of what identifies a run (undo_cli/identity.py)


@dataclass(kw_only=True)
class GenerationOptions:
    """Which backend serves the model and how it samples (one CLI flag per field)."""

    help_group = "Backend and sampling"  # the section of these flags in `undo generate --help` etc.

    backend: str = field(default="hf", metadata={"choices": BACKENDS, "help": "hf (embedded transformers), openai (any server), vllm, or a hosted batch API at half price: openai-batch, anthropic-batch (results within 24 h; a killed run polls its batches again: docs/economy.md)."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy (reproducible); e.g. 0.7 to sample."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (with temperature > 0)."})
    max_tokens: int = field(default=512, metadata={"help": "Most tokens per completion; longer ones end with finish_reason 'length'."})
    seed: int | None = field(default=None, metadata={"help": "Sampling seed, for reproducible samples (with temperature > 0)."})
    stop: list[str] | None = field(default=None, metadata={"help": "A stop string: the completion ends before it (OpenAI's `stop`); repeat it for several."})
    stop_at_answer: bool = field(default=True, metadata={"help": "End a completion where its '#### <answer>' line ends, as every shipped prompt asks (docs/method.md, 'When a generation stops')."})
    repetition_cut: int = field(default=STOP_REPETITION_CHARS, metadata={"help": "End a completion that loops: one unit of up to 200 characters written 4+ times in a row, covering at least this many characters (one copy kept; finish_reason 'repetition'); 0 = never."})
    base_url: list[str] | None = field(default=None, metadata={**RUNTIME, "help": "openai backend: the server, e.g. http://127.0.0.1:8000/v1; repeat it (or give a list) to spread requests over several replicas."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={**RUNTIME, "help": "openai backend: the NAME of the variable holding the key."})
    concurrency: int = field(default=16, metadata={**RUNTIME, "help": "openai backend: requests in flight at once, per endpoint."})
    request_timeout: float = field(default=600.0, metadata={**RUNTIME, "help": "openai backend: seconds one request may take (connect, wait, body) before it is retried."})
    max_retries: int = field(default=5, metadata={**RUNTIME, "help": "openai backend: retries of a failed request (429/5xx, dropped connection, timeout, malformed answer), on another endpoint when there is one."})
    batch_size: int = field(default=32, metadata={**RUNTIME, "help": "hf backend: sequences per forward batch (prompts x samples)."})
    trust_remote_code: bool = field(default=False, metadata={**RUNTIME, "help": "Run code shipped with the model repo (opt-in)."})
    tensor_parallel_size: int = field(default=1, metadata={**RUNTIME, "help": "vllm backend: GPUs to shard the model over."})
    gpu_memory_utilization: float = field(default=0.9, metadata={**RUNTIME, "help": "vllm backend: fraction of GPU memory to use."})
    max_model_len: int | None = field(default=None, metadata={**RUNTIME, "help": "vllm backend: context length (default: the model's)."})
    batch_poll_s: float = field(default=30.0, metadata={**RUNTIME, "help": "batch backends: seconds between looks at the batches in flight."})
    batch_resubmits: int = field(default=2, metadata={**RUNTIME, "help": "batch backends: how often one run submits errored and expired requests again (only those)."})
    batch_max_requests: int = field(default=0, metadata={**RUNTIME, "help": "batch backends: requests per batch; 0 = the API's limit (OpenAI 50,000, Anthropic 100,000)."})
    batch_max_mb: float = field(default=0.0, metadata={**RUNTIME, "help": "batch backends: megabytes per batch; 0 = the API's limit (OpenAI 200, Anthropic 256)."})
    shard: str | None = field(default=None, metadata={**RUNTIME,
        "help": "K/N: work on shard K (0-based) of N only, by a stable hash of the problem id; "
                "`undo merge` joins the shards' outputs."})

    def check_generation_options(self, n: int = 1) -> None:
        """The checks of the shared fields; a stage with `--n` passes it (n samples of greedy decoding are one)."""
        from undo_cli.fields import check_choices

        check_choices(self)  # backend, and the stage's own fields with choices (keep, verify, select, ...)
        if self.temperature < 0:
            raise SettingError("temperature", self.temperature, "must be >= 0", hint="0 means greedy decoding")
        if n > 1 and self.temperature == 0:
            raise UndoError(f"{ref('n')} {n} with {ref('temperature')} 0 would give {n} identical greedy rationales",
                            hint=f"sample with e.g. {ref('temperature')} 0.7, or use {ref('n')} 1", setting="n")
        if not 0 < self.top_p <= 1:
            raise SettingError("top_p", self.top_p, "must be in (0, 1]")
        if self.repetition_cut < 0:
            raise SettingError("repetition_cut", self.repetition_cut, "must be >= 0", hint="0 never cuts")
        self.stop = [self.stop] if isinstance(self.stop, str) else (list(self.stop) if self.stop else None)
        if self.stop and not all(self.stop):
            raise SettingError("stop", self.stop, "must not be empty", hint="leave it out for no stop string")
        for name in ("max_tokens", "concurrency", "batch_size"):
            if getattr(self, name) < 1:
                raise SettingError(name, getattr(self, name), "must be at least 1")
        for name in ("batch_resubmits", "batch_max_requests", "batch_max_mb"):
            if getattr(self, name) < 0:
                raise SettingError(name, getattr(self, name), "must be >= 0")
        if not self.batch_poll_s > 0:
            raise SettingError("batch_poll_s", self.batch_poll_s, "must be > 0 seconds")
        if self.backend in BATCH_BACKENDS and getattr(self, "logprobs", None):
            raise UndoError(f"{ref('logprobs')} with {ref('backend')} {self.backend}: the batch APIs' answers are "
                            "read as text only here", setting="logprobs",
                            hint=f"use {ref('backend')} openai (online) for log-probabilities")
        if not self.request_timeout > 0:
            raise SettingError("request_timeout", self.request_timeout, "must be > 0 seconds",
                               hint=f"e.g. {ref('request_timeout')} 120: a request that takes longer is retried")
        if self.max_retries < 0:
            raise SettingError("max_retries", self.max_retries, "must be >= 0", hint="0 means no retry")
        from undo_cli.urls import base_urls

        # One URL (a string, as config files and older commands write it) or a list of them.
        self.base_url = base_urls(self.base_url) or None
        if self.shard is not None:
            from undo_cli.stages.shards import parse_shard

            parse_shard(self.shard)
        if self.base_url and self.backend not in SERVED:
            raise UndoError(f"{ref('base_url')} is for the {', '.join(SERVED)} backends, not '{self.backend}'",
                            setting="base_url",
                            hint=f"add {ref('backend')} openai to talk to a server")

    def backend_config(self, model: str, adapter: str | None = None):
        from undo_cli.backends import BackendConfig

        return BackendConfig(
            backend=self.backend, model=model, adapter=adapter, trust_remote_code=self.trust_remote_code,
            batch_size=self.batch_size, base_url=self.base_url, api_key_env=self.api_key_env,
            concurrency=self.concurrency, request_timeout=self.request_timeout, max_retries=self.max_retries,
            tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_model_len,
            batch_poll_s=self.batch_poll_s, batch_resubmits=self.batch_resubmits,
            batch_max_requests=self.batch_max_requests, batch_max_mb=self.batch_max_mb,
        )

    def sampling(self, n: int = 1, logprobs: int | None = None):
        from undo_cli.backends import SamplingConfig

        return SamplingConfig(n=n, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                              seed=self.seed, logprobs=logprobs, stop=list(self.stop or []),
                              stop_at_answer=self.stop_at_answer, repetition_cut=self.repetition_cut)


# undo_cli.scoring.VERIFY with what each means, restated so this module stays light
VERIFY = {"strict": "only an explicit final answer counts: #### x, \\boxed{x}, 'the answer is x'",
          "flexible": "also the last number when there is none",
          "steps": "strict, and every arithmetic statement in the text must be true (6 * 4 = 24)"}
EXTRACTIONS = {m: VERIFY[m] for m in ("strict", "flexible")}  # the readings of a student's answer (`undo evaluate`)

# How the teacher's rationales are verified when nobody says (`undo generate`, `undo refine`, and so the
# [generate]/[refine] tables of `undo iterate`): THE one place to change that default. `steps`: the final
# answer (strict) and every arithmetic statement true (undo_cli/steps.py), because a strict check let the
# demo's teacher teach false arithmetic that ends on the right answer (bench/undo_effect.py: 14 refinements
# over 5 seeds); text without arithmetic is checked as strict. Why: docs/method.md, "The default".
TEACHER_VERIFY = "steps"


def verify_field(default: str, help: str, choices: dict[str, str] = VERIFY):
    """The `verify` field of a stage config: how the scorer decides `correct` (`choices`: the modes it takes,
    checked by fields.check_choices)."""
    return field(default=default, metadata={"help": help, "choices": choices})


def check_limit(value: int | None, name: str = "limit") -> None:
    if value is not None and value < 1:
        raise SettingError(name, value, "must be at least 1", hint="leave it out to use every problem")


def same_file(a: str, b: str) -> bool:
    """`a` and `b` name one file: equal after resolving symlinks, or the same inode (a hard link)."""
    import os

    if a == "-" or b == "-":
        return False
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def check_output_is_new(output: str, inputs: dict[str, str | None], hint: str, flag: str = ref("output")) -> None:
    """Refuse an --output that is one of the inputs: the stage would write into the file it is reading.

    `inputs` maps how the message names the input ("input", "--targets") to its path; '-' is never a clash.
    A device or FIFO (`/dev/null`, `/dev/stdout`) is written in place and never clashes.
    """
    from undo_cli.records import is_stream

    if is_stream(output):
        return
    for name, path in inputs.items():
        if path and same_file(output, path):
            raise UndoError(f"{flag} {output} is the {name} file" + ("" if output == path else f" ({path})"),
                            hint=hint, setting="output")
