"""`undo generate`: the teacher writes verified rationales (see undo_cli/stages/generate.py)."""

from __future__ import annotations

from typing import Optional

import typer

from undo_cli.cli.options import (
    ApiKeyEnv, Backend, BaseUrl, BatchSize, Concurrency, GpuMemoryUtilization, MaxModelLen, MaxRetries, MaxTokens,
    RequestTimeout, Seed,
    Temperature, TensorParallelSize, TopP, TrustRemoteCode,
)


def generate(
    teacher: str = typer.Option(..., "--teacher", help="Teacher: a model folder, a hub name, or the model name on the server."),
    input: str = typer.Option(..., "--input", "-i", help="Problems JSONL (id, question, answer[, task, choices]); '-' reads stdin."),
    output: str = typer.Option("-", "--output", "-o", help="Rationales JSONL; re-running resumes it. '-' is stdout (no resume)."),
    backend: Backend = "hf",
    n: int = typer.Option(1, "--n", help="Rationales sampled per problem."),
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    max_tokens: MaxTokens = 512,
    keep: str = typer.Option("correct", "--keep", help="correct: only verified rationales (others go to <output>.rejected.jsonl); all: every sample."),
    prompt: str = typer.Option("generate", "--prompt", help="Prompt template: a name in prompts/ or a .jinja file."),
    fewshot: Optional[str] = typer.Option(None, "--fewshot", help="JSONL of {question, rationale} few-shot examples."),
    base_url: BaseUrl = None,
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
    concurrency: Concurrency = 16,
    request_timeout: RequestTimeout = 600.0,
    max_retries: MaxRetries = 5,
    batch_size: BatchSize = 32,
    logprobs: Optional[int] = typer.Option(None, "--logprobs", help="Record the teacher's top-K log-probs per token (1-20)."),
    seed: Seed = None,
    trust_remote_code: TrustRemoteCode = False,
    tensor_parallel_size: TensorParallelSize = 1,
    gpu_memory_utilization: GpuMemoryUtilization = 0.9,
    max_model_len: MaxModelLen = None,
    iteration: Optional[int] = typer.Option(None, "--iteration", help="UNDO iteration recorded on each line."),
) -> None:
    """The teacher writes step-by-step rationales for each problem; verified ones are kept.

    Example: undo generate --teacher Qwen/Qwen2.5-1.5B-Instruct --input train.jsonl --output rationales.jsonl
    """
    flags = dict(locals())  # the parameters, named as the config's fields; nothing else is bound yet
    from undo_cli.stages.generate import GenerateConfig, run

    run(GenerateConfig(**flags))
