"""The teacher economy around any backend: cache lookups, token ledger and budget, once for every stage.

    economy = config.economy()        # TeacherEconomy(config): its economy fields (options.py)
    economy.begin("out/rationales.jsonl", fresh=False)   # loads the output's ledger
    llm = economy.wrap(BackendConfig(backend="openai", model="m", base_url=...))
    results = llm.generate(prompts, sampling)             # None where the budget left a prompt undone
    economy.summary()                                     # teacher_usage + budget, for the stage summary

`stages/generation_loop.py` (`Generation(..., economy=...)`) is the only caller, so
`generate` and `refine` (and any stage that passes an economy) get it with no
code of their own. The wrapper has the `Backend` interface (base.py), with two
differences the loop knows about: a prompt the budget does not allow comes
back as None instead of a list of completions, and each completion says
whether it came from the cache (`Completion.cached`).

The real backend is opened only on the first cache miss: a run whose every
answer is cached never loads the teacher (minutes for a 30B model on vLLM) and
never connects to a server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.backends.base import Completion, Message, SamplingConfig, one_batch_at_a_time
from undo_cli.economy.accounting import BATCH_PRICE, Budget, Ledger, Prices, Usage, ledger_path, prompt_chars
from undo_cli.errors import UndoError


def cacheable(sampling: SamplingConfig, unseeded_ok: bool) -> bool:
    """Greedy and seeded sampling reproduce an answer; unseeded sampling is cached only when asked to."""
    return sampling.temperature == 0 or sampling.seed is not None or unseeded_ok


class TeacherEconomy:
    """The cache, ledger and budget of one output. `settings`: anything with the fields of
    `TeacherEconomyOptions` (options.py): a stage's config."""

    def __init__(self, settings: Any):
        self.settings = settings
        from undo_cli.backends import BATCH_BACKENDS

        self.prices = Prices(settings.price_input, settings.price_output)
        if getattr(settings, "backend", None) in BATCH_BACKENDS:  # booked at what a batch costs
            self.prices = self.prices.at(BATCH_PRICE)
        self.budget = Budget(settings.max_teacher_tokens, settings.max_cost, self.prices)
        self.ledger = Ledger()
        self.run_paid = Usage()       # this run only (the ledger also holds earlier runs on the same output)
        self.left = 0                 # prompts the budget did not allow
        self.cache = None
        self.identity: dict[str, Any] | None = None
        self.load_s = 0.0             # time spent opening the real backend (on the first miss)
        self.tier_limits: dict[str, dict[str, Any]] = {}  # a cascade tier's own budget, by tier name

    def limits(self) -> dict[str, Any]:
        """The budget this output runs under (what a shard stopped by it records): the output's, and under
        `tiers` each cascade tier's own where one has one (stages/slurm.py compares it with the share it gave)."""
        out: dict[str, Any] = {"max_teacher_tokens": self.budget.max_tokens, "max_cost": self.budget.max_cost}
        if self.tier_limits:
            out["tiers"] = dict(sorted(self.tier_limits.items()))
        return out

    def begin(self, output: str, *, fresh: bool) -> None:
        self.ledger = Ledger.load(ledger_path(output), fresh=fresh)
        self.ledger.prices = self.prices

    def wrap(self, backend: Any, tier: Any = None) -> "EconomyBackend":
        """`backend` (a BackendConfig, opened on the first miss, or an open backend) inside the cache, ledger and
        budget. tier: a cascade's tier (economy/cascade.py): its ledger row, prices, own budget and revision."""
        from undo_cli.backends import BackendConfig

        identity = None
        if self.settings.cache:
            from undo_cli.economy.cache import TeacherCache, default_cache_dir

            if self.cache is None:
                self.cache = TeacherCache(self.settings.cache_dir or default_cache_dir())
            config = backend if isinstance(backend, BackendConfig) else None
            revision = tier.model_revision if tier is not None else self.settings.model_revision
            identity = self.cache.model_identity(
                backend.model if config is None else config.model, revision=revision,
                adapter=config.adapter if config is not None else None)
            if self.identity is None:
                self.identity = identity
        wrapped = EconomyBackend(self, backend, identity=identity)
        if tier is not None:
            from undo_cli.backends import BATCH_BACKENDS

            wrapped.row = tier.name
            wrapped.tier_prices = Prices(tier.price_input, tier.price_output)
            if tier.backend in BATCH_BACKENDS:  # booked at what a batch costs, as the stage's own prices
                wrapped.tier_prices = wrapped.tier_prices.at(BATCH_PRICE)
            wrapped.tier_budget = Budget(tier.max_teacher_tokens, tier.max_cost, wrapped.tier_prices)
            if wrapped.tier_budget.active:
                self.tier_limits[tier.name] = {"max_teacher_tokens": tier.max_teacher_tokens, "max_cost": tier.max_cost}
            self.ledger.row_prices[tier.name] = wrapped.tier_prices
        return wrapped

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def summary(self) -> dict[str, Any]:
        totals = self.ledger.totals(self.prices)
        paid = self.ledger.total("paid")
        out: dict[str, Any] = {"teacher_usage": {**totals, "this_run_paid": self.run_paid.to_json(),
                                                 "cache": str(self.cache_path) if self.cache_path else None}}
        if self.budget.active:
            out["budget"] = {"max_teacher_tokens": self.budget.max_tokens, "max_cost": self.budget.max_cost,
                             "stopped": self.left > 0, "items_left": self.left,
                             **self.budget.left(paid, self.ledger.cost("paid", self.prices) or 0.0)}
        return out

    @property
    def cache_path(self) -> Path | None:
        if not self.settings.cache:
            return None
        from undo_cli.economy.cache import FILENAME, default_cache_dir

        return Path(self.settings.cache_dir or default_cache_dir()).expanduser() / FILENAME

    def rows(self) -> list[tuple[str, str]]:
        """Rows for the stage's summary table."""
        s = self.summary()
        u = s["teacher_usage"]
        rows = [("teacher tokens paid / cached",
                 f"{u['paid']['tokens']:,} ({u['paid']['requests']} req) / {u['cached']['tokens']:,} "
                 f"({u['cached']['requests']} req)")]
        if u["cost"] is not None:
            rows.append(("teacher cost (saved by cache)", f"{u['cost']:.4f} ({u['saved']:.4f})"))
        if "budget" in s:
            b = s["budget"]
            left = ", ".join(f"{k.split('_')[0]} {v:,}" if isinstance(v, int) else f"{k.split('_')[0]} {v:.4f}"
                             for k, v in b.items() if k in ("tokens_left", "cost_left"))
            rows.append(("budget left", left + (f"; {b['items_left']} items not done" if b["stopped"] else "")))
        return rows


