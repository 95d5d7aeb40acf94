"""The embedded `hf` backend: transformers models, batched, no server.

    undo generate --teacher path/or/hub-name --backend hf --batch-size 32 ...

This is the default because it needs nothing but the model: the same folder
`undo train` writes is the folder `undo evaluate` reads. It is a real
throughput path, not a loop over prompts:

* prompts are formatted with `prompts.chat_prompt` and tokenised exactly as
  the trainer tokenises them (`prompts.encode_prompt`), so a student is
  evaluated on the very text it was trained on;
* prompts are sorted by token length and cut into batches, left-padded (a
  decoder-only model continues from the right edge; right padding would put pad
  tokens between the prompt and the answer);
* each batch runs through its own decode loop (hf_decode.py), not transformers'
  `generate`: a row that has ended (eos, a stop string, the end rules of
  stopping.py) leaves the batch at that step, where `generate` computed it to
  the batch's last step;
* `n` samples per prompt share one pass over the prompt: its KV cache is
  repeated n times (num_return_sequences would run the prompt n times);
* bf16 on a GPU, float32 on CPU (bf16 matmuls on CPU are slower and less exact).

Log-probabilities (`SamplingConfig.logprobs = k`) are taken from the model's
logits *before* temperature and top-p: that is the teacher's distribution, which
is what offline distillation wants; only the top-k per token are kept, never a
[steps x vocab] tensor. The model's own sampling defaults (generation_config.json:
a repetition penalty, top_k, ...) are not applied (docs/method.md, "Generation
defaults"); its eos ids are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from undo_cli.backends import stopping
from undo_cli.backends.base import (Completion, Message, SamplingConfig, TokenLogprobs,
                                    model_sampling_defaults)
from undo_cli.console import warn
from undo_cli.errors import UndoError
from undo_cli.models import load_pretrained


def pick_device_dtype(dtype: str):
    """(device, torch dtype): bf16 on GPU, float32 on CPU unless `dtype` says otherwise."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return device, (torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32)
    if dtype not in names:
        raise UndoError(f"unknown dtype '{dtype}'", hint="use auto, float32, bfloat16 or float16")
    return device, names[dtype]


