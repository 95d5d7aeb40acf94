"""When the loop stops refining: today's patience rule, or one that counts what a round cost and proved.

    undo iterate --config run.toml --stop-rule patience                 # the default: raw accuracy, patience, min_delta
    undo iterate --config run.toml --stop-rule paired                   # the choice's paired test, patience rounds
    undo iterate --config run.toml --stop-rule value --stop-min-gain-per-ktok 0.05

Rules (each also stops at max_iterations and when no validation error is left):

* `patience`: stop after `patience` iterations without a raw validation gain of
  `min_delta` (the rule before this one; loop/rounds.decide).
* `paired`: stop when `patience` refinement rounds in a row show no evidence
  of a gain over the student kept so far: the same exact McNemar test on the
  same validation items that chooses the best iteration (loop/choose.py:
  p < choose_alpha and a gain of at least choose_min_gain), so the loop stops
  on the evidence that would have kept a student, not on a one-problem wobble.
* `value`: `paired`, or stop as soon as a round's validation gain per 1,000
  paid teacher tokens falls below `stop_min_gain_per_ktok` (points of accuracy,
  0-100, per 1,000 tokens): a round that costs much and buys little ends the
  run even if a test could still be passed later. A round the cache answered
  (no paid token) is free and never stops the run on cost.

A round's gain is its validation accuracy minus the kept student's (the one
the paired test compares it with), in points; its tokens are the paid teacher
tokens of its refine stage (loop/usage.py). Every round's numbers go to
manifest.json (`stop`): gain, paid tokens, gain per 1,000 tokens, tokens per
point of gain, the test's p-value; `undo iterate` prints them when it stops.
"""

from __future__ import annotations

from typing import Any

RULES = {"patience": "stop after `patience` iterations without a raw validation gain of min_delta (the rule before)",
         "paired": "stop when `patience` rounds in a row show no evidence of a gain in the choice's paired test",
         "value": "paired, or stop when a round's validation gain per 1,000 paid teacher tokens is below "
                  "stop_min_gain_per_ktok"}


def rounds(history: list[dict[str, Any]], tests: list[dict[str, Any]], paid: dict[int, int]) -> list[dict[str, Any]]:
    """Per refinement round k >= 1: its gain over the kept student (points), paid tokens, gain per 1,000 tokens,
    tokens per point, and the paired test (tests: choose.choose's, one per later iteration)."""
    by_k = {t["iteration"]: t for t in tests}
    out = []
    for k in range(1, len(history)):
        test = by_k.get(k)
        against = test["against"] if test else k - 1
        gain = 100.0 * (history[k]["accuracy"] - history[against]["accuracy"])
        tokens = int(paid.get(k, 0))
        out.append({"iteration": k, "against": against, "gain_points": round(gain, 3), "paid_tokens": tokens,
                    "gain_per_ktok": round(gain / (tokens / 1000), 4) if tokens else None,
                    "tokens_per_point": round(tokens / gain) if gain > 0 else None,
                    "p": test["p"] if test else None, "evidence": bool(test and test["kept"])})
    return out


def should_stop(rule: str, table: list[dict[str, Any]], patience: int, min_gain_per_ktok: float) -> str | None:
    """Why rule `rule` (not `patience`: rounds.decide keeps that one) stops after the last round, or None."""
    if not table:
        return None
    last = table[-1]
    if rule == "value" and last["gain_per_ktok"] is not None and last["gain_per_ktok"] < min_gain_per_ktok:
        return (f"round {last['iteration']} gained {last['gain_points']:+.1f} points for {last['paid_tokens']:,} paid "
                f"teacher tokens ({last['gain_per_ktok']:.3g} per 1,000 tokens, below stop_min_gain_per_ktok "
                f"{min_gain_per_ktok:g})")
    streak = 0
    for row in reversed(table):
        if row["evidence"]:
            break
        streak += 1
    if streak >= patience:
        rounds_ = f"{patience} round{'s' if patience > 1 else ''}"
        return f"the paired test found no evidence of a gain for {rounds_} (last p = {last['p']:.3f})" \
            if last["p"] is not None else f"no evidence of a gain for {rounds_}"
    return None


def describe(row: dict[str, Any]) -> str:
    """'round 2 vs 0: +3.3 points for 1,204 paid tokens (2.74 per 1,000; 365 tokens a point), p = 0.250'."""
    per = f"{row['gain_per_ktok']:.3g} per 1,000" if row["gain_per_ktok"] is not None else "no paid token"
    point = f"; {row['tokens_per_point']:,} tokens a point" if row["tokens_per_point"] is not None else ""
    p = f", p = {row['p']:.3f}" if row["p"] is not None else ""
    return (f"round {row['iteration']} vs {row['against']}: {row['gain_points']:+.1f} points for "
            f"{row['paid_tokens']:,} paid teacher tokens ({per}{point}){p}")
