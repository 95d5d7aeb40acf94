"""The white-box objective of one `undo train` run, wired in: which loss runs, its checks, its teacher, its summary.

    undo train --student S --teacher T --objective auto --data rationales.jsonl --output out

`prepare_objective` is what stages/train.py calls: `--objective sft` needs nothing; otherwise it chooses
the objective (`auto`; a teacher with another tokenizer: training/cross_teacher.py), checks a served teacher
(training/served_teacher.py) or aligns the recorded top-K log-probs (training/distill.py), before anything
is written or a model loads; `Objective.attach` then loads the live teacher beside the student and builds
the loss (distill.DistillationLoss). This module sits above the three it composes; none of them imports it.
"""

from __future__ import annotations

from typing import Any

from undo_cli.objectives.offline import AlignmentCounts
from undo_cli.objectives.options import DESCRIPTIONS
from undo_cli.training.config import TrainConfig
from undo_cli.training.distill import DistillationLoss, TeacherTopKCollator, attach_teacher_topk, load_teacher
from undo_cli.training.trainer import unwrap


class Objective:
    """The white-box objective of one `undo train` run: the trainer's loss_fn, a collator, a summary.

    Built in two steps so that every mistake a user can make (another tokenizer, records
    without log-probs, a server that is down) is reported before `undo train` writes anything
    or loads a model: `prepare_objective` checks, `attach` loads the teacher once the student is loaded.
    """

    def __init__(self, config: TrainConfig, tokenizer_size: int, counts: AlignmentCounts | None, width: int,
                 served=None):
        self.config, self.tokenizer_size, self.counts, self.width = config, tokenizer_size, counts, width
        self.served = served  # served_teacher.ServedTeacher for --teacher-url
        self.choice = None  # cross_teacher.Choice: what was asked (e.g. auto) and why this objective runs
        self.loss: DistillationLoss | None = None
        self.vocab = 0

    def attach(self, model, device, *, packed: bool = False) -> DistillationLoss:
        """Load the live teacher (if any) next to the student `model` and build the loss."""
        c = self.config
        rows = unwrap(model).get_output_embeddings().weight.shape[0]
        teacher, self.vocab = None, rows
        if self.served is not None:
            self.served.vocab_limit = rows
        if c.teacher and self.served is None:
            teacher, self.vocab = load_teacher(c.teacher, tokenizer_size=self.tokenizer_size, student_vocab_rows=rows,
                                               device=device, trust_remote_code=c.trust_remote_code)
            from undo_cli.training import packed_attention

            if packed and packed_attention.supports(teacher):  # the teacher reads the student's packed rows
                packed_attention.enable(teacher)
        overlap_k = min(c.teacher_top_k, self.width) if self.counts is not None else c.teacher_top_k
        self.loss = DistillationLoss(c.objective, teacher=teacher, vocab_size=self.vocab, alpha=c.alpha, beta=c.beta,
                                     temperature=c.temperature, kd_weight=c.kd_weight, lm_weight=c.lm_weight,
                                     chunk_size=c.kd_chunk_size, served=self.served, packed=packed,
                                     overlap_k=overlap_k)
        return self.loss

    def collator(self, inner, *, packed: bool):
        return inner if self.counts is None else TeacherTopKCollator(inner, packed=packed, width=self.width)

    def prefetch(self, packed: bool):
        """UndoTrainer's `prefetch` for a served teacher (request each batch's log-probs ahead), else None."""
        if self.served is None:
            return None
        return lambda batches: self.served.prefetch(batches, packed)

    def describe(self) -> str:
        c = self.config
        if self.served is not None:
            from undo_cli.training.served_teacher import describe_url

            source = f"teacher {c.teacher} served at {describe_url(c.teacher_url)} (top-{c.teacher_top_k} log-probs)"
        else:
            source = f"teacher {c.teacher}" if c.teacher else f"teacher top-{self.width} log-probs from {c.data}"
        weights = f"{c.kd_weight:g} x {c.objective}" + (f" + {c.lm_weight:g} x cross-entropy" if c.lm_weight else "")
        return f"objective {weights} ({DESCRIPTIONS[c.objective]}), {source}"

    def summary(self, runtime_s: float | None = None) -> dict[str, Any]:
        c = self.config
        out = {"name": c.objective, "teacher": c.teacher, "offline": bool(c.teacher_logprobs), "alpha": c.alpha,
               "beta": c.beta, "temperature": c.temperature, "kd_weight": c.kd_weight, "lm_weight": c.lm_weight,
               "kd_chunk_size": c.kd_chunk_size, "vocab": self.vocab, **(self.choice.to_json() if self.choice else {}),
               **(self.loss.summary() if self.loss else {})}
        if self.counts is not None:
            out["offline_examples"] = {"aligned": self.counts.aligned, "mismatched": self.counts.mismatched,
                                       "missing": self.counts.missing, "support_width": self.width}
        if self.served is not None:
            out["served"] = self.served.summary(runtime_s)
        return out

    def close(self) -> None:
        if self.loss is not None:
            self.loss.teacher = None  # let the teacher's memory go with the trainer
        if self.served is not None:
            self.served.close()


def prepare_objective(config: TrainConfig, *, records: list[dict[str, Any]], examples: list[dict[str, Any]],
                      record_index: list[int], tokenizer):
    """None for --objective sft. Otherwise choose the objective (`auto`; another tokenizer: cross_teacher.py), check
    the served teacher's tokenizer, or align the recorded top-K log-probs with `examples` (adding their tensors),
    and return the objective to `attach`."""
    if config.objective == "sft":
        return None
    from undo_cli.training import cross_teacher

    choice, teacher_tokenizer = cross_teacher.choose(config, tokenizer=tokenizer, records=records, examples=examples,
                                                     record_index=record_index)
    if choice.cross:
        return cross_teacher.prepare(config, choice, teacher_tokenizer, records=records, examples=examples,
                                     record_index=record_index, tokenizer=tokenizer)
    config = choice.resolved(config)
    counts, width, served = None, 0, None
    if config.teacher_url:
        from undo_cli.training.served_teacher import ServedTeacher

        served = ServedTeacher(config.teacher_url, config.teacher, top_k=config.teacher_top_k,
                               api_key_env=config.teacher_api_key_env, timeout=config.teacher_timeout,
                               max_retries=config.teacher_max_retries)
        try:
            served.probe()
            served.check_tokenizer(tokenizer)
            served.check_lengths(max((len(e["input_ids"]) for e in examples), default=0), config.max_length)
            served.check_top_k(examples[0]["input_ids"] if examples else [])
        except BaseException:
            served.close()
            raise
        width = config.teacher_top_k + 1
    elif not config.teacher:
        counts, width = attach_teacher_topk(records, examples, record_index, vocab_size=len(tokenizer),
                                            path=config.data)
    objective = Objective(config, len(tokenizer), counts, width, served)
    objective.choice = choice
    return objective
