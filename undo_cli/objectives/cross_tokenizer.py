"""Cross-tokenizer objectives: a teacher with another tokenizer, compared at byte-aligned spans.

    from undo_cli.objectives.cross_tokenizer import SpanRows, cross_tokenizer_divergence
    loss = cross_tokenizer_divergence(student_logits, teacher_logits, student_rows, teacher_rows, "uld")

The teacher and the student read the same text in different tokens. `undo_cli.tokenization`
cuts it into spans that both spell with whole tokens (byte offsets; most spans are one token
on each side). For span k let the student's tokens be s_1..s_n and the teacher's t_1..t_m:

* q_k = the student's next-token distribution where it has read exactly the text before the
  span (the row predicting s_1), p_k the teacher's (the row predicting t_1);
* L^s_k = Σ_{j=2..n} log q(s_j | text, s_<j), the log-probability of the span's other tokens
  (0 for a one-token span), L^t_k the teacher's;
* the span distributions are merged by GOLD's chain rule (TRL's `GOLDTrainer`,
  `_merge_probabilities_with_alignment_groups`): q̂_k = q_k · exp(L^s_k), p̂_k = p_k · exp(L^t_k).
  For the token actually written first this is the probability of the span's whole text;
  for other tokens it is their first-step probability scaled by the same factor (the
  continuation after a token not written is unknown): an approximation, documented in
  docs/objectives.md. The vectors are not normalised (their mass is exp(L)).

Two objectives on the merged vectors:

* `uld` — Universal Logit Distillation (Boizard et al., "Towards Cross-Tokenizer Distillation:
  the Universal Logit Distillation Loss", arXiv:2402.12030): Σ_i |q̂_(i) − p̂_(i)|, the L1
  distance between the probability vectors sorted in decreasing order, the shorter one
  padded with zeros (the paper's closed form of a Wasserstein-1 distance that ignores which
  token is which). Aligned by byte spans, as TRL's "extended ULD", not by position index as
  in the paper.
* `gold` — the matched-vocabulary half of GOLD's hybrid loss (TRL's `GOLDTrainer` with
  `uld_use_hybrid_loss`): the generalised JSD (β = --beta; 0 = forward KL, 1 = reverse KL)
  between the teacher's and the student's probabilities of the tokens both vocabularies have
  (identical bytes, `tokenization.shared_vocabulary`) plus one bucket each for everything else
  (the other tokens, and the mass exp(L) does not cover): categories p̃ = (p̂_v for shared v,
  1 − Σ p̂_v), q̃ likewise. GOLD compares the unshared tokens by ULD's sorted L1 instead; here
  they are one bucket (a merge of categories: an f-divergence can only go down, the same
  data-processing bound as the offline top-K tail in offline.py).

A top-K teacher (served or offline: `TopKTeacher`) knows only its top K (plus the written
token): `uld` compares the first K sorted ranks one by one and the rest as one sum on each
side (|Σ_{i>K} q̂_(i) − p̂_tail|, a lower bound of the full sum by the triangle inequality,
exact when the teacher's tail is 0); `gold` uses the shared tokens among the recorded ones
and lumps the rest into the bucket. With K covering the vocabulary both are exact.

Gradients are formed analytically per chunk, as in chunked.py: ∂/∂log q_k (s) and ∂/∂L^s_k
(c) per span; s goes through log_softmax into the span's first row, c into the rows of the
span's other tokens by a second, small chunked pass over those rows only (`cross_loss`).
Inside a chunk the spans are taken SPAN_BLOCK at a time, and a live teacher's distribution over
its own vocabulary is reduced at once to what the objective reads (`live_teacher`: the shared
tokens for gold, the sorted probabilities for uld), so no [spans × V_t] float32 tensor is kept.
`cross_tokenizer_divergence` is the plain-autograd reference the tests hold it to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from undo_cli.objectives.chunked import ChunkedObjective, log_softmax_, with_cross_entropy
from undo_cli.objectives.divergences import generalized_jsd, logits_grad
from undo_cli.objectives.offline import STUDENT_TAIL_FLOOR, TAIL_NOISE, _log1mexp

Tensor = torch.Tensor
CROSS_KINDS = ("uld", "gold")


# --- where the spans are --------------------------------------------------------------

@dataclass
class SpanRows:
    """Where a batch's aligned spans are, as row indices into one model's scored rows.

    `first[k]` predicts span k's first token; `cont[j]` predicts one of its other tokens, of span
    `cont_span[j]`, namely token `cont_target[j]`.
    """

    first: Tensor
    cont: Tensor
    cont_span: Tensor
    cont_target: Tensor

    @property
    def count(self) -> int:
        return int(self.first.shape[0])

    def to(self, device) -> "SpanRows":
        return SpanRows(*(t.to(device) for t in (self.first, self.cont, self.cont_span, self.cont_target)))


def continuation_logprob(rows: SpanRows, logp_of_targets: Tensor) -> Tensor:
    """L[k] = Σ over span k's other tokens of their log-probabilities ([n_cont] -> [m])."""
    out = torch.zeros(rows.count, dtype=logp_of_targets.dtype, device=logp_of_targets.device)
    return out.index_add_(0, rows.cont_span, logp_of_targets)


