"""The teacher economy of `undo iterate`: one budget for the whole run, shared out, and the tokens per iteration.

    settings = teacher_settings(config, manifest, "iter_01/refine")   # the stage's economy fields
    summary = within_budget("iter_01/refine", refine.run(cfg))         # BudgetReached if it stopped
    usage_by_iteration("runs/NAME")                                     # manifest.json's teacher_usage

The run's `max_teacher_tokens` / `max_cost` hold for all its teacher stages
together: each stage is given what the others have not spent (their summaries'
`teacher_usage`, counted against its own ledger, which also holds its earlier
attempts), and a sharded stage shares its part out among its shards
(stages/slurm.py). A stage the budget stops keeps what it finished and is
marked `budget` in the manifest; `--resume` with a larger budget continues it
(budgets, prices and the cache folder do not identify a run). The loop's
cache, prices and teacher revision go to every teacher stage as they are.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from undo_cli.economy.accounting import Prices, Usage, _round, ledger_path, read_ledger


class BudgetReached(Exception):
    """A teacher stage stopped at the run's budget; RunFolder.step marks it 'budget' (not done)."""

    stage_status = "budget"

    def __init__(self, key: str, summary: dict[str, Any]):
        self.summary = summary
        left = summary.get("left_by_budget", 0)
        self.reason = (f"teacher budget reached in {key} ({left} items left); resume with --resume and a higher "
                       "max_teacher_tokens / max_cost to continue")
        super().__init__(self.reason)
        self.message = self.reason


def within_budget(key: str, summary: dict[str, Any]) -> dict[str, Any]:
    """A teacher stage's summary, or BudgetReached when the budget left items undone."""
    if summary.get("left_by_budget"):
        raise BudgetReached(key, summary)
    return summary


def _spent(manifest: dict[str, Any], but: str) -> tuple[int, float]:
    """Paid teacher tokens and cost of the run's teacher stages other than `but` (that one's ledger has its own)."""
    tokens, cost = 0, 0.0
    for key, stage in manifest.get("stages", {}).items():
        usage = (stage.get("summary") or {}).get("teacher_usage")
        if key != but and usage:
            tokens += usage["paid"]["tokens"]
            cost += usage.get("cost") or 0.0
    return tokens, cost


def teacher_settings(config: Any, manifest: dict[str, Any], key: str) -> dict[str, Any]:
    """The economy fields of teacher stage `key`: the loop's own (one declaration, economy/options.py) with what
    is left of the run's budget after the other stages."""
    from undo_cli.economy.options import economy_fields

    settings = {name: getattr(config, name) for name in economy_fields()}
    tokens, cost = _spent(manifest, key)
    if config.max_teacher_tokens is not None:
        settings["max_teacher_tokens"] = max(0, config.max_teacher_tokens - tokens)
    if config.max_cost is not None:
        settings["max_cost"] = max(0.0, config.max_cost - cost)
    return settings


def record_usage(folder) -> None:
    """manifest.json's teacher_usage: paid/cached tokens, requests and cost per iteration, and in total."""
    folder.manifest["teacher_usage"] = usage_by_iteration(folder.path)
    folder.save()


def usage_by_iteration(run_dir: str | Path, prices: Prices | None = None) -> dict[str, Any]:
    """Teacher usage per iteration of a run folder, with running totals (for manifest.json and the report).

    prices: recompute costs at these prices (else each ledger's own cost, at the prices its stage ran with).
    """
    from undo_cli.loop.layout import RunLayout

    layout = RunLayout(Path(run_dir))
    rows = []
    paid_total, cached_total = Usage(), Usage()
    cost_total: float | None = None
    for d in sorted(Path(run_dir).glob("iter_*")):
        m = re.fullmatch(r"iter_(\d+)", d.name)
        if not m:
            continue
        k = int(m.group(1))
        output = layout.rationales() if k == 0 else layout.refined(k)  # iteration 0 generates, later ones refine
        ledger = read_ledger(ledger_path(str(output)))
        if ledger is None:
            continue
        paid, cached = Usage.from_json(ledger["paid"]), Usage.from_json(ledger["cached"])
        cost = prices.cost(paid.prompt_tokens, paid.completion_tokens) if prices and prices.set else ledger.get("cost")
        paid_total.add(paid)
        cached_total.add(cached)
        if cost is not None:
            cost_total = (cost_total or 0.0) + cost
        rows.append({"iteration": k, "paid": paid.to_json(), "cached": cached.to_json(), "cost": _round(cost),
                     "paid_tokens_cumulative": paid_total.tokens, "cost_cumulative": _round(cost_total)})
    return {"iterations": rows, "total": {"paid": paid_total.to_json(), "cached": cached_total.to_json(),
                                          "cost": _round(cost_total)}}


def tier_budgets(cascade: dict[str, Any], manifest: dict[str, Any], key: str) -> dict[str, Any]:
    """A cascade's settings for teacher stage `key` (IterateConfig.cascade_settings) with each tier's own budget
    reduced by what that tier spent in the run's other teacher stages (their ledgers' row of that tier)."""
    if not cascade.get("cascade"):
        return cascade
    from undo_cli.economy.cascade import own_budgets, with_budgets

    left = {}
    for name, budget in own_budgets(cascade["cascade"]).items():
        tokens, cost = 0, 0.0
        for other, stage in manifest.get("stages", {}).items():
            row = (((stage.get("summary") or {}).get("teacher_usage") or {}).get("by_backend") or {}).get(name)
            if other != key and row:
                tokens += row["paid"]["tokens"]
                cost += row.get("cost") or 0.0
        left[name] = {"max_teacher_tokens": None if budget["max_teacher_tokens"] is None else
                      max(0, budget["max_teacher_tokens"] - tokens),
                      "max_cost": None if budget["max_cost"] is None else max(0.0, budget["max_cost"] - cost)}
    return {**cascade, "cascade": with_budgets(cascade["cascade"], left)}
