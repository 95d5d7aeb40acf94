"""Per-token divergences between the teacher's distribution p and the student's q.

These are the white-box objectives of docs/objectives.md. Each one is a small function
on *log-probabilities* (the last dimension is the vocabulary, or any set of
categories) that returns the per-token value and, on request, its gradient with
respect to the student's log-probabilities:

    value, s = reverse_kl(lp, lq, grad=True)     # value: [n], s = dvalue/dlq: [n, V]

`s` is what lets `chunked.py` compute the gradient with respect to the logits
one chunk at a time without autograd keeping every intermediate alive; the
chain rule through log_softmax is then one line (`logits_grad`). The tests
check these hand-derived gradients against autograd and everything against a
deliberately naive float64 reference.

Conventions (the same everywhere in `undo_cli.objectives`):

* Log space only. Mixtures such as m = β·p + (1−β)·q are formed with
  `logaddexp(log β + log p, log(1−β) + log q)`, never `log(β·p + (1−β)·q)`.
* The teacher may put -inf on some tokens (p = 0 there). Terms weighted by p
  follow 0·log 0 = 0. The one term that is genuinely infinite, reverse KL's
  q·log(q/p) where p = 0 < q, is dropped: the sum runs over the teacher's
  support, as DistiLLM's and MiniLLM's `inf_mask` does. Everything else (JSD,
  skew reverse KL, TVD) keeps its exact, finite value at those tokens.
* `valid` (optional, same shape as the log-probs) drops categories outright;
  the offline top-K path uses it for padding slots.
* The student's log-probabilities must be finite (a log_softmax of finite
  logits always is).
"""

from __future__ import annotations

import math
import warnings

import torch

from undo_cli.objectives.options import KINDS

Tensor = torch.Tensor


class VocabSizeMismatchWarning(UserWarning):
    """Teacher and student logits differ in size; only the shared vocabulary is compared."""


# --- small helpers --------------------------------------------------------------------

def _finite(logp: Tensor) -> Tensor:
    """log p with -inf replaced by 0. Safe wherever the result is multiplied by p = 0 or masked out:
    substituting *before* the product keeps both the value and the gradient free of inf·0 = NaN."""
    return logp.masked_fill(torch.isneginf(logp), 0.0)


def _total(terms: Tensor, keep: Tensor | None) -> Tensor:
    return (terms if keep is None else terms.masked_fill(~keep, 0.0)).sum(-1)


def _kept(s: Tensor, keep: Tensor | None) -> Tensor:
    return s if keep is None else s.masked_fill(~keep, 0.0)


