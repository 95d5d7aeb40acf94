"""The flags `undo generate`, `undo evaluate` and `undo refine` share: backend and sampling.

    def evaluate(
        model: str = typer.Option(..., "--model", help="..."),
        backend: Backend = "hf",
        temperature: Temperature = 0.0,
        ...
    ) -> None:
        flags = dict(locals())  # first statement: exactly the parameters
        run(EvaluateConfig(**flags))

One `Annotated` alias per field of `stages/options.py:GenerationOptions`, so a
flag's name and help are written once; the default stays in each command's
signature, next to the parameter, where typer reads it. Parameter names are the
config's field names, which lets a command build its config from `locals()`
instead of repeating some twenty-five keyword arguments.

Only typer and the standard library here: every command module imports this at
load time, and `undo --help` must stay instant.
"""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

Backend = Annotated[str, typer.Option("--backend", help="hf (embedded transformers), openai (any OpenAI-compatible server) or vllm.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 = greedy (reproducible); e.g. 0.7 to sample.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", help="Most tokens per completion; longer ones end with finish_reason 'length'.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Sampling seed (with --temperature > 0).")]
BaseUrl = Annotated[Optional[List[str]], typer.Option("--base-url", help="openai backend: server URL, e.g. http://127.0.0.1:8000/v1; repeat it to spread requests over several replicas.")]
ApiKeyEnv = Annotated[str, typer.Option("--api-key-env", help="openai backend: NAME of the env variable that holds the key.")]
Concurrency = Annotated[int, typer.Option("--concurrency", help="openai backend: requests in flight, per endpoint.")]
RequestTimeout = Annotated[float, typer.Option("--request-timeout", help="openai backend: seconds one request may take before it is retried.")]
MaxRetries = Annotated[int, typer.Option("--max-retries", help="openai backend: retries of a failed request (on another endpoint when there is one).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="hf backend: sequences per batch (prompts x samples).")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Run code shipped with the model (opt-in).")]
TensorParallelSize = Annotated[int, typer.Option("--tensor-parallel-size", help="vllm backend: GPUs to shard over.")]
GpuMemoryUtilization = Annotated[float, typer.Option("--gpu-memory-utilization", help="vllm backend: GPU memory fraction.")]
MaxModelLen = Annotated[Optional[int], typer.Option("--max-model-len", help="vllm backend: context length.")]
