"""Where a training row came from, on the row itself: `lineage`, written by every teacher stage (generate, refine).

    undo generate ... -o r.jsonl && head -1 r.jsonl | jq .lineage
    undo lineage runs/NAME p07#0            # the row's history across iterations (undo_cli/loop/lineage.py)

Each record `undo generate` and `undo refine` write (kept, rejected, or a
refinement that kept its previous text) gets one `lineage` object:

    {"teacher": {"id": "strong", "model": "out/teacher", "backend": "hf", "hash": "3f2a...", "hash_of": "files"},
     "template": {"name": "refine", "hash": "9c1e..."},
     "sampling": {"n": 4, "temperature": 0.7, "top_p": 1.0, "max_tokens": 128, "seed": 0},
     "iteration": 1,
     "parent": {"id": "p07#0", "iteration": 0, "rationale_hash": "77b0..."},   # null for generate
     "failure_cluster": null,                   # refine: the target's cluster (--clusters), else null
     "informed_by": ["val-3", "val-9"],         # the failures shown to the teacher (refine)
     "cascade": [{"teacher": "cheap", "tokens": 310, "cost": null, "verdict": "false_step", "cached": false},
                 {"teacher": "strong", "tokens": 402, "cost": null, "verdict": "verified", "cached": false}],
     "cascade_verified": true,                  # false: no tier verified this row (done, never asked again)
     "cached": false}

(plus `"text_from": "parent"` on a refinement that did not verify: the row keeps its parent's text.)

`teacher` is the tier whose answer the record holds (with one teacher, that
teacher). Its `hash` is the teacher cache's identity of the model (the sha256
of every file of a model folder, memoised by path, size and mtime; a served
or hub model: its name and revision), cut to 16 hex digits; with `--no-cache`
a folder is hashed from its small files (config, tokenizer, generation config)
and its weight files' names and sizes (`hash_of: "config"`), without reading
gigabytes. The template's hash is of its source text. `cascade` lists every
tier this row was sent to, in order (one entry without a cascade): the
answer's tokens (prompt + completions), its cost at that tier's prices (null
without prices), the verdict (`verified`, or why not: `false_step`,
`wrong_answer`, `no_answer`, `truncated`) and whether the cache answered it
(then nothing was paid for it this time: the output's ledger counts it as cached).

Records stay plain JSONL; readers that do not know `lineage` ignore it, and
nothing that identifies a run reads it, so resume and identity checks are
unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.backends.base import Completion

_SMALL_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
                "chat_template.jinja", "special_tokens_map.json")
_hashes: dict[tuple[str, str | None], dict[str, str]] = {}  # per process: a model is hashed once


def short(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def model_hash(model: str, revision: str | None = None, identity: dict[str, Any] | None = None) -> dict[str, str]:
    """{"hash", "hash_of"}: the teacher cache's identity of the model when there is one (`identity`), else a
    cheap one (module docstring)."""
    if identity is not None:
        return {"hash": identity["digest"][:16], "hash_of": "files" if "files" in identity else "name+revision"}
    key = (model, revision)
    if key not in _hashes:
        folder = Path(model).expanduser()
        if folder.is_dir():
            h = hashlib.sha256()
            for f in sorted(folder.rglob("*")):
                rel = f.relative_to(folder)
                if not f.is_file() or "checkpoints" in rel.parts or rel.name.startswith("."):
                    continue
                if rel.name in _SMALL_FILES:
                    h.update(f"{rel.as_posix()}:{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
                else:
                    h.update(f"{rel.as_posix()}:{f.stat().st_size}\n".encode())
            _hashes[key] = {"hash": h.hexdigest()[:16], "hash_of": "config"}
        else:
            _hashes[key] = {"hash": short(f"{model}@{revision}"), "hash_of": "name+revision"}
    return _hashes[key]


def template_hash(name_or_path: str) -> dict[str, str]:
    from undo_cli.prompts import load_template, template_name

    tmpl = load_template(name_or_path)
    source = Path(tmpl.filename).read_text(encoding="utf-8") if tmpl.filename else ""
    return {"name": template_name(name_or_path), "hash": short(source)}


# How close a sample that did not verify came: the reason an attempt shows (as refine.CLOSENESS).
_CLOSENESS = ("false_step", "wrong_answer", "truncated", "no_answer")


def is_verified(record: dict[str, Any]) -> bool:
    """Did this record's new text verify? A refinement: `refinement.verified`; a rationale: `correct` and text."""
    refinement = record.get("refinement")
    if isinstance(refinement, dict) and "verified" in refinement:
        return bool(refinement["verified"])
    return bool(record.get("correct")) and bool(str(record.get("rationale") or "").strip())


