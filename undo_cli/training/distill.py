"""White-box distillation in `undo train`: the loss that compares the student with its teacher.

    undo train --student S --teacher T --objective skl --lm-weight 1 --data rationales.jsonl --output out
    undo generate --teacher T --logprobs 20 ... --output rationales.jsonl     # then, with no teacher loaded:
    undo train --student S --teacher-logprobs --objective fkl --data rationales.jsonl --output out

`--objective sft` (the default) is plain cross-entropy on the rationale and
needs nothing from this module. Every other objective (`undo_cli.objectives`:
fkl, rkl, jsd, skl, srkl, tvd) compares the student's next-token distribution
with the teacher's at every rationale token, so both must share a tokenizer (a
teacher with another tokenizer: `uld`, `gold` or `auto`, training/cross_teacher.py):

* **live teacher** (`--teacher MODEL`): loaded once, frozen, in eval mode (bf16
  on a GPU, its stored dtype on a CPU: `load_frozen`), fed the same packed batch as the student. Both models' final
  hidden states are taken from their forward pass (a hook on the decoder; the
  LM head is asked for no logits at all) and the loss is
  `fused_linear_divergence`-style: logits formed chunk by chunk, never whole.
* **offline teacher** (`--teacher-logprobs`): the rationale records carry the
  teacher's top-K log-probabilities per generated token (`undo generate
  --logprobs K`); they are aligned with the student's tokenisation here and the
  loss is the top-K + tail-bucket approximation of `objectives/offline.py`.

The loss is `kd_weight × divergence + lm_weight × cross-entropy`, both summed
over response tokens (the trainer divides by the number of response tokens in
the optimizer step), computed in one chunked pass (`with_cross_entropy`).

Fused needs an LM head that is a plain linear map (Llama, Qwen, Mistral, ...).
On the first batch each model's fused logits are checked against its own
forward; a model whose head does more (soft-capping, scaling) or that a
sharding wrapper hides (FSDP) falls back to the model's logits, with a warning,
and the chunking still bounds the float32 work.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from undo_cli.console import warn
from undo_cli.errors import UndoError
from undo_cli.objectives.chunked import ChunkedObjective, live_teacher_chunk_fn, with_cross_entropy
from undo_cli.objectives.offline import AlignmentCounts, align_teacher_logprobs, topk_chunk_fn
from undo_cli.training.trainer import MODEL_INPUT_KEYS, response_logits, response_positions, unwrap

TOPK_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_topk_valid")
# Logged per step and summarised: teacher / student entropy on the trained tokens, top-k overlap.
HEALTH_KEYS = ("teacher_entropy", "student_entropy", "topk_overlap")


# --- the student's and the teacher's final hidden states --------------------------------

def _decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    base = unwrap(model)
    try:
        decoder = base.get_decoder()
    except Exception:
        return None
    return decoder if decoder is not base else None


def final_hidden_states(model: torch.nn.Module, inputs: dict[str, Any], keep: torch.Tensor) -> torch.Tensor:
    """The model's final (post-norm) hidden states at the `keep` positions, [n, H], without any logits.

    The forward goes through `model` itself (so DDP and gradient checkpointing see a normal
    call) with `logits_to_keep` selecting no position; a hook on the decoder keeps its output.
    """
    decoder = _decoder(model)
    if decoder is None:
        raise RuntimeError("no decoder module to take hidden states from")
    captured: list[torch.Tensor] = []
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model_inputs = {k: inputs[k] for k in MODEL_INPUT_KEYS if k in inputs}
        model(**model_inputs, logits_to_keep=torch.zeros_like(keep), use_cache=False)
    finally:
        handle.remove()
    return captured[-1][keep]


def head_weight(model: torch.nn.Module) -> torch.Tensor | None:
    head = unwrap(model).get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return head.weight


def labels_for(keep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Labels whose shifted non-ignored positions are exactly `keep` (for response_logits)."""
    out = torch.full_like(labels, -100)
    out[:, 1:][keep[:, :-1]] = labels[:, 1:][keep[:, :-1]]
    return out


