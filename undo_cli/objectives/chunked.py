"""Memory-bounded objectives: process tokens in chunks, never the whole [tokens × vocab] at once.

    loss = fused_linear_divergence(student_hidden, student.lm_head.weight,
                                   teacher_hidden, teacher.lm_head.weight,
                                   mask, "skl", chunk_size=1024)
    loss.backward()   # grads reach student_hidden (and so the body) and the lm_head weight

Why: at vocabulary 152k an 8k-token batch has 1.2 G logits per model. In float32
that is 5 GB per tensor, and the naive loss keeps several of them alive (both
models' logits, their log-softmaxes, the probabilities, the mixture, their
gradients). That, not the model, is what runs out of memory.

How (the approach of Liger-Kernel's fused linear losses, written from scratch
here): a custom `torch.autograd.Function` whose *forward* walks the tokens in
chunks of `chunk_size`. For each chunk it

  1. projects the chunk's final hidden states through the output layer
     (student and teacher) to get [chunk × V] logits,
  2. computes the per-token divergence and its gradient with respect to the
     student logits analytically (`divergences.py`: ∂/∂log q, then one chain
     rule through log_softmax),
  3. immediately turns that into the gradient for the chunk's hidden states
     (g @ W) and adds its share to the output layer's gradient (gᵀ @ h),

then drops every [chunk × V] tensor before the next chunk. `backward` only
scales the stored gradients by the incoming grad_output.

Why this and not `torch.utils.checkpoint` per chunk: checkpointing also bounds
peak memory by the chunk, but it runs every chunk's projection and softmax
twice (forward, then again in backward) and still lets autograd keep ~8
[chunk × V] intermediates during the recomputation. Computing the gradient in
the forward pass does each matmul once (2 forward + 2 backward, the same count
as the naive loss), so it costs no extra time; the price is that the gradient
is computed even when only the value is needed, which we skip when no input
requires grad (evaluation).

Peak memory is then: the output layer's gradient (one weight-sized tensor, kept
in the weight's dtype and accumulated per chunk like Liger does) + the hidden
states' gradient ([tokens × hidden], small) + a handful of [chunk × V] float32
temporaries. `bench/objectives.py` measures it against the naive loss.

Limits: the output layer must be a plain linear map without bias, logit
soft-capping or logit scaling (Llama, Qwen2, Mistral, ...); for other heads use
`chunked_divergence` on the model's logits, which still bounds the float32
intermediates and gradient by the chunk. The result cannot be backpropagated
twice (retain_graph) unless the incoming gradient is 1: the stored gradients
are scaled in place.
"""

from __future__ import annotations

from typing import Callable

import torch

from undo_cli.objectives.divergences import (check_params, health_sums, logits_grad, per_token, reduce,
                                              select_positions, shared_vocab_size)

Tensor = torch.Tensor

DEFAULT_CHUNK_SIZE = 1024

# A chunk function: (start, end, student logits of rows start:end as float32 [c, V], need_grad)
#   -> (sum of the chunk's per-token values, ∂(that sum)/∂logits [c, V] or None).
ChunkFn = Callable[[int, int, Tensor, bool], tuple[Tensor, Tensor | None]]