# --- the teacher at the spans ------------------------------------------------------------

@dataclass
class FullTeacher:
    """A live teacher at m spans: log-probs over its vocabulary [m, V_t] (at the temperature) and L^t [m]."""

    lp: Tensor
    lt: Tensor


@dataclass
class TopKTeacher:
    """A top-K teacher at m spans: per span the recorded tokens' log-probs [m, K] (`valid` marks real
    entries), how many of the largest are exact top ranks (`rank_k` [m]), each one's student id
    (`student_ids` [m, K], -1 when the student's vocabulary lacks it) and L^t [m]."""

    lps: Tensor
    valid: Tensor
    rank_k: Tensor
    student_ids: Tensor
    lt: Tensor

    def __getitem__(self, idx: Tensor) -> "TopKTeacher":
        return TopKTeacher(self.lps[idx], self.valid[idx], self.rank_k[idx], self.student_ids[idx], self.lt[idx])


# A live teacher reduced to what one objective reads (`live_teacher` builds them a few rows at a time, so that
# no [spans × V_t] float32 tensor exists): the same numbers as a FullTeacher gives that objective.

@dataclass
class SharedTeacher:
    """For gold: the log-probs of the shared vocabulary's tokens [m, S] (in `shared`'s order), the log of the
    mass outside them [m] (unmerged, at the temperature), L^t [m], the entropy over the whole vocabulary [m]."""

    lp_cat: Tensor
    lp_out: Tensor
    lt: Tensor
    entropy: Tensor

    @classmethod
    def of(cls, lp: Tensor, lt: Tensor, shared_teacher: Tensor) -> "SharedTeacher":
        lp_cat = lp[:, shared_teacher]
        entropy = _entropy(lp)
        lp_out = torch.logsumexp(lp.index_fill(-1, shared_teacher, -math.inf), dim=-1)
        return cls(lp_cat, lp_out, lt, entropy)


@dataclass
class SortedTeacher:
    """For uld: p̂ = p·exp(L^t) sorted in decreasing order, its first `width` (the student's vocabulary size,
    zero-padded) [m, width], the sum of the rest [m] (what no student token can match), the entropy [m]."""

    top: Tensor
    rest: Tensor
    entropy: Tensor

    @classmethod
    def of(cls, lp: Tensor, lt: Tensor, width: int) -> "SortedTeacher":
        ps = (lp + lt[:, None]).exp().sort(dim=-1, descending=True).values
        top = torch.nn.functional.pad(ps[:, :width], (0, max(width - ps.shape[-1], 0)))
        return cls(top, ps[:, width:].sum(-1), _entropy(lp))


def _entropy(logp: Tensor) -> Tensor:
    """−Σ p log p per row (−inf entries count 0)."""
    return -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)


# --- uld ------------------------------------------------------------------------------------

def _sorted_merged(lq: Tensor, ls: Tensor) -> tuple[Tensor, Tensor]:
    """q̂ sorted in decreasing order and the permutation: ([m, V_s], [m, V_s])."""
    return (lq + ls[:, None]).exp().sort(dim=-1, descending=True)


