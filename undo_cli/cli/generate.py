"""`undo generate`: the teacher writes verified rationales (see undo_cli/stages/generate.py)."""

from __future__ import annotations

from typing import Optional

import typer


def generate(
    teacher: str = typer.Option(..., "--teacher", help="Teacher: a model folder, a hub name, or the model name on the server."),
    input: str = typer.Option(..., "--input", "-i", help="Problems JSONL (id, question, answer[, task, choices]); '-' reads stdin."),
    output: str = typer.Option("-", "--output", "-o", help="Rationales JSONL; re-running resumes it. '-' is stdout (no resume)."),
    backend: str = typer.Option("hf", "--backend", help="hf (embedded transformers), openai (any OpenAI-compatible server) or vllm."),
    n: int = typer.Option(1, "--n", help="Rationales sampled per problem."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; e.g. 0.7 with --n > 1."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Most tokens per rationale."),
    keep: str = typer.Option("correct", "--keep", help="correct: only verified rationales (others go to <output>.rejected.jsonl); all: every sample."),
    prompt: str = typer.Option("generate", "--prompt", help="Prompt template: a name in prompts/ or a .jinja file."),
    fewshot: Optional[str] = typer.Option(None, "--fewshot", help="JSONL of {question, rationale} few-shot examples."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="openai backend: server URL, e.g. http://127.0.0.1:8000/v1."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="openai backend: NAME of the env variable that holds the key."),
    concurrency: int = typer.Option(16, "--concurrency", help="openai backend: requests in flight."),
    batch_size: int = typer.Option(32, "--batch-size", help="hf backend: sequences per batch (prompts x n)."),
    logprobs: Optional[int] = typer.Option(None, "--logprobs", help="Record the teacher's top-K log-probs per token (1-20)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run code shipped with the model (opt-in)."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vllm backend: GPUs to shard over."),
    gpu_memory_utilization: float = typer.Option(0.9, "--gpu-memory-utilization", help="vllm backend: GPU memory fraction."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="vllm backend: context length."),
    iteration: Optional[int] = typer.Option(None, "--iteration", help="UNDO iteration recorded on each line."),
) -> None:
    """The teacher writes step-by-step rationales for each problem; verified ones are kept.

    Example: undo generate --teacher Qwen/Qwen2.5-1.5B-Instruct --input train.jsonl --output rationales.jsonl
    """
    from undo_cli.stages.generate import GenerateConfig, run

    run(GenerateConfig(
        teacher=teacher, input=input, output=output, backend=backend, n=n, temperature=temperature, top_p=top_p,
        max_tokens=max_tokens, keep=keep, prompt=prompt, fewshot=fewshot, base_url=base_url,
        api_key_env=api_key_env, concurrency=concurrency, batch_size=batch_size, logprobs=logprobs, seed=seed,
        trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, iteration=iteration,
    ))
