"""White-box distillation objectives: the student learns the teacher's token distribution.

    from undo_cli.objectives import divergence, fused_linear_divergence
    loss = divergence(student_logits, teacher_logits, labels != -100, "skl", alpha=0.1)

Six per-token divergences (SPEC.md §2), teacher p, student q, float32 softmax of
logits / temperature, averaged over the positions where the mask is true:

    fkl   KL(p ‖ q)                                       classic KD (Hinton et al., arXiv 1503.02531)
    rkl   KL(q ‖ p)                                       MiniLLM, token level (arXiv 2306.08543)
    jsd   β·KL(p ‖ m) + (1−β)·KL(q ‖ m), m = β·p+(1−β)·q  GKD (arXiv 2306.13649), TRL's convention
    skl   KL(p ‖ α·p + (1−α)·q)                           DistiLLM (arXiv 2402.03898)
    srkl  KL(q ‖ (1−α)·p + α·q)                           DistiLLM
    tvd   ½·Σ |p − q|                                     DistiLLM's comparison (arXiv 2307.15190)

Three ways to compute them, one set of formulas (`divergences.py`):

* `divergence` — full logits, plain autograd: the simple reference.
* `fused_linear_divergence` / `chunked_divergence` (`chunked.py`) — tokens in
  chunks, gradients formed per chunk; the fused version takes final hidden
  states and output layers, so neither model's [tokens × vocab] logits ever
  exist whole. This is what `undo train` uses.
* `fused_linear_topk_divergence` / `topk_divergence` (`offline.py`) — against
  the teacher's recorded top-K log-probabilities plus a tail bucket, with no
  teacher loaded; the module docstring states the approximation.

docs/objectives.md has the formulas, sources, conventions and memory figures.
"""

from undo_cli.objectives.chunked import DEFAULT_CHUNK_SIZE, chunked_divergence, fused_linear_divergence
from undo_cli.objectives.divergences import (KINDS, VocabSizeMismatchWarning, divergence, forward_kl,
                                              generalized_jsd, per_token, reverse_kl, shared_vocab_size,
                                              skew_kl, skew_reverse_kl, total_variation)
from undo_cli.objectives.offline import (AlignmentCounts, align_teacher_logprobs, collate_teacher_topk,
                                         fused_linear_topk_divergence, parse_teacher_logprobs, topk_divergence)

__all__ = [
    "KINDS", "DEFAULT_CHUNK_SIZE", "VocabSizeMismatchWarning",
    "divergence", "chunked_divergence", "fused_linear_divergence",
    "topk_divergence", "fused_linear_topk_divergence",
    "parse_teacher_logprobs", "align_teacher_logprobs", "collate_teacher_topk", "AlignmentCounts",
    "forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl", "total_variation",
    "per_token", "shared_vocab_size",
]
