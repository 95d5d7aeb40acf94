"""White-box distillation objectives: the student learns the teacher's token distribution.

    from undo_cli.objectives import divergence, fused_linear_divergence
    loss = divergence(student_logits, teacher_logits, labels != -100, "skl", alpha=0.1)

Six per-token divergences (docs/objectives.md), teacher p, student q, float32 softmax of
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

Two more for a teacher with another tokenizer (`cross_tokenizer.py`), compared at
byte-aligned spans of the same text (`undo_cli.tokenization`):

    uld   Σ_i |q̂_(i) − p̂_(i)|, sorted probabilities    ULD (Boizard et al., arXiv 2402.12030)
    gold  JSD_β over the shared vocabulary + a bucket  the matched half of TRL's GOLD hybrid loss

docs/objectives.md has the formulas, sources, conventions and memory figures.
"""

from __future__ import annotations

import importlib
from typing import Any

from undo_cli.objectives.options import CROSS_KINDS, KINDS, OBJECTIVES

# Imported on first use (PEP 562): `options` (the CLI's flag checks) must not pull in torch.
_EXPORTS = {
    "chunked": ("DEFAULT_CHUNK_SIZE", "chunked_divergence", "fused_linear_divergence"),
    "divergences": ("VocabSizeMismatchWarning", "divergence", "forward_kl", "reverse_kl", "generalized_jsd",
                    "skew_kl", "skew_reverse_kl", "total_variation", "per_token", "shared_vocab_size"),
    "cross_tokenizer": ("SpanRows", "FullTeacher", "TopKTeacher", "cross_loss", "cross_tokenizer_divergence"),
    "offline": ("AlignmentCounts", "align_teacher_logprobs", "collate_teacher_topk", "fused_linear_topk_divergence",
                "parse_teacher_logprobs", "topk_divergence"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["CROSS_KINDS", "KINDS", "OBJECTIVES", *_WHERE]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"undo_cli.objectives.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'undo_cli.objectives' has no attribute '{name}'")