class ChunkedObjective(torch.autograd.Function):
    """Sum over chunks of `chunk_fn`, times `scale`, with the gradient computed chunk by chunk in forward.

    `student` is either final hidden states [n, H] (then `weight` is the output layer [V, H]
    and logits are formed per chunk) or logits [n, V] (`weight` None).
    """

    @staticmethod
    def forward(ctx, student: Tensor, weight: Tensor | None, chunk_fn: ChunkFn, chunk_size: int,
                scale: float) -> Tensor:
        want_input = ctx.needs_input_grad[0]
        want_weight = weight is not None and ctx.needs_input_grad[1]
        need = want_input or want_weight
        grad_input = torch.empty_like(student) if want_input else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        # float32 for the softmax work (float64 when given float64: the tests' gradcheck).
        dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=dtype, device=student.device)
        for start in range(0, student.shape[0], chunk_size):
            end = min(start + chunk_size, student.shape[0])
            rows = student[start:end]
            # A fresh tensor either way: chunk functions may work on it in place.
            logits = (rows @ weight.T).to(dtype) if weight is not None else rows.to(dtype, copy=True)
            value, g = chunk_fn(start, end, logits, need)
            del logits
            total += value
            if not need:
                continue
            if scale != 1.0:
                g.mul_(scale)
            if weight is None:
                grad_input[start:end] = g
            else:
                g = g.to(weight.dtype)
                if want_input:
                    grad_input[start:end] = g @ weight
                if want_weight:
                    # The weight's gradient is accumulated in the weight's own dtype (fp32 accumulation
                    # inside the matmul, one rounding per chunk), as Liger-Kernel does, to avoid a
                    # second float32 copy of a [V, H] matrix on bf16 models.
                    grad_weight.addmm_(g.T, rows.to(weight.dtype))
            del g
        ctx.save_for_backward(grad_input, grad_weight)
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad_input, grad_weight = ctx.saved_tensors
        if float(grad_output) != 1.0:
            # Scaling in place saves a weight-sized copy; a second backward through the same graph
            # then fails loudly (the saved tensors' version changed) instead of scaling twice.
            for grad in (grad_input, grad_weight):
                if grad is not None:
                    grad.mul_(grad_output.to(grad.dtype))
        return grad_input, grad_weight, None, None, None


def log_softmax_(z: Tensor) -> Tensor:
    """log_softmax over the last dimension, in place: one [chunk × V] tensor fewer at the peak."""
    return z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))


def live_teacher_chunk_fn(teacher: Tensor, teacher_weight: Tensor | None, kind: str, *, alpha: float,
                          beta: float, temperature: float, vocab: int, stats: dict[str, Tensor] | None = None,
                          overlap_k: int = 20) -> ChunkFn:
    """A chunk function against a live teacher: `teacher` is its hidden states [n, H_t] (with
    `teacher_weight` [V_t, H_t]) or its logits [n, V_t]; only the first `vocab` entries are used.
    `stats`: accumulate the on-policy health sums (`divergences.health_sums`)."""

    def chunk_fn(start: int, end: int, z: Tensor, need: bool):
        with torch.no_grad():  # nothing flows into the teacher
            rows = teacher[start:end].to(z.device)
            if teacher_weight is not None:
                lp = (rows @ teacher_weight[:vocab].T).to(z.dtype)
            else:  # a copy: the caller's teacher logits must not change
                lp = rows[:, :vocab].to(z.dtype, copy=True)
            lp = log_softmax_(lp.div_(temperature))
            lq = log_softmax_(z.div_(temperature))  # z is this chunk's own temporary
            values, s = per_token(kind, lp, lq, alpha=alpha, beta=beta, grad=need)
            if stats is not None:
                health_sums(stats, lp, lq, min(overlap_k, vocab))
            del lp
            g = logits_grad(lq, s, temperature) if need else None
            return values.sum(), g

    return chunk_fn


def with_cross_entropy(kd_fn: ChunkFn | None, targets: Tensor, *, kd_weight: float = 1.0, lm_weight: float = 0.0,
                       totals: dict[str, Tensor] | None = None) -> ChunkFn:
    """kd_weight × (the divergence of `kd_fn`) + lm_weight × cross-entropy on `targets` [n], in one pass.

    DistiLLM trains on skl + 1.0 × the language-model loss; computing both from the same chunk
    of student logits costs one projection instead of two. `totals`, when given, accumulates
    the unweighted sums 'kd' and 'ce' and the count of arg-max hits 'correct' (0-d tensors), for logging.
    `kd_fn` None means cross-entropy alone (plain SFT, memory-bounded).
    """

    def chunk_fn(start: int, end: int, z: Tensor, need: bool):
        with torch.no_grad():
            t = targets[start:end].to(z.device)[:, None]
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            ce = (lse - z.gather(-1, t)).sum()
            correct = (z.argmax(-1, keepdim=True) == t).sum()
            ce_grad = None
            if need and lm_weight:  # ∂CE/∂z = softmax(z) − onehot(target), formed before kd_fn reuses z
                ce_grad = (z - lse).exp_()
                ce_grad.scatter_add_(-1, t, torch.full_like(t, -1.0, dtype=z.dtype))
            kd, g = kd_fn(start, end, z, need and kd_weight != 0) if kd_fn is not None else (ce.new_zeros(()), None)
            if totals is not None:  # tensors: no host sync per chunk
                for key, value in (("kd", kd), ("ce", ce), ("correct", correct)):
                    totals[key] = totals.get(key, 0) + value.detach()
            value = kd_weight * kd + lm_weight * ce
            if not need:
                return value, None
            if g is None:
                g = ce_grad.mul_(lm_weight) if ce_grad is not None else z.new_zeros(z.shape)
            else:
                g.mul_(kd_weight)
                if ce_grad is not None:
                    g.add_(ce_grad, alpha=lm_weight)
            return value, g

    return chunk_fn


