"""Training on the student's own outputs: GKD's on-policy mix and DistiLLM's adaptive off-policy schedule.

    undo train --student S --teacher T --objective jsd --student-outputs on-policy --lmbda 0.5 \\
        --data rationales.jsonl --output out
    undo train --student S --teacher T --objective srkl --student-outputs adaptive \\
        --val-data val_rationales.jsonl --data rationales.jsonl --output out

Trained only on the teacher's text, the student never practises continuing its
*own* prefixes, which is all it does at test time. Here some optimizer steps
train on responses the student itself samples from the step's prompts, scored
by the teacher (docs/method.md §3). One decision per optimizer step, for all its
micro-batches:

* **on-policy** (GKD, Agarwal et al., arXiv 2306.13649): with probability λ
  (`--lmbda`, TRL's default 0.5) the batch's responses are sampled from the
  current student at `--sample-temperature` (TRL's 0.9), else the data's.
* **adaptive** (DistiLLM's adaptive off-policy SGO, Ko et al., arXiv 2402.03898):
  a threshold φ (`--phi-init`, 0) and a generation probability that decays
  linearly, λ = φ·(1 − step/total). Draw u ~ U(0,1):
      u < λ, or u < φ while the replay buffer is not full  -> sample fresh outputs
                                                             (temperature 1, top-p 1)
                                                             and push them into the buffer
      else u < φ                                           -> a random batch from the buffer
      else                                                 -> the data (teacher rationales)
  At every validation (`--eval-steps`, default once per epoch, and once before
  the first step) the student's cross-entropy on `--val-data` (without it, a
  seeded 5% of `--data` held out, at most 256 examples) is compared with
  the *recorded* loss: the one from the start, re-recorded each time φ grows.
  A rise of ≥ 0.1 grows φ by 0.1 (at most 1). That is DistiLLM's own code
  (finetune.py keeps `prev_avg_loss` until the threshold moves), so a slow drift
  upwards counts as well as a jump.
  The buffer holds `--buffer-size` sequences (1000), first in first out (a
  deque with maxlen, like DistiLLM's ReplayBuffer); a replayed batch is drawn
  uniformly without replacement. Replay happens only once the buffer is full
  (the first branch samples fresh outputs until then). Under several processes
  each keeps its own buffer and all draw the same u, so they stay in step.

How it plugs in: `StudentOutputs` is the trainer's batch hook (UndoTrainer's
`batch_hook`, called where Trainer collects a step's micro-batches, before it
counts their response tokens). It swaps the ground-truth micro-batches for
prompt + sampled response ones built by the same collator, so the loss, the
token normalisation and the token counts all see what is really trained on.
On those batches the loss is the chosen divergence alone: the language-model
term of `--lm-weight` would make the student imitate its own samples.
Sampling is batched (left-padded prompts, one `generate` per micro-batch) on
the student's current weights, unwrapped from DDP, in eval mode without
gradients. train_summary.json gets `student_outputs`: batches per source, the φ
history, and the share of wall time spent generating.
"""

from __future__ import annotations

import random
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator

FRESH, REPLAY, GROUND_TRUTH = "fresh", "replay", "ground_truth"
SOURCE_KEY = "undo_batch_source"  # marks a batch the student sampled (fresh or replayed)
STATE_FILE = "undo_student_outputs-rank{rank}.json"  # inside each checkpoint, one per process (setup module)
RISE, PHI_STEP = 0.1, 0.1  # DistiLLM: --loss-eps 0.1, threshold += 0.1
IGNORE_INDEX = -100

Sequence = tuple[list[int], list[int]]  # (prompt ids, response ids)


def default_temperature(mode: str, method: str, given: float | None) -> float:
    """The sampling temperature: the flag, else the method's published default."""
    if given is not None:
        return given
    return 0.9 if mode == "on-policy" and method == "sft" else 1.0  # TRL GKD 0.9; DistiLLM and MiniLLM 1.0


# --- the replay buffer and the two schedules --------------------------------------------