def _unsort(values_sorted: Tensor, order: Tensor) -> Tensor:
    return torch.empty_like(values_sorted).scatter_(-1, order, values_sorted)


def uld_full(lq: Tensor, ls: Tensor, teacher: FullTeacher | SortedTeacher, *, grad: bool = False):
    """Σ_i |q̂_(i) − p̂_(i)| over the zero-padded sorted vectors: (values [m], ∂/∂log q [m, V_s], ∂/∂L^s [m]).

    Beyond the student's V_s ranks q̂ is 0, so those terms are the teacher's sorted rest, summed (SortedTeacher)."""
    qs, order = _sorted_merged(lq, ls)
    if isinstance(teacher, FullTeacher):
        teacher = SortedTeacher.of(teacher.lp, teacher.lt, qs.shape[-1])
    diff = qs - teacher.top
    values = diff.abs().sum(-1) + teacher.rest
    if not grad:
        return values, None, None
    s = _unsort(torch.sign(diff) * qs, order)  # ∂|·|/∂q̂ · ∂q̂/∂log q
    return values, s, s.sum(-1)


def _teacher_tail(lps: Tensor, keep: Tensor) -> Tensor:
    """log(1 − Σ_keep p) from recorded log-probs; tails under TAIL_NOISE (rounding of the records) are 0."""
    top = torch.logsumexp(lps.masked_fill(~keep, -math.inf), dim=-1).clamp(max=0.0)
    tail = _log1mexp(top)
    return tail.masked_fill(tail < math.log(TAIL_NOISE), -math.inf)


def uld_topk(lq: Tensor, ls: Tensor, teacher: TopKTeacher, *, grad: bool = False):
    """ULD against a top-K teacher: ranks below rank_k one by one, the rest as one sum per side."""
    lp_sorted = teacher.lps.masked_fill(~teacher.valid, -math.inf).sort(dim=-1, descending=True).values
    width = lp_sorted.shape[-1]
    ranks = torch.arange(width, device=lq.device)
    exact = ranks[None, :] < teacher.rank_k[:, None]                       # [m, K]
    p_top = (lp_sorted + teacher.lt[:, None]).exp().masked_fill(~exact, 0.0)
    p_tail = (teacher.lt + _teacher_tail(lp_sorted, exact)).exp()          # exp(L^t)·(1 − Σ top ranks)
    qs, order = _sorted_merged(lq, ls)
    if qs.shape[-1] < width:
        qs = torch.nn.functional.pad(qs, (0, width - qs.shape[-1]))
    student_ranks = torch.arange(qs.shape[-1], device=lq.device)
    in_top = student_ranks[None, :] < teacher.rank_k[:, None]             # [m, V]
    top_diff = qs[:, :width].masked_fill(~exact, 0.0) - p_top
    q_tail = qs.masked_fill(in_top, 0.0).sum(-1)
    tail_diff = q_tail - p_tail
    values = top_diff.abs().sum(-1) + tail_diff.abs()
    if not grad:
        return values, None, None
    sign = torch.sign(tail_diff)[:, None].expand_as(qs).clone()
    sign[:, :width] = torch.where(exact, torch.sign(top_diff), sign[:, :width])
    vocab = lq.shape[-1]
    s = _unsort((sign * qs)[:, :vocab], order)
    return values, s, s.sum(-1)


# --- gold -------------------------------------------------------------------------------------

