"""The `hf` backend's decode loop: one batch of prompts, finished rows leave the batch at once.

    undo generate --teacher M --backend hf --batch-size 32 ...   # backends/hf.py calls `decode` per batch
    python bench/generation.py --sections hf --model M            # batched vs one prompt at a time

Why not transformers' `generate`: it keeps every row of a batch to the last step. A row that has ended
(its eos, a stop string, its `#### <answer>` line, a repetition: backends/stopping.py) is padded and
still computed at every step until the batch's longest row ends. On real word problems that is most of
the work: SmolLM2-135M-Instruct on 32 problems of examples/arithmetic.jsonl wrote a median of 45 tokens,
one row ran to the 256-token limit, and `generate` computed 32 rows for all 256 steps (issue 33). Here a
finished row is dropped from the batch (its KV-cache rows, mask, positions) at the step it ends, so a
batch costs the sum of its rows' lengths, not rows x the longest.

The loop is greedy or samples with temperature and top-p only, as `generate` did for this backend
(the model's own sampling defaults are set aside, docs/method.md "Generation defaults"). It computes
what `generate` computed, in the same order, for the rows still running: the prompt (left-padded;
positions count real tokens only), the logits of the last position only, argmax or a draw from the
warped distribution, one token per row per step into a dynamic KV cache. Greedy text is the text of
the prompt alone (tests/test_backend_hf.py). With `n` samples per prompt the prompt runs once and its
cache is repeated n times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from undo_cli.backends import stopping


@dataclass
class Row:
    """One generated sequence: its tokens, why it ended, and (with log-probs) per token the top-k and chosen."""

    ids: list[int] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    chosen: list[float] = field(default_factory=list)


def decode(backend: Any, input_ids, attention, sampling: Any, per_prompt: int) -> list[Row]:
    """Generate for a left-padded batch (`input_ids`, `attention`: prompts x width) -> prompts x per_prompt
    rows, in order (prompt 0's samples first). `backend`: the HFBackend (model, tokenizer, eos ids)."""
    import torch
    from transformers import DynamicCache

    model, eos = backend.hf_model, backend.eos_ids
    cache = DynamicCache(config=model.config)
    kw = backend.cache_kwarg
    # Left padding: positions count real tokens only (what generate computes from the mask).
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                logits_to_keep=1, **{kw: cache})
    logits = out.logits[:, -1, :]
    if per_prompt > 1:  # n samples continue one pass over the prompt
        cache.batch_repeat_interleave(per_prompt)
        logits = logits.repeat_interleave(per_prompt, dim=0)
        attention = attention.repeat_interleave(per_prompt, dim=0)
    del out
    rows = [Row() for _ in range(logits.shape[0])]
    live = list(range(len(rows)))  # the original row index of each row still in the batch
    next_pos = attention.long().sum(-1, keepdim=True)
    warp = _warpers(sampling)
    ends = stopping.RowStop(backend.tokenizer, sampling)
    k = sampling.logprobs or 0
    for step in range(sampling.max_tokens):
        if k:
            logp = torch.log_softmax(logits.float(), dim=-1)  # the model's distribution, before temperature/top-p
            top_lps, top_ids = logp.topk(k, dim=-1)
        if warp is None:
            tokens = logits.argmax(-1)
        else:
            probs = torch.softmax(warp(None, logits.float()), dim=-1)
            tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        picked = tokens.tolist()
        if k:
            chosen = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
            top_ids_l, top_lps_l = top_ids.tolist(), top_lps.tolist()
        last = step == sampling.max_tokens - 1
        keep = []
        for j, (r, t) in enumerate(zip(live, picked)):
            row = rows[r]
            row.ids.append(t)
            if k:
                row.chosen.append(chosen[j])
                row.top.append(list(zip(top_ids_l[j], top_lps_l[j])))
            if not (last or t in eos or ends(row.ids)):
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(live):  # drop the finished rows: the batch shrinks to the rows still running
            index = torch.tensor(keep, device=tokens.device)
            cache.batch_select_indices(index)
            attention, next_pos, tokens = attention[index], next_pos[index], tokens[index]
            live = [live[j] for j in keep]
        attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=next_pos, use_cache=True,
                    **{kw: cache})
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
    return rows


def _warpers(sampling: Any):
    """Temperature and top-p (OpenAI semantics: nothing else shapes the distribution), or None for greedy."""
    if sampling.temperature <= 0:
        return None
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return warpers
