"""The offline teacher: white-box objectives on the teacher's recorded top-K log-probabilities.

    undo generate --teacher T --logprobs 20 ... --output rationales.jsonl
    undo train --objective skl --teacher-logprobs --data rationales.jsonl ...

`undo generate --logprobs K` stores, for every response token, the token the
teacher produced and its K most likely alternatives as the rationale field
`teacher_logprobs = [[token_id, logprob, [[id, logprob], ...]], ...]`. Training
then needs no teacher in memory. This module turns those records into tensors
aligned with the training labels and computes the divergences on them.

The approximation, precisely. For one response token let S be the recorded
ids (the top K plus the sampled token when it is not among them), p the
teacher's distribution and q the student's over the vocabulary V. We replace
both V-way distributions by (|S|+1)-way ones, lumping everything outside S
into one tail bucket:

    p̃ = (p_s for s in S,  p_tail = 1 − Σ_{s∈S} p_s)
    q̃ = (q_s for s in S,  q_tail = Σ_{v∉S} q_v)

and compute the same divergence D(p̃ ‖ q̃) as the live path computes on (p, q).

* It is exact when S holds every token the teacher gives mass to, in particular
  when K is the whole vocabulary (the tests check that it then equals the live
  path, value and gradient). Equivalently, it is exact whenever the teacher
  spreads its tail mass over the tail in the student's proportions
  (p_v / q_v constant for v ∉ S).
* Otherwise it is biased *low*: all six objectives are f-divergences, and
  merging categories never increases an f-divergence (data processing
  inequality). The gap is what happens inside the tail, e.g. for forward KL
  KL(p‖q) − KL(p̃‖q̃) = p_tail · KL(p(·|tail) ‖ q(·|tail)). In gradient terms:
  the student is pulled to the teacher's probabilities on S and to the right
  *total* tail mass, but gets no signal about how to split its tail among the
  tail tokens. With K ≥ 20 the tail of a confident teacher is usually a few
  percent of the mass, so the top of the distribution, which is what
  distillation transfers, is kept.
* p_tail comes from the recorded numbers as log1p(−exp(logsumexp(top-K))),
  in log space. The records round log-probs to 5 decimals, so Σ_S p_s can
  exceed 1 by ~1e-5: tails below TAIL_NOISE (1e-5) are treated as 0 and the
  K+1 values are renormalised to sum to 1.
* q_tail is computed exactly, as the logsumexp of the student's log-probs
  outside S (not as 1 − Σ_S q_s, which cancels catastrophically in float32
  when the student is confident); when S is the whole vocabulary the bucket is
  empty and gets a 1e-30 floor so that its log stays finite.
* Temperature must be 1: the records cannot say how the tail reshapes at
  another temperature. The log-probs must be those of the teacher's raw
  distribution (vLLM's default `raw_logprobs`), not of a processed one.
* The teacher's numbers were produced conditioned on *its* generation prompt;
  the live path scores the response after the student's prompt.

The student side is the chunked machinery of `chunked.py`: gradients w.r.t. the
student's hidden states and output layer are formed chunk by chunk, analytically
(∂/∂log q̃ from `divergences.py`, then the chain rule through the lumping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from undo_cli.objectives.chunked import (DEFAULT_CHUNK_SIZE, ChunkedObjective, ChunkFn, _check_chunk_size,
                                         log_softmax_, reduction_scale)
from undo_cli.objectives.divergences import check_params, health_sums, per_token, select_positions

Tensor = torch.Tensor

TAIL_NOISE = 1e-5            # teacher tail mass below this is rounding noise of the records
STUDENT_TAIL_FLOOR = math.log(1e-30)


# --- records -> per-position supports -------------------------------------------------

Support = list[tuple[int, float]]  # (token id, teacher log-prob), best first, ids unique


def parse_teacher_logprobs(rows: Any) -> tuple[list[int], list[Support]]:
    """The recorded tokens and, per token, its support: the top-K plus the sampled token.

    `rows` is a rationale's `teacher_logprobs`: [[token_id, logprob, [[id, logprob], ...]], ...]
    (undo_cli.backends.base.TokenLogprobs.to_json). Raises ValueError naming the bad entry.
    """
    if not isinstance(rows, list):
        raise ValueError(f"expected a list of [token_id, logprob, [[id, logprob], ...]], got {type(rows).__name__}")
    tokens: list[int] = []
    supports: list[Support] = []
    for i, row in enumerate(rows):
        try:
            token_id, logprob, top = int(row[0]), float(row[1]), row[2]
            support: dict[int, float] = {}
            for entry in top:
                support.setdefault(int(entry[0]), float(entry[1]))
        except (TypeError, ValueError, IndexError, KeyError):
            raise ValueError(f"token {i}: expected [token_id, logprob, [[id, logprob], ...]], got {row!r:.80}") from None
        support.setdefault(token_id, logprob)
        if any(math.isnan(lp) or lp > 1e-3 for lp in support.values()):
            raise ValueError(f"token {i}: log-probabilities must be <= 0 (got {sorted(support.values())[-1]})")
        tokens.append(token_id)
        supports.append(list(support.items()))
    return tokens, supports


def align_teacher_logprobs(labels: Sequence[int], rows: Any) -> list[tuple[int, Support]] | None:
    """Pair each scored response token (labels != -100) with the teacher's support recorded for it.

    The student's response ids (from `prompts.encode_example`) must be the tokens the teacher
    generated. One may extend the other (the chat template appends an end-of-turn marker the
    teacher never produced; the teacher may have been cut off): KD then covers the shared prefix.
    Anything else is a re-tokenisation mismatch (the text was re-tokenised differently, or edited,
    or another tokenizer produced it): returns None and the caller skips KD for that example.
    Returns [(label position, support), ...].
    """
    tokens, supports = parse_teacher_logprobs(rows)
    positions = [i for i, label in enumerate(labels) if label != -100]
    response = [labels[i] for i in positions]
    shared = min(len(response), len(tokens))
    if shared == 0 or response[:shared] != tokens[:shared]:
        return None
    return list(zip(positions[:shared], supports[:shared]))


def collate_teacher_topk(aligned: Sequence[list[tuple[int, Support]] | None], length: int,
                         vocab_size: int | None = None) -> dict[str, Tensor]:
    """Batch tensors, aligned with the (unshifted) labels [B, length]:

    `teacher_topk_ids` [B, length, K] (long), `teacher_topk_logprobs` [B, length, K] (float32),
    `teacher_topk_valid` [B, length, K] (bool; padding slots are False) and `teacher_kd_mask`
    [B, length] (True where a teacher distribution was recorded). K is the batch's widest support.
    Entry [b, t] describes the distribution of token labels[b, t]; a causal LM predicts it from
    position t − 1, so shift like the labels.
    """
    width = max((len(s) for ex in aligned if ex for _, s in ex), default=1)
    batch = len(aligned)
    ids = torch.zeros((batch, length, width), dtype=torch.long)
    logprobs = torch.full((batch, length, width), -math.inf, dtype=torch.float32)
    valid = torch.zeros((batch, length, width), dtype=torch.bool)
    kd_mask = torch.zeros((batch, length), dtype=torch.bool)
    for b, example in enumerate(aligned):
        for position, support in example or ():
            if position >= length:
                continue
            if vocab_size is not None and max(i for i, _ in support) >= vocab_size:
                raise ValueError(f"teacher token id {max(i for i, _ in support)} is outside the student's "
                                 f"vocabulary of {vocab_size}: the logprobs come from another tokenizer")
            k = len(support)
            ids[b, position, :k] = torch.tensor([i for i, _ in support])
            logprobs[b, position, :k] = torch.tensor([lp for _, lp in support])
            valid[b, position, :k] = True
            kd_mask[b, position] = True
    return {"teacher_topk_ids": ids, "teacher_topk_logprobs": logprobs, "teacher_topk_valid": valid,
            "teacher_kd_mask": kd_mask}


@dataclass
class AlignmentCounts:
    """How many examples could use the teacher's recorded distribution (for the run's summary)."""

    aligned: int = 0
    mismatched: int = 0
    missing: int = 0

    def add(self, result: list | None, had_logprobs: bool) -> None:
        if not had_logprobs:
            self.missing += 1
        elif result is None:
            self.mismatched += 1
        else:
            self.aligned += 1


# --- the loss on the K+1 categories ---------------------------------------------------

def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate on both sides of −log 2 (Mächler's log1mexp)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_categories(logprobs: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(renormalised log-probs on the support [n, K], log tail mass [n]) from recorded top-K log-probs."""
    lp = logprobs.masked_fill(~valid, -math.inf)
    top = torch.logsumexp(lp, dim=-1)
    tail = _log1mexp(top.clamp(max=0.0))
    tail = tail.masked_fill(tail < math.log(TAIL_NOISE), -math.inf)
    norm = torch.logaddexp(top, tail)
    return lp - norm[:, None], tail - norm


