"""The one generation interface every text-producing stage goes through.

`generate`, `evaluate` and `refine` never talk to transformers, vLLM or an HTTP
server directly: they build chat messages and call `Backend.generate`, which
returns `n` completions per prompt. Swapping the teacher from a local folder to
a vLLM server is then a flag, not a code path.

Backends are context managers: leaving the `with` block releases the model
(GPU memory, server connections), so `undo iterate` never holds the teacher and
the student at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

Message = dict[str, str]


@dataclass
class SamplingConfig:
    """How to sample. Greedy when temperature == 0."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # record the top-k log-probabilities of each generated token
    # Where a completion ends besides eos, `stop` and max_tokens (backends/stopping.py): at the end of
    # its `#### <answer>` line, and at a degenerate repetition covering this many characters (0: never).
    stop_at_answer: bool = False
    repetition_cut: int = 0


# What a model's generation_config.json may set about sampling. The run's own settings win on every backend
# (docs/method.md, "Generation defaults"): the hf backend unsets these in the loaded model's generation_config
# (generate() would refill any setting left unset from it), then sets temperature and top_p; vLLM gets its
# SamplingParams from the run alone.
MODEL_SAMPLING = ("do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                  "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "num_beams",
                  "length_penalty")
_NO_EFFECT = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0,
              "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
              "no_repeat_ngram_size": 0, "num_beams": 1, "length_penalty": 1.0}


def model_sampling_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The sampling settings a model's generation_config sets to something with an effect (not applied)."""
    return {k: v for k, v in generation_config.items()
            if k in MODEL_SAMPLING and v is not None and v != _NO_EFFECT.get(k)}


@dataclass
class TokenLogprobs:
    """The teacher's view of one generated token: its id, its log-prob, and the top-k alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-prob), best first

    def to_json(self) -> list[Any]:
        # Compact on disk: [id, logprob, [[id, lp], ...]]; rationale files with logprobs get large.
        return [self.token_id, round(self.logprob, 5), [[i, round(lp, 5)] for i, lp in self.top]]

    @classmethod
    def from_json(cls, row: list[Any]) -> "TokenLogprobs":
        return cls(int(row[0]), float(row[1]), [(int(i), float(lp)) for i, lp in row[2]])


@dataclass
class Completion:
    text: str
    finish_reason: str | None  # "stop" | "length" | "repetition" (backends/stopping.py) | None when the backend does not say
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprobs] | None = None
    cached: bool = False  # served from the teacher cache (undo_cli/economy), not by the model just now


class Backend(Protocol):
    name: str             # "hf" | "openai" | "vllm"
    model: str            # what provenance fields record (a path or a hub name; never a key)
    batch_hint: int       # prompts per `generate` call that keep it busy (backends.batch_hint)
    sort_by_length: bool  # the caller should sort prompts by length first (hf: less padding per batch)

    def generate(self, prompts: list[list[Message]], sampling: SamplingConfig) -> list[list[Completion]]:
        """`sampling.n` completions for each prompt, in prompt order."""
        ...

    def generate_stream(self, batches: Iterable[list[list[Message]]],
                        sampling: SamplingConfig) -> Iterator[list[list[Completion]]]:
        """`generate` for each batch, yielded batch by batch in order. A backend may start the next batch
        before it yields one (openai: no idle slots between batches); it reads at most one batch ahead."""
        ...

    def endpoint_summary(self) -> list[dict[str, Any]] | None:
        """Per server: requests, failures, req/s (openai); None for a backend without servers."""
        ...

    def applied(self, sampling: SamplingConfig) -> dict[str, Any]:
        """The generation settings in force for `sampling`: what the stage's summary records as applied
        (the model's own sampling defaults that were set aside included, where the backend can see them)."""
        ...

    def close(self) -> None:
        """Release the model / connections."""
        ...

    def __enter__(self) -> "Backend": ...

    def __exit__(self, *exc: object) -> None: ...


def one_batch_at_a_time(backend: Backend, batches: Iterable[list[list[Message]]],
                        sampling: SamplingConfig) -> Iterator[list[list[Completion]]]:
    """`generate_stream` for a backend whose model is busy with one batch at a time (vllm in process):
    nothing to overlap, so nothing is read ahead."""
    for prompts in batches:
        yield backend.generate(prompts, sampling) if prompts else []  # all cached: nothing to send
