"""The `hf` backend's decode loop: finished rows leave the batch at once, the next prompts take their place.

    undo generate --teacher M --backend hf --batch-size 32 ...   # backends/hf.py: every batch through `decode`
    python bench/generation.py --sections hf --model M            # batched vs one prompt at a time

Why not transformers' `generate`: it keeps every row of a batch to the last step. A row that has ended
(its eos, a stop string, its `#### <answer>` line, a repetition: backends/stopping.py) is padded and
still computed at every step until the batch's longest row ends. On real word problems that is most of
the work: SmolLM2-135M-Instruct on 32 problems of examples/arithmetic.jsonl wrote a median of 45 tokens,
one row ran to the 256-token limit, and `generate` computed 32 rows for all 256 steps (issue 33). Here a
finished row is dropped from the batch (its KV-cache rows, mask, positions) at the step it ends, and
once a quarter of the batch has ended the next prompts' prompt pass runs and their rows join (the
stage's next batch included: `HFBackend.generate_stream`), so the model computes about `rows` sequences
at every step until the work runs out.

The loop is greedy or samples with temperature and top-p only, as `generate` did for this backend
(the model's own sampling defaults are set aside, docs/method.md "Generation defaults"). Per row it
computes what `generate` computed: the prompt (left-padded; positions count real tokens only), the
logits of the last position only, argmax or a draw from the warped distribution, one token per step
into a dynamic KV cache; padding is masked, so greedy text is the text of the prompt alone
(tests/test_backend_hf.py). With `n` samples per prompt the prompt runs once and its cache is repeated
n times.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from undo_cli.backends import stopping


@dataclass
class Row:
    """One generated sequence: its tokens, why it ended, and (with log-probs) per token the top-k and chosen."""

    ids: list[int] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    chosen: list[float] = field(default_factory=list)


def decode(backend: Any, prompts: Iterable[tuple[Any, list[int]]], sampling: Any, per_prompt: int,
           rows: int) -> Iterator[tuple[Any, list[Row]]]:
    """Generate for (key, prompt ids) pairs, taken in the order given, at most `rows` sequences at once
    (prompts x per_prompt); yields (key, its per_prompt rows) as soon as a prompt's rows have all ended.
    `prompts` may give None: nothing more for now (asked again at the next refill).

    The batch is refilled while it runs: once a quarter of its rows (at least one prompt's) have ended,
    the next prompts' prompt pass runs and their rows join the batch (their KV cache left-padded to the
    batch's length), so a batch does not wait for its longest row with most of its rows gone.
    `backend`: the HFBackend (model, tokenizer, eos ids, cache argument name)."""
    import torch

    source = iter(prompts)
    batch: _Batch | None = None
    waiting: dict[Any, list] = {}  # key -> [rows, how many still running]
    warp = _warpers(sampling)
    ends = stopping.RowStop(backend.tokenizer, sampling)
    k = sampling.logprobs or 0
    admit_at = max(per_prompt, rows // 4)
    exhausted = False
    while True:
        finished: list[Any] = []
        with torch.inference_mode():  # not across a yield: the caller's code must not run in inference mode
            running = batch.size if batch else 0
            if not exhausted and (batch is None or (rows - running >= admit_at and batch.can_merge)):
                take = []
                for item in source:
                    if item is None:  # nothing more for now (the caller's read-ahead limit); ask again later
                        break
                    take.append(item)
                    if running + (len(take) + 1) * per_prompt > rows:
                        break
                else:
                    exhausted = True
                if not take and batch is None and not exhausted:
                    raise RuntimeError("decode: no rows running and no prompt given")  # a caller bug: it would spin
                if take:
                    new = _Batch.prefill(backend, take, per_prompt)
                    for i, (key, _) in enumerate(take):
                        waiting[key] = [new.rows[i * per_prompt : (i + 1) * per_prompt], per_prompt]
                    batch = new if batch is None else batch.merge(new)
            if batch is None:
                return
            logits = batch.logits
            if k:
                logp = torch.log_softmax(logits.float(), dim=-1)  # the model's distribution, before temperature/top-p
                top_lps, top_ids = logp.topk(k, dim=-1)
            if warp is None:
                tokens = logits.argmax(-1)
            else:
                tokens = torch.multinomial(torch.softmax(warp(None, logits.float()), dim=-1), num_samples=1).squeeze(1)
            picked = tokens.tolist()
            if k:
                chosen = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
                top_ids_l, top_lps_l = top_ids.tolist(), top_lps.tolist()
            keep = []
            for j, (row, t) in enumerate(zip(batch.rows, picked)):
                row.ids.append(t)
                if k:
                    row.chosen.append(chosen[j])
                    row.top.append(list(zip(top_ids_l[j], top_lps_l[j])))
                if len(row.ids) < sampling.max_tokens and t not in backend.eos_ids and not ends(row.ids):
                    keep.append(j)
                    continue
                entry = waiting[batch.keys[j][0]]
                entry[1] -= 1
                if not entry[1]:
                    finished.append(batch.keys[j][0])
            if keep:
                batch.step(backend, tokens, keep)
            else:
                batch = None
        for key in finished:
            yield key, waiting.pop(key)[0]


class _Batch:
    """The rows running together: their KV cache, mask, next positions and the logits of their next token."""

    def __init__(self, cache, attention, next_pos, logits, keys, rows):
        self.cache, self.attention, self.next_pos, self.logits = cache, attention, next_pos, logits
        self.keys, self.rows = keys, rows  # per row: (prompt key, sample index), Row

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def can_merge(self) -> bool:
        """Rows can join only a cache of plain full-attention layers (a sliding-window layer keeps a window)."""
        return all(isinstance(layer, _room_layer()) for layer in self.cache.layers)

    @classmethod
    def prefill(cls, backend, prompts: list[tuple[Any, list[int]]], per_prompt: int) -> "_Batch":
        """The prompt pass of `prompts` (left-padded; positions count real tokens only, as transformers'
        generate computes them; logits of the last position only), each prompt's cache repeated per_prompt
        times: n samples continue one pass over the prompt."""
        from transformers import DynamicCache

        padded = backend.tokenizer.pad({"input_ids": [ids for _, ids in prompts]}, padding=True, return_tensors="pt")
        input_ids = padded["input_ids"].to(backend.device)
        attention = padded["attention_mask"].to(backend.device)
        model = backend.hf_model
        cache = DynamicCache(config=model.config)
        room = _room_layer()
        for i, layer in enumerate(cache.layers):  # full-attention layers: appended to in place (_room_layer)
            if type(layer) is room.__base__:
                cache.layers[i] = room()
        positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{backend.cache_kwarg: cache})
        logits = out.logits[:, -1, :]
        if per_prompt > 1:
            cache.batch_repeat_interleave(per_prompt)
            logits = logits.repeat_interleave(per_prompt, dim=0)
            attention = attention.repeat_interleave(per_prompt, dim=0)
        keys = [(key, s) for key, _ in prompts for s in range(per_prompt)]
        return cls(cache, attention, attention.long().sum(-1, keepdim=True), logits, keys, [Row() for _ in keys])

    def merge(self, other: "_Batch") -> "_Batch":
        """This batch and `other` as one: the shorter cache and mask left-padded (masked) to the longer."""
        import torch

        width = max(self.attention.shape[1], other.attention.shape[1])

        def left(mask):  # zeros in front, up to `width` positions
            return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.join(theirs, width)
        self.attention = torch.cat([left(self.attention), left(other.attention)], dim=0)
        self.next_pos = torch.cat([self.next_pos, other.next_pos], dim=0)
        self.logits = torch.cat([self.logits, other.logits], dim=0)
        self.keys, self.rows = self.keys + other.keys, self.rows + other.rows
        return self

    def step(self, backend, tokens, keep: list[int]) -> None:
        """Drop the rows not in `keep` (and cache columns no row still uses), then one forward pass: each
        remaining row's picked token in, the logits of its next token out."""
        import torch

        if len(keep) < self.size:
            index = torch.tensor(keep, device=tokens.device)
            self.cache.batch_select_indices(index)
            self.attention, self.next_pos, tokens = self.attention[index], self.next_pos[index], tokens[index]
            self.keys, self.rows = [self.keys[j] for j in keep], [self.rows[j] for j in keep]
            used = self.attention.any(0).nonzero()
            lead = int(used[0]) if len(used) else 0
            if lead and self.can_merge:  # left padding every remaining row has: out of the cache
                for layer in self.cache.layers:
                    layer.trim(lead)
                self.attention = self.attention[:, lead:]
        self.attention = torch.cat([self.attention, self.attention.new_ones((self.size, 1))], dim=1)
        out = backend.hf_model(input_ids=tokens[:, None], attention_mask=self.attention, position_ids=self.next_pos,
                               use_cache=True, **{backend.cache_kwarg: self.cache})
        self.logits = out.logits[:, -1, :]
        self.next_pos = self.next_pos + 1


GROW = 64  # KV-cache positions a layer makes room for at a time: one copy per GROW steps, not one per step
_ROOM = None


def _room_layer():
    """transformers' DynamicLayer, appended to in place: keys and values are views of buffers with room for
    GROW more positions. DynamicLayer appends with torch.cat, a copy of the layer's whole cache at every
    step; at 32 SmolLM2 rows of 350 positions a step took 369-388 ms of CPU that way and 312-327 ms with
    room to grow (the same process, alternated). Rows leave (`batch_select_indices`), join (`join`) and
    shed the left padding they all have (`trim`) in place too."""
    global _ROOM
    if _ROOM is not None:
        return _ROOM
    import torch
    from transformers.cache_utils import DynamicLayer

    class RoomLayer(DynamicLayer):
        def _views(self) -> None:
            self.keys, self.values = self._k[..., : self._n, :], self._v[..., : self._n, :]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._k = self._v = None
                self._n = 0
            n, new = self._n, key_states.shape[-2]
            if self._k is None or n + new > self._k.shape[-2]:
                self._k, self._v = self._moved(self._k, key_states), self._moved(self._v, value_states)
            self._k[..., n : n + new, :] = key_states
            self._v[..., n : n + new, :] = value_states
            self._n = n + new
            self._views()
            return self.keys, self.values

        def _moved(self, buf, like):
            """A buffer like `like` holding the used positions of `buf`, with room for `like` and GROW more."""
            shape = list(like.shape)
            shape[-2] = self._n + like.shape[-2] + GROW
            out = like.new_empty(shape)
            if buf is not None and self._n:
                out[..., : self._n, :] = buf[..., : self._n, :]
            return out

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.get_seq_length() > 0:
                self._k, self._v = self._k.repeat_interleave(repeats, dim=0), self._v.repeat_interleave(repeats, dim=0)
                self._views()

        def batch_select_indices(self, indices) -> None:
            if self.get_seq_length() > 0:
                self._k, self._v = self._k[indices], self._v[indices]
                self._views()

        def trim(self, lead: int) -> None:
            self._k, self._v, self._n = self._k[..., lead:, :], self._v[..., lead:, :], self._n - lead
            self._views()

        def join(self, other: "RoomLayer", width: int) -> None:
            """`other`'s rows after this layer's, both left-padded to `width` positions."""
            k = torch.cat([self._padded(self._k, width), other._padded(other._k, width)], dim=0)
            v = torch.cat([self._padded(self._v, width), other._padded(other._v, width)], dim=0)
            self._k, self._v, self._n = k, v, width
            self._views()

        def _padded(self, buf, width: int):
            out = buf.new_zeros((*buf.shape[:2], width + GROW, buf.shape[-1]))
            out[..., width - self._n : width, :] = buf[..., : self._n, :]
            return out

    _ROOM = RoomLayer
    return RoomLayer


def _warpers(sampling: Any):
    """Temperature and top-p (OpenAI semantics: nothing else shapes the distribution), or None for greedy."""
    if sampling.temperature <= 0:
        return None
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return warpers
