"""Before any call: an upper bound of the teacher tokens (and cost) of `undo generate` over a problems file.

    undo iterate --config examples/run.toml --dry-run --price-input 0.15 --price-output 0.60

`undo iterate --dry-run` shows it for iteration 0 (the generate stage over
train_file; later iterations refine only the errors, which are not known before
a student exists). Each problem is one request for its `n` samples, and a
request's prompt tokens count once, as the ledger counts them (accounting.py),
so the bound is

    sum over problems of (prompt tokens + n x max_tokens)

with every sample running to max_tokens and no answer taken from the teacher
cache. The prompts are the ones generate sends (same template, few-shot
examples, `limit`: the caller passes `generate.work_items(config)`'s). Their length is counted with the teacher's own tokenizer
and chat template when that loads without the network (a local folder, or a
hub name already in the local hub cache); no model is loaded. Otherwise it is
estimated from characters at the budget check's conservative ratio (2
characters a token, plus a few tokens of chat formatting per message), and the
result says so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from undo_cli.backends import BATCH_BACKENDS
from undo_cli.economy.accounting import BATCH_PRICE, INITIAL_TOKENS_PER_CHAR, PER_MESSAGE_OVERHEAD, Prices, _round, prompt_chars


def _local_tokenizer(name: str, trust_remote_code: bool) -> tuple[Any | None, str]:
    """The teacher's tokenizer if it loads with no network (else None), and why not."""
    from undo_cli.gguf_models import existing, is_gguf
    from undo_cli.model_refs import _cached

    if is_gguf(name):  # a dry run never converts: the conversion made earlier, if any
        folder = existing(name)
        if folder is None:
            return None, f"{name} is not converted yet (the first stage that loads it converts it)"
        name = str(folder)
    local = Path(name).expanduser().is_dir()
    if not local and not _cached(name):
        return None, f"{name} is not a local folder nor in the local hub cache"
    try:
        from transformers import AutoTokenizer

        from undo_cli.console import quiet_transformers

        quiet_transformers()
        kwargs = {"trust_remote_code": True} if trust_remote_code else {}
        # local_files_only: a dry run never downloads, even with the hub reachable
        return AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if local else name,
                                             local_files_only=True, **kwargs), ""
    except Exception as exc:  # a folder without tokenizer files: the estimate still helps, from characters
        return None, f"its tokenizer did not load ({type(exc).__name__})"


