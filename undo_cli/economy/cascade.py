"""A teacher cascade: the cheapest teacher first, a dearer one only for the rows it could not verify.

    undo generate --teacher undo-demo/models/student --cascade undo-demo/models/teacher,name=strong,price_output=2 \\
        --input train.jsonl --output rationales.jsonl
    undo generate --teacher small --backend openai --base-url http://127.0.0.1:8000/v1 --input train.jsonl \\
        --cascade 'big,backend=openai,base_url=http://127.0.0.1:8001/v1,max_teacher_tokens=200000' -o r.jsonl
    undo generate ... --route task:choice=strong          # choice problems go to the strong teacher only
    # undo iterate: [[teachers]] tables and a [teacher_routes] table in run.toml (docs/economy.md)

`--teacher` is the first tier; each `--cascade TIER` adds one after it, in
order (cheapest first). A row (one problem for generate, one target for
refine) goes to the next tier only when the previous tier's answer does not
verify (`--verify`, the stage's own check: a kept sample for generate, a
verified refinement for refine). A row no tier verifies is written with the
last tier's answer and marked so (`lineage.cascade_verified: false`; counted
as `cascade.unverified` in the summary): it is done, never asked again.

A TIER is `MODEL` followed by `,key=value` settings, all optional:
`name` (what records, routes and the ledger call it; default: the model),
`backend`, `base_url` (repeat it for replicas), `api_key_env`,
`model_revision`, `price_input`, `price_output` (per million tokens; default:
the stage's prices), `max_teacher_tokens` and `max_cost` (this tier's own
budget, within the output's). A first `--cascade` entry naming the `--teacher`
model itself describes the first tier (its name, prices, budget) instead of
adding one.

Economy: every tier shares the stage's cache (an entry's key holds the model's
identity, so tiers never answer for each other), its ledger (one row per tier,
`by_backend` keyed by the tier's name, each costed at its own prices) and its
budget (`--max-teacher-tokens`/`--max-cost` hold for all tiers together). A
row that a tier's budget (or the output's) does not allow is left undone, as
without a cascade, and a re-run with more resumes it; a dearer tier is never
paid because a cheaper one ran out.

Routes (`--route KEY=TIER[,TIER...]`) give some rows their own tiers (in the
cascade's order): KEY is `task:<task>` (the problem's task) or `cluster:<id>` (the failure
cluster of a refine target: refine's own, with `--clusters`, else the error
record's `cluster` field). The first
matching route wins (cluster before task); other rows go through every tier.

Resume: a killed cascade loses the attempts of the batch in flight; the
re-run asks the tiers again, and the cache answers what was already paid
(without `--no-cache`).

Only the standard library at import time (`undo --help` imports the config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from undo_cli.errors import SettingError, UndoError, ref

RUNTIME = {"identity": False}

# key -> (type, what it means): the settings of one tier, in --cascade's `key=value` form and in [[teachers]].
TIER_KEYS: dict[str, tuple[type, str]] = {
    "name": (str, "what records, routes and the ledger call it (default: the model)"),
    "backend": (str, "hf, openai or vllm (default: the stage's --backend)"),
    "base_url": (list, "openai backend: the server; repeat for replicas"),
    "api_key_env": (str, "openai backend: the NAME of the variable holding the key"),
    "model_revision": (str, "cache key: the weights' revision when the name does not pin them"),
    "price_input": (float, "price of a million prompt tokens (default: the stage's)"),
    "price_output": (float, "price of a million completion tokens (default: the stage's)"),
    "max_teacher_tokens": (int, "this tier's own budget of paid tokens"),
    "max_cost": (float, "this tier's own budget of money (needs prices)"),
}
ROUTE_KINDS = ("task", "cluster")


@dataclass
class Tier:
    """One teacher of a cascade, with its backend, prices and own budget (None: the stage's)."""

    model: str
    name: str = ""
    backend: str | None = None
    base_url: list[str] | None = None
    api_key_env: str | None = None
    model_revision: str | None = None
    price_input: float | None = None
    price_output: float | None = None
    max_teacher_tokens: int | None = None
    max_cost: float | None = None

    def __post_init__(self) -> None:
        self.name = self.name or self.model

    def identity(self) -> dict[str, Any]:
        """What of a tier identifies a run: the model, its backend and revision (prices, budgets and servers
        change no record)."""
        return {"name": self.name, "model": self.model, "backend": self.backend, "model_revision": self.model_revision}

    def backend_config(self, stage: Any) -> Any:
        """The BackendConfig this tier's requests go through: the stage's (`stage`) with this tier's backend, model,
        servers and key (no batch manifest: a later tier is never a batch API)."""
        from dataclasses import replace

        return replace(stage, backend=self.backend, model=self.model, batch_manifest=None, base_url=self.base_url,
                       api_key_env=self.api_key_env or stage.api_key_env)

    def identifying_spec(self) -> str:
        """The tier as a `--cascade` value holding only what identifies a run (`identity`): a shard's settings
        (stages/shards.py), the same for every shard whatever share of this tier's budget it was given."""
        return Tier(model=self.model, name=self.name, backend=self.backend, model_revision=self.model_revision).spec()

    def spec(self) -> str:
        """The tier as one `--cascade` value (the inverse of `parse_tier`)."""
        parts = [self.model]
        for key in TIER_KEYS:
            value = getattr(self, key)
            if key == "name" and value == self.model or value is None:
                continue
            for one in value if isinstance(value, list) else [value]:
                parts.append(f"{key}={one}")
        return ",".join(parts)


def _typed(key: str, value: Any, where: str) -> Any:
    kind, what = TIER_KEYS[key]
    try:
        if kind is list:
            return [str(v) for v in (value if isinstance(value, list) else [value])]
        if isinstance(value, bool):
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            out = int(value)
        elif kind is float:
            out = float(value)
        else:
            if not isinstance(value, str):
                raise ValueError
            out = value
    except (TypeError, ValueError):
        names = {int: "an integer", float: "a number", str: "text"}
        raise UndoError(f"{where}: {key} = {value!r}: expected {names[kind]}", hint=f"{key}: {what}") from None
    if kind in (int, float) and out < 0:
        raise UndoError(f"{where}: {key} = {value!r}: must be 0 or more", hint=f"{key}: {what}")
    return out


def _suggest(key: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, known, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def tier_from_mapping(data: dict[str, Any], where: str) -> Tier:
    """A tier from a [[teachers]] table (`where` names the file and the table: `run.toml: teachers[2]`)."""
    if not isinstance(data, dict):
        raise UndoError(f"{where}: expected a table (model = ..., backend = ...)",
                        hint="write each teacher as its own teachers table (its header in double square brackets) with a model key")
    if "routes" in data and isinstance(data["routes"], dict):
        raise UndoError(f"{where}: routes is a key of this teacher (TOML reads a teachers.routes table after the "
                        "teachers tables as part of the last teacher)", hint="write the routes as a teacher_routes table "
                                                                           "instead")
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise UndoError(f"{where}: model: missing or not text", hint='each teacher needs model = "FOLDER or NAME"')
    unknown = [k for k in data if k != "model" and k not in TIER_KEYS]
    if unknown:
        raise UndoError(f"{where}: unknown key '{unknown[0]}'",
                        hint=f"{_suggest(unknown[0], ['model', *TIER_KEYS])}a teacher has: model, {', '.join(TIER_KEYS)}")
    return Tier(model=model, **{k: _typed(k, v, where) for k, v in data.items() if k != "model"})


def parse_tier(text: str, where: str = "--cascade") -> Tier:
    """`MODEL[,key=value...]` (module docstring) as a Tier; an error names the part and the keys there are."""
    model, *rest = [p.strip() for p in str(text).split(",")]
    data: dict[str, Any] = {"model": model}
    for part in rest:
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise UndoError(f"{where} {text}: '{part}' is not key=value",
                            hint=f"write MODEL,key=value,...; keys: {', '.join(TIER_KEYS)}")
        if key not in TIER_KEYS:
            raise UndoError(f"{where} {text}: unknown key '{key}'",
                            hint=f"{_suggest(key, list(TIER_KEYS))}keys: {', '.join(TIER_KEYS)}")
        value = value.strip()
        if key == "base_url":
            data.setdefault("base_url", []).append(value)
        else:
            data[key] = value
    return tier_from_mapping(data, f"{where} {text}")


def parse_route(text: str, names: list[str], where: str = "--route") -> tuple[str, list[str]]:
    """`task:choice=strong` or `cluster:c3=cheap,strong` -> ("task:choice", ["strong"]) (tier names checked)."""
    key, eq, value = str(text).partition("=")
    kind, colon, what = key.strip().partition(":")
    if not eq or not colon or kind not in ROUTE_KINDS or not what:
        raise UndoError(f"{where} {text}: expected task:<task>=TIER[,TIER...] or cluster:<id>=TIER[,TIER...]",
                        hint="e.g. task:choice=strong (tiers by name, in order)")
    tiers = [t.strip() for t in value.split(",") if t.strip()]
    unknown = [t for t in tiers if t not in names]
    if not tiers or unknown:
        raise UndoError(f"{where} {text}: " + (f"no tier named '{unknown[0]}'" if unknown else "no tier given"),
                        hint=f"the tiers are: {', '.join(names)} (a tier's name=, else its model)")
    return f"{kind}:{what.strip()}", tiers


@dataclass(kw_only=True)
class CascadeOptions:
    """The cascade's flags (module docstring); a stage with a `teacher` and the economy composes them."""

    help_group = "Teacher cascade (docs/economy.md)"

    cascade: list[str] | None = field(default=None, metadata={
        "help": "A further teacher, tried for the rows the ones before could not verify (cheapest first; repeat "
                "for more): MODEL[,name=N,backend=B,base_url=URL,price_input=X,price_output=Y,"
                "max_teacher_tokens=T,max_cost=C,model_revision=R]."})
    route: list[str] | None = field(default=None, metadata={
        "help": "task:<task>=TIER[,TIER...] or cluster:<id>=TIER[,TIER...]: those rows go through these tiers "
                "only (by name, in the cascade's order; repeat --route for more routes)."})

    def check_cascade_options(self) -> None:
        from undo_cli.backends import BACKENDS, BATCH_BACKENDS, SERVED

        tiers = self.tiers()
        names = [t.name for t in tiers]
        seen: set[str] = set()
        for i, t in enumerate(tiers):
            if t.name in seen:
                raise SettingError("cascade", t.spec(), f"a second tier named '{t.name}'",
                                   hint="give each tier its own name=")
            seen.add(t.name)
            if t.backend is not None and t.backend not in BACKENDS:
                raise SettingError("cascade", t.spec(), f"unknown backend '{t.backend}'",
                                   hint=f"use one of: {', '.join(BACKENDS)}")
            if t.base_url and (t.backend or getattr(self, "backend", "hf")) not in SERVED:
                raise SettingError("cascade", t.spec(), "base_url is for a served backend (openai)",
                                   hint="add backend=openai to that tier")
            if i and t.backend in BATCH_BACKENDS:  # a row waits for the tier before it: not a 24-hour batch
                raise SettingError("cascade", t.spec(), f"a batch API ({t.backend}) can only be the first teacher",
                                   hint="make it the --teacher (with --backend), or use backend=openai for this tier")
            if i and (t.backend or "hf") not in SERVED:  # on a server the name is the server's, not a folder
                from undo_cli.model_refs import check_model_ref

                check_model_ref(t.model, ref("cascade"))
            if t.max_cost is not None and t.price_input is None and t.price_output is None:
                raise SettingError("cascade", t.spec(), "max_cost needs prices",
                                   hint="add price_input= and price_output= to that tier (or the stage's prices)")
        for text in self.route or []:
            parse_route(text, names, ref("route"))

    def tiers(self) -> list[Tier]:
        """The cascade's tiers in order, the first being `--teacher` with the stage's backend settings."""
        first = Tier(model=self.teacher, backend=self.backend, base_url=self.base_url,  # type: ignore[attr-defined]
                     api_key_env=self.api_key_env, model_revision=self.model_revision,  # type: ignore[attr-defined]
                     price_input=self.price_input, price_output=self.price_output)  # type: ignore[attr-defined]
        more = [parse_tier(t, ref("cascade")) for t in self.cascade or []]
        if more and more[0].model == first.model and (more[0].backend or first.backend) == first.backend:
            own = more.pop(0)  # describes --teacher itself: its name, prices, budget
            for key in TIER_KEYS:
                if getattr(own, key) is not None and (key != "name" or own.name != own.model):
                    setattr(first, key, getattr(own, key))
        for t in more:  # a tier's unset settings are the stage's
            t.backend = t.backend or self.backend  # type: ignore[attr-defined]
            t.api_key_env = t.api_key_env or self.api_key_env  # type: ignore[attr-defined]
            if t.price_input is None and t.price_output is None:
                t.price_input, t.price_output = self.price_input, self.price_output  # type: ignore[attr-defined]
        return [first, *more]

    def tier_backends(self) -> list[tuple[Tier, Any]]:
        """Each tier with the BackendConfig its requests go through (the first: the stage's own)."""
        stage = self.backend_config()  # type: ignore[attr-defined]
        tiers = self.tiers()
        return [(tiers[0], stage)] + [(t, t.backend_config(stage)) for t in tiers[1:]]

    @property
    def cascading(self) -> bool:
        return len(self.tiers()) > 1 or bool(self.route)

    def cascade_identity(self) -> list[dict[str, Any]] | None:
        """What of the cascade identifies a run (None without one: a lone teacher's identity is as before)."""
        if not self.cascade and not self.route:
            return None
        return [t.identity() for t in self.tiers()] + [{"route": r} for r in self.route or []]

    def routes(self) -> dict[str, list[str]]:
        names = [t.name for t in self.tiers()]
        return dict(parse_route(r, names, ref("route")) for r in self.route or [])


BUDGET_KEYS = ("max_teacher_tokens", "max_cost")


def own_budgets(cascade: list[str] | None) -> dict[str, dict[str, Any]]:
    """Tier name -> its own budget ({"max_teacher_tokens", "max_cost"}), for the `--cascade` values that set one."""
    tiers = [parse_tier(text, ref("cascade")) for text in cascade or []]
    return {t.name: {k: getattr(t, k) for k in BUDGET_KEYS} for t in tiers
            if any(getattr(t, k) is not None for k in BUDGET_KEYS)}


def with_budgets(cascade: list[str], budgets: dict[str, dict[str, Any]]) -> list[str]:
    """The `--cascade` values with the own budgets of the tiers named in `budgets` set to the values given there
    (what is left of a run's budget for one stage, loop/usage.py; a shard's share of it, stages/slurm.py)."""
    out = []
    for text in cascade:
        tier = parse_tier(text, ref("cascade"))
        for key, value in budgets.get(tier.name, {}).items():
            setattr(tier, key, value)
        out.append(tier.spec() if tier.name in budgets else text)
    return out


def tiers_for(tags: dict[str, Any], routes: dict[str, list[str]], names: list[str]) -> list[str]:
    """The tier names a row goes through, in order: its cluster's route, else its task's, else every tier."""
    for kind in ("cluster", "task"):
        value = tags.get(kind)
        if value is not None and f"{kind}:{value}" in routes:
            return routes[f"{kind}:{value}"]
    return names