def gold_categories(lq: Tensor, ls: Tensor, ids: Tensor, keep: Tensor, lp_cat: Tensor, lp_out: Tensor, lt: Tensor,
                    *, beta: float, grad: bool = False):
    """generalised JSD between (p̂ on the categories `ids`, bucket) and (q̂ likewise): values, ∂/∂log q, ∂/∂L^s.

    `ids` [m, C] are student token ids (`keep` marks real ones), `lp_cat` [m, C] the teacher's log-probs of
    the same tokens (unmerged), `lp_out` [m] the log of the teacher's mass outside them (unmerged).
    Merged: log p̃_c = lp_cat + L^t, log p̃_tail = log(1 − exp(L^t) + exp(L^t)·exp(lp_out)); q̃ alike, its
    outside mass taken exactly as the logsumexp of the student's log-probs outside the categories.
    """
    safe = ids.clamp(min=0)
    # Counted, not scattered as bools: a padding entry (id -1 -> 0) must not overwrite a real id 0.
    inside = torch.zeros_like(lq, dtype=torch.int32).scatter_add_(-1, safe, keep.to(torch.int32)) > 0
    lq_out = torch.logsumexp(lq.masked_fill(inside, -math.inf), dim=-1)
    lq_tail = torch.logaddexp(_log1mexp(ls.clamp(max=0.0)), ls + lq_out)
    lq_tail = torch.logaddexp(lq_tail, torch.full_like(lq_tail, STUDENT_TAIL_FLOOR))
    lp_tail = torch.logaddexp(_log1mexp(lt.clamp(max=0.0)), lt + lp_out)
    lq_cat = lq.gather(-1, safe) + ls[:, None]
    lp = torch.cat([(lp_cat + lt[:, None]).masked_fill(~keep, -math.inf), lp_tail[:, None]], dim=-1)
    lqc = torch.cat([lq_cat.masked_fill(~keep, 0.0), lq_tail[:, None]], dim=-1)  # 0: a finite filler, never used
    valid = torch.cat([keep, torch.ones_like(keep[:, :1])], dim=-1)
    values, s_cat = generalized_jsd(lp, lqc, beta=beta, valid=valid, grad=grad)
    if not grad:
        return values, None, None
    s_tail = s_cat[:, -1]
    # log q̃_tail = log((1 − e^{L}) + e^{L}·Σ_out q): ∂/∂log q_y = e^{L}·q_y/q̃_tail outside the categories,
    # ∂/∂L = −e^{L}·(Σ_in q)/q̃_tail (Σ_in q = 1 − Σ_out q).
    s = (lq + ls[:, None] - lq_tail[:, None]).exp().masked_fill(inside, 0.0).mul_(s_tail[:, None])
    s.scatter_add_(-1, safe, s_cat[:, :-1].masked_fill(~keep, 0.0))
    lq_in = torch.logsumexp(lq.masked_fill(~inside, -math.inf), dim=-1)
    c = s_cat[:, :-1].masked_fill(~keep, 0.0).sum(-1) - s_tail * (ls + lq_in - lq_tail).exp()
    return values, s, c


def gold_full(lq: Tensor, ls: Tensor, teacher: FullTeacher | SharedTeacher, shared_student: Tensor,
              shared_teacher: Tensor, *, beta: float, grad: bool = False):
    """`gold` against a live teacher: the categories are the whole shared vocabulary."""
    m = lq.shape[0]
    ids = shared_student[None, :].expand(m, -1)
    keep = torch.ones_like(ids, dtype=torch.bool)
    if isinstance(teacher, FullTeacher):
        teacher = SharedTeacher.of(teacher.lp, teacher.lt, shared_teacher)
    return gold_categories(lq, ls, ids, keep, teacher.lp_cat, teacher.lp_out, teacher.lt, beta=beta, grad=grad)


def gold_topk(lq: Tensor, ls: Tensor, teacher: TopKTeacher, *, beta: float, grad: bool = False):
    """`gold` against a top-K teacher: the recorded tokens the student also has; the rest is the bucket."""
    keep = teacher.valid & (teacher.student_ids >= 0)
    lp_out = _teacher_tail(teacher.lps, keep)
    return gold_categories(lq, ls, teacher.student_ids, keep, teacher.lps, lp_out, teacher.lt, beta=beta, grad=grad)


def span_terms(kind: str, lq: Tensor, ls: Tensor, teacher, *, beta: float = 0.5, shared: tuple[Tensor, Tensor] | None,
               grad: bool = False):
    """Dispatch: (values [m], ∂/∂log q_first [m, V_s] or None, ∂/∂L^s [m] or None)."""
    top = isinstance(teacher, TopKTeacher)
    if kind == "uld":
        return (uld_topk if top else uld_full)(lq, ls, teacher, grad=grad)
    if kind == "gold":
        if top:
            return gold_topk(lq, ls, teacher, beta=beta, grad=grad)
        if shared is None:
            raise ValueError("gold against a live teacher needs the shared vocabulary (student ids, teacher ids)")
        return gold_full(lq, ls, teacher, *shared, beta=beta, grad=grad)
    raise ValueError(f"unknown cross-tokenizer objective '{kind}' (use one of: {', '.join(CROSS_KINDS)})")


