"""The names of the white-box objectives, and what each one is.

    undo train ... --objective skl --alpha 0.1 --lm-weight 1 --teacher T
    undo train ... --objective jsd --beta 0.5 --teacher-logprobs

Free of heavy imports: `undo train --help` lists these choices. The checks of
the objective flags live with the fields, in `training/config.py`
(`ObjectiveOptions.check_objective`), and run before any model loads. The same
rules hold for the library functions (they raise ValueError there).
"""

from __future__ import annotations

KINDS = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")
OBJECTIVES = ("sft", *KINDS)

# What each objective is, for --help texts, errors and docs.
DESCRIPTIONS = {
    "sft": "cross-entropy on the rationale tokens (black-box; any teacher)",
    "fkl": "forward KL(p||q), classic KD",
    "rkl": "reverse KL(q||p), MiniLLM's token-level form",
    "jsd": "generalised JSD with --beta (GKD; 0 = fkl, 1 = rkl)",
    "skl": "skew KL(p || a*p + (1-a)*q) with --alpha (DistiLLM)",
    "srkl": "skew reverse KL(q || (1-a)*p + a*q) with --alpha (DistiLLM)",
    "tvd": "total variation distance",
}