def reduction_scale(count: int, reduction: str) -> float:
    """What the sum over `count` positions is multiplied by: 1/count for 'mean', 1 for 'sum'."""
    return float(reduce(torch.ones(()), count, reduction))


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")


def fused_linear_divergence(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                            teacher_weight: Tensor, mask: Tensor | None, kind: str, *, alpha: float = 0.1,
                            beta: float = 0.5, temperature: float = 1.0,
                            chunk_size: int = DEFAULT_CHUNK_SIZE, reduction: str = "mean") -> Tensor:
    """`divergence(student_hidden @ Wsᵀ, teacher_hidden @ Wtᵀ, mask, kind)` without building either logits tensor.

    `student_hidden` [..., H_s] and `teacher_hidden` [..., H_t] are the final hidden states
    (after the last norm) at the positions whose next token is scored, `mask` [...] picks the
    positions that count (e.g. shifted `labels != -100`); the weights are the output layers
    [V_s, H_s] and [V_t, H_t]. Different padded vocabulary sizes are sliced to the shared
    size with a `VocabSizeMismatchWarning`. Gradients reach `student_hidden` and
    `student_weight`; none reach the teacher.
    """
    check_params(kind, alpha, beta, temperature)
    _check_chunk_size(chunk_size)
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student hidden states {tuple(student_hidden.shape)} and teacher's "
                         f"{tuple(teacher_hidden.shape)} must cover the same positions")
    vocab = shared_vocab_size(student_weight.shape[0], teacher_weight.shape[0])
    hs = select_positions(student_hidden, mask)
    ht = select_positions(teacher_hidden.detach(), mask)
    fn = live_teacher_chunk_fn(ht, teacher_weight.detach(), kind, alpha=alpha, beta=beta,
                               temperature=temperature, vocab=vocab)
    return ChunkedObjective.apply(hs, student_weight[:vocab], fn, chunk_size, reduction_scale(hs.shape[0], reduction))


def chunked_divergence(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None, kind: str, *,
                       alpha: float = 0.1, beta: float = 0.5, temperature: float = 1.0,
                       chunk_size: int = DEFAULT_CHUNK_SIZE, reduction: str = "mean") -> Tensor:
    """`divergence(...)` on logits the model already produced, with float32 work bounded by the chunk.

    For output layers `fused_linear_divergence` cannot fuse (soft-capping, scaling, bias,
    LoRA on the head): the logits themselves are whole, but the float32 softmaxes, mixtures
    and autograd intermediates exist for one chunk at a time.
    """
    check_params(kind, alpha, beta, temperature)
    _check_chunk_size(chunk_size)
    vocab = shared_vocab_size(student_logits.shape[-1], teacher_logits.shape[-1])
    zs = select_positions(student_logits[..., :vocab], mask)
    zt = select_positions(teacher_logits.detach(), mask)
    fn = live_teacher_chunk_fn(zt, None, kind, alpha=alpha, beta=beta, temperature=temperature, vocab=vocab)
    return ChunkedObjective.apply(zs, None, fn, chunk_size, reduction_scale(zs.shape[0], reduction))
