"""A teacher with another tokenizer in `undo train`: choosing the objective, aligning the text, the loss.

    undo train --objective auto --teacher Qwen/Qwen2.5-1.5B-Instruct --student HuggingFaceTB/SmolLM2-360M-Instruct ...
    undo train --objective gold --teacher T --teacher-url http://127.0.0.1:8000/v1 --student S ...
    undo generate --teacher T --logprobs 20 ... && undo train --objective uld --teacher-logprobs --student S ...

`choose` decides which objective runs and records why (train_summary.json's
`objective.requested` / `objective.why`): the teacher's tokenizer is loaded (only
the tokenizer) and compared with the student's token by token
(`undo_cli.tokenization.compare`). Identical: any objective; `auto` runs skl.
Different: an exact-vocabulary objective (fkl ... tvd) is refused, naming uld,
gold and auto; `auto` runs gold when the shared vocabulary covers at least half of
the student's response tokens in the data, else uld.

A cross-tokenizer run then works on the same text in both tokenizations:

* **live** (`--teacher T`): each example's prompt messages are rendered with the
  *teacher's* chat template and the rationale tokenised by the teacher
  (`prompts.encode_example` with the teacher's tokenizer); the teacher runs on
  that sequence, frozen, in the same step as the student.
* **served** (`--teacher T --teacher-url URL`): the same teacher sequence, as
  token ids, is scored by the vLLM server (`prompt_logprobs`, top `--teacher-top-k`
  per position, training/served_teacher.py); the teacher's tokenizer must load here
  (to tokenise for it) and is checked against the server's `/tokenize`.
* **offline** (`--teacher-logprobs`): the records' `teacher_logprobs` (top-K per
  generated token) and `teacher_offsets` (each generated token's UTF-8 byte span
  in the rationale, written by `undo generate --logprobs K`): no teacher at all for
  `uld`; `gold` also needs the teacher's tokenizer (from the records' `teacher`) to
  know which recorded tokens the student's vocabulary has.

Each example's response is cut into byte-aligned spans (`tokenization.align_spans`)
over the text both sides spell (the rationale; the two end-of-turn markers differ
after it and are not distilled, as TRL's GOLD skips EOS by default). Examples
whose tokens do not spell their text (a tokenizer that normalises it) are counted
and train on the LM term only. The loss is objectives/cross_tokenizer.py's
`cross_loss`. Not supported here: the student's own samples (on-policy,
adaptive, MiniLLM), which would have to be re-tokenised for the teacher.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from undo_cli.console import warn
from undo_cli.errors import UndoError
from undo_cli.objectives.cross_tokenizer import SpanRows, TopKTeacher, cross_loss, live_teacher
from undo_cli.objectives.options import AUTO, AUTO_EXACT, CROSS_KINDS, DESCRIPTIONS, KINDS
from undo_cli.training.config import TrainConfig

GOLD_COVERAGE = 0.5   # auto: gold when the shared vocabulary holds at least this share of the student's response tokens
CROSS_HINT = ("use --objective uld or gold (cross-tokenizer: compared at byte-aligned spans of the same text), or "
              "--objective auto to pick; --objective sft works with any teacher")


# --- which objective ---------------------------------------------------------------------------

@dataclass
class Choice:
    """The objective that runs, and why (train_summary.json's objective.requested / why / tokenizers)."""

    requested: str
    objective: str
    cross: bool
    why: str
    tokenizers: str | None = None          # tokenization.Comparison.relation, or None when not compared
    shared_vocabulary: int | None = None
    shared_token_share: float | None = None  # share of the data's student response tokens in the shared vocabulary

    def resolved(self, config: TrainConfig) -> TrainConfig:
        """`config` with the objective that runs (a copy: the run's identity keeps what was asked)."""
        out = copy.copy(config)
        out.objective = self.objective
        return out

    def to_json(self) -> dict[str, Any]:
        return {"requested": self.requested, "why": self.why, "tokenizers": self.tokenizers,
                "shared_vocabulary": self.shared_vocabulary, "shared_token_share": self.shared_token_share}


def teacher_tokenizer(config: TrainConfig, records: list[dict[str, Any]]):
    """(tokenizer or None, where it came from): the live teacher's (an error if it does not load), the served
    teacher's name if it loads here, or the offline records' `teacher` if they name one that loads."""
    from undo_cli.models import load_pretrained

    if config.teacher and not config.teacher_url:
        return load_pretrained("tokenizer", config.teacher, trust_remote_code=config.trust_remote_code,
                               flag="--teacher"), config.teacher
    names = [config.teacher] if config.teacher_url else sorted({str(r["teacher"]) for r in records
                                                                if r.get("teacher_logprobs") and r.get("teacher")})
    if len(names) != 1:
        return None, None
    try:
        return load_pretrained("tokenizer", names[0], trust_remote_code=config.trust_remote_code), names[0]
    except UndoError:  # a served model name that is a path on another machine, a hub name offline, ...
        return None, None


def _shared_share(examples: list[dict[str, Any]], shared_ids: set[int]) -> float:
    tokens = [t for e in examples for t in e["labels"] if t != -100]
    return sum(t in shared_ids for t in tokens) / max(len(tokens), 1)


def _offline_ids_match(records, examples, record_index) -> bool:
    """Offline without the teacher's tokenizer: do the recorded ids reproduce the student's tokenisation?"""
    from undo_cli.objectives.offline import align_teacher_logprobs

    tried = matched = 0
    for example, i in zip(examples, record_index):
        rows = records[i].get("teacher_logprobs")
        if rows:
            tried += 1
            try:
                matched += align_teacher_logprobs(example["labels"], rows) is not None
            except ValueError:
                pass
    return tried > 0 and matched * 2 > tried


def choose(config: TrainConfig, *, tokenizer, records: list[dict[str, Any]], examples: list[dict[str, Any]],
           record_index: list[int]) -> tuple[Choice, Any]:
    """(the choice, the teacher's tokenizer or None). Raises UndoError for an exact objective across tokenizers."""
    from undo_cli.tokenization import TokenBytes, compare, shared_vocabulary

    asked = config.objective
    t_tok, t_name = teacher_tokenizer(config, records)
    if t_tok is None:
        return _choose_blind(config, records, examples, record_index), None
    comparison = compare(t_tok, tokenizer)
    s_ids, _ = shared_vocabulary(TokenBytes.of(tokenizer), TokenBytes.of(t_tok))
    share = round(_shared_share(examples, set(s_ids)), 4)
    base = dict(tokenizers=comparison.relation, shared_vocabulary=len(s_ids), shared_token_share=share)
    if comparison.relation == "identical":
        if asked == AUTO:
            return Choice(asked, AUTO_EXACT, False, "the tokenizers are identical token by token: the exact-vocabulary "
                          f"objective {AUTO_EXACT} (DistiLLM's skew KL)", **base), t_tok
        return Choice(asked, asked, asked in CROSS_KINDS, "asked for; the tokenizers are identical", **base), t_tok
    who = f"--teacher {config.teacher}" if config.teacher else f"{config.data}: the recorded teacher {t_name}"
    if config.student_outputs != "off" or config.method == "minillm":
        raise UndoError(f"{who}: its tokenizer differs from the student's ({comparison.difference}): scoring the "
                        "student's own samples (--student-outputs, --method minillm) needs a shared tokenizer",
                        hint="train on the data alone with --objective uld, gold or auto (cross-tokenizer), or use "
                             "a teacher with the student's tokenizer")
    if asked in KINDS:
        raise UndoError(f"{who}: its tokenizer differs from the student's ({comparison.difference}): --objective "
                        f"{asked} compares probabilities token id by token id; exact-vocabulary objectives need a "
                        "shared tokenizer", hint=CROSS_HINT)
    if asked == AUTO:
        pick = "gold" if share >= GOLD_COVERAGE else "uld"
        why = (f"the tokenizers differ ({comparison.difference}): a cross-tokenizer objective; {share:.0%} of the "
               f"student's response tokens are in the shared vocabulary ({len(s_ids)} tokens), "
               + ("so gold compares them directly" if pick == "gold" else
                  f"under {GOLD_COVERAGE:.0%}, so uld (sorted probabilities, no shared tokens needed)"))
        return Choice(asked, pick, True, why, **base), t_tok
    return Choice(asked, asked, True, f"asked for; the tokenizers differ ({comparison.difference})", **base), t_tok


def _choose_blind(config: TrainConfig, records, examples, record_index) -> Choice:
    """No teacher tokenizer here (a served name that does not load, records without a loadable teacher)."""
    asked = config.objective
    if config.teacher_url:
        if asked in CROSS_KINDS:
            raise UndoError(f"--objective {asked} with --teacher-url needs the teacher's tokenizer here, to tokenise "
                            f"for the server, but '{config.teacher}' does not load",
                            hint="pass as --teacher a hub name or folder whose tokenizer loads here (the server must "
                                 "serve it under that name: vLLM's --served-model-name)")
        pick = AUTO_EXACT if asked == AUTO else asked
        return Choice(asked, pick, False, "the teacher's tokenizer does not load here: the server's own tokenizer is "
                      "compared with the student's through /tokenize; exact-vocabulary objective " + pick)
    # offline
    if asked == "gold":
        raise UndoError("--objective gold --teacher-logprobs needs the teacher's tokenizer (which recorded tokens "
                        "the student's vocabulary has), but the records' `teacher` does not name one that loads here",
                        hint="use --objective uld (it needs only the recorded teacher_offsets), or make the "
                             "teacher's tokenizer available under the name the records carry")
    if asked in KINDS or asked == "uld":
        return Choice(asked, asked, asked == "uld", "asked for (the teacher's tokenizer does not load here; the "
                      "recorded token ids are checked against the student's tokenisation)")
    if _offline_ids_match(records, examples, record_index):
        return Choice(asked, AUTO_EXACT, False, "the recorded token ids are the student's tokenisation of the "
                      f"rationales (the teacher's tokenizer does not load here): exact-vocabulary {AUTO_EXACT}")
    return Choice(asked, "uld", True, "the recorded token ids are not the student's tokenisation and the teacher's "
                  "tokenizer does not load here: uld, which needs only the recorded teacher_offsets")


# --- aligning each example ---------------------------------------------------------------------

@dataclass
class AlignCounts:
    aligned: int = 0
    unaligned: int = 0      # tokens that do not spell the text, or no common text
    missing: int = 0        # offline: no teacher_logprobs / teacher_offsets
    spans: int = 0
    one_to_one: int = 0
    response_tokens: int = 0
    tokens_in_spans: int = 0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["span_token_share"] = round(self.tokens_in_spans / max(self.response_tokens, 1), 4)
        return out


@dataclass
class XtExample:
    """One example's alignment: spans in absolute positions (student [a, b), teacher [c, d)), and the teacher's
    side: its token ids (live, served) or per-span top-K numbers (offline)."""

    spans: list[tuple[int, int, int, int]]
    teacher_ids: list[int] | None = None
    topk: dict[str, torch.Tensor] | None = None


def _messages(record: dict[str, Any], template: str):
    from undo_cli.prompts import student_messages

    return record.get("prompt_messages") or student_messages(record, template)


def _response(example: dict[str, Any]) -> tuple[int, list[int]]:
    labels = example["labels"]
    start = next((j for j, t in enumerate(labels) if t != -100), len(labels))
    return start, [t for t in labels[start:]]


def _pieces(tokenizer, messages, rationale: str, response_ids: list[int]) -> list[bytes] | None:
    """The response tokens' bytes, checked against the text they must spell (the chat template's response part)."""
    from undo_cli.prompts import chat_response_suffix
    from undo_cli.tokenization import TokenBytes, cover

    suffix = chat_response_suffix(tokenizer, messages, rationale).encode("utf-8")
    return cover(TokenBytes.of(tokenizer).pieces(response_ids), suffix)


def _count(counts: AlignCounts, spans, response_len: int) -> None:
    counts.aligned += 1
    counts.spans += len(spans)
    counts.one_to_one += sum(b - a == 1 and d - c == 1 for a, b, c, d in spans)
    counts.response_tokens += response_len
    counts.tokens_in_spans += sum(b - a for a, b, _, _ in spans)


def align_live(config: TrainConfig, records, examples, record_index, tokenizer, t_tok) -> AlignCounts:
    """Give each example its teacher sequence and spans (`example["xt"]`); count what aligned."""
    from undo_cli.prompts import encode_example
    from undo_cli.tokenization import align_spans

    counts = AlignCounts()
    for example, i in zip(examples, record_index):
        record = records[i]
        messages = _messages(record, config.template)
        start, response = _response(example)
        t_ids, t_labels = encode_example(t_tok, messages, record["rationale"])
        t_ids = t_ids[: config.max_length]
        t_start = next((j for j, t in enumerate(t_labels) if t != -100), len(t_labels))
        s_pieces = _pieces(tokenizer, messages, record["rationale"], response)
        t_pieces = _pieces(t_tok, messages, record["rationale"], t_ids[t_start:])
        spans = align_spans(s_pieces, t_pieces) if s_pieces is not None and t_pieces is not None else []
        example["xt"] = XtExample([(a + start, b + start, c + t_start, d + t_start) for a, b, c, d in spans], t_ids)
        if spans:
            _count(counts, spans, len(response))
        else:
            counts.unaligned += 1
    return counts


def _offsets(record: dict[str, Any], path: str, n: int) -> list[list[int]]:
    offsets = record.get("teacher_offsets")
    text_len = len(record["rationale"].encode("utf-8"))
    ok = isinstance(offsets, list) and len(offsets) == n and all(
        isinstance(o, list) and len(o) == 2 and all(isinstance(x, int) for x in o) and 0 <= o[0] <= o[1] <= text_len
        for o in offsets) and all(b[0] >= a[1] for a, b in zip(offsets, offsets[1:]))
    if not ok:
        raise UndoError(f"{path}: record '{record['id']}': field 'teacher_offsets': expected one [start, end] UTF-8 "
                        f"byte span of the rationale per recorded token ({n}), non-overlapping, in order",
                        hint="regenerate it with `undo generate --logprobs K` (it records teacher_offsets)")
    return offsets


def align_offline(config: TrainConfig, records, examples, record_index, tokenizer, t_tok) -> AlignCounts:
    """Spans between the student's tokens and the recorded teacher tokens, with each span's top-K numbers."""
    from undo_cli.objectives.offline import parse_teacher_logprobs
    from undo_cli.tokenization import TokenBytes, align_spans, shared_vocabulary

    counts = AlignCounts()
    mapping: dict[int, int] = {}
    if t_tok is not None:
        s_ids, t_ids = shared_vocabulary(TokenBytes.of(tokenizer), TokenBytes.of(t_tok))
        mapping = dict(zip(t_ids, s_ids))
    for example, i in zip(examples, record_index):
        record = records[i]
        rows = record.get("teacher_logprobs")
        example["xt"] = XtExample([])
        if not rows or record.get("teacher_offsets") is None:
            counts.missing += 1
            continue
        try:
            _, supports = parse_teacher_logprobs(rows)
        except ValueError as exc:
            raise UndoError(f"{config.data}: record '{record['id']}': field 'teacher_logprobs': {exc}",
                            hint="regenerate it with `undo generate --logprobs K`") from None
        text = record["rationale"].encode("utf-8")
        t_pieces = [text[s:e] for s, e in _offsets(record, config.data, len(rows))]
        start, response = _response(example)
        s_pieces = _pieces(tokenizer, _messages(record, config.template), record["rationale"], response)
        spans = align_spans(s_pieces, t_pieces) if s_pieces is not None else []
        if not spans:
            counts.unaligned += 1
            continue
        example["xt"] = XtExample([(a + start, b + start, c, d) for a, b, c, d in spans],
                                  topk=_offline_topk(spans, rows, supports, mapping))
        _count(counts, spans, len(response))
    for record in records:
        record.pop("teacher_logprobs", None)  # large; converted
    return counts


def topk_rows(rows: list[dict[int, float]], rank_k: list[int], lt: list[float], mapping: dict[int, int]):
    """Per-span teacher numbers -> TopKTeacher fields: {token id: log-prob} per span's first token (the top-K
    plus the written token), how many of the largest are exact ranks, and L^t."""
    width = max((len(r) for r in rows), default=1)
    m = len(rows)
    lps = torch.full((m, width), -math.inf)
    ids = torch.full((m, width), -1, dtype=torch.long)
    for k, row in enumerate(rows):
        ranked = sorted(row.items(), key=lambda kv: -kv[1])
        lps[k, : len(ranked)] = torch.tensor([lp for _, lp in ranked])
        ids[k, : len(ranked)] = torch.tensor([mapping.get(t, -1) for t, _ in ranked])
    return {"lps": lps, "valid": torch.isfinite(lps), "rank_k": torch.tensor(rank_k, dtype=torch.long),
            "student_ids": ids, "lt": torch.tensor(lt, dtype=torch.float32)}


def _offline_topk(spans, rows, supports, mapping) -> dict[str, torch.Tensor]:
    first = [dict(supports[c]) for _, _, c, _ in spans]
    rank_k = [min(len({int(e[0]) for e in rows[c][2]}), len(supports[c])) or 1 for _, _, c, _ in spans]
    lt = [sum(float(rows[j][1]) for j in range(c + 1, d)) for _, _, c, d in spans]
    return topk_rows(first, rank_k, lt, mapping)


# --- batches ---------------------------------------------------------------------------------------

class CrossCollator:
    """Wraps a collator: batches the examples as it does, plus their spans in the batch's coordinates.

    `xt_student`: (first, cont, cont_span, cont_target) as flat indices into the [rows, width] labels grid of
    the position that *predicts* each token; `xt_teacher`: the same as (example, position) pairs of the
    teacher tokens, with the teacher's padded batch (live, served) or the spans' top-K tensors (offline).
    """

    def __init__(self, inner, *, packed: bool, pad_id: int):
        self.inner, self.packed, self.pad_id = inner, packed, pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        xts = [f["xt"] for f in features]
        batch = self.inner([{k: v for k, v in f.items() if k != "xt"} for f in features])
        lengths = [len(f["input_ids"]) for f in features]
        width = batch["input_ids"].shape[-1]
        offsets = [sum(lengths[:b]) for b in range(len(features))] if self.packed else [b * width
                                                                                       for b in range(len(features))]
        s_first, s_cont, s_span, s_target, t_first, t_cont = [], [], [], [], [], []
        k = 0
        for b, (xt, f) in enumerate(zip(xts, features)):
            for a, e, c, d in xt.spans:
                s_first.append(offsets[b] + a - 1)
                t_first.append((b, c))
                for j in range(a + 1, e):
                    s_cont.append(offsets[b] + j - 1)
                    s_span.append(k)
                    s_target.append(f["input_ids"][j])
                for j in range(c + 1, d):
                    t_cont.append((b, j, k))
                k += 1
        long = lambda xs: torch.tensor(xs, dtype=torch.long).reshape(-1)  # noqa: E731
        batch["xt_student"] = (long(s_first), long(s_cont), long(s_span), long(s_target))
        batch["xt_teacher_first"] = torch.tensor(t_first, dtype=torch.long).reshape(-1, 2)
        batch["xt_teacher_cont"] = torch.tensor(t_cont, dtype=torch.long).reshape(-1, 3)
        if xts and xts[0].teacher_ids is not None:
            t_width = max(len(x.teacher_ids) for x in xts)
            ids = torch.full((len(xts), t_width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(xts), t_width), dtype=torch.long)
            for b, x in enumerate(xts):
                ids[b, : len(x.teacher_ids)] = torch.tensor(x.teacher_ids)
                mask[b, : len(x.teacher_ids)] = 1
            batch["xt_teacher_input_ids"], batch["xt_teacher_attention_mask"] = ids, mask
        else:
            batch["xt_topk"] = _stack_topk([x.topk for x in xts if x.topk is not None])
        return batch


def _stack_topk(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if not parts:
        return {"lps": torch.zeros((0, 1)), "valid": torch.zeros((0, 1), dtype=torch.bool),
                "rank_k": torch.zeros(0, dtype=torch.long), "student_ids": torch.zeros((0, 1), dtype=torch.long),
                "lt": torch.zeros(0)}
    width = max(p["lps"].shape[1] for p in parts)
    pad = {"lps": -math.inf, "valid": False, "student_ids": -1}
    out = {}
    for key in ("lps", "valid", "student_ids"):
        out[key] = torch.cat([torch.nn.functional.pad(p[key], (0, width - p[key].shape[1]), value=pad[key])
                              for p in parts])
    out["rank_k"] = torch.cat([p["rank_k"] for p in parts])
    out["lt"] = torch.cat([p["lt"] for p in parts])
    return out


# --- the loss -------------------------------------------------------------------------------------

def _row_index(keep: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Flat grid positions -> their row among the `keep` positions (row-major, as the models' rows are taken)."""
    return (keep.flatten().cumsum(0) - 1)[grid.to(keep.device)]


class CrossDistillationLoss:
    """`loss_fn(model, inputs) -> (loss_sum, metrics)` for UndoTrainer, against a teacher with another tokenizer."""

    HEALTH = ("teacher_entropy", "student_entropy")

    def __init__(self, kind: str, *, teacher: torch.nn.Module | None, served=None,
                 shared: tuple[torch.Tensor, torch.Tensor] | None, config: TrainConfig):
        from undo_cli.training.distill import DistillationLoss

        c = config
        # The student's side (hidden states + head, fused when the head allows) is DistillationLoss's own.
        self._base = DistillationLoss(kind, teacher=teacher, vocab_size=1 << 62, alpha=c.alpha, beta=c.beta,
                                      temperature=c.temperature, kd_weight=c.kd_weight, lm_weight=c.lm_weight,
                                      chunk_size=c.kd_chunk_size)
        self.kind, self.teacher, self.served, self.config = kind, teacher, served, c
        self.shared = shared  # (student ids, teacher ids) of the shared vocabulary, or None
        self.history: list[torch.Tensor] = []

    @property
    def fused(self) -> dict[str, bool]:
        return self._base.fused

    def _live(self, inputs: dict[str, Any], student_vocab: int):
        from undo_cli.training.distill import head_weight, final_hidden_states
        from undo_cli.training.trainer import response_logits

        ids, mask = inputs["xt_teacher_input_ids"], inputs["xt_teacher_attention_mask"]
        width = ids.shape[1]
        first, cont = inputs["xt_teacher_first"].to(ids.device), inputs["xt_teacher_cont"].to(ids.device)
        first_grid = first[:, 0] * width + first[:, 1] - 1
        cont_grid = cont[:, 0] * width + cont[:, 1] - 1
        keep = torch.zeros_like(ids, dtype=torch.bool)
        keep.view(-1)[first_grid] = True
        keep.view(-1)[cont_grid] = True
        t_inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids}
        with torch.no_grad():
            if self._base._decide("teacher", self.teacher, t_inputs, keep):
                rows, weight = final_hidden_states(self.teacher, t_inputs, keep), head_weight(self.teacher)
            else:
                from undo_cli.training.distill import labels_for

                rows, weight = response_logits(self.teacher, {**t_inputs, "labels": labels_for(keep, ids)})[0], None
        t_rows = SpanRows(_row_index(keep, first_grid), _row_index(keep, cont_grid), cont[:, 2],
                          ids.view(-1)[cont_grid + 1])
        c = self.config
        return live_teacher(rows, weight, t_rows, self.kind, student_vocab=student_vocab,
                            shared_teacher=None if self.shared is None else self.shared[1].to(rows.device),
                            temperature=c.temperature, chunk_size=c.kd_chunk_size)

    def _served(self, inputs: dict[str, Any]):
        scores = self.served.wait_scores(inputs, _teacher_sequences)
        first, cont = inputs["xt_teacher_first"].tolist(), inputs["xt_teacher_cont"].tolist()
        ids = inputs["xt_teacher_input_ids"].tolist()
        rows = [scores[b][p] or {} for b, p in first]
        lt = [0.0] * len(first)
        for b, j, k in cont:
            lt[k] += (scores[b][j] or {}).get(ids[b][j], -math.inf)
        topk = topk_rows(rows, [min(self.served.top_k, len(r)) or 1 for r in rows], lt, self.mapping_dict)
        return self._topk_at(topk, inputs["input_ids"].device)

    @property
    def mapping_dict(self) -> dict[int, int]:
        if not hasattr(self, "_mapping_dict"):
            self._mapping_dict = {} if self.shared is None else dict(zip(self.shared[1].tolist(),
                                                                           self.shared[0].tolist()))
        return self._mapping_dict

    @staticmethod
    def _topk_at(topk: dict[str, torch.Tensor], device):
        teacher = TopKTeacher(*(topk[k].to(device) for k in ("lps", "valid", "rank_k", "student_ids", "lt")))
        return lambda spans: teacher[spans]

    def __call__(self, model: torch.nn.Module, inputs: dict[str, Any]):
        from undo_cli.training.trainer import response_positions

        keep, targets = response_positions(inputs["labels"])
        student, weight = self._base._student(model, inputs, keep)
        first, cont, span, target = (t.to(keep.device) for t in inputs["xt_student"])
        rows = SpanRows(_row_index(keep, first), _row_index(keep, cont), span, target)
        if self.teacher is not None:
            teacher_at = self._live(inputs, student.shape[-1] if weight is None else weight.shape[0])
        elif self.served is not None:
            teacher_at = self._served(inputs)
        else:
            teacher_at = self._topk_at(inputs["xt_topk"], keep.device)
        c = self.config
        totals: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        shared = None if self.shared is None else tuple(t.to(keep.device) for t in self.shared)
        loss_sum = cross_loss(student, weight, targets=targets, rows=rows, teacher_at=teacher_at, kind=self.kind,
                              beta=c.beta, temperature=c.temperature, kd_weight=c.kd_weight, lm_weight=c.lm_weight,
                              shared=shared, chunk_size=c.kd_chunk_size, totals=totals, stats=stats)
        n, spans = max(int(targets.numel()), 1), max(rows.count, 1)
        zero = loss_sum.new_zeros(())
        metrics = {self.kind: totals.get("kd", zero) / spans, "ce": totals.get("ce", zero) / n,
                   "token_accuracy": totals.get("correct", zero).float() / n}
        for key in self.HEALTH:
            metrics[key] = stats.get(key, zero) / spans
        if model.training:
            self.history.append(torch.stack([metrics[k].detach().to(zero.dtype)
                                             for k in (self.kind, "ce", *self.HEALTH)]))
        return loss_sum, metrics

    def summary(self) -> dict[str, Any]:
        columns = ("kd", "ce", *self.HEALTH)
        h = torch.stack(self.history).double().cpu() if self.history else torch.zeros((0, len(columns)))
        window = max(len(h) // 10, 1)
        out: dict[str, Any] = {}
        for col, name in enumerate(columns):
            for suffix, part in (("first", h[:window]), ("final", h[-window:])):
                out[f"{name}_{suffix}"] = round(float(part[:, col].mean()), 6) if len(part) else None
        return {**out, "fused": dict(self.fused), "micro_batches": len(h)}


# --- wiring it into `undo train` --------------------------------------------------------------------

@dataclass
class CrossObjective:
    """The cross-tokenizer objective of one `undo train` run (the interface of objective.Objective)."""

    config: TrainConfig          # with the objective that runs
    choice: Choice
    counts: AlignCounts
    t_tok: Any = None
    served: Any = None
    loss: CrossDistillationLoss | None = None
    shared: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def attach(self, model, device, *, packed: bool = False) -> CrossDistillationLoss:
        from undo_cli.training.distill import load_frozen

        c = self.config
        teacher = None
        if c.teacher and self.served is None:
            teacher = load_frozen(c.teacher, device=device, trust_remote_code=c.trust_remote_code)
        self.loss = CrossDistillationLoss(c.objective, teacher=teacher, served=self.served, shared=self.shared,
                                          config=c)
        return self.loss

    def collator(self, inner, *, packed: bool):
        pad = self.t_tok.pad_token_id if self.t_tok is not None and self.t_tok.pad_token_id is not None else 0
        return CrossCollator(inner, packed=packed, pad_id=pad)

    def prefetch(self, packed: bool):
        if self.served is None:
            return None
        return lambda batches: self.served.prefetch_sequences(batches, _teacher_sequences)

    def describe(self) -> str:
        c = self.config
        if self.served is not None:
            from undo_cli.training.served_teacher import describe_url

            source = f"teacher {c.teacher} served at {describe_url(c.teacher_url)} (top-{c.teacher_top_k} log-probs)"
        else:
            source = f"teacher {c.teacher}" if c.teacher else f"teacher top-K log-probs and byte offsets from {c.data}"
        weights = f"{c.kd_weight:g} x {c.objective}" + (f" + {c.lm_weight:g} x cross-entropy" if c.lm_weight else "")
        a = self.counts
        return (f"objective {weights} ({DESCRIPTIONS[c.objective]}), {source}; {self.choice.why}; "
                f"{a.spans} aligned spans in {a.aligned} examples ({a.one_to_one} one token on each side)")

    def summary(self, runtime_s: float | None = None) -> dict[str, Any]:
        c = self.config
        out = {"name": c.objective, **self.choice.to_json(), "cross_tokenizer": True, "teacher": c.teacher,
               "offline": bool(c.teacher_logprobs), "beta": c.beta, "temperature": c.temperature,
               "kd_weight": c.kd_weight, "lm_weight": c.lm_weight, "kd_chunk_size": c.kd_chunk_size,
               "alignment": self.counts.to_json(), **(self.loss.summary() if self.loss else {})}
        if self.served is not None:
            out["served"] = self.served.summary(runtime_s)
        return out

    def close(self) -> None:
        if self.loss is not None:
            self.loss.teacher = None
        if self.served is not None:
            self.served.close()


def _teacher_sequences(batch: dict[str, Any]) -> list[list[int]]:
    ids, mask = batch["xt_teacher_input_ids"], batch["xt_teacher_attention_mask"]
    return [row[: int(n)] for row, n in zip(ids.tolist(), mask.sum(-1).tolist())]


def prepare(config: TrainConfig, choice: Choice, t_tok, *, records, examples, record_index,
            tokenizer) -> CrossObjective:
    """Align every example, set up the served teacher if any; every error before anything is written."""
    from undo_cli.tokenization import TokenBytes, shared_vocabulary

    config = choice.resolved(config)
    shared = None
    if t_tok is not None:
        s_ids, t_ids = shared_vocabulary(TokenBytes.of(tokenizer), TokenBytes.of(t_tok))
        shared = (torch.tensor(s_ids, dtype=torch.long), torch.tensor(t_ids, dtype=torch.long))
    if config.objective == "uld" and config.lm_weight == 0:
        warn("--objective uld compares sorted probabilities only (which token is which does not enter it): the ULD "
             "paper adds cross-entropy on the rationale, --lm-weight 1")
    served = None
    if config.teacher_logprobs:
        counts = align_offline(config, records, examples, record_index, tokenizer, t_tok)
    else:
        counts = align_live(config, records, examples, record_index, tokenizer, t_tok)
        if config.teacher_url:
            served = _served_teacher(config, t_tok, examples)
    _report(config, counts)
    return CrossObjective(config, choice, counts, t_tok, served, shared=shared)


def _served_teacher(config: TrainConfig, t_tok, examples):
    from undo_cli.training.served_teacher import ServedTeacher

    served = ServedTeacher(config.teacher_url, config.teacher, top_k=config.teacher_top_k,
                           api_key_env=config.teacher_api_key_env, timeout=config.teacher_timeout,
                           max_retries=config.teacher_max_retries)
    try:
        served.probe()
        served.check_tokenizer(t_tok, whose="the teacher's (loaded here)")
        longest = max((len(e["xt"].teacher_ids) for e in examples), default=0)
        served.check_lengths(longest, config.max_length)
        served.check_top_k(examples[0]["xt"].teacher_ids if examples else [])
    except BaseException:
        served.close()
        raise
    return served


def _report(config: TrainConfig, counts: AlignCounts) -> None:
    if not counts.aligned:
        what = ("records with teacher_logprobs and teacher_offsets" if config.teacher_logprobs else "examples")
        raise UndoError(f"{config.data}: no {what} could be aligned with the student's tokenisation "
                        f"({counts.unaligned} unaligned, {counts.missing} without the teacher's numbers)",
                        hint="regenerate the rationales with `undo generate --logprobs K` (it records "
                             "teacher_offsets)" if config.teacher_logprobs else
                             "check that both tokenizers reproduce the rationale text (a normalising tokenizer "
                             "changes it); --objective sft trains on the text alone")
    if counts.unaligned or counts.missing:
        warn(f"{config.data}: {counts.unaligned} example(s) whose tokens could not be aligned and {counts.missing} "
             f"without the teacher's recorded numbers train on the LM term only ({counts.aligned} use the teacher)")
