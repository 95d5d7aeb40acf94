"""The names of the white-box objectives, and what each one is.

    undo train ... --objective skl --alpha 0.1 --lm-weight 1 --teacher T
    undo train ... --objective jsd --beta 0.5 --teacher-logprobs
    undo train ... --objective auto --teacher T       # exact if T shares the tokenizer, else uld/gold

Free of heavy imports: `undo train --help` lists these choices. The checks of
the objective flags live with the fields, in `training/config.py`
(`ObjectiveOptions.check_objective`), and run before any model loads. The same
rules hold for the library functions (they raise ValueError there).
"""

from __future__ import annotations

KINDS = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")   # exact-vocabulary: teacher and student share a tokenizer
CROSS_KINDS = ("uld", "gold")                          # any teacher: compared at byte-aligned spans
AUTO = "auto"
OBJECTIVES = ("sft", *KINDS, *CROSS_KINDS, AUTO)
AUTO_EXACT = "skl"     # what auto picks for identical tokenizers (DistiLLM's objective)

# What each objective is, for --help texts, errors and docs.
DESCRIPTIONS = {
    "sft": "cross-entropy on the rationale tokens (black-box; any teacher)",
    "fkl": "forward KL(p||q), classic KD",
    "rkl": "reverse KL(q||p), MiniLLM's token-level form",
    "jsd": "generalised JSD with --beta (GKD; 0 = fkl, 1 = rkl)",
    "skl": "skew KL(p || a*p + (1-a)*q) with --alpha (DistiLLM)",
    "srkl": "skew reverse KL(q || (1-a)*p + a*q) with --alpha (DistiLLM)",
    "tvd": "total variation distance",
    "uld": "ULD: L1 between sorted probability vectors at byte-aligned spans (any tokenizer; Boizard et al. 2024)",
    "gold": "GOLD-style: JSD (--beta) over the shared vocabulary + one bucket at byte-aligned spans (any tokenizer)",
    "auto": "an exact-vocabulary objective (skl) when the tokenizers are identical, a cross-tokenizer one otherwise",
}