def check_cross(kind: str, beta: float, temperature: float) -> None:
    if kind not in CROSS_KINDS:
        raise ValueError(f"unknown cross-tokenizer objective '{kind}' (use one of: {', '.join(CROSS_KINDS)})")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


# --- the reference: full logits, plain autograd -----------------------------------------------

def _merged_inputs(student_logits, teacher_logits, student_rows: SpanRows, teacher_rows: SpanRows, temperature):
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    lq_all = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    with torch.no_grad():
        lp_all = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    ls = continuation_logprob(student_rows, lq_all[student_rows.cont, student_rows.cont_target])
    lt = continuation_logprob(teacher_rows, lp_all[teacher_rows.cont, teacher_rows.cont_target])
    return lq_all[student_rows.first], ls, FullTeacher(lp_all[teacher_rows.first], lt)


def cross_tokenizer_divergence(student_logits: Tensor, teacher_logits: Tensor, student_rows: SpanRows,
                               teacher_rows: SpanRows, kind: str, *, beta: float = 0.5, temperature: float = 1.0,
                               shared: tuple[Tensor, Tensor] | None = None, reduction: str = "mean") -> Tensor:
    """The mean (or sum) over aligned spans of `kind` (module docstring), on full logits with plain autograd.

    `student_logits` [N_s, V_s] and `teacher_logits` [N_t, V_t] are rows of scored positions; the
    `SpanRows` say which rows belong to which span. `shared` (student ids, teacher ids) is the shared
    vocabulary `gold` compares. `reduction`: "mean", "sum" or "none" (per span). Simple and exact: the
    reference `cross_loss` is tested against.
    """
    check_cross(kind, beta, temperature)
    lq, ls, teacher = _merged_inputs(student_logits, teacher_logits, student_rows, teacher_rows, temperature)
    if kind == "uld":
        qs = (lq + ls[:, None]).exp().sort(dim=-1, descending=True).values
        ps = (teacher.lp + teacher.lt[:, None]).exp().sort(dim=-1, descending=True).values
        width = max(qs.shape[-1], ps.shape[-1])
        pad = torch.nn.functional.pad
        values = (pad(qs, (0, width - qs.shape[-1])) - pad(ps, (0, width - ps.shape[-1]))).abs().sum(-1)
    else:
        values, _, _ = span_terms(kind, lq, ls, teacher, beta=beta, shared=shared)
    if reduction == "none":
        return values
    total = values.sum()
    return total / max(student_rows.count, 1) if reduction == "mean" else total


# --- the chunked loss that `undo train` uses --------------------------------------------------

# span indices -> the teacher at those spans
TeacherAt = Callable[[Tensor], "FullTeacher | SharedTeacher | SortedTeacher | TopKTeacher"]
# Spans whose divergence is formed at a time inside a chunk: at 151,936 teacher tokens a block's float32 rows are
# 78 MB, where a 1024-row chunk's would be 0.6 GB each, and a dozen of them live at once. 128, not fewer: smaller
# blocks were slower on a CPU (256 spans in blocks of 64: ~25% more time than one block; 128: the same).
SPAN_BLOCK = 128


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def target_logprob_chunks(rows: Tensor, weight: Tensor | None, targets: Tensor, temperature: float,
                          chunk_size: int) -> Tensor:
    """log q(target) at each row ([n, H] hidden with `weight` [V, H], or [n, V] logits), chunk by chunk, no grad."""
    out, dtype = [], _work_dtype(rows)
    with torch.no_grad():
        for start in range(0, rows.shape[0], chunk_size):
            z = rows[start:start + chunk_size]
            z = (z @ weight.T) if weight is not None else z
            lq = log_softmax_(z.to(dtype) / temperature)  # a fresh tensor: the caller's logits stay as they are
            out.append(lq.gather(-1, targets[start:start + chunk_size, None].to(lq.device))[:, 0])
    return torch.cat(out) if out else torch.zeros(0, dtype=dtype, device=rows.device)


