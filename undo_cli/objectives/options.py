"""The objective flags of `undo train`, checked before torch is imported.

    undo train ... --objective skl --alpha 0.1 --lm-weight 1 --teacher T
    undo train ... --objective jsd --beta 0.5 --teacher-logprobs

This module is deliberately free of heavy imports: `TrainConfig.__post_init__`
calls `check_objective_flags`, so a wrong combination of flags fails in a
fraction of a second with a message naming the fix, before any model loads.
The same rules hold for the library functions (they raise ValueError there).
"""

from __future__ import annotations

from typing import Any

from undo_cli.errors import UndoError

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


def check_objective_flags(config: Any) -> None:
    """Refuse meaningless combinations of --objective/--teacher/--teacher-logprobs/--alpha/... (UndoError)."""
    objective = config.objective
    live, offline = config.teacher is not None, bool(config.teacher_logprobs)
    if objective not in OBJECTIVES:
        raise UndoError(f"--objective {objective}: unknown objective",
                        hint="use one of: " + "; ".join(f"{k} = {v}" for k, v in DESCRIPTIONS.items()))
    if objective == "sft":
        if live or offline:
            raise UndoError(f"{'--teacher' if live else '--teacher-logprobs'} only matters for a white-box "
                            "objective; --objective sft trains on the rationale text alone",
                            hint=f"add --objective skl (or one of {', '.join(KINDS)}), or drop the teacher flag")
        return
    if live and offline:
        raise UndoError("--teacher and --teacher-logprobs contradict each other",
                        hint="use a live --teacher MODEL, or the log-probs recorded in --data (--teacher-logprobs)")
    if not (live or offline):
        raise UndoError(f"--objective {objective} needs --teacher MODEL or --teacher-logprobs",
                        hint="--teacher loads a teacher that shares the student's tokenizer; --teacher-logprobs "
                             "uses rationales generated with `undo generate --logprobs K`; --objective sft needs "
                             "neither")
    if not 0.0 <= config.alpha < 1.0:
        raise UndoError(f"--alpha {config.alpha}: must be in [0, 1)",
                        hint="DistiLLM uses 0.1; 0 turns skl into fkl and srkl into rkl; 1 makes both identically 0")
    if not 0.0 <= config.beta <= 1.0:
        raise UndoError(f"--beta {config.beta}: must be in [0, 1]",
                        hint="0 = forward KL, 1 = reverse KL, 0.5 (default, GKD/TRL) = symmetric JSD")
    if not config.temperature > 0.0:
        raise UndoError(f"--temperature {config.temperature}: must be > 0", hint="1 (default) leaves the logits as they are")
    if offline and config.temperature != 1.0:
        raise UndoError(f"--temperature {config.temperature} needs a live --teacher",
                        hint="the recorded top-K log-probs do not say how the teacher's tail reshapes at another "
                             "temperature; drop --temperature or use --teacher MODEL")
    if not config.kd_weight > 0.0:
        raise UndoError(f"--kd-weight {config.kd_weight}: must be > 0",
                        hint="use --objective sft for cross-entropy alone")
    if config.lm_weight < 0.0:
        raise UndoError(f"--lm-weight {config.lm_weight}: must be >= 0",
                        hint="0 (default) trains on the divergence alone; DistiLLM adds 1.0")
    if config.kd_chunk_size < 1:
        raise UndoError(f"--kd-chunk-size {config.kd_chunk_size}: must be at least 1",
                        hint="1024 tokens per chunk bounds the float32 work to ~1024 x vocab values")
