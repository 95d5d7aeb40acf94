"""The teacher-economy settings, declared once: every config that calls the teacher composes them.

    @dataclass
    class GenerateConfig(GenerationOptions, TeacherEconomyOptions):
        ...
        def __post_init__(self) -> None:
            self.check_economy_options()

    Generation(..., economy=config.economy())

One field per flag (`--cache-dir`, `--cache/--no-cache`, `--cache-unseeded`,
`--model-revision`, `--max-teacher-tokens`, `--max-cost`, `--price-input`,
`--price-output`); keyword-only, like GenerationOptions, so a stage's required
fields still come first. `undo generate` and `undo refine` take them as flags
(the budget then holds for that output); `undo iterate` composes the same class
(loop/iterate.py: one cache, one price list and one budget for the whole run,
which it shares out among its teacher stages and their shards).

Only the teacher's revision identifies a run (it says which weights answered);
the others change no record (`identity: False`): a killed run resumes with a
higher budget, other prices or another cache folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from undo_cli.errors import SettingError, UndoError, ref

RUNTIME = {"identity": False}  # not part of what identifies a run (undo_cli/identity.py)


@dataclass(kw_only=True)
class TeacherEconomyOptions:
    """The teacher cache, prices and budgets (docs: undo_cli/economy/, docs/economy.md)."""

    help_group = "Teacher economy (docs/economy.md)"  # the section of these flags in `undo generate --help` etc.

    cache_dir: str | None = field(default=None, metadata={**RUNTIME, "help": "Teacher cache folder [default: $UNDO_CACHE_DIR, else $XDG_CACHE_HOME/undo or ~/.cache/undo]; keep it on a local disk."})
    cache: bool = field(default=True, metadata={**RUNTIME, "help": "Read and write the teacher cache (--no-cache: every answer is paid for)."})
    cache_unseeded: bool = field(default=False, metadata={**RUNTIME, "help": "Also cache sampling without a seed (a re-run then reuses the first samples instead of drawing new ones)."})
    model_revision: str | None = field(default=None, metadata={"affects": ("generate", "refine"), "help": "Cache key: the teacher's revision when its name does not pin the weights (a server's model name); local folders are hashed instead."})
    max_teacher_tokens: int | None = field(default=None, metadata={**RUNTIME, "help": "Stop before the teacher's paid prompt+completion tokens would exceed this (for this output; in `undo iterate`, for the whole run); re-run with more to resume."})
    max_cost: float | None = field(default=None, metadata={**RUNTIME, "help": "Stop before the teacher's cost would exceed this (needs prices), like --max-teacher-tokens."})
    price_input: float | None = field(default=None, metadata={**RUNTIME, "help": "Price of a million prompt tokens (turns token counts into money)."})
    price_output: float | None = field(default=None, metadata={**RUNTIME, "help": "Price of a million completion tokens."})

    def check_economy_options(self) -> None:
        for name in ("max_teacher_tokens", "max_cost", "price_input", "price_output"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SettingError(name, value, "must be 0 or more")
        if self.max_cost is not None and self.price_input is None and self.price_output is None:
            raise UndoError(f"{ref('max_cost')} needs prices to turn tokens into money", setting="max_cost",
                            hint=f"add {ref('price_input')} and {ref('price_output')} (per million tokens), or use "
                                 f"{ref('max_teacher_tokens')}")

    def economy(self):
        """The cache, ledger and budget around a stage's backend (economy/backend.py), for these settings."""
        from undo_cli.economy.backend import TeacherEconomy

        return TeacherEconomy(self)


def economy_fields() -> list[str]:
    """The names of the economy settings, in order."""
    import dataclasses

    return [f.name for f in dataclasses.fields(TeacherEconomyOptions)]