class ReplayBuffer:
    """The student's recent samples, at most `capacity` sequences; the oldest leave first (FIFO)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: deque[Sequence] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.capacity

    def push(self, sequences: list[Sequence]) -> None:
        self.items.extend((list(p), list(r)) for p, r in sequences)

    def sample(self, k: int, rng: random.Random) -> list[Sequence]:
        """k distinct sequences, uniformly (fewer only if the buffer holds fewer)."""
        return rng.sample(list(self.items), min(k, len(self.items)))

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "items": [[p, r] for p, r in self.items]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items = deque(((p, r) for p, r in state["items"]), maxlen=self.capacity)


class OnPolicySchedule:
    """GKD: each step the student's samples with probability λ, else the data."""

    kind = "on-policy"

    def __init__(self, lmbda: float, *, seed: int = 0):
        self.lmbda = lmbda
        self.rng = random.Random(seed)

    def probabilities(self, step: int, total: int, buffer_full: bool = False) -> dict[str, float]:
        return {FRESH: self.lmbda, REPLAY: 0.0, GROUND_TRUTH: 1.0 - self.lmbda}

    def decide(self, step: int, total: int, buffer_full: bool = False, u: float | None = None) -> str:
        u = self.rng.random() if u is None else u
        return FRESH if u < self.lmbda else GROUND_TRUTH

    def next_uses_data(self) -> bool:
        """Will the next `decide` pick the data? (Its draw, peeked without consuming it.)"""
        return _peek(self.rng) >= self.lmbda

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(_rng_from(state["rng"]))