class HFBackend:
    """transformers generation behind the `Backend` interface (see base.py)."""

    name = "hf"
    # The generation loop sends this many prompts per call and sorts work by prompt length first.
    sort_by_length = True

    def __init__(self, config):
        from undo_cli.model_refs import check_hub_reachable

        check_hub_reachable(config.model, "model")  # before seconds of torch imports: an unreachable hub is fast
        import torch  # noqa: F401  (fail here, not mid-run, if torch is missing)

        self.config = config
        self.model = config.model if not config.adapter else f"{config.model}+{config.adapter}"
        if not config.model:
            raise UndoError("no model given", hint="pass --teacher/--model with a folder or a hub name")
        from undo_cli.backends.config import batch_hint

        self.batch_hint = batch_hint(config)
        self.device, dtype = pick_device_dtype(config.dtype)
        tok_source = config.adapter if config.adapter and (Path(config.adapter) / "tokenizer_config.json").exists() \
            else config.model
        remote = config.trust_remote_code
        self.tokenizer = load_pretrained("tokenizer", tok_source, trust_remote_code=remote)
        model = load_pretrained("model", config.model, trust_remote_code=remote, dtype=dtype)
        if config.adapter:
            model = self._apply_adapter(model, config.adapter)
        self.tokenizer.padding_side = "left"  # decoder-only: the answer continues from the right edge
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.hf_model = model.to(self.device).eval()
        import inspect

        # The name forward and generate take a KV cache under: `cache` in recent transformers, `past_key_values` before.
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # Where the model ends its turn: the eos ids of its generation_config and its tokenizer's eos (a
        # converted GGUF may list only one of them; Qwen's hub config lists <|im_end|> and <|endoftext|>).
        eos = self.hf_model.generation_config.eos_token_id
        self.eos_ids = (set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}) - {None}
        # The model's own sampling defaults (generation_config.json: Qwen's temperature 0.7, top_p 0.8,
        # top_k 20, repetition_penalty 1.1) do not apply: the run's settings do, on every backend alike
        # (docs/method.md, "Generation defaults"); the decode loop (hf_decode.py) reads only the run's
        # temperature and top-p. They are recorded, so a run shows what it set aside.
        self.model_defaults = model_sampling_defaults(self.hf_model.generation_config.to_diff_dict())
        if not getattr(self.hf_model, "_supports_default_dynamic_cache", lambda: True)():
            raise UndoError(f"the hf backend cannot decode {type(self.hf_model).__name__}: it needs a cache of its own "
                            "kind, not the usual key/value cache",
                            hint="serve the model (vllm, or any OpenAI-compatible server) and use --backend openai")

    @staticmethod
    def _apply_adapter(model, adapter: str):
        try:
            from peft import PeftModel
        except ImportError:  # pragma: no cover - peft is a core dependency
            raise UndoError("--adapter needs peft", hint="pip install peft") from None
        try:
            # Merging once makes generation as fast as for a plain model.
            return PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except (OSError, ValueError) as exc:
            raise UndoError(f"cannot load LoRA adapter '{adapter}': {str(exc).splitlines()[0]}",
                            hint="pass the folder `undo train --lora` wrote (it holds adapter_config.json)") from None

    # -- the interface ------------------------------------------------------------------

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        from undo_cli.prompts import encode_prompt

        return encode_prompt(self.tokenizer, messages)

    def generate(self, prompts: list[list[Message]], sampling: SamplingConfig) -> list[list[Completion]]:
        return next(self.generate_stream([prompts], sampling))

    def generate_stream(self, batches, sampling: SamplingConfig):
        """Each batch's completions, in order, from one decode loop over all of them: a batch's prompts join
        the running rows as earlier rows end (hf_decode.py), so the model never waits for a batch's longest
        row with most of its rows gone. Within a batch, prompts start in order of length (similar lengths
        pad the least)."""
        import torch

        from undo_cli.backends.hf_decode import decode

        if sampling.seed is not None:
            # Per call, like the `seed` of an OpenAI request: the same call gives the same samples.
            torch.manual_seed(sampling.seed)
            if torch.cuda.is_available():
                torch.cuda.manual_seed_all(sampling.seed)
        per_prompt = sampling.n if sampling.temperature > 0 else 1  # greedy gives n identical answers: one, copied
        encoded: list[list[list[int]]] = []  # per batch, per prompt
        done: list[dict[int, list[Completion]]] = []

        def items():
            for prompts in batches:  # read at most one batch ahead of the one being written (base.py)
                encoded.append([self.prompt_ids(m) for m in prompts])
                done.append({})
                b = len(encoded) - 1
                for i in sorted(range(len(encoded[b])), key=lambda i: len(encoded[b][i])):
                    yield (b, i), encoded[b][i]
                while len(encoded) - sent >= 2:
                    yield None  # this batch and the next are read: the next read waits for one to be written

        sent = 0
        # batch_size counts sequences (prompts x n): that is what fills memory.
        for (b, i), rows in decode(self, items(), sampling, per_prompt, max(self.batch_hint, per_prompt)):
            completions = [self._completion(row, len(encoded[b][i]), sampling) for row in rows]
            done[b][i] = completions * (sampling.n // per_prompt)
            while sent < len(done) and len(done[sent]) == len(encoded[sent]):
                yield [done[sent][i] for i in range(len(encoded[sent]))]
                sent += 1
        for b in range(sent, len(done)):  # batches of no prompts (all cached) after the last prompt ended
            yield [done[b][i] for i in range(len(encoded[b]))]

    def _completion(self, row, prompt_len: int, sampling: SamplingConfig) -> Completion:
        # Where this sequence ended: at its eos (kept: the model chose to stop, and a distilled student
        # must learn that token too), a stop rule, or max_tokens.
        ids = row.ids
        length, hit_eos = len(ids), bool(ids) and ids[-1] in self.eos_ids
        text_ids = ids[:-1] if hit_eos else ids
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        finish = "stop" if hit_eos else "length"
        for s in sampling.stop:
            cut = text.find(s)
            if cut != -1:  # OpenAI semantics: the stop string is not part of the text
                text, finish = text[:cut], "stop"
        text, finish, was_cut = stopping.apply(text, finish, sampling)
        if was_cut:  # the tokens that wrote the kept text (the rest was cut)
            length = self._tokens_for(text_ids, len(text))
        logprobs = None
        if sampling.logprobs:
            logprobs = [TokenLogprobs(ids[j], row.chosen[j], row.top[j]) for j in range(length)]
        return Completion(text=text, finish_reason=finish, prompt_tokens=prompt_len, completion_tokens=length,
                          logprobs=logprobs)

    def _tokens_for(self, ids: list[int], chars: int) -> int:
        """The fewest leading tokens of `ids` whose decoded text reaches `chars` characters (binary search)."""
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(ids[:mid], skip_special_tokens=True)) >= chars:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def applied(self, sampling: SamplingConfig) -> dict[str, Any]:
        """The generation settings in force for `sampling` (recorded in the stage's summary)."""
        sample = sampling.temperature > 0
        return {"backend": "hf", "do_sample": sample, "temperature": sampling.temperature if sample else 0.0,
                "top_p": sampling.top_p if sample else 1.0, "top_k": 0 if sample else None,
                "repetition_penalty": None, "max_new_tokens": sampling.max_tokens,
                "eos_token_id": sorted(self.eos_ids), "stop": list(sampling.stop),
                "stop_at_answer": sampling.stop_at_answer, "repetition_cut": sampling.repetition_cut,
                "model_defaults_not_applied": self.model_defaults}

    def close(self) -> None:
        import gc

        self.hf_model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover - best effort
            warn("could not release GPU memory")

    def endpoint_summary(self) -> None:
        return None  # in process: no servers to count

    def __enter__(self) -> "HFBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