def live_teacher(rows: Tensor, weight: Tensor | None, t_rows: SpanRows, kind: str, *, student_vocab: int,
                 shared_teacher: Tensor | None, temperature: float, chunk_size: int) -> TeacherAt:
    """`teacher_at` for `cross_loss` from a live teacher's scored rows: [n, H_t] final hidden states with its output
    layer `weight` [V_t, H_t], or [n, V_t] logits (`weight` None), and where the spans are in them (`t_rows`).

    L^t comes from the continuation rows once (chunked). At the spans asked for (`cross_loss` asks SPAN_BLOCK at a
    time) the teacher's distribution is formed and reduced at once to what `kind` reads: gold, the shared tokens'
    log-probs and the mass outside them (SharedTeacher, [m, S]); uld, the sorted merged probabilities the student's
    `student_vocab` ranks can match and the sum of the rest (SortedTeacher, [m, V_s]). The values are FullTeacher's;
    no gradient flows into the teacher.
    """
    if kind == "gold" and shared_teacher is None:
        raise ValueError("gold against a live teacher needs the shared vocabulary (student ids, teacher ids)")
    if kind not in CROSS_KINDS:
        raise ValueError(f"unknown cross-tokenizer objective '{kind}' (use one of: {', '.join(CROSS_KINDS)})")
    dtype = _work_dtype(rows)
    with torch.no_grad():
        lt = continuation_logprob(t_rows, target_logprob_chunks(rows[t_rows.cont], weight, t_rows.cont_target,
                                                                temperature, chunk_size).to(dtype))

    def teacher_at(spans: Tensor) -> SharedTeacher | SortedTeacher:
        with torch.no_grad():
            z = rows[t_rows.first[spans]]  # a fresh tensor (indexing copies), as is the product below
            z = z @ weight.T if weight is not None else z
            lp = log_softmax_(z.to(dtype).div_(temperature))
            del z
            if kind == "gold":
                return SharedTeacher.of(lp, lt[spans], shared_teacher)
            return SortedTeacher.of(lp, lt[spans], student_vocab)

    return teacher_at


def span_chunk_fn(kind: str, span_of_row: Tensor, ls: Tensor, teacher_at: TeacherAt, coeff: Tensor, *, beta: float,
                  temperature: float, shared: tuple[Tensor, Tensor] | None, stats: dict[str, Tensor] | None = None,
                  block: int = SPAN_BLOCK):
    """A chunk function (chunked.ChunkFn) over the student's scored rows: the span divergence at rows that open a
    span (`span_of_row[r]` = its span, -1 elsewhere), gradient 0 at the others; ∂/∂L^s per span goes to `coeff`.
    `teacher_at` is asked for at most `block` spans at a time."""

    def chunk_fn(start: int, end: int, z: Tensor, need: bool):
        spans_here = span_of_row[start:end].to(z.device)
        openings = (spans_here >= 0).nonzero().flatten()
        g = z.new_zeros(z.shape) if need else None
        total = z.new_zeros(())
        with torch.no_grad():
            # `block` spans at a time: the objective's [spans × vocabulary] temporaries (a dozen on each side, the
            # teacher's at its own vocabulary) exist for one block, not for the whole chunk.
            for first in range(0, openings.numel(), block):
                local = openings[first:first + block]
                spans = spans_here[local]
                lq = log_softmax_(z[local].div_(temperature))  # z[local] is a copy
                teacher = teacher_at(spans)
                values, s, c = span_terms(kind, lq, ls[spans].to(lq.dtype), teacher, beta=beta, shared=shared,
                                          grad=need)
                if stats is not None:
                    _health(stats, lq, teacher)
                total += values.sum()
                if need:
                    coeff[spans] = c.to(coeff.dtype)
                    g[local] = logits_grad(lq, s, temperature)
                del lq, teacher, s
        return total, g

    return chunk_fn