class AdaptiveSchedule:
    """DistiLLM's adaptive SGO: threshold φ, decaying generation probability λ, three-way choice."""

    kind = "adaptive"

    def __init__(self, phi_init: float = 0.0, *, seed: int = 0):
        self.phi = phi_init
        self.reference: float | None = None  # the recorded validation loss φ's growth is measured from
        self.history: list[dict[str, Any]] = []
        self.rng = random.Random(seed)

    def generation_probability(self, step: int, total: int) -> float:
        """λ = φ·(1 − step/total), step = optimizer steps done so far."""
        return self.phi * (1.0 - step / max(total, 1))

    def probabilities(self, step: int, total: int, buffer_full: bool) -> dict[str, float]:
        """The analytic chance of each source this step (what `decide` draws from)."""
        lam = self.generation_probability(step, total)
        fresh = lam if buffer_full else self.phi
        return {FRESH: fresh, REPLAY: self.phi - fresh, GROUND_TRUTH: 1.0 - self.phi}

    def decide(self, step: int, total: int, buffer_full: bool, u: float | None = None) -> str:
        u = self.rng.random() if u is None else u
        lam = self.generation_probability(step, total)
        if u < lam or (u < self.phi and not buffer_full):
            return FRESH
        if u < self.phi:
            return REPLAY
        return GROUND_TRUTH

    def next_uses_data(self) -> bool:
        """Will the next `decide` pick the data (u ≥ φ, whatever λ and the buffer)? Peeked, not consumed;
        a validation that grows φ before that step can still turn it to the student's outputs."""
        return _peek(self.rng) >= self.phi

    def record_validation(self, step: int, loss: float) -> bool:
        """Update φ from a validation loss; True if φ grew."""
        grew = False
        if self.reference is None:
            self.reference = loss
        elif loss - self.reference >= RISE - 1e-9:  # the tolerance: 2.2 - 2.1 is 0.0999... in floating point
            self.phi = round(min(self.phi + PHI_STEP, 1.0), 10)
            self.reference, grew = loss, True
        self.history.append({"step": step, "val_loss": round(loss, 6), "reference": round(self.reference, 6),
                             "phi": self.phi})
        return grew

    def state_dict(self) -> dict[str, Any]:
        return {"phi": self.phi, "reference": self.reference, "history": self.history, "rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phi, self.reference, self.history = state["phi"], state["reference"], state["history"]
        self.rng.setstate(_rng_from(state["rng"]))


def _peek(rng: random.Random) -> float:
    """The next rng.random() without consuming it."""
    state = rng.getstate()
    u = rng.random()
    rng.setstate(state)
    return u


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from(state: list) -> tuple:
    return state[0], tuple(state[1]), state[2]


# --- batches: prompts out of a collated batch, sequences back into one --------------------

def split_examples(batch: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every example in a collated batch, packed (one row) or padded."""
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    if "attention_mask" in batch:  # padded: right padding, one example per row
        lengths = batch["attention_mask"].sum(-1).tolist()
        return [(ids[r][:n], labels[r][:n]) for r, n in enumerate(lengths)]
    starts = [j for j, p in enumerate(batch["position_ids"][0].tolist()) if p == 0] + [len(ids[0])]
    return [(ids[0][a:b], labels[0][a:b]) for a, b in zip(starts, starts[1:])]


def prompt_of(input_ids: list[int], labels: list[int]) -> list[int]:
    """The prompt: everything before the first labelled (response) token."""
    first = next((j for j, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    return input_ids[:first]


def to_batch(sequences: list[Sequence], collator, device, extras: list[dict[str, list]] | None = None) -> dict:
    """Prompt + response examples (response labelled, prompt masked), collated like the data."""
    examples = []
    for i, (prompt, response) in enumerate(sequences):
        example = {"input_ids": list(prompt) + list(response), "labels": [IGNORE_INDEX] * len(prompt) + list(response)}
        if extras is not None:
            example.update(extras[i])
        examples.append(example)
    batch = collator(examples)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


# --- sampling from the student's current weights -----------------------------------------

def sampling_config(model, *, temperature: float, top_p: float, max_new_tokens: int, pad_id: int, eos_ids: list[int]):
    """Plain ancestral sampling: the model's distribution at `temperature`, nothing else.

    Starts from the model's generation_config (so model-specific settings such as the
    cache implementation survive) and neutralises everything that reshapes the
    distribution (top-k, min-p, repetition penalties): transformers would otherwise fill
    top_k = 50 from its global defaults, and the divergences assume the student's own q.
    """
    from transformers import GenerationConfig

    gen = GenerationConfig.from_dict(model.generation_config.to_dict())
    gen.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, typical_p=1.0,
               min_p=0.0 if gen.min_p is not None else None, epsilon_cutoff=0.0, eta_cutoff=0.0,
               repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1, num_return_sequences=1,
               max_new_tokens=max_new_tokens, max_length=None, min_new_tokens=None, min_length=0,
               pad_token_id=pad_id, eos_token_id=eos_ids, return_dict_in_generate=False,
               output_scores=False, output_logits=False, use_cache=True, stop_strings=None)
    return gen


def eos_ids_of(model, tokenizer) -> list[int]:
    found = model.generation_config.eos_token_id
    found = [found] if isinstance(found, int) else list(found or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in found:
        found.append(tokenizer.eos_token_id)
    return found


@contextmanager
def generation_model(trainer) -> Iterator[Any]:
    """The student as it is right now, ready to generate: unwrapped (DDP), eval mode, no gradients.

    Under FSDP or DeepSpeed ZeRO-3 the unwrapped module still gathers its shards in
    forward, and transformers' generate then keeps the processes in step (synced_gpus).
    """
    import torch

    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        if was_training:
            model.train()


def sample_responses(model, prompts: list[list[int]], *, tokenizer, eos_ids: list[int], temperature: float,
                     max_new_tokens: int, max_length: int, top_p: float = 1.0, logits_processor=None) -> list[list[int]]:
    """One batched, left-padded `generate` on the prompts; each response cut after its first eos
    (kept: the student must learn to stop) and to --max-length with its prompt."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention[row, width - len(prompt):] = 1
    room = max(max_length - min(len(p) for p in prompts), 1)
    gen = sampling_config(model, temperature=temperature, top_p=top_p, max_new_tokens=min(max_new_tokens, room),
                          pad_id=pad, eos_ids=eos_ids)
    extra = {"logits_processor": logits_processor} if logits_processor is not None else {}
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                         generation_config=gen, **extra)
    responses = []
    for prompt, row in zip(prompts, out[:, width:].tolist()):
        end = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
        responses.append(row[: max(min(end, max_length - len(prompt)), 1)])
    return responses


# --- the batch hook ----------------------------------------------------------------------

