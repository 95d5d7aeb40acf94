"""The teacher tiers of one generating stage run: a lone teacher, or a cascade (economy/cascade.py).

    tiers = TeacherTiers(economy, config, backend)      # every tier wrapped in the stage's economy
    made = tiers.run(batch, sampling, make_records)     # per item: (records, attempts) or None (budget)

stages/generation_loop.py (`Generation`) is the only caller. Without a cascade
the one tier streams as before (`generate_stream`); with one, each batch goes
to its first tier, the rows whose answer does not verify (lineage.is_verified)
to the next, and so on, each tier one `generate` call per batch: a later tier
only ever sees the few rows the ones before could not do. The tiers share the
stage's economy: one cache (keyed by each model's identity), one ledger (a row
per tier, at its prices) and the output's budget; a tier's own budget is
checked by its wrapper (economy/backend.py).
"""

from __future__ import annotations

from typing import Any, Callable

from undo_cli.economy.accounting import Prices
from undo_cli.stages.lineage import Attempt, LineageWriter, verdict_of


class TeacherTiers:
    """The stage's teachers behind the `Backend` surface the generation loop uses, plus `run` for a cascade."""

    def __init__(self, economy: Any, config: Any, backend: Any):
        from undo_cli.backends import BackendConfig
        from undo_cli.economy.cascade import Tier, tiers_for

        self.config = config
        self.tiers = config.tiers() if hasattr(config, "tiers") else [Tier(model=backend.model, backend=backend.name)]
        self.routes = config.routes() if hasattr(config, "routes") else {}
        self.cascading = len(self.tiers) > 1 or bool(self.routes)
        self._tiers_for = tiers_for
        self.backends: dict[str, Any] = {}
        for i, tier in enumerate(self.tiers):
            if i == 0 or not isinstance(backend, BackendConfig):
                inner = backend  # the stage's own (an open one is only ever the first tier)
            else:
                inner = tier.backend_config(backend)
            # A described tier (a cascade, or [[teachers]] of one) keeps its ledger row, prices and own budget.
            described = self.cascading or bool(getattr(config, "cascade", None))
            self.backends[tier.name] = economy.wrap(inner, tier=tier if described else None)
        first = self.backends[self.tiers[0].name]
        self.name = first.name if not self.cascading else "cascade"
        self.model = first.model if not self.cascading else " -> ".join(t.name for t in self.tiers)
        self.batch_hint = min(b.batch_hint for b in self.backends.values())
        self.sort_by_length = first.sort_by_length
        self.economy = economy
        self.lineage = LineageWriter.of(config, self.tiers, self.backends)

    def prices(self, tier: Any) -> Prices:
        """What a tier's tokens cost: its wrapper's prices (its own, at the batch price on a batch API), else the
        stage's."""
        own = self.backends[tier.name].tier_prices
        return own if own is not None and own.set else self.economy.prices

    def attempt(self, tier: Any, completions, records: list[dict[str, Any]]) -> Attempt:
        tokens = (completions[0].prompt_tokens if completions else 0,
                  sum(c.completion_tokens for c in completions))
        return Attempt(tier.name, completions, records, verdict_of(records), self.prices(tier).cost(*tokens))

    # --- the Backend surface of a lone teacher ----------------------------------------------------

    def generate_stream(self, batches, sampling):
        return self.backends[self.tiers[0].name].generate_stream(batches, sampling)

    def endpoint_summary(self):
        found = [e for b in self.backends.values() for e in (b.endpoint_summary() or [])]
        return found or None

    def applied(self, sampling):
        """The first tier's settings for a lone teacher; per tier (those that opened) for a cascade."""
        if not self.cascading:
            return self.backends[self.tiers[0].name].applied(sampling)
        per_tier = {name: b.applied(sampling) for name, b in self.backends.items()}
        return {name: a for name, a in per_tier.items() if a is not None} or None

    def close(self) -> None:
        errors = []
        for b in self.backends.values():
            try:
                b.close()
            except BaseException as exc:  # close every tier, then say the first failure
                errors.append(exc)
        if errors:
            raise errors[0]

    # --- a cascade ----------------------------------------------------------------------------------

    def run(self, batch: list[Any], sampling, make_records: Callable) -> list[tuple[list[dict], list[Attempt]] | None]:
        """Per item of `batch`: (the records of its last attempt, every attempt), or None when a budget (the
        output's or a tier's) did not allow a tier it had to go to: left undone, a re-run resumes it."""
        names = [t.name for t in self.tiers]
        route = [[n for n in names if n in self._tiers_for(item.tags or {}, self.routes, names)] for item in batch]
        attempts: list[list[Attempt]] = [[] for _ in batch]
        settled = [False] * len(batch)  # verified, or its last tier answered
        left = [False] * len(batch)     # a budget stopped it
        for tier in self.tiers:
            todo = [i for i in range(len(batch)) if not settled[i] and not left[i] and tier.name in route[i]]
            if not todo:
                continue
            answers = self.backends[tier.name].generate([batch[i].messages for i in todo], sampling)
            for i, completions in zip(todo, answers):
                if completions is None:
                    left[i] = True
                    continue
                a = self.attempt(tier, completions, make_records(batch[i], completions))
                attempts[i].append(a)
                settled[i] = a.verdict == "verified" or tier.name == route[i][-1]
        return [None if left[i] or not settled[i] else (attempts[i][-1].records, attempts[i])
                for i in range(len(batch))]
