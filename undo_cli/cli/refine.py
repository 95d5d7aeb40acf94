"""`undo refine`: the teacher re-teaches the student's mistakes, verified (see undo_cli/stages/refine.py)."""

from __future__ import annotations

from typing import Optional

import typer


def refine(
    teacher: str = typer.Option(..., "--teacher", help="Teacher: a model folder, a hub name, or the model name on the server."),
    errors: str = typer.Option(..., "--errors", help="Errors JSONL from `undo collect-errors` ('-' reads stdin)."),
    targets: str = typer.Option(..., "--targets", help="The teacher's current rationales (from `undo generate` or an earlier refine)."),
    output: str = typer.Option("-", "--output", "-o", help="Refined rationales JSONL (same ids as the targets they replace); re-running resumes it."),
    select: str = typer.Option("similar", "--select", help="similar: refine the targets most like the failures (TF-IDF); errors: refine the failed items themselves."),
    k: int = typer.Option(3, "--k", help="Similar failures shown to the teacher next to the main one."),
    per_error: int = typer.Option(1, "--per-error", help="--select similar: target questions each failure nominates."),
    max_targets: Optional[int] = typer.Option(None, "--max-targets", help="Refine at most N target questions (most similar first)."),
    backend: str = typer.Option("hf", "--backend", help="hf (embedded transformers), openai (any OpenAI-compatible server) or vllm."),
    prompt: str = typer.Option("refine", "--prompt", help="Prompt template: a name in prompts/ or a .jinja file."),
    iteration: Optional[int] = typer.Option(None, "--iteration", help="UNDO iteration recorded on each line (default: the target's + 1)."),
    n: int = typer.Option(1, "--n", help="Refinements sampled per target; the first verified one is kept."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; e.g. 0.7 with --n > 1."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Most tokens per rationale (a cut-off one is never accepted)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="openai backend: server URL, e.g. http://127.0.0.1:8000/v1."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="openai backend: NAME of the env variable that holds the key."),
    concurrency: int = typer.Option(16, "--concurrency", help="openai backend: requests in flight."),
    batch_size: int = typer.Option(32, "--batch-size", help="hf backend: sequences per batch (prompts x n)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run code shipped with the model (opt-in)."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vllm backend: GPUs to shard over."),
    gpu_memory_utilization: float = typer.Option(0.9, "--gpu-memory-utilization", help="vllm backend: GPU memory fraction."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="vllm backend: context length."),
) -> None:
    """The teacher rewrites rationales to target the student's failures; each new rationale
    is verified, and the previous one is kept when it does not verify.

    Example: undo refine --teacher out/teacher --errors errors.jsonl --targets rationales.jsonl --output refined.jsonl
    """
    from undo_cli.stages.refine import RefineConfig, run

    run(RefineConfig(
        teacher=teacher, errors=errors, targets=targets, output=output, select=select, k=k, per_error=per_error,
        max_targets=max_targets, backend=backend, prompt=prompt, iteration=iteration, n=n, temperature=temperature,
        top_p=top_p, max_tokens=max_tokens, seed=seed, base_url=base_url, api_key_env=api_key_env,
        concurrency=concurrency, batch_size=batch_size, trust_remote_code=trust_remote_code,
        tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
    ))