def check_fusable(model: torch.nn.Module, inputs: dict[str, Any], keep: torch.Tensor) -> str | None:
    """None if hidden states × head weight reproduce the model's own logits on this batch, else why not."""
    weight = head_weight(model)
    if weight is None:
        return "its output layer is not a plain bias-free linear layer"
    first = keep & (keep.cumsum(-1) <= 4)  # a few positions are enough
    try:
        with torch.no_grad():
            hidden = final_hidden_states(model, inputs, first)
            expected = response_logits(model, {**inputs, "labels": labels_for(first, inputs["labels"])})[0].float()
            got = (hidden.to(weight.dtype) @ weight.T).float()
    except Exception as exc:  # a wrapper that shards the head, a model without logits_to_keep, ...
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if got.shape != expected.shape:
        return f"hidden states x head give {tuple(got.shape)}, the model {tuple(expected.shape)}"
    scale = expected.abs().max().clamp(min=1.0)
    if not torch.allclose(got, expected, rtol=2e-2, atol=float(2e-2 * scale)):
        return "its logits are not hidden states x head weight (soft-capping or scaling?)"
    return None


# --- the loss -------------------------------------------------------------------------

class DistillationLoss:
    """`loss_fn(model, inputs) -> (loss_sum, metrics)` for UndoTrainer (see training/trainer.py)."""

    def __init__(self, kind: str, *, teacher: torch.nn.Module | None, vocab_size: int, alpha: float, beta: float,
                 temperature: float, kd_weight: float, lm_weight: float, chunk_size: int, served=None,
                 packed: bool = False, overlap_k: int = 20):
        self.kind, self.teacher, self.vocab = kind, teacher, vocab_size
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.kd_weight, self.lm_weight, self.chunk_size = kd_weight, lm_weight, chunk_size
        # A served teacher (served_teacher.ServedTeacher): its top-K arrive as the offline path's tensors.
        self.served, self.packed, self.overlap_k = served, packed, overlap_k
        self.fused: dict[str, bool] = {}  # "student"/"teacher" -> fused path usable (decided on the first batch)
        # per training micro-batch: [kd mean, ce mean, teacher entropy, student entropy, top-k overlap]
        self.history: list[torch.Tensor] = []

    def _decide(self, role: str, model: torch.nn.Module, inputs: dict[str, Any], keep: torch.Tensor) -> bool:
        if role not in self.fused:
            why = check_fusable(model, inputs, keep)
            if why is not None:
                warn(f"the {role}'s logits cannot be formed chunk by chunk ({why}): using the model's full "
                     "response logits instead (more memory, same loss)")
            self.fused[role] = why is None
        return self.fused[role]

    def _student(self, model, inputs, keep):
        if self._decide("student", model, inputs, keep):
            return final_hidden_states(model, inputs, keep), head_weight(model)[: self.vocab]
        return response_logits(model, inputs)[0][:, : self.vocab], None

    def _teacher_fn(self, inputs, keep, stats: dict[str, torch.Tensor] | None = None):
        if self.teacher is None:  # offline or served: the top-K, shifted like the labels
            if self.served is not None and TOPK_KEYS[0] not in inputs:
                inputs = {**inputs, **self.served.wait(inputs, self.packed)}  # after the student's forward
            rows = keep[:, :-1]
            ids, lps, valid = (inputs[k][:, 1:][rows] for k in TOPK_KEYS)
            return topk_chunk_fn(ids.long(), lps, valid, self.kind, alpha=self.alpha, beta=self.beta, stats=stats,
                                 overlap_k=self.overlap_k), int(valid.any(-1).sum())
        with torch.no_grad():
            if self._decide("teacher", self.teacher, inputs, keep):
                rows, weight = final_hidden_states(self.teacher, inputs, keep), head_weight(self.teacher)
            else:
                rows, weight = response_logits(self.teacher, inputs)[0], None
        fn = live_teacher_chunk_fn(rows, weight, self.kind, alpha=self.alpha, beta=self.beta,
                                   temperature=self.temperature, vocab=self.vocab, stats=stats,
                                   overlap_k=self.overlap_k)
        return fn, int(keep.sum())

    def __call__(self, model: torch.nn.Module, inputs: dict[str, Any]):
        keep, targets = response_positions(inputs["labels"])
        student, weight = self._student(model, inputs, keep)
        health: dict[str, torch.Tensor] = {}
        kd_fn, kd_rows = self._teacher_fn(inputs, keep, health)
        totals: dict[str, torch.Tensor] = {}
        fn = with_cross_entropy(kd_fn, targets, kd_weight=self.kd_weight, lm_weight=self.lm_weight, totals=totals)
        loss_sum = ChunkedObjective.apply(student, weight, fn, self.chunk_size, 1.0)
        n = max(int(targets.numel()), 1)
        zero = loss_sum.new_zeros(())
        metrics = {self.kind: totals.get("kd", zero) / max(kd_rows, 1), "ce": totals.get("ce", zero) / n,
                   "token_accuracy": totals.get("correct", zero).float() / n}
        # On-policy health (docs/objectives.md): are student and teacher still "thinking alike"?
        for key in HEALTH_KEYS:
            metrics[key] = health.get(key, zero) / max(kd_rows, 1)
        if model.training:  # kept on the device: no host sync per micro-batch
            self.history.append(torch.stack([metrics[k].detach().to(zero.dtype)
                                             for k in (self.kind, "ce", *HEALTH_KEYS)]))
        return loss_sum, metrics

    def summary(self) -> dict[str, Any]:
        """Divergence, cross-entropy and health means over the first and the last 10% of training micro-batches."""
        columns = ("kd", "ce", *HEALTH_KEYS)
        h = torch.stack(self.history).double().cpu() if self.history else torch.zeros((0, len(columns)))
        window = max(len(h) // 10, 1)

        def mean(rows, col):
            return round(float(rows[:, col].mean()), 6) if len(rows) else None

        out: dict[str, Any] = {}
        for col, name in enumerate(columns):
            out[f"{name}_first"], out[f"{name}_final"] = mean(h[:window], col), mean(h[-window:], col)
        return {**out, "fused": dict(self.fused), "micro_batches": len(h)}


# --- the live teacher -------------------------------------------------------------------

from undo_cli.tokenization import tokenizer_difference  # noqa: E402,F401 (its home; kept importable here)


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (oneDNN's bf16 kernels: AVX-512 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def load_frozen(name: str, *, device, trust_remote_code: bool) -> torch.nn.Module:
    """The teacher model, frozen, in eval mode: bf16 on a GPU; on a CPU in the dtype it is stored in.

    A frozen teacher needs no float32 master copy: on a CPU a bf16 checkpoint stays bf16, half the
    memory of the float32 upcast this used to make (Qwen2.5-1.5B: 3.5 GB instead of 7.1 GB, and
    transformers maps the file instead of copying it), and on a CPU with bf16 kernels its matrix
    products are faster than float32's (docs/objectives.md, "On a real pair"). float16 (slow on
    CPUs), or bf16 on a CPU without bf16 kernels, becomes float32; float32 stays float32.
    """
    from undo_cli.models import load_pretrained

    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        teacher = load_pretrained("model", name, trust_remote_code=trust_remote_code, flag="--teacher", dtype=dtype)
    else:
        teacher = load_pretrained("model", name, trust_remote_code=trust_remote_code, flag="--teacher", dtype="auto")
        if teacher.dtype != torch.float32 and not (teacher.dtype == torch.bfloat16 and cpu_computes_bf16()):
            teacher = teacher.float()
    return teacher.to(device).eval().requires_grad_(False)


def load_teacher(name: str, *, tokenizer_size: int, student_vocab_rows: int, device, trust_remote_code: bool):
    """The teacher, frozen, in eval mode (`load_frozen`), and the vocabulary size both models score."""
    teacher = load_frozen(name, device=device, trust_remote_code=trust_remote_code)
    teacher_rows = teacher.get_output_embeddings().weight.shape[0]
    shared = min(student_vocab_rows, teacher_rows)
    if shared < tokenizer_size:
        raise UndoError(f"--teacher {name}: scores {teacher_rows} tokens but the tokenizer has {tokenizer_size}",
                        hint="use a teacher whose embedding covers the tokenizer, or --objective sft")
    if teacher_rows != student_vocab_rows:
        warn(f"student and teacher pad their vocabularies differently ({student_vocab_rows} vs {teacher_rows} rows): "
             f"comparing the first {shared}, which hold all {tokenizer_size} tokens")
    return teacher, shared


# --- the offline teacher: records -> per-example tensors ----------------------------------

def attach_teacher_topk(records: list[dict[str, Any]], examples: list[dict[str, Any]], record_index: list[int],
                        *, vocab_size: int, path: str) -> tuple[AlignmentCounts, int]:
    """Give each example the teacher's recorded top-K at its response tokens, as compact tensors.

    Examples whose records have no `teacher_logprobs`, or whose recorded tokens are not the
    student's tokenisation of the rationale, train on the LM term only; they are counted.
    The records' (large) `teacher_logprobs` lists are dropped once converted.
    Returns the counts and the support width (K, or K + 1 when sampled tokens fall outside the top K).
    """
    counts = AlignmentCounts()
    aligned_all = []
    for example, i in zip(examples, record_index):
        rows = records[i].get("teacher_logprobs")
        try:
            aligned = align_teacher_logprobs(example["labels"], rows) if rows else None
        except ValueError as exc:
            raise UndoError(f"{path}: record '{records[i]['id']}': field 'teacher_logprobs': {exc}",
                            hint="regenerate it with `undo generate --logprobs K`") from None
        counts.add(aligned, bool(rows))
        aligned_all.append(aligned)
    for record in records:
        record.pop("teacher_logprobs", None)
    if not counts.aligned:
        if counts.mismatched:
            raise UndoError(f"{path}: none of the {counts.mismatched} recorded teacher_logprobs match the student's "
                            "tokenisation of the rationale: exact-vocabulary objectives need a shared tokenizer",
                            hint="use --objective uld (or auto) for a teacher with another tokenizer (it aligns the "
                                 "recorded teacher_offsets), --objective sft for the text alone")
        raise UndoError(f"{path}: no record has teacher_logprobs; --teacher-logprobs needs rationales generated "
                        "with `undo generate --logprobs K`",
                        hint="regenerate with `undo generate ... --logprobs 20`, or use a live --teacher MODEL")
    if counts.mismatched or counts.missing:
        warn(f"{path}: {counts.mismatched} rationale(s) whose recorded tokens differ from the student's tokenisation "
             f"and {counts.missing} without teacher_logprobs train on the LM term only "
             f"({counts.aligned} use the teacher's distribution)")
    width = max(len(s) for a in aligned_all if a for _, s in a)
    for example, aligned in zip(examples, aligned_all):
        if not aligned:
            continue
        length = len(example["input_ids"])
        ids = torch.zeros((length, width), dtype=torch.int32)
        lps = torch.full((length, width), -math.inf, dtype=torch.float32)
        valid = torch.zeros((length, width), dtype=torch.bool)
        for position, support in aligned:
            if max(token for token, _ in support) >= vocab_size:
                raise UndoError(f"{path}: teacher token id {max(t for t, _ in support)} is outside the student's "
                                f"vocabulary of {vocab_size}: exact-vocabulary objectives need a shared tokenizer",
                                hint="use --objective uld (or auto) for a teacher with another tokenizer")
            ids[position, : len(support)] = torch.tensor([t for t, _ in support], dtype=torch.int32)
            lps[position, : len(support)] = torch.tensor([lp for _, lp in support])
            valid[position, : len(support)] = True
        example.update(teacher_topk_ids=ids, teacher_topk_logprobs=lps, teacher_topk_valid=valid)
    return counts, width


class TeacherTopKCollator:
    """Wraps a collator: batches the examples' top-K tensors the way it batches their labels."""

    def __init__(self, inner, *, packed: bool, width: int):
        self.inner, self.packed, self.width = inner, packed, width

    def _fields(self, example: dict[str, Any], length: int) -> tuple[torch.Tensor, ...]:
        if TOPK_KEYS[0] in example:
            return tuple(example[k] for k in TOPK_KEYS)
        return (torch.zeros((length, self.width), dtype=torch.int32),
                torch.full((length, self.width), -math.inf), torch.zeros((length, self.width), dtype=torch.bool))

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner([{k: v for k, v in f.items() if k not in TOPK_KEYS} for f in features])
        fields = [self._fields(f, len(f["input_ids"])) for f in features]
        if self.packed:  # one row, examples end to end, like input_ids
            for j, key in enumerate(TOPK_KEYS):
                batch[key] = torch.cat([f[j] for f in fields]).unsqueeze(0)
        else:  # right-padded to the batch's width
            rows, width = batch["input_ids"].shape
            pads = (0, -math.inf, False)
            for j, key in enumerate(TOPK_KEYS):
                out = torch.full((rows, width, self.width), pads[j], dtype=fields[0][j].dtype)
                for b, f in enumerate(fields):
                    out[b, : f[j].shape[0]] = f[j]
                batch[key] = out
        batch["teacher_topk_ids"] = batch["teacher_topk_ids"].long()
        return batch