def _and(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a & b


def log_mixture(lp: Tensor, lq: Tensor, wp: float, wq: float) -> Tensor:
    """log(wp·p + wq·q), computed from log-probs with logaddexp (wp, wq ≥ 0, wq > 0 so it is finite)."""
    if wp == 0.0:
        return lq + math.log(wq)
    if wq == 0.0:
        return lp + math.log(wp)
    return torch.logaddexp(lp + math.log(wp), lq + math.log(wq))


# --- the objectives -------------------------------------------------------------------

def forward_kl(lp: Tensor, lq: Tensor, *, valid: Tensor | None = None, grad: bool = False):
    """KL(p ‖ q) = Σ p·(log p − log q): classic knowledge distillation, mass-covering.

    Source: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531).
    ∂/∂log q = −p.
    """
    p = lp.exp()
    value = _total(p * (_finite(lp) - lq), valid)
    return value, (_kept(-p, valid) if grad else None)


def reverse_kl(lp: Tensor, lq: Tensor, *, valid: Tensor | None = None, grad: bool = False):
    """KL(q ‖ p) = Σ q·(log q − log p) over the teacher's support: mode-seeking.

    Source: MiniLLM's token-level (single-step) form, Gu et al., "MiniLLM: Knowledge
    Distillation of Large Language Models" (arXiv 2306.08543). Tokens where the teacher
    has -inf are left out of the sum (MiniLLM/DistiLLM `inf_mask`); the exact value is +inf.
    ∂/∂log q = q·(log q − log p + 1) on the support.
    """
    keep = _and(~torch.isneginf(lp), valid)
    q = lq.exp()
    log_ratio = lq - _finite(lp)
    value = _total(q * log_ratio, keep)
    return value, (_kept(q * (log_ratio + 1.0), keep) if grad else None)


def generalized_jsd(lp: Tensor, lq: Tensor, *, beta: float = 0.5, valid: Tensor | None = None, grad: bool = False):
    """β·KL(p ‖ m) + (1−β)·KL(q ‖ m) with m = β·p + (1−β)·q: the generalised Jensen-Shannon divergence.

    Source: Agarwal et al., "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes" (GKD, arXiv 2306.13649), Eq. 1, in the convention of TRL's
    `GKDTrainer.generalized_jsd_loss` (TRL 1.16): β = 0 *is* forward KL and β = 1 *is* reverse
    KL. Those endpoints are special cases, not limits of the formula (which tends to 0 at
    both ends); β = 0.5 is the symmetric JSD. ∂/∂log q = (1−β)·q·(log q − log m).
    """
    if beta == 0.0:
        return forward_kl(lp, lq, valid=valid, grad=grad)
    if beta == 1.0:
        return reverse_kl(lp, lq, valid=valid, grad=grad)
    lm = log_mixture(lp, lq, beta, 1.0 - beta)  # finite: (1−β)·q > 0
    student_term = (1.0 - beta) * lq.exp() * (lq - lm)  # (1−β)·KL(q‖m)'s terms, which are also ∂/∂log q
    value = _total(beta * lp.exp() * (_finite(lp) - lm) + student_term, valid)
    return value, (_kept(student_term, valid) if grad else None)


def skew_kl(lp: Tensor, lq: Tensor, *, alpha: float = 0.1, valid: Tensor | None = None, grad: bool = False):
    """Skew KL: KL(p ‖ α·p + (1−α)·q). α = 0 is forward KL; the mixture keeps the ratio p/m ≤ 1/α,
    which bounds the gradient where the student puts almost no mass.

    Source: Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models"
    (ICML 2024, arXiv 2402.03898), default α = 0.1. ∂/∂log q = −(1−α)·p·q/m.
    """
    lm = log_mixture(lp, lq, alpha, 1.0 - alpha)  # finite: (1−α)·q > 0 for α < 1
    p = lp.exp()
    value = _total(p * (_finite(lp) - lm), valid)
    if not grad:
        return value, None
    return value, _kept(-(1.0 - alpha) * (lp + lq - lm).exp(), valid)


def skew_reverse_kl(lp: Tensor, lq: Tensor, *, alpha: float = 0.1, valid: Tensor | None = None, grad: bool = False):
    """Skew reverse KL: KL(q ‖ (1−α)·p + α·q). α = 0 is reverse KL; for α > 0 it is finite even
    where the teacher has -inf (the mixture keeps α·q there).

    Source: Ko et al., DistiLLM (arXiv 2402.03898), default α = 0.1.
    ∂/∂log q = q·(log q − log m) + (1−α)·p·q/m.
    """
    if alpha == 0.0:
        return reverse_kl(lp, lq, valid=valid, grad=grad)
    lm = log_mixture(lp, lq, 1.0 - alpha, alpha)
    terms = lq.exp() * (lq - lm)
    value = _total(terms, valid)
    if not grad:
        return value, None
    return value, _kept(terms + (1.0 - alpha) * (lp + lq - lm).exp(), valid)


def total_variation(lp: Tensor, lq: Tensor, *, valid: Tensor | None = None, grad: bool = False):
    """TVD: ½·Σ |p − q|, bounded in [0, 1].

    Source: one of the objectives DistiLLM compares (Ko et al., arXiv 2402.03898), following
    Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge Distillation", arXiv 2307.15190.
    ∂/∂log q = ½·sign(q − p)·q (0 where p = q, as autograd's |x|' at 0).
    """
    p, q = lp.exp(), lq.exp()
    value = 0.5 * _total((p - q).abs(), valid)
    return value, (_kept(0.5 * torch.sign(q - p) * q, valid) if grad else None)


def per_token(kind: str, lp: Tensor, lq: Tensor, *, alpha: float = 0.1, beta: float = 0.5,
              valid: Tensor | None = None, grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """Dispatch to one objective by name: (per-token value [n], ∂value/∂log q or None)."""
    if kind == "fkl":
        return forward_kl(lp, lq, valid=valid, grad=grad)
    if kind == "rkl":
        return reverse_kl(lp, lq, valid=valid, grad=grad)
    if kind == "jsd":
        return generalized_jsd(lp, lq, beta=beta, valid=valid, grad=grad)
    if kind == "skl":
        return skew_kl(lp, lq, alpha=alpha, valid=valid, grad=grad)
    if kind == "srkl":
        return skew_reverse_kl(lp, lq, alpha=alpha, valid=valid, grad=grad)
    if kind == "tvd":
        return total_variation(lp, lq, valid=valid, grad=grad)
    raise ValueError(f"unknown objective '{kind}' (use one of: {', '.join(KINDS)})")


def logits_grad(lq: Tensor, s: Tensor, temperature: float) -> Tensor:
    """Chain rule through log q = log_softmax(z / T): ∂L/∂z = (s − q·Σs) / T."""
    return (s - lq.exp() * s.sum(-1, keepdim=True)) / temperature


# --- checks and the shared-vocabulary rule --------------------------------------------

def check_params(kind: str, alpha: float, beta: float, temperature: float) -> None:
    """Refuse settings that are meaningless, with the reason (the CLI turns these into UndoErrors)."""
    if kind not in KINDS:
        raise ValueError(f"unknown objective '{kind}' (use one of: {', '.join(KINDS)})")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha} (alpha = 1 makes skl and srkl identically 0)")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta} (0 = forward KL, 1 = reverse KL)")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def shared_vocab_size(student_size: int, teacher_size: int) -> int:
    """The number of vocabulary entries both models score.

    Models of one family sometimes pad their embedding to different sizes (Qwen2.5: 151936 in
    the small models, 152064 in 7B); the rows past the tokenizer are never real tokens. We
    compare only the shared prefix, and say so, because when the sizes differ for another
    reason (a different tokenizer) the numbers are meaningless and the caller should know.
    """
    if student_size == teacher_size:
        return student_size
    shared = min(student_size, teacher_size)
    warnings.warn(
        f"student scores {student_size} vocabulary entries and teacher {teacher_size}: comparing the "
        f"first {shared} only (fine for one tokenizer padded to different sizes; meaningless for "
        f"different tokenizers - use --objective sft there)", VocabSizeMismatchWarning, stacklevel=3)
    return shared