def verdict_of(records: list[dict[str, Any]]) -> str:
    """`verified` when any record verified, else the reason of the one that came closest."""
    if any(is_verified(r) for r in records):
        return "verified"
    reasons = []
    for r in records:
        refinement = r.get("refinement") if isinstance(r.get("refinement"), dict) else {}
        reasons.append(refinement.get("reject_reason") or r.get("reject_reason") or "no_answer")
    known = [x for x in reasons if x in _CLOSENESS]
    return min(known, key=_CLOSENESS.index) if known else (reasons[0] if reasons else "no_answer")


@dataclass
class Attempt:
    """One tier's answer to one row (a cascade sends a row on while its tiers' answers do not verify)."""

    teacher: str
    completions: list[Completion]
    records: list[dict[str, Any]]
    verdict: str
    cost: float | None = None

    @property
    def cached(self) -> bool:
        return bool(self.completions and self.completions[0].cached)

    @property
    def tokens(self) -> int:
        if not self.completions:
            return 0
        return self.completions[0].prompt_tokens + sum(c.completion_tokens for c in self.completions)

    def to_json(self) -> dict[str, Any]:
        # The answer's tokens and cost whether paid now or answered by the cache (`cached`): a cached record is
        # the fresh one with only its cache flags flipped (the ledger says what was paid, economy/accounting.py).
        return {"teacher": self.teacher, "tokens": self.tokens,
                "cost": None if self.cost is None else round(self.cost, 8), "verdict": self.verdict,
                "cached": self.cached}


@dataclass
class LineageWriter:
    """Builds each record's `lineage` for one stage run (what is the same for every row is computed once)."""

    sampling: dict[str, Any]
    template: dict[str, str]
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)  # tier name -> {"id", "model", ...}
    cascading: bool = False

    @classmethod
    def of(cls, config: Any, tiers: list[Any], backends: dict[str, Any]) -> "LineageWriter":
        """config: the stage's (its prompt and sampling); tiers: its teachers (economy/cascade.py) and
        backends: tier name -> its economy-wrapped backend (whose `identity` is the cache's)."""
        s = config.sampling()
        writer = cls(sampling={"n": s.n, "temperature": s.temperature, "top_p": s.top_p,
                               "max_tokens": s.max_tokens, "seed": s.seed},
                     template=template_hash(config.prompt), cascading=len(tiers) > 1 or bool(getattr(config, "route", None)))
        for t in tiers:
            identity = getattr(backends.get(t.name), "identity", None)
            writer.teachers[t.name] = {"id": t.name, "model": t.model, "backend": t.backend,
                                       **model_hash(t.model, t.model_revision, identity)}
        return writer

    def attach(self, record: dict[str, Any], item: Any, attempts: list[Attempt]) -> None:
        """`record["lineage"]` for a record of the last attempt (`item`: its WorkItem; its `lineage` holds what
        the stage knows: parent, informed_by, failure_cluster)."""
        last = attempts[-1]
        extra = getattr(item, "lineage", None) or {}
        lineage: dict[str, Any] = {
            "teacher": self.teachers.get(last.teacher, {"id": last.teacher}),
            "template": self.template,
            "sampling": self.sampling,
            "iteration": record.get("iteration", (record.get("refinement") or {}).get("iteration")),
            "parent": extra.get("parent"),
            "failure_cluster": extra.get("failure_cluster"),
            "informed_by": extra.get("informed_by", []),
            "cascade": [a.to_json() for a in attempts],
            "cached": last.cached,
        }
        if (record.get("refinement") or {}).get("kept_previous"):
            lineage["text_from"] = "parent"  # the refusal kept the parent's text (and its own provenance fields)
        if self.cascading:
            lineage["cascade_verified"] = last.verdict == "verified"
        record["lineage"] = lineage