@dataclass
class _Call:
    """One batch on its way through the economy: what the cache answered, and which prompts go to the backend."""

    prompts: list[list[Message]]
    results: list[list[Completion] | None]
    keys: list[str] | None = None  # cache keys, when this sampling is cacheable
    send: list[int] = field(default_factory=list)  # indices of the misses the budget admitted, in order

    def sent_prompts(self) -> list[list[Message]]:
        return [self.prompts[i] for i in self.send]


class EconomyBackend:
    """A `Backend` that answers from the cache when it can and calls the real one (opened lazily) otherwise."""

    def __init__(self, economy: TeacherEconomy, backend: Any, identity: dict[str, Any] | None = None):
        from undo_cli.backends import SORT_BY_LENGTH, BackendConfig, batch_hint

        self.economy = economy
        self.identity = identity  # the model's identity in the cache key (None: no cache)
        self.row: str | None = None  # the ledger row: a cascade tier's name, else the backend's name
        self.tier_prices: Prices | None = None
        self.tier_budget: Budget | None = None  # a cascade tier's own budget, within the output's
        self._config = backend if isinstance(backend, BackendConfig) else None
        self._inner = None if self._config is not None else backend
        if self._config is not None:  # not opened yet: what it will be once open
            self.name, self.model = self._config.backend, self._config.model
            self.batch_hint, self.sort_by_length = batch_hint(self._config), SORT_BY_LENGTH[self._config.backend]
        else:
            self.name, self.model = backend.name, backend.model
            self.batch_hint, self.sort_by_length = backend.batch_hint, backend.sort_by_length

    @property
    def ledger_row(self) -> str:
        return self.row or self.name

    def _backend(self):
        if self._inner is None:
            import time

            from undo_cli.backends import open_backend

            started = time.perf_counter()
            self._inner = open_backend(self._config)
            self.economy.load_s += time.perf_counter() - started
        return self._inner

    def _cache_call(self, fn, default):
        """A cache read or write; if the store fails (disk full, read-only), warn once and go on without it."""
        import sqlite3

        try:
            return fn()
        except sqlite3.Error as exc:
            from undo_cli.console import warn

            warn(f"the teacher cache {self.economy.cache.path} failed ({exc}); continuing without it for this run")
            self.economy.close()
            return default

    def generate(self, prompts: list[list[Message]], sampling: SamplingConfig) -> list[list[Completion] | None]:
        call = self._look_up(prompts, sampling)
        answers = self._backend().generate(call.sent_prompts(), sampling) if call.send else []
        return self._record(call, answers)

    def generate_stream(self, batches, sampling: SamplingConfig):
        """`generate` per batch through the real backend's stream (openai: the next batch's requests run
        while one finishes). With a budget, one batch at a time: what a batch may send depends on what the
        ones before it spent. The real backend still opens only at the first batch with a miss."""
        if self.economy.budget.active or (self.tier_budget is not None and self.tier_budget.active):
            yield from one_batch_at_a_time(self, batches, sampling)
            return
        batches = iter(batches)
        for prompts in batches:  # answered from the cache until the first miss
            call = self._look_up(prompts, sampling)
            if call.send:
                break
            yield self._record(call, [])
        else:
            return
        ahead = [call]  # looked up, sent, not answered yet: at most the real backend's one batch ahead

        def sent():
            yield call.sent_prompts()
            for prompts in batches:
                ahead.append(self._look_up(prompts, sampling))
                yield ahead[-1].sent_prompts()

        for answers in self._backend().generate_stream(sent(), sampling):
            yield self._record(ahead.pop(0), answers)

    def _look_up(self, prompts: list[list[Message]], sampling: SamplingConfig) -> "_Call":
        """Cache hits counted in the ledger; the misses the budget admits are the call's `send`."""
        e = self.economy
        call = _Call(prompts, [None] * len(prompts))
        if e.cache is not None and cacheable(sampling, e.settings.cache_unseeded):
            from undo_cli.economy.cache import request_key

            call.keys = [request_key(self.identity["digest"], p, sampling) for p in prompts]
            hits = self._cache_call(lambda: e.cache.get_many(call.keys), {})
            for i, key in enumerate(call.keys):
                if key in hits:
                    call.results[i] = hits[key]
                    e.ledger.add(self.ledger_row, paid=False, prompt_tokens=hits[key][0].prompt_tokens if hits[key] else 0,
                                 completion_tokens=sum(c.completion_tokens for c in hits[key]))
        misses = [i for i, r in enumerate(call.results) if r is None]
        call.send = self._admit(prompts, misses, sampling)
        e.left += len(misses) - len(call.send)
        return call

    def _record(self, call: "_Call", answers: list[list[Completion]]) -> list[list[Completion] | None]:
        """The real backend's answers into the call's results, the ledger and the cache."""
        e = self.economy
        if len(answers) != len(call.send):
            raise UndoError(f"backend {self.name} returned {len(answers)} results for {len(call.send)} prompts",
                            hint="this is a bug in the backend; please report it")
        for i, completions in zip(call.send, answers):
            if completions is None:  # a batch API request that failed for good: left undone, nothing paid
                e.left += 1
                continue
            call.results[i] = completions
            prompt = completions[0].prompt_tokens if completions else 0
            completion = sum(c.completion_tokens for c in completions)
            e.ledger.add(self.ledger_row, paid=True, prompt_tokens=prompt, completion_tokens=completion)
            e.ledger.measure(prompt_chars(call.prompts[i]), prompt)
            e.run_paid.add(Usage(1, prompt, completion))
        if answers and call.keys is not None and e.cache is not None:
            self._cache_call(lambda: e.cache.put_many((call.keys[i], self.identity, completions)
                                                      for i, completions in zip(call.send, answers)
                                                      if completions is not None), None)
        e.ledger.save()
        return call.results

    def _admit(self, prompts, misses: list[int], sampling: SamplingConfig) -> list[int]:
        """The misses the budget allows (the output's, and a cascade tier's own), in order; the first that might
        not fit ends the admission."""
        budget, tier = self.economy.budget, self.tier_budget
        if not budget.active and not (tier is not None and tier.active):
            return misses
        ledger, prices = self.economy.ledger, self.tier_prices
        spent = ledger.total("paid")
        planned = Usage(spent.requests, spent.prompt_tokens, spent.completion_tokens)
        planned_cost = ledger.cost("paid", self.economy.prices) or 0.0
        mine = ledger.backends.get(self.ledger_row, {}).get("paid", Usage())
        tier_planned = Usage(mine.requests, mine.prompt_tokens, mine.completion_tokens)
        admitted = []
        for i in misses:
            prompt, completion = budget.bound(ledger, prompts[i], sampling.n, sampling.max_tokens)
            if budget.active and not budget.fits(planned, prompt, completion, spent_cost=planned_cost, prices=prices):
                break
            if tier is not None and tier.active and not tier.fits(tier_planned, prompt, completion):
                break
            planned.add(Usage(1, prompt, completion))
            tier_planned.add(Usage(1, prompt, completion))
            step = ((prices if prices is not None and prices.set else self.economy.prices).cost(prompt, completion)
                    or 0.0)
            planned_cost += step
            admitted.append(i)
        return admitted

    def applied(self, sampling: SamplingConfig) -> dict[str, Any] | None:
        """The real backend's settings; None while every answer came from the cache (it never opened)."""
        return self._inner.applied(sampling) if self._inner is not None else None

    def endpoint_summary(self) -> list[dict[str, Any]] | None:
        """The openai backend's per-server counts, when it was opened (a fully cached run opens nothing)."""
        return self._inner.endpoint_summary() if self._inner is not None else None

    def close(self) -> None:
        try:
            if self._inner is not None and self._config is not None:
                self._inner.close()  # ours; a backend handed to us open stays the caller's to close
        finally:
            self.economy.close()

    def __enter__(self) -> "EconomyBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
