"""The embedded `hf` backend: transformers `generate`, batched, no server.

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
* `n` samples per prompt share one pass over the prompt: all but its last
  token are run once, that KV cache is repeated n times, and `generate`
  continues from it (num_return_sequences alone would run the prompt n times);
* on CPU, batches of at least `STATIC_CACHE_MIN_ROWS` sequences decode into a
  static (preallocated) KV cache: the dynamic cache copies the whole cache at
  every step (torch.cat), which in bench/generation.py cost a batch of 64 about
  a quarter of its time; for fewer rows the static cache's bookkeeping costs
  more than the copies (measured 2-16 rows, tiny Llama). On a GPU, generate's
  dynamic cache is kept: a static one there means torch.compile of the model;
* bf16 on a GPU, float32 on CPU (bf16 matmuls on CPU are slower and less exact).

Log-probabilities (`SamplingConfig.logprobs = k`) are taken from the model's
logits *before* temperature and top-p: that is the teacher's distribution, which
is what offline distillation wants. The model's own sampling defaults
(generation_config.json: a repetition penalty, top_k, ...) are not applied
(docs/method.md, "Generation defaults"); its eos ids are. They are
recorded step by step by a logits processor that keeps only the top-k (k ids per
token), never the full [steps x vocab] tensor that `output_logits=True` would
hold in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from undo_cli.backends import stopping
from undo_cli.backends.base import (MODEL_SAMPLING, Completion, Message, SamplingConfig, TokenLogprobs,
                                    model_sampling_defaults, one_batch_at_a_time)
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


class _TopKRecorder:
    """A logits processor that records, per step, the top-k log-probs and the chosen token's log-prob.

    At step t the processor sees the logits for token t, but not yet which token
    will be picked; it learns that at step t+1 (the last column of input_ids).
    So it keeps the previous step's log-softmax row (batch x vocab, one step
    only) and gathers the chosen token's log-prob from it one step late;
    `finish` does the same for the very last token.
    """

    def __init__(self, k: int):
        self.k = k
        self.top_ids: list[Any] = []
        self.top_lps: list[Any] = []
        self.chosen_lps: list[Any] = []
        self._prev = None

    def __call__(self, input_ids, scores):
        import torch

        if self._prev is not None:
            self.chosen_lps.append(self._prev.gather(1, input_ids[:, -1:]).squeeze(1))
        logp = torch.log_softmax(scores.float(), dim=-1)
        values, ids = logp.topk(self.k, dim=-1)
        self.top_ids.append(ids)
        self.top_lps.append(values)
        self._prev = logp
        return scores  # recording only: the distribution is not changed

    def finish(self, sequences) -> None:
        if self._prev is not None:
            self.chosen_lps.append(self._prev.gather(1, sequences[:, -1:]).squeeze(1))
            self._prev = None


STATIC_CACHE_MIN_ROWS = 8  # CPU: static KV cache from this many sequences per batch (see the docstring)


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
        # (docs/method.md, "Generation defaults"); they are recorded, so a run shows what it set aside.
        # generate() fills every setting a call leaves unset from the model's generation_config, so they
        # are unset there, in memory (this backend never saves the model).
        own = self.hf_model.generation_config
        self.model_defaults = model_sampling_defaults(own.to_diff_dict())
        for name in MODEL_SAMPLING:
            setattr(own, name, None)

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
        import torch

        encoded = [self.prompt_ids(m) for m in prompts]
        # Group by length: a batch pads to its longest prompt, so similar lengths waste the least.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        # batch_size counts sequences (prompts x n): that is what fills memory.
        per_batch = max(1, self.batch_hint // max(1, sampling.n))
        results: list[list[Completion] | None] = [None] * len(encoded)
        if sampling.seed is not None:
            # Per call, like the `seed` of an OpenAI request: the same call gives the same samples.
            torch.manual_seed(sampling.seed)
            if torch.cuda.is_available():
                torch.cuda.manual_seed_all(sampling.seed)
        for start in range(0, len(order), per_batch):
            idx = order[start : start + per_batch]
            for i, completions in zip(idx, self._generate_batch([encoded[i] for i in idx], sampling)):
                results[i] = completions
        return results  # type: ignore[return-value]

    def _generate_config(self, sampling: SamplingConfig, rows: int = 1):
        """transformers' GenerationConfig for `sampling`, for a batch of `rows` sequences (prompts x n)."""
        from transformers import GenerationConfig

        gen = GenerationConfig.from_dict(self.hf_model.generation_config.to_dict())  # its sampling fields unset
        gen.eos_token_id = sorted(self.eos_ids)
        sample = sampling.temperature > 0
        gen.max_new_tokens = sampling.max_tokens
        gen.max_length = None
        gen.do_sample = sample
        gen.temperature = sampling.temperature if sample else None
        gen.top_p = sampling.top_p if sample else None
        # OpenAI semantics: only temperature and top-p shape the distribution. top_k=None would be
        # refilled with transformers' global default of 50; 0 switches top-k off. Greedy decoding has
        # no top-k to switch off, and a top_k set there makes transformers warn on every call.
        gen.top_k = 0 if sample else None
        # Greedy decoding gives n identical answers: compute one and copy it.
        gen.num_return_sequences = sampling.n if sample else 1
        gen.pad_token_id = self.tokenizer.pad_token_id
        gen.stop_strings = list(sampling.stop) or None
        gen.return_dict_in_generate = True
        supports_cache = getattr(self.hf_model, "_supports_default_dynamic_cache", lambda: True)()
        if self.device == "cpu" and rows >= STATIC_CACHE_MIN_ROWS and supports_cache and gen.cache_implementation is None:
            gen.cache_implementation = "static"
        return gen

    def _generate_batch(self, encoded: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        import torch
        from transformers import LogitsProcessorList

        padded = self.tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt")
        input_ids = padded["input_ids"].to(self.device)
        attention = padded["attention_mask"].to(self.device)
        width = input_ids.shape[1]
        sample = sampling.temperature > 0
        per_prompt = sampling.n if sample else 1  # greedy decoding gives n identical answers: one, copied
        gen = self._generate_config(sampling, rows=len(encoded) * per_prompt)
        recorder = _TopKRecorder(sampling.logprobs) if sampling.logprobs else None
        extra: dict[str, Any] = {}
        if recorder is not None:
            extra["logits_processor"] = LogitsProcessorList([recorder])
        if gen.stop_strings:
            extra["tokenizer"] = self.tokenizer  # StopStringCriteria needs the vocabulary
        if stopping.active(sampling):  # at the answer line, at a degenerate repetition (backends/stopping.py)
            from transformers import StoppingCriteriaList

            extra["stopping_criteria"] = StoppingCriteriaList([stopping.TextStop(self.tokenizer, sampling, width)])
        with torch.inference_mode():
            if per_prompt > 1 and width > 1:  # the prompt once, its KV cache repeated for the n samples
                input_ids, attention, extra[self.cache_kwarg] = self._shared_prompt(input_ids, attention, per_prompt)
                gen.num_return_sequences, gen.cache_implementation = 1, None
            out = self.hf_model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen, **extra)
        sequences = out.sequences
        if recorder is not None:
            recorder.finish(sequences)
        generated = sequences[:, width:].tolist()
        lp_tensors = self._stack_logprobs(recorder)
        results: list[list[Completion]] = []
        for p, prompt in enumerate(encoded):
            completions = []
            for s in range(per_prompt):
                row = p * per_prompt + s
                completions.append(self._completion(generated[row], len(prompt), sampling, lp_tensors, row))
            if per_prompt < sampling.n:
                completions = [completions[0]] * sampling.n
            results.append(completions)
        return results

    def _shared_prompt(self, input_ids, attention, n: int):
        """Run all but the last prompt token once; return (ids, mask) repeated n times per prompt and the KV cache
        repeated to match. `generate` then computes only the last prompt token of each row, then samples."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.hf_model.config)
        # Left padding: positions count real tokens only, as generate itself computes them.
        positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
        self.hf_model(input_ids=input_ids[:, :-1], attention_mask=attention[:, :-1], position_ids=positions[:, :-1],
                      use_cache=True, **{self.cache_kwarg: cache})
        cache.batch_repeat_interleave(n)
        return input_ids.repeat_interleave(n, dim=0), attention.repeat_interleave(n, dim=0), cache

    @staticmethod
    def _stack_logprobs(recorder: _TopKRecorder | None):
        if recorder is None or not recorder.top_ids:
            return None
        import torch

        # One device->host copy per batch, not one per step.
        return (torch.stack(recorder.top_ids, 1).cpu().tolist(), torch.stack(recorder.top_lps, 1).cpu().tolist(),
                torch.stack(recorder.chosen_lps, 1).cpu().tolist())

    def _completion(self, ids: list[int], prompt_len: int, sampling: SamplingConfig, lp, row: int) -> Completion:
        # Where this sequence really ended: its first eos (kept: the model chose to stop, and a
        # distilled student must learn that token too), else the last non-pad token.
        length, hit_eos = len(ids), False
        for j, t in enumerate(ids):
            if t in self.eos_ids:
                length, hit_eos = j + 1, True
                break
        else:
            pad = self.tokenizer.pad_token_id
            while length and ids[length - 1] == pad and pad not in self.eos_ids:
                length -= 1
        ids = ids[:length]
        text_ids = ids[:-1] if hit_eos else ids
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        finish = "stop" if hit_eos else "length"
        for s in sampling.stop:
            cut = text.find(s)
            if cut != -1:  # OpenAI semantics: the stop string is not part of the text
                text, finish = text[:cut], "stop"
        text, finish, was_cut = stopping.apply(text, finish, sampling)
        if was_cut:  # the tokens that wrote the kept text (the rest of the row is padding or was cut)
            length = self._tokens_for(text_ids, len(text))
        logprobs = None
        if lp is not None:
            top_ids, top_lps, chosen = lp
            logprobs = [TokenLogprobs(ids[j], chosen[row][j], list(zip(top_ids[row][j], top_lps[row][j])))
                        for j in range(length)]
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
        gen = self._generate_config(sampling)
        sample = sampling.temperature > 0
        return {"backend": "hf", "do_sample": sample, "temperature": sampling.temperature if sample else 0.0,
                "top_p": sampling.top_p if sample else 1.0, "top_k": 0 if sample else None,
                "repetition_penalty": gen.repetition_penalty, "max_new_tokens": sampling.max_tokens,
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

    def generate_stream(self, batches, sampling: SamplingConfig):
        return one_batch_at_a_time(self, batches, sampling)  # the model is the pipeline: nothing to overlap

    def endpoint_summary(self) -> None:
        return None  # in process: no servers to count

    def __enter__(self) -> "HFBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
