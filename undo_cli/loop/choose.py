"""Which iteration's student the loop keeps: a later one only when it is better on the same validation items.

    undo iterate --config run.toml --choose-alpha 0.05 --choose-min-gain 0.02   # the defaults

The raw maximum of validation accuracy picks a later student on a one-problem
wobble (39 -> 40 of 90), which then does worse on test as often as better.
So the choice is a paired test on the very items both students answered:

1. Iteration 0 (one-shot distillation) is the kept student to begin with.
2. Each later iteration k is compared with the kept one on the validation
   items both answered: `gained` items k gets right and the kept one wrong,
   `lost` the other way round. Exact McNemar test: under "no difference" each
   discordant item is a fair coin, so the two-sided p-value is
   2 * P(Binomial(gained + lost, 1/2) <= min(gained, lost)), capped at 1
   (McNemar 1947; the exact binomial form, e.g. Fagerland, Lydersen and
   Laake 2013, BMC Med Res Methodol 13:91).
3. k becomes the kept student only if it gained more than it lost, p <
   `alpha`, AND its accuracy gain on those items is at least `min_gain`
   (0-1): significance alone on a large validation set would keep a
   difference too small to matter.

Ties and small wobbles therefore keep the earlier student. The stopping rule
(rounds.decide: patience, min_delta) still looks at raw accuracy, so the loop
goes on exploring while accuracy moves; only the choice is tested. Every
comparison (gained, lost, n, p, gain, kept or not) goes to manifest.json and
summary.json (`choice`) and is printed under the table.
"""

from __future__ import annotations

from math import comb
from pathlib import Path
from typing import Any

ALPHA = 0.05     # the usual 5% level, two-sided
MIN_GAIN = 0.02  # 2 points: on the demo's 300 validation problems, six problems net


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (an exact binomial test with p = 1/2)."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(new: dict[str, bool], kept: dict[str, bool]) -> dict[str, Any]:
    """The paired comparison of two students' outcomes (id -> correct) on the items both answered."""
    shared = sorted(set(new) & set(kept))
    gained = sum(new[i] and not kept[i] for i in shared)
    lost = sum(kept[i] and not new[i] for i in shared)
    n = len(shared)
    return {"n": n, "gained": gained, "lost": lost, "gain": (gained - lost) / n if n else 0.0,
            "p": mcnemar_exact(gained, lost)}


def choose(outcomes: list[dict[str, bool] | None], alpha: float = ALPHA,
           min_gain: float = MIN_GAIN) -> tuple[int | None, list[dict[str, Any]]]:
    """(kept iteration, one comparison per later iteration) from each iteration's validation outcomes.

    `outcomes[k]` is iteration k's {problem id: correct} (None: not evaluated, skipped)."""
    scored = [k for k, o in enumerate(outcomes) if o]
    if not scored:
        return None, []
    best, tests = scored[0], []
    for k in scored[1:]:
        test = {"iteration": k, "against": best, **compare(outcomes[k], outcomes[best])}
        test["kept"] = test["gained"] > test["lost"] and test["p"] < alpha and test["gain"] >= min_gain - 1e-12
        tests.append(test)
        if test["kept"]:
            best = k
    return best, tests


def read_outcomes(path: Path) -> dict[str, bool] | None:
    """id -> correct from a predictions file (undo evaluate's), or None when there is none."""
    import json

    if not path.is_file():
        return None
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            out[str(record["id"])] = bool(record.get("correct"))
    return out


def describe(test: dict[str, Any], alpha: float | None = None, min_gain: float | None = None) -> str:
    """One line: 'iteration 2 vs 0: +7/-1 of 90 (+6.7 points), exact McNemar p = 0.070: not kept'."""
    rule = ""
    if alpha is not None and min_gain is not None:
        rule = f" (needs p < {alpha:g} and at least {100 * min_gain:+.1f} points)"
    return (f"iteration {test['iteration']} vs {test['against']}: +{test['gained']}/-{test['lost']} of {test['n']} "
            f"({100 * test['gain']:+.1f} points), exact McNemar p = {test['p']:.3f}: "
            + ("kept" if test["kept"] else "not kept" + rule))
