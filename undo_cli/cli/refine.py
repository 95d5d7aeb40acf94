"""`undo refine`: the teacher re-teaches the student's mistakes, verified (see undo_cli/stages/refine.py)."""

from __future__ import annotations

from typing import Optional

import typer

from undo_cli.cli.options import (
    ApiKeyEnv, Backend, BaseUrl, BatchSize, Concurrency, GpuMemoryUtilization, MaxModelLen, MaxRetries, MaxTokens,
    RequestTimeout, Seed,
    Temperature, TensorParallelSize, TopP, TrustRemoteCode,
)


def refine(
    teacher: str = typer.Option(..., "--teacher", help="Teacher: a model folder, a hub name, or the model name on the server."),
    errors: str = typer.Option(..., "--errors", help="Errors JSONL from `undo collect-errors` ('-' reads stdin)."),
    targets: str = typer.Option(..., "--targets", help="The teacher's current rationales (from `undo generate` or an earlier refine)."),
    output: str = typer.Option("-", "--output", "-o", help="Refined rationales JSONL (same ids as the targets they replace); re-running resumes it."),
    select: str = typer.Option("similar", "--select", help="similar: refine the targets most like the failures (TF-IDF); errors: refine the failed items themselves."),
    k: int = typer.Option(3, "--k", help="Similar failures shown to the teacher next to the main one."),
    per_error: int = typer.Option(1, "--per-error", help="--select similar: target questions each failure nominates."),
    max_targets: Optional[int] = typer.Option(None, "--max-targets", help="Refine at most N target questions (most similar first)."),
    backend: Backend = "hf",
    prompt: str = typer.Option("refine", "--prompt", help="Prompt template: a name in prompts/ or a .jinja file."),
    iteration: Optional[int] = typer.Option(None, "--iteration", help="UNDO iteration recorded on each line (default: the target's + 1)."),
    n: int = typer.Option(1, "--n", help="Refinements sampled per target; the first verified one is kept."),
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    max_tokens: MaxTokens = 512,
    seed: Seed = None,
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
    """The teacher rewrites rationales to target the student's failures; each new rationale
    is verified, and the previous one is kept when it does not verify.

    Example: undo refine --teacher out/teacher --errors errors.jsonl --targets rationales.jsonl --output refined.jsonl
    """
    flags = dict(locals())  # the parameters, named as the config's fields; nothing else is bound yet
    from undo_cli.stages.refine import RefineConfig, run

    run(RefineConfig(**flags))