def _health(stats: dict[str, Tensor], lq: Tensor, teacher) -> None:
    """Teacher and student entropy at the spans' first rows (the teacher's over its categories)."""
    if isinstance(teacher, TopKTeacher):
        lp = teacher.lps.masked_fill(~teacher.valid, -math.inf)
        teacher_h = _entropy(torch.cat([lp, _teacher_tail(lp, teacher.valid)[:, None]], dim=-1))
    elif isinstance(teacher, FullTeacher):
        teacher_h = _entropy(teacher.lp)
    else:
        teacher_h = teacher.entropy
    for key, h in (("teacher_entropy", teacher_h), ("student_entropy", _entropy(lq))):
        stats[key] = stats.get(key, 0) + h.sum()


def loglik_chunk_fn(targets: Tensor, weights: Tensor, temperature: float):
    """Σ_r w_r · log q_r(target_r) and its gradient w_r·(onehot − q_r)/T: carries ∂/∂L^s into the continuation rows."""

    def chunk_fn(start: int, end: int, z: Tensor, need: bool):
        with torch.no_grad():
            t = targets[start:end].to(z.device)[:, None]
            w = weights[start:end].to(z.device, z.dtype)[:, None]
            lq = log_softmax_(z.div_(temperature))
            value = (w * lq.gather(-1, t)).sum()
            if not need:
                return value, None
            g = lq.exp_().mul_(-w)
            g.scatter_add_(-1, t, w.expand_as(t).clone())
            return value, g.div_(temperature)

    return chunk_fn


def cross_loss(student: Tensor, weight: Tensor | None, *, targets: Tensor, rows: SpanRows, teacher_at: TeacherAt,
               kind: str, beta: float = 0.5, temperature: float = 1.0, kd_weight: float = 1.0,
               lm_weight: float = 0.0, shared: tuple[Tensor, Tensor] | None = None, chunk_size: int = 1024,
               totals: dict[str, Tensor] | None = None, stats: dict[str, Tensor] | None = None,
               block: int = SPAN_BLOCK) -> Tensor:
    """kd_weight × Σ_spans divergence + lm_weight × Σ_rows cross-entropy, summed, memory-bounded by the chunk.

    `student` are the scored rows ([n, H] final hidden states with `weight` [V_s, H], or [n, V_s] logits),
    `targets` [n] their next tokens (the LM term), `rows` the spans in those rows, `teacher_at(spans)` the
    teacher there. Three chunked passes: log q of the continuation rows (no grad) for L^s; the main pass
    (cross-entropy everywhere, the divergence and ∂/∂log q at span openings, ∂/∂L^s per span); then the
    continuation rows again, with ∂/∂L^s as the weight of their log-likelihood's gradient. The value is the
    main pass's; the third pass only adds its gradient.
    """
    device, dtype = student.device, _work_dtype(student)
    rows = rows.to(device)
    cont_targets = rows.cont_target
    need = student.requires_grad or (weight is not None and weight.requires_grad)
    if rows.cont.numel():
        lq_cont = target_logprob_chunks(student[rows.cont].detach(), None if weight is None else weight.detach(),
                                        cont_targets, temperature, chunk_size)
        ls = continuation_logprob(rows, lq_cont)
    else:
        ls = torch.zeros(rows.count, dtype=dtype, device=device)
    span_of_row = torch.full((student.shape[0],), -1, dtype=torch.long, device=device)
    span_of_row[rows.first] = torch.arange(rows.count, device=device)
    coeff = torch.zeros(rows.count, dtype=dtype, device=device)
    kd_fn = span_chunk_fn(kind, span_of_row, ls, teacher_at, coeff, beta=beta, temperature=temperature, shared=shared,
                          stats=stats, block=block)
    fn = with_cross_entropy(kd_fn, targets, kd_weight=kd_weight, lm_weight=lm_weight, totals=totals)
    loss = ChunkedObjective.apply(student, weight, fn, chunk_size, 1.0)
    if need and rows.cont.numel():
        surrogate = ChunkedObjective.apply(student[rows.cont], weight,
                                           loglik_chunk_fn(cont_targets, kd_weight * coeff[rows.cont_span],
                                                           temperature), chunk_size, 1.0)
        loss = loss + (surrogate - surrogate.detach())
    return loss