def estimate_generate(prompts: list[list[dict[str, str]]], config, *, max_teacher_tokens: int | None = None,
                      max_cost: float | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """Upper bound of the paid teacher tokens (and cost) of sending `prompts` (one request each, for `config.n`
    samples of at most `config.max_tokens`) to `config.teacher`: `undo generate`'s prompts (generate.work_items)."""
    lengths, counted = _prompt_tokens(prompts, config.teacher, trust_remote_code)
    completion = config.n * config.max_tokens
    prompt_total, completion_total = sum(lengths), completion * len(lengths)
    prices = Prices(config.price_input, config.price_output)
    out: dict[str, Any] = {
        "upper_bound": True,
        "assumes": "every sample runs to max_tokens; no answer from the teacher cache",
        "problems": len(prompts), "requests": len(prompts), "n": config.n, "max_tokens": config.max_tokens,
        "prompt_tokens": prompt_total, "prompt_tokens_from": counted,
        "completion_tokens": completion_total, "tokens": prompt_total + completion_total,
        "cost": _round(prices.cost(prompt_total, completion_total)),
        "prices": {"input": prices.input, "output": prices.output} if prices.set else None,
        # the same tokens through a batch API (--backend openai-batch|anthropic-batch), side by side
        "cost_batch": _round(prices.at(BATCH_PRICE).cost(prompt_total, completion_total)),
        "backend": getattr(config, "backend", None),
    }
    batch = out["backend"] in BATCH_BACKENDS  # its budget is spent at the batch price
    booked = prices.at(BATCH_PRICE) if batch else prices
    out["budget"] = _coverage(lengths, completion, {**out, "cost": out["cost_batch"] if batch else out["cost"]},
                              booked, max_teacher_tokens, max_cost)
    return out


def _prompt_tokens(prompts: list[list[dict[str, str]]], teacher: str, trust_remote_code: bool) -> tuple[list[int], str]:
    """Each prompt's length in tokens (the teacher's tokenizer, or the budget check's estimate); and how."""
    count, counted = prompt_counter(teacher, trust_remote_code)
    return [count(m) for m in prompts], counted


def prompt_counter(teacher: str, trust_remote_code: bool = False):
    """(messages -> prompt tokens, how they are counted): the teacher's tokenizer and chat template when it loads
    without the network, else the budget check's estimate from characters (as Budget.bound). `undo refine
    --budget N-tokens` prices its targets with it, as the dry run prices iteration 0."""
    from undo_cli.prompts import encode_prompt

    tokenizer, why = _local_tokenizer(teacher, trust_remote_code)
    if tokenizer is not None:  # what the hf backend sends
        return (lambda m: len(encode_prompt(tokenizer, m))), f"counted with the teacher's tokenizer ({teacher})"
    counted = (f"estimated from characters at {1 / INITIAL_TOKENS_PER_CHAR:g} characters a token "
               f"+ {PER_MESSAGE_OVERHEAD} a message ({why})")
    return (lambda m: math.ceil(prompt_chars(m) * INITIAL_TOKENS_PER_CHAR) + PER_MESSAGE_OVERHEAD * (len(m) + 1)), \
        counted


def _coverage(prompts: list[int], completion: int, out: dict[str, Any], prices: Prices,
              max_teacher_tokens: int | None, max_cost: float | None) -> dict[str, Any] | None:
    """How much of the bound a budget covers: problems in file order, each at its upper bound."""
    budget: dict[str, Any] = {}
    if max_teacher_tokens is not None or max_cost is not None:
        spent_p = spent_c = covered = 0
        for p in prompts:
            p_next, c_next = spent_p + p, spent_c + completion
            if max_teacher_tokens is not None and p_next + c_next > max_teacher_tokens:
                break
            if max_cost is not None and (prices.cost(p_next, c_next) or 0.0) > max_cost + 1e-12:
                break
            spent_p, spent_c, covered = p_next, c_next, covered + 1
        budget = {"max_teacher_tokens": max_teacher_tokens, "max_cost": max_cost, "covers_problems": covered,
                  "covers_all": covered == len(prompts)}
        if max_teacher_tokens is not None:
            budget["tokens_fraction"] = round(min(1.0, max_teacher_tokens / out["tokens"]), 4) if out["tokens"] else 1.0
        if max_cost is not None and out["cost"]:
            budget["cost_fraction"] = round(min(1.0, max_cost / out["cost"]), 4)
    return budget or None


def describe(est: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, value) rows for people (the dry run's table)."""
    rows = [("problems (one request each)", f"{est['problems']:,} x n={est['n']}"),
            ("prompt tokens", f"{est['prompt_tokens']:,}  ({est['prompt_tokens_from']})"),
            ("completion tokens, at most", f"{est['completion_tokens']:,}  (n x max_tokens {est['max_tokens']} "
                                           "per problem)"),
            ("teacher tokens, upper bound", f"{est['tokens']:,}  ({est['assumes']})")]
    if est["cost"] is not None:
        p = est["prices"]
        batch = est.get("backend") in BATCH_BACKENDS  # the chosen backend: its row reads "upper bound"
        rows.append(("cost online" if batch else "cost, upper bound",
                     f"{est['cost']:,.6g}  (per million tokens: input {p['input'] or 0:g}, output {p['output'] or 0:g})"))
        if est.get("cost_batch") is not None:
            rows.append(("cost through a batch API" + (", upper bound" if batch else ""),
                         f"{est['cost_batch']:,.6g}  (at {BATCH_PRICE:.0%} of the online price; results within 24 h"
                         + ("; the chosen backend)" if batch else ")")))
    b = est.get("budget")
    if b:
        limits = " and ".join(s for s in (
            f"--max-teacher-tokens {b['max_teacher_tokens']:,}" if b["max_teacher_tokens"] is not None else "",
            f"--max-cost {b['max_cost']:g}" if b["max_cost"] is not None else "") if s)
        if b["covers_all"]:
            rows.append(("budget", f"{limits} covers all of it"))
        else:
            shares = ", ".join(f"{b[k]:.0%} of the {what}" for k, what in (("tokens_fraction", "tokens"),
                                                                            ("cost_fraction", "cost")) if k in b)
            fit = (f"the first {b['covers_problems']:,} of {est['problems']:,} problems" if b["covers_problems"]
                   else "not even the first problem")
            rows.append(("budget", f"{limits} covers {shares}: {fit} at their upper bound (the stage stops cleanly "
                                   "there; re-run with more to resume)"))
    return rows


def estimate_tiers(prompts: list[list[dict[str, str]]], config, *, trust_remote_code: bool = False) -> list[dict[str, Any]]:
    """A teacher cascade's tiers (economy/cascade.py), each bounded as if every problem reached it: the cascade
    can cost at most their sum, and a tier's own budget is said against its bound."""
    from types import SimpleNamespace

    out = []
    for tier in config.tiers():
        own = Prices(tier.price_input, tier.price_output)
        prices = own if own.set else Prices(config.price_input, config.price_output)
        view = SimpleNamespace(teacher=tier.model, n=config.n, max_tokens=config.max_tokens,
                               price_input=prices.input, price_output=prices.output)
        out.append({"teacher": tier.name, **estimate_generate(
            prompts, view, max_teacher_tokens=tier.max_teacher_tokens, max_cost=tier.max_cost,
            trust_remote_code=trust_remote_code)})
    return out


def describe_tiers(tiers: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(what, value) rows: each tier's bound, and its own budget's coverage."""
    rows = []
    for t in tiers:
        cost = f", cost {t['cost']:,.6g}" if t["cost"] is not None else ""
        rows.append((f"tier {t['teacher']}, upper bound", f"{t['tokens']:,} tokens{cost} (if every problem "
                                                           f"reached it; {t['prompt_tokens_from']})"))
        b = t.get("budget")
        if b:
            rows.append((f"tier {t['teacher']}, own budget", "covers all of it" if b["covers_all"] else
                         f"covers the first {b['covers_problems']:,} of {t['problems']:,} problems at their bound"))
    return rows