def _membership(ids: Tensor, valid: Tensor, vocab: int) -> Tensor:
    """[n, V] bool: which vocabulary entries are in each row's support (padding slots excluded)."""
    counts = torch.zeros((ids.shape[0], vocab), dtype=torch.int32, device=ids.device)
    counts.scatter_add_(-1, ids, valid.to(torch.int32))
    if counts.numel() and int(counts.max()) > 1:
        raise ValueError("a token id appears twice in one position's teacher support; "
                         "build supports with parse_teacher_logprobs (it de-duplicates)")
    return counts > 0


def topk_chunk_fn(ids: Tensor, logprobs: Tensor, valid: Tensor, kind: str, *, alpha: float,
                  beta: float, stats: dict[str, Tensor] | None = None, overlap_k: int = 20) -> ChunkFn:
    """A chunk function against recorded top-K supports ([n, K] each).

    `stats`, when given, accumulates the on-policy health sums of `divergences.health_sums` (teacher entropy
    over the K+1 categories, student entropy over the vocabulary, top-k overlap).
    """

    def chunk_fn(start: int, end: int, z: Tensor, need: bool):
        with torch.no_grad():
            ids_c = ids[start:end].to(z.device)
            valid_c = valid[start:end].to(z.device)
            lp_top, lp_tail = teacher_categories(logprobs[start:end].to(z.device, z.dtype), valid_c)
            lq_all = log_softmax_(z)
            in_support = _membership(ids_c, valid_c, lq_all.shape[-1])
            outside = torch.logsumexp(lq_all.masked_fill(in_support, -math.inf), dim=-1)
            lq_tail = torch.logaddexp(outside, torch.full_like(outside, STUDENT_TAIL_FLOOR))
            lp = torch.cat([lp_top, lp_tail[:, None]], dim=-1)
            lq = torch.cat([lq_all.gather(-1, ids_c), lq_tail[:, None]], dim=-1)
            keep = torch.cat([valid_c, torch.ones_like(valid_c[:, :1])], dim=-1)
            values, s = per_token(kind, lp, lq, alpha=alpha, beta=beta, valid=keep, grad=need)
            if stats is not None:
                width = int(valid_c.sum(-1).min()) if valid_c.numel() else 1
                health_sums(stats, lp, lq_all, min(overlap_k, max(width, 1)), top_ids=ids_c, top_lp=lp_top)
            if not need:
                return values.sum(), None
            # ∂L/∂z_j = s_j [j in S] + s_tail·q_j/q_tail [j not in S] − q_j·Σs   (log q̃ through log_softmax)
            g = (lq_all - lq_tail[:, None]).exp_().masked_fill_(in_support, 0.0).mul_(s[:, -1:])
            g.scatter_add_(-1, ids_c, s[:, :-1])
            g.sub_(lq_all.exp_().mul_(s.sum(-1, keepdim=True)))
            return values.sum(), g

    return chunk_fn


