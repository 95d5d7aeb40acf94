"""`undo evaluate`: the student answers held-out questions, scored (see undo_cli/stages/evaluate.py)."""

from __future__ import annotations

from typing import Optional

import typer

from undo_cli.cli.options import (
    ApiKeyEnv, Backend, BaseUrl, BatchSize, Concurrency, GpuMemoryUtilization, MaxModelLen, MaxRetries, MaxTokens,
    RequestTimeout, Seed,
    Temperature, TensorParallelSize, TopP, TrustRemoteCode,
)


def evaluate(
    model: str = typer.Option(..., "--model", help="Student: a model folder (what `undo train` writes), a hub name, or the model name on the server."),
    input: str = typer.Option(..., "--input", "-i", help="Problems JSONL (id, question, answer[, task, choices]); '-' reads stdin."),
    output: str = typer.Option("-", "--output", "-o", help="Predictions JSONL; re-running resumes it. '-' is stdout (no resume)."),
    backend: Backend = "hf",
    adapter: Optional[str] = typer.Option(None, "--adapter", help="hf backend: a LoRA adapter folder to apply on top of --model."),
    max_tokens: MaxTokens = 512,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = None,
    prompt: str = typer.Option("student", "--prompt", help="Student template: the one `undo train` used (default: student)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="metrics.json path (default: beside --output; none when --output is '-')."),
    base_url: BaseUrl = None,
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
    concurrency: Concurrency = 16,
    request_timeout: RequestTimeout = 600.0,
    max_retries: MaxRetries = 5,
    batch_size: BatchSize = 32,
    trust_remote_code: TrustRemoteCode = False,
    tensor_parallel_size: TensorParallelSize = 1,
    gpu_memory_utilization: GpuMemoryUtilization = 0.9,
    max_model_len: MaxModelLen = None,
) -> None:
    """The student answers each question (greedy, with the chat formatting it was trained on);
    every answer is scored and metrics.json is written beside the predictions.

    Example: undo evaluate --model out/student --input val.jsonl --output out/val/predictions.jsonl
    """
    flags = dict(locals())  # the parameters, named as the config's fields; nothing else is bound yet
    from undo_cli.stages.evaluate import EvaluateConfig, run

    run(EvaluateConfig(**flags))
