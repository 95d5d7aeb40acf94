"""Teacher tokens, requests and money: a ledger per output file, prices, and the budget check.

    ledger = Ledger.load("out/rationales.usage.json", fresh=False)
    ledger.add("openai", paid=True, prompt_tokens=91, completion_tokens=130)
    ledger.save()
    ledger.totals()   # {"paid": {...}, "cached": {...}, "by_backend": {...}}

**The ledger** (`<output stem>.usage.json` beside a stage's output, e.g.
`rationales.usage.json`) counts what the teacher was asked for that output,
per backend, split into *paid* (the model was called) and *cached* (the answer
came from the teacher cache). It is cumulative over the runs that wrote the
output (a resumed run adds to it; a fresh output starts a new one), and it is
saved right after each call to the teacher returns, before the records are
written: tokens are spent when the teacher answers, and a kill between the two
then costs nothing twice (the answer is in the cache; the resumed run counts
it as cached). A request is one prompt sent for its `n` completions; the
prompt's tokens count once per request, as servers that support `n` bill them
(the generation loop's `tokens_in` counts them the same way).

**Prices** are per million tokens, input and output (`--price-input`,
`--price-output`); cost = paid prompt tokens x input price + paid completion
tokens x output price. They are the online prices: a batch API backend
(`--backend openai-batch|anthropic-batch`) books its tokens at `BATCH_PRICE`
times them, what both APIs charge for batches. Cached tokens cost nothing; their would-be cost is
reported as `saved`.

**Budgets** (`--max-teacher-tokens`, `--max-cost`) are checked before each
request, against an upper bound of what it can cost: its prompt's length in
tokens (estimated from characters with the largest tokens-per-character ratio
measured so far on this output, 0.5 before the first answer, plus a few tokens
of chat formatting per message) plus `n x max_tokens` completion tokens. A
request that might not fit is not sent; the stage writes what finished, says
how many items are left, and a re-run with a higher budget resumes them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BATCH_PRICE = 0.5  # OpenAI's and Anthropic's batch APIs: 50% of the online price of the same tokens
INITIAL_TOKENS_PER_CHAR = 0.5  # no measurement yet: ~2 characters a token, above what English text needs
PER_MESSAGE_OVERHEAD = 8       # role markers and separators of a chat template, per message


def ledger_path(output: str) -> str | None:
    """`out/rationales.jsonl` -> `out/rationales.usage.json`; None for stdout and other streams (/dev/null)."""
    from undo_cli.records.sidecars import USAGE, sidecar_path

    return sidecar_path(output, USAGE)


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: "Usage") -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "tokens": self.tokens}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> "Usage":
        d = d or {}
        return cls(int(d.get("requests", 0)), int(d.get("prompt_tokens", 0)), int(d.get("completion_tokens", 0)))


@dataclass
class Prices:
    """Money per million tokens; None when not set (then there is no cost, only tokens)."""

    input: float | None = None
    output: float | None = None

    @property
    def set(self) -> bool:
        return self.input is not None or self.output is not None

    def at(self, factor: float) -> "Prices":
        """These prices times `factor` (the batch price: `at(BATCH_PRICE)`)."""
        return Prices(None if self.input is None else self.input * factor,
                      None if self.output is None else self.output * factor)

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float | None:
        if not self.set:
            return None
        return (prompt_tokens * (self.input or 0.0) + completion_tokens * (self.output or 0.0)) / 1e6


@dataclass
class Ledger:
    path: str | None = None
    backends: dict[str, dict[str, Usage]] = field(default_factory=dict)
    tokens_per_char: float | None = None  # the largest measured prompt tokens / prompt characters
    prices: Prices = field(default_factory=Prices)  # the cost written to the file is at these prices
    # A teacher cascade's tiers (economy/cascade.py) each at its own prices: row (tier name) -> prices.
    row_prices: dict[str, Prices] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | None, *, fresh: bool) -> "Ledger":
        from undo_cli.records import read_json

        ledger = cls(path)
        if path and not fresh and Path(path).is_file():
            try:
                data = read_json(path)
            except Exception:  # a damaged ledger costs the history of the count, never the run
                from undo_cli.console import warn

                warn(f"{path}: unreadable, token counts for this output start again from zero")
                return ledger
            ledger.backends = {b: {k: Usage.from_json(v.get(k)) for k in ("paid", "cached")}
                               for b, v in (data.get("by_backend") or {}).items()}
            ledger.tokens_per_char = data.get("tokens_per_char")
        return ledger

    def add(self, backend: str, *, paid: bool, prompt_tokens: int, completion_tokens: int, requests: int = 1) -> None:
        row = self.backends.setdefault(backend, {"paid": Usage(), "cached": Usage()})
        row["paid" if paid else "cached"].add(Usage(requests, prompt_tokens, completion_tokens))

    def measure(self, chars: int, prompt_tokens: int) -> None:
        if chars > 0 and prompt_tokens > 0:
            ratio = prompt_tokens / chars
            self.tokens_per_char = max(ratio, self.tokens_per_char or 0.0)

    def total(self, kind: str) -> Usage:
        out = Usage()
        for row in self.backends.values():
            out.add(row[kind])
        return out

    def row_cost(self, row: str, kind: str = "paid", prices: Prices | None = None) -> float | None:
        """One row's cost at its own prices (a cascade tier's), else at `prices` (default: the ledger's)."""
        usage = self.backends.get(row, {}).get(kind, Usage())
        own = self.row_prices.get(row)
        return (own if own is not None and own.set else prices or self.prices).cost(usage.prompt_tokens,
                                                                                     usage.completion_tokens)

    def cost(self, kind: str = "paid", prices: Prices | None = None) -> float | None:
        """The rows' costs added up, each at its own prices; None when no row has prices."""
        costs = [self.row_cost(row, kind, prices) for row in self.backends]
        return None if all(c is None for c in costs) else sum(c or 0.0 for c in costs)

    def totals(self, prices: Prices | None = None) -> dict[str, Any]:
        paid, cached = self.total("paid"), self.total("cached")
        prices = prices or self.prices
        by_backend = {}
        for b, row in sorted(self.backends.items()):
            by_backend[b] = {k: u.to_json() for k, u in row.items()}
            if b in self.row_prices:  # a cascade's tier: its own cost (accounting per teacher)
                by_backend[b]["cost"] = _round(self.row_cost(b, "paid", prices))
        return {
            "paid": paid.to_json(),
            "cached": cached.to_json(),
            "by_backend": by_backend,
            "cost": _round(self.cost("paid", prices)),
            "saved": _round(self.cost("cached", prices)),
        }

    def save(self) -> None:
        if self.path:
            from undo_cli.records import write_json

            write_json(self.path, {**self.totals(), "prices": {"input": self.prices.input, "output": self.prices.output},
                                   "tokens_per_char": self.tokens_per_char})


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def prompt_chars(messages: list[dict[str, str]]) -> int:
    return sum(len(m.get("content") or "") for m in messages)


@dataclass
class Budget:
    """--max-teacher-tokens / --max-cost for one output (paid tokens only; module docstring)."""

    max_tokens: int | None = None
    max_cost: float | None = None
    prices: Prices = field(default_factory=Prices)

    @property
    def active(self) -> bool:
        return self.max_tokens is not None or self.max_cost is not None

    def bound(self, ledger: Ledger, messages: list[dict[str, str]], n: int, max_tokens: int) -> tuple[int, int]:
        """Upper bound (prompt tokens, completion tokens) of one request."""
        ratio = ledger.tokens_per_char or INITIAL_TOKENS_PER_CHAR
        prompt = math.ceil(prompt_chars(messages) * ratio) + PER_MESSAGE_OVERHEAD * (len(messages) + 1)
        return prompt, n * max_tokens

    def fits(self, spent: Usage, prompt: int, completion: int, *, spent_cost: float | None = None,
             prices: Prices | None = None) -> bool:
        """Would `prompt` + `completion` more tokens stay within the budget? spent_cost: what was spent so far
        when it is not `spent` at this budget's prices (a cascade's tiers, each at its own); prices: the
        request's (its tier's)."""
        if self.max_tokens is not None and spent.tokens + prompt + completion > self.max_tokens:
            return False
        if self.max_cost is not None:
            if spent_cost is None:
                cost = self.prices.cost(spent.prompt_tokens + prompt, spent.completion_tokens + completion) or 0.0
            else:
                cost = spent_cost + ((prices or self.prices).cost(prompt, completion) or 0.0)
            if cost > self.max_cost + 1e-12:
                return False
        return True

    def left(self, spent: Usage, spent_cost: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.max_tokens is not None:
            out["tokens_left"] = max(0, self.max_tokens - spent.tokens)
        if self.max_cost is not None:
            if spent_cost is None:
                spent_cost = self.prices.cost(spent.prompt_tokens, spent.completion_tokens) or 0.0
            out["cost_left"] = _round(max(0.0, self.max_cost - spent_cost))
        return out


def read_ledger(path: str | Path) -> dict[str, Any] | None:
    """A ledger file as written by `Ledger.save`, or None if there is none (or it is torn)."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "paid" in data else None


def sum_ledgers(paths: list[str]) -> dict[str, Any] | None:
    """The ledgers at `paths` (shards of one output) added up, as one ledger file holds them; None if none exists.

    Costs add up as each ledger recorded them (at the prices its shard ran with); the prices are kept when
    every ledger had the same.
    """
    found = [(p, data) for p in paths if p and (data := read_ledger(p)) is not None]
    if not found:
        return None
    merged = Ledger()
    for path, _ in found:
        one = Ledger.load(path, fresh=False)
        for backend, row in one.backends.items():
            for kind, usage in row.items():
                merged.add(backend, paid=kind == "paid", prompt_tokens=usage.prompt_tokens,
                           completion_tokens=usage.completion_tokens, requests=usage.requests)
        if one.tokens_per_char is not None:
            merged.tokens_per_char = max(one.tokens_per_char, merged.tokens_per_char or 0.0)

    def added(key: str) -> float | None:
        values = [data.get(key) for _, data in found]
        return None if all(v is None for v in values) else _round(sum(v or 0.0 for v in values))

    totals = merged.totals()
    for backend, row in totals["by_backend"].items():  # a cascade tier's own cost, as each shard's ledger has it
        costs = [((data.get("by_backend") or {}).get(backend) or {}).get("cost") for _, data in found]
        if any(c is not None for c in costs):
            row["cost"] = _round(sum(c or 0.0 for c in costs))
    prices = [data.get("prices") for _, data in found]
    return {**totals, "cost": added("cost"), "saved": added("saved"),
            "prices": prices[0] if all(p == prices[0] for p in prices) else None,
            "tokens_per_char": merged.tokens_per_char, "merged_from": len(found)}


def merge_ledgers(paths: list[str], output: str) -> dict[str, Any] | None:
    """`undo merge`: the shards' ledgers added up (`sum_ledgers`) and written beside the merged `output`
    (`rationales.usage.json`), so later stages and the report count the tokens the shards paid for."""
    out_path, data = ledger_path(output), sum_ledgers(paths)
    if out_path is None or data is None:
        return None
    from undo_cli.records import write_json

    write_json(out_path, data)
    return data
