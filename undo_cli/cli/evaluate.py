"""`undo evaluate`: the student answers held-out questions, scored (see undo_cli/stages/evaluate.py)."""

from __future__ import annotations

from typing import Optional

import typer


def evaluate(
    model: str = typer.Option(..., "--model", help="Student: a model folder (what `undo train` writes), a hub name, or the model name on the server."),
    input: str = typer.Option(..., "--input", "-i", help="Problems JSONL (id, question, answer[, task, choices]); '-' reads stdin."),
    output: str = typer.Option("-", "--output", "-o", help="Predictions JSONL; re-running resumes it. '-' is stdout (no resume)."),
    backend: str = typer.Option("hf", "--backend", help="hf (embedded transformers), openai (any OpenAI-compatible server) or vllm."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="hf backend: a LoRA adapter folder to apply on top of --model."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (default)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (with --temperature > 0)."),
    prompt: str = typer.Option("student", "--prompt", help="Student template: the one `undo train` used (default: student)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="metrics.json path (default: beside --output; none when --output is '-')."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="openai backend: server URL, e.g. http://127.0.0.1:8000/v1."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="openai backend: NAME of the env variable that holds the key."),
    concurrency: int = typer.Option(16, "--concurrency", help="openai backend: requests in flight."),
    batch_size: int = typer.Option(32, "--batch-size", help="hf backend: sequences per batch."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run code shipped with the model (opt-in)."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vllm backend: GPUs to shard over."),
    gpu_memory_utilization: float = typer.Option(0.9, "--gpu-memory-utilization", help="vllm backend: GPU memory fraction."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="vllm backend: context length."),
) -> None:
    """The student answers each question (greedy, with the chat formatting it was trained on);
    every answer is scored and metrics.json is written beside the predictions.

    Example: undo evaluate --model out/student --input val.jsonl --output out/val/predictions.jsonl
    """
    from undo_cli.stages.evaluate import EvaluateConfig, run

    run(EvaluateConfig(
        model=model, input=input, output=output, backend=backend, adapter=adapter, max_tokens=max_tokens,
        temperature=temperature, top_p=top_p, seed=seed, prompt=prompt, metrics=metrics, base_url=base_url,
        api_key_env=api_key_env, concurrency=concurrency, batch_size=batch_size,
        trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
    ))
