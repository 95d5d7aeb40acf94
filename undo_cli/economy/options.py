"""The teacher-economy settings of the stages that call the teacher (`undo generate`, `undo refine`).

    @dataclass
    class GenerateConfig(GenerationOptions, TeacherEconomyOptions):
        ...
        def __post_init__(self) -> None:
            self.check_economy_options()

    run_generation(..., economy=config.economy())

One field per flag (`--cache-dir`, `--cache/--no-cache`, `--cache-unseeded`,
`--model-revision`, `--max-teacher-tokens`, `--max-cost`, `--price-input`,
`--price-output`); keyword-only, like GenerationOptions, so a stage's required
fields still come first. `undo iterate` sets them from its own top-level keys
(one budget and one price list for the whole loop, see loop/iterate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from undo_cli.errors import UndoError

@dataclass(kw_only=True)
class TeacherEconomyOptions:
    """The teacher cache, prices and budgets (docs: undo_cli/economy/)."""

    help_group = "Teacher cache, prices and budget"  # the section of these flags in `undo generate --help`

    cache_dir: str | None = field(default=None, metadata={"help": "Teacher cache folder [default: $XDG_CACHE_HOME/undo or ~/.cache/undo]; keep it on a local disk."})
    cache: bool = field(default=True, metadata={"help": "Read and write the teacher cache (--no-cache: every answer is paid for)."})
    cache_unseeded: bool = field(default=False, metadata={"help": "Also cache sampling without --seed (a re-run then reuses the first samples instead of drawing new ones)."})
    model_revision: str | None = field(default=None, metadata={"help": "Cache key: the teacher's revision when its name does not pin the weights (a server's model name); local folders are hashed instead."})
    max_teacher_tokens: int | None = field(default=None, metadata={"help": "Stop before the teacher's paid prompt+completion tokens for this output would exceed this; re-run with more to resume."})
    max_cost: float | None = field(default=None, metadata={"help": "Stop before the teacher's cost for this output would exceed this (needs --price-input/--price-output)."})
    price_input: float | None = field(default=None, metadata={"help": "Price of a million prompt tokens (turns token counts into money)."})
    price_output: float | None = field(default=None, metadata={"help": "Price of a million completion tokens."})

    def check_economy_options(self) -> None:
        for name in ("max_teacher_tokens", "max_cost", "price_input", "price_output"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UndoError(f"--{name.replace('_', '-')} {value}: must be 0 or more")
        if self.max_cost is not None and self.price_input is None and self.price_output is None:
            raise UndoError("--max-cost needs prices to turn tokens into money",
                            hint="add --price-input and --price-output (per million tokens), or use --max-teacher-tokens")

    def economy(self):
        from undo_cli.economy.backend import EconomySettings, TeacherEconomy

        return TeacherEconomy(EconomySettings(
            cache_dir=self.cache_dir, use_cache=self.cache, cache_unseeded=self.cache_unseeded,
            model_revision=self.model_revision, max_teacher_tokens=self.max_teacher_tokens, max_cost=self.max_cost,
            price_input=self.price_input, price_output=self.price_output))