def select_positions(x: Tensor, mask: Tensor | None) -> Tensor:
    """[..., D] -> [n, D]: the rows where `mask` is true (all rows when mask is None)."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    if mask.shape != x.shape[:-1]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(x.shape[:-1])}")
    return x[mask.to(device=x.device, dtype=torch.bool)]


def reduce(total: Tensor, count: int, reduction: str) -> Tensor:
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(count, 1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got '{reduction}'")


# --- the reference implementation on full logits ---------------------------------------

def divergence(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None, kind: str, *,
               alpha: float = 0.1, beta: float = 0.5, temperature: float = 1.0,
               reduction: str = "mean") -> Tensor:
    """The mean (or sum) over positions where `mask` is true of the per-token divergence `kind`.

    `student_logits` and `teacher_logits` are [..., V] (any dtype; the softmax is computed in
    float32, or float64 if given), `mask` is [...] (bool, or e.g. `labels != -100`), temperature
    divides both logits. Plain autograd over the whole [positions × V] tensors: simple and exact,
    the reference the chunked versions are tested against. For long sequences and large
    vocabularies use `fused_linear_divergence` (hidden states in, no full logits).
    The teacher gets no gradient.
    """
    check_params(kind, alpha, beta, temperature)
    vocab = shared_vocab_size(student_logits.shape[-1], teacher_logits.shape[-1])
    student = select_positions(student_logits[..., :vocab], mask)
    teacher = select_positions(teacher_logits.detach()[..., :vocab], mask)
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    lq = torch.log_softmax(student.to(dtype) / temperature, dim=-1)
    lp = torch.log_softmax(teacher.to(dtype) / temperature, dim=-1)
    values, _ = per_token(kind, lp, lq, alpha=alpha, beta=beta)
    return reduce(values.sum(), student.shape[0], reduction)


def health_sums(stats: dict[str, Tensor], lp: Tensor, lq: Tensor, k: int, *, top_ids: Tensor | None = None,
                top_lp: Tensor | None = None) -> None:
    """Add a chunk's on-policy health to `stats` (0-d tensors: no host sync per chunk).

    Sums over the chunk's rows of: the teacher's entropy over the categories of `lp` (the vocabulary,
    or the K+1 top-K + tail categories: then a lower bound, merging categories lowers entropy); the
    student's entropy over the vocabulary (`lq`, a full log-softmax); and |top-k(p) ∩ top-k(q)| / k.
    For a top-K teacher, `top_ids`/`top_lp` [n, K] are its support's ids and log-probs.
    """
    with torch.no_grad():
        h_t = -(lp.exp() * lp.masked_fill(torch.isinf(lp), 0.0)).sum(-1)
        h_s = -(lq.exp() * lq.masked_fill(torch.isinf(lq), 0.0)).sum(-1)
        top_q = lq.topk(k, dim=-1).indices
        top_p = lp.topk(k, dim=-1).indices if top_ids is None else top_ids.gather(-1, top_lp.topk(k, dim=-1).indices)
        overlap = (top_q[:, :, None] == top_p[:, None, :]).any(-1).sum(-1).to(lq.dtype) / k
        for key, value in (("teacher_entropy", h_t), ("student_entropy", h_s), ("topk_overlap", overlap)):
            stats[key] = stats.get(key, 0) + value.sum()