def _check_offline(kind, alpha, beta, temperature, chunk_size, ids, logprobs, valid, vocab):
    check_params(kind, alpha, beta, temperature)
    _check_chunk_size(chunk_size)
    if temperature != 1.0:
        raise ValueError("the offline (top-K) path needs temperature 1: the recorded log-probs do not say "
                         "how the teacher's tail reshapes at another temperature; use a live teacher")
    if ids.shape != logprobs.shape or (valid is not None and valid.shape != ids.shape):
        raise ValueError(f"teacher top-K ids {tuple(ids.shape)}, log-probs {tuple(logprobs.shape)} and "
                         f"valid {tuple(valid.shape) if valid is not None else None} must have one shape")
    if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ValueError(f"teacher token id {int(ids.max())} is outside the student's vocabulary of {vocab}: "
                         "the logprobs come from another tokenizer")


def fused_linear_topk_divergence(student_hidden: Tensor, student_weight: Tensor, topk_ids: Tensor,
                                 topk_logprobs: Tensor, mask: Tensor | None, kind: str, *,
                                 topk_valid: Tensor | None = None, alpha: float = 0.1, beta: float = 0.5,
                                 temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                                 reduction: str = "mean") -> Tensor:
    """The divergence between the recorded top-K teacher (plus tail bucket) and the student.

    `student_hidden` [..., H] with `student_weight` [V, H] as in `fused_linear_divergence`;
    `topk_ids`/`topk_logprobs`/`topk_valid` [..., K] as built by `collate_teacher_topk` (shifted to
    the hidden states' positions); `mask` [...] the positions that count.
    """
    valid = topk_valid if topk_valid is not None else torch.ones_like(topk_ids, dtype=torch.bool)
    _check_offline(kind, alpha, beta, temperature, chunk_size, topk_ids, topk_logprobs, valid, student_weight.shape[0])
    hs = select_positions(student_hidden, mask)
    fn = topk_chunk_fn(select_positions(topk_ids, mask), select_positions(topk_logprobs, mask),
                       select_positions(valid, mask), kind, alpha=alpha, beta=beta)
    return ChunkedObjective.apply(hs, student_weight, fn, chunk_size, reduction_scale(hs.shape[0], reduction))


def topk_divergence(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mask: Tensor | None,
                    kind: str, *, topk_valid: Tensor | None = None, alpha: float = 0.1, beta: float = 0.5,
                    temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    reduction: str = "mean") -> Tensor:
    """As `fused_linear_topk_divergence`, on logits [..., V] the model already produced."""
    valid = topk_valid if topk_valid is not None else torch.ones_like(topk_ids, dtype=torch.bool)
    _check_offline(kind, alpha, beta, temperature, chunk_size, topk_ids, topk_logprobs, valid, student_logits.shape[-1])
    zs = select_positions(student_logits, mask)
    fn = topk_chunk_fn(select_positions(topk_ids, mask), select_positions(topk_logprobs, mask),
                       select_positions(valid, mask), kind, alpha=alpha, beta=beta)
    return ChunkedObjective.apply(zs, None, fn, chunk_size, reduction_scale(zs.shape[0], reduction))