class StudentOutputs:
    """UndoTrainer's batch hook for on-policy / adaptive training (see the module docstring)."""

    def __init__(self, schedule, *, tokenizer, collator, eos_ids: list[int], temperature: float,
                 max_new_tokens: int, max_length: int, buffer_size: int | None, seed: int = 0):
        self.schedule = schedule
        self.tokenizer, self.collator, self.eos_ids = tokenizer, collator, eos_ids
        self.temperature, self.max_new_tokens, self.max_length = temperature, max_new_tokens, max_length
        self.buffer = ReplayBuffer(buffer_size) if buffer_size else None
        self.rng = random.Random(seed + 1)  # replay draws; the schedule has its own stream
        self.counts = {"steps": {FRESH: 0, REPLAY: 0, GROUND_TRUTH: 0},
                       "batches": {FRESH: 0, REPLAY: 0, GROUND_TRUTH: 0}, "sampled_sequences": 0,
                       "sampled_tokens": 0, "generation_s": 0.0}
        self.session_generation_s = 0.0  # this process's run only (not restored): its share of this runtime

    def __call__(self, trainer, batches: list[dict]) -> list[dict]:
        state = trainer.state
        choice = self.schedule.decide(state.global_step, state.max_steps,
                                      buffer_full=self.buffer.full if self.buffer is not None else False)
        self.counts["steps"][choice] += 1
        self.counts["batches"][choice] += len(batches)
        if choice == GROUND_TRUTH:
            return batches
        device = batches[0]["input_ids"].device
        out = []
        for batch in batches:
            if choice == FRESH:
                sequences = self.sample(trainer, [prompt_of(*ex) for ex in split_examples(batch)])
                if self.buffer is not None:
                    self.buffer.push(sequences)
            else:
                sequences = self.buffer.sample(len(split_examples(batch)), self.rng)
            new = to_batch(sequences, self.collator, device)
            new[SOURCE_KEY] = choice
            out.append(new)
        return out

    def next_step_uses_data(self) -> bool:
        """For UndoTrainer's look-ahead: only a step that trains on the data can use its batches early."""
        return self.schedule.next_uses_data()

    def sample(self, trainer, prompts: list[list[int]], logits_processor=None) -> list[Sequence]:
        """The student's responses to `prompts`, timed."""
        import torch

        started = time.perf_counter()
        with generation_model(trainer) as model:
            responses = sample_responses(model, prompts, tokenizer=self.tokenizer, eos_ids=self.eos_ids,
                                         temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                                         max_length=self.max_length, logits_processor=logits_processor)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        self.counts["generation_s"] += elapsed
        self.session_generation_s += elapsed
        self.counts["sampled_sequences"] += len(responses)
        self.counts["sampled_tokens"] += sum(len(r) for r in responses)
        return list(zip(prompts, responses))

    # resume: everything the schedule decided and remembered, per process
    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "counts": self.counts, "rng": _rng_state(self.rng),
                "buffer": self.buffer.state_dict() if self.buffer is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.counts = state["counts"]
        self.rng.setstate(_rng_from(state["rng"]))
        if self.buffer is not None and state.get("buffer"):
            self.buffer.load_state_dict(state["buffer"])

    def summary(self, runtime_s: float) -> dict[str, Any]:
        c = self.counts
        found = {"mode": self.schedule.kind, "steps": dict(c["steps"]), "batches": dict(c["batches"]),
                 "sampled_sequences": c["sampled_sequences"],
                 "mean_sampled_tokens": round(c["sampled_tokens"] / max(c["sampled_sequences"], 1), 2),
                 "sample_temperature": self.temperature, "generation_s": round(c["generation_s"], 3),
                 "generation_share": round(self.session_generation_s / max(runtime_s, 1e-9), 4)}
        if isinstance(self.schedule, OnPolicySchedule):
            found["lmbda"] = self.schedule.lmbda
        if isinstance(self.schedule, AdaptiveSchedule):
            found.update(phi_final=self.schedule.phi, phi_history=self.schedule.history)
        if self.buffer is not None:
            found["buffer"] = {"capacity": self.buffer.capacity, "filled": len(self.buffer)}
        return found


class SourceAwareLoss:
    """The loss for ground-truth batches, and `sampled` for batches the student sampled (see SOURCE_KEY)."""

    def __init__(self, ground_truth, sampled):
        self.ground_truth, self.sampled = ground_truth, sampled

    def __call__(self, model, inputs):
        return (self.sampled if inputs.get(SOURCE_KEY) else self.ground_truth)(model, inputs)
