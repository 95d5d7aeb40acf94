"""MiniLLM: the sequence-level reverse KL to the teacher, minimised by policy gradient.

    undo train --student SFT_STUDENT --teacher T --method minillm --data rationales.jsonl --output out
    undo train --student SFT_STUDENT --teacher T --method minillm --lm-data rationales.jsonl ...

Start from an SFT student (`undo train --student S --data rationales.jsonl`
first): MiniLLM refines a student that already writes sensible text; from a
random one its own samples carry no signal. Source: Gu et al., "MiniLLM:
Knowledge Distillation of Large Language Models" (ICLR 2024, arXiv 2306.08543),
docs/method.md §3.

Every optimizer step, for each micro-batch's prompts:

1. **Teacher-mixed sampling.** The student generates, but each token is drawn
   from α·p + (1−α)·q (teacher p, student q, α = `--teacher-mix` 0.2): a logits
   processor runs the teacher alongside `generate` (its own KV cache) and hands
   back the mixture's log-probabilities. Tokens the teacher finds absurd become
   rare, which stops the student from "reward hacking" degenerate text.
2. **Scoring** (no gradients): log q(y_t) and log p(y_t) of every sampled token;
   reward r_t = log p(y_t) − log q(y_t); importance weight w_t = q(y_t) / mix(y_t)
   (the token came from the mixture, the gradient is for q); the length-normalised
   future reward R_{t+1} = mean of r over t+1..T (0 for the last token).
3. **Loss** per response token t, summed (the trainer divides by the token count):

       ρ_t = exp(log q_θ(y_t) − log q_old(y_t)) · w_t              the importance ratio
       ℓ_t = max(−R_{t+1}·ρ_t, −R_{t+1}·clip(ρ_t, 1−ε, 1+ε))        PPO clipping, ε = --clip-eps 0.2
           + Σ_v q_θ(v)·(log q_θ(v) − log p(v))                       the single-step term: exact KL(q‖p)

   The long-term term's gradient is the policy gradient of the future reward;
   the single-step term replaces r_t's own high-variance sample by its exact
   expectation, the per-step reverse KL, summed over the vocabulary (it is
   `objectives`' chunked `rkl`: logits never whole). The single-step term is
   not weighted by w_t: it is an exact expectation over y_t, which w_t corrects
   for (MiniLLM's own code leaves it unweighted too). Sampling and the update
   happen in the same optimizer step, so q_old = q_θ in value and ρ_t = w_t: the
   clipping bounds the importance weights.
4. **Language-model term** (`--lm-data`, optional): plus `--lm-weight` × the
   mean cross-entropy on a batch of plain text ("text" lines) or rationales
   from that file, packed into the same forward pass.

Deliberate differences from MiniLLM's released code: one policy update per
sample (no rollout store or PPO inner epochs), no reward whitening, and the
future reward starts at t+1 as in the paper (the code's includes r_t).
train_summary.json gets `student_outputs` (mode "minillm"): mean rewards (first
and last 10% of steps), the time spent sampling and scoring, the generation share.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import torch

from undo_cli.errors import RecordError, UndoError
from undo_cli.objectives.chunked import ChunkedObjective, live_teacher_chunk_fn, with_cross_entropy
from undo_cli.training.student_outputs import (FRESH, IGNORE_INDEX, SOURCE_KEY, _rng_from, _rng_state,
                                               generation_model, prompt_of, split_examples, to_batch)
from undo_cli.training.trainer import MODEL_INPUT_KEYS, response_positions

Tensor = torch.Tensor
EXTRAS = ("minillm_old_logprob", "minillm_weight", "minillm_return", "minillm_reward", "minillm_rl")


# --- 1. teacher-mixed sampling -----------------------------------------------------------

class TeacherMixProcessor:
    """A transformers logits processor: generate samples from α·p + (1−α)·q instead of q.

    `scores` are the student's next-token logits; the teacher runs incrementally on the
    same sequences (prompt prefill on the first call, then one token per call, with its
    own cache and the left-padding positions generate uses). Returns log(mixture), so
    generate's sampling (temperature 1, no top-k/top-p) draws from the mixture.
    """

    def __init__(self, teacher, alpha: float, attention_mask: Tensor, vocab: int):
        self.teacher, self.alpha, self.vocab = teacher, alpha, vocab
        self.mask = attention_mask
        self.cache = None

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.cache is None:
            step_ids, mask = input_ids, self.mask
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        else:
            mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=-1)
            step_ids, positions = input_ids[:, -1:], mask.long().sum(-1, keepdim=True) - 1
        out = self.teacher(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                           past_key_values=self.cache, use_cache=True)
        self.mask, self.cache = mask, out.past_key_values
        lp = torch.log_softmax(out.logits[:, -1, : self.vocab].float(), dim=-1)
        lq = torch.log_softmax(scores[:, : self.vocab].float(), dim=-1)
        mixed = torch.logaddexp(lp + math.log(self.alpha), lq + math.log1p(-self.alpha))
        full = scores.new_full(scores.shape, -math.inf)
        full[:, : self.vocab] = mixed.to(scores.dtype)
        return full


# --- 2. scoring: rewards, importance weights, normalised future rewards ------------------

def token_logprobs(model, inputs: dict[str, Any], keep: Tensor, targets: Tensor, *, vocab: int,
                   fused: bool, chunk_size: int = 1024) -> Tensor:
    """log softmax(logits)[target] at the `keep` positions, [n] float32, without gradients.

    `fused`: form the logits chunk by chunk from the final hidden states and the output
    layer (distill.check_fusable said it is a plain linear map), so no [n × V] tensor exists.
    """
    from undo_cli.training.distill import final_hidden_states

    with torch.no_grad():
        if fused:
            rows, weight = final_hidden_states(model, inputs, keep), model.get_output_embeddings().weight[:vocab]
        else:
            model_inputs = {k: inputs[k] for k in MODEL_INPUT_KEYS if k in inputs}
            rows, weight = model(**model_inputs, use_cache=False).logits[keep][:, :vocab], None
        out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        for a in range(0, rows.shape[0], chunk_size):
            z = (rows[a: a + chunk_size] @ weight.T if weight is not None else rows[a: a + chunk_size]).float()
            t = targets[a: a + chunk_size, None].to(z.device)
            out[a: a + chunk_size] = (z.gather(-1, t) - torch.logsumexp(z, -1, keepdim=True)).squeeze(-1)
    return out


def served_token_logprobs(topk: dict[str, Tensor], keep: Tensor, targets: Tensor) -> Tensor:
    """log p(target) at the `keep` positions from a served teacher's top-K tensors (the trained token is
    always in its support: vLLM's prompt_logprobs include the prompt's own token)."""
    ids = topk["teacher_topk_ids"][:, 1:][keep[:, :-1].cpu()]
    lps = topk["teacher_topk_logprobs"][:, 1:][keep[:, :-1].cpu()]
    hit = ids == targets.cpu()[:, None]
    return lps.masked_fill(~hit, -math.inf).max(-1).values.to(targets.device)


def next_returns(rewards: Tensor, lengths: list[int]) -> Tensor:
    """R_{t+1} = mean of r over t+1..T within each sequence (0 for its last token); rewards flat [Σ lengths]."""
    out = torch.zeros_like(rewards)
    start = 0
    for n in lengths:
        r = rewards[start: start + n]
        later = torch.flip(torch.cumsum(torch.flip(r, [0]), 0), [0])[1:]  # Σ_{s>t} r_s for t < T
        count = torch.arange(n - 1, 0, -1, device=r.device, dtype=r.dtype)  # how many tokens follow t
        out[start: start + n - 1] = later / count
        start += n
    return out


def rollout_stats(logq: Tensor, logp: Tensor, lengths: list[int], alpha: float) -> dict[str, Tensor]:
    """Per sampled token: log q_old, reward, log of the sampling mixture, importance weight, R_{t+1}."""
    rewards = logp - logq
    if alpha > 0:
        log_mix = torch.logaddexp(logp + math.log(alpha), logq + math.log1p(-alpha))
    else:
        log_mix = logq.clone()
    return {"old_logprobs": logq, "rewards": rewards, "log_mixture": log_mix, "weights": torch.exp(logq - log_mix),
            "returns": next_returns(rewards, lengths)}


# --- 3. the loss --------------------------------------------------------------------------

def policy_gradient_chunk_fn(kl_fn, targets: Tensor, old_logprobs: Tensor, weights: Tensor, returns: Tensor,
                             clip_eps: float, totals: dict[str, Tensor] | None = None):
    """A ChunkFn (objectives.chunked): Σ_t [clipped PG term + single-step KL] with its gradient.

    The PG term's gradient with respect to log q_θ(y_t) is −R_{t+1}·ρ_t when the unclipped
    branch is the larger one (inside the clip range the two are equal), else 0; through
    log_softmax that is c_t·(onehot(y_t) − q). `kl_fn` (the live teacher's `rkl` chunk
    function) adds the single-step term and may overwrite the logits, so it runs last.
    """

    def chunk_fn(start: int, end: int, z: Tensor, need: bool):
        with torch.no_grad():
            t = targets[start:end, None].to(z.device)
            log_q = z - torch.logsumexp(z, -1, keepdim=True)
            log_q_y = log_q.gather(-1, t).squeeze(-1)
            ratio = torch.exp(log_q_y - old_logprobs[start:end]) * weights[start:end]
            adv = returns[start:end]
            unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
            pg = torch.maximum(unclipped, clipped)
            g = None
            if need:
                coef = torch.where(unclipped >= clipped, -adv * ratio, torch.zeros_like(ratio))
                g = log_q.exp_().mul_(-coef[:, None])  # log_q's storage becomes the gradient
                g.scatter_add_(-1, t, coef[:, None])
            del log_q
            kl, g_kl = kl_fn(start, end, z, need)
            if totals is not None:
                outside = (ratio - ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)).abs() > 0
                for key, value in (("pg", pg.sum()), ("kl", kl), ("clipped", outside.sum())):
                    totals[key] = totals.get(key, 0) + value.detach()
            if need:
                g.add_(g_kl)
            return pg.sum() + kl, g

    return chunk_fn


def minillm_loss(student: Tensor, weight: Tensor | None, kl_fn, targets: Tensor, old_logprobs: Tensor,
                 weights: Tensor, returns: Tensor, *, clip_eps: float, chunk_size: int = 1024,
                 totals: dict[str, Tensor] | None = None) -> Tensor:
    """The summed MiniLLM loss over response tokens: `student` is hidden states with the output layer
    `weight`, or logits (`weight` None); gradients reach them, chunk by chunk."""
    fn = policy_gradient_chunk_fn(kl_fn, targets, old_logprobs, weights, returns, clip_eps, totals)
    return ChunkedObjective.apply(student, weight, fn, chunk_size, 1.0)


def teacher_logits_kl_fn(teacher_logits: Tensor, vocab: int):
    """The single-step KL(q‖p) chunk function against teacher logits already computed (tests, small runs)."""
    return live_teacher_chunk_fn(teacher_logits, None, "rkl", alpha=0.0, beta=0.5, temperature=1.0, vocab=vocab)


class MiniLLMLoss:
    """`loss_fn(model, inputs)` for UndoTrainer on the batches `MiniLLMRollout` builds.

    `kd` is the live-teacher `DistillationLoss` for objective `rkl` (training/distill.py):
    its student rows and teacher chunk function are reused as they are.
    """

    def __init__(self, kd, *, clip_eps: float, lm_weight: float, chunk_size: int = 1024):
        self.kd, self.clip_eps, self.lm_weight, self.chunk_size = kd, clip_eps, lm_weight, chunk_size

    def __call__(self, model, inputs: dict[str, Any]):
        keep, targets = response_positions(inputs["labels"])
        old, w, ret, reward, rl = (inputs[k][keep].float() for k in EXTRAS)
        rl = rl > 0.5
        student, weight = self.kd._student(model, inputs, keep)
        # The teacher scores the sampled responses only: their labels alone, so that whichever way it
        # forms its rows (fused, or from the labels' positions) they line up with student[rl].
        keep_rl = keep & (inputs["minillm_rl"] > 0.5)
        labels_rl = torch.full_like(inputs["labels"], IGNORE_INDEX)
        labels_rl[:, 1:][keep_rl[:, :-1]] = inputs["labels"][:, 1:][keep_rl[:, :-1]]
        kl_fn, _ = self.kd._teacher_fn({**inputs, "labels": labels_rl}, keep_rl)
        totals: dict[str, Tensor] = {}
        n_rl, n_lm = int(rl.sum()), int((~rl).sum())
        loss_sum = minillm_loss(student[rl], weight, kl_fn, targets[rl], old[rl], w[rl], ret[rl],
                                clip_eps=self.clip_eps, chunk_size=self.chunk_size, totals=totals)
        zero = loss_sum.new_zeros(())
        metrics = {"pg": totals.get("pg", zero) / max(n_rl, 1), "rkl": totals.get("kl", zero) / max(n_rl, 1),
                   "reward": reward[rl].mean() if n_rl else zero,
                   "clip_frac": totals.get("clipped", zero).float() / max(n_rl, 1)}
        if n_lm:  # mean RL loss + lm_weight × mean LM loss, scaled back to a sum over this batch's tokens
            ce_totals: dict[str, Tensor] = {}
            ce_fn = with_cross_entropy(None, targets[~rl], kd_weight=0.0, lm_weight=1.0, totals=ce_totals)
            ce_sum = ChunkedObjective.apply(student[~rl], weight, ce_fn, self.chunk_size, 1.0)
            n = n_rl + n_lm
            loss_sum = n * (loss_sum / max(n_rl, 1) + self.lm_weight * ce_sum / n_lm)
            metrics["lm_ce"] = ce_totals["ce"] / n_lm
        return loss_sum, metrics


# --- 4. the language-model data -----------------------------------------------------------

def lm_records(path: str) -> list[dict[str, Any]]:
    """--lm-data's records, checked: each has a non-empty "text" or is a rationale record (file:line:field errors)."""
    from undo_cli.records import read_records
    from undo_cli.records.io import display_name
    from undo_cli.records.schema import check_record
    from undo_cli.training.data import record_lines

    records, lines = read_records(path), record_lines(path)
    for i, record in enumerate(records):
        text = record.get("text") if isinstance(record, dict) else None
        if isinstance(text, str) and text.strip():
            continue
        if check_record(dict(record) if isinstance(record, dict) else record, "rationale") is not None:
            raise RecordError(display_name(path), lines[i] if lines else None,
                              "needs a non-empty 'text' (plain text) or the fields of a rationale record",
                              field="text", hint='write lines like {"text": "..."}, or pass a rationales file')
    return records


def lm_examples(path: str, tokenizer, *, max_length: int, template: str) -> list[dict[str, list[int]]]:
    """--lm-data as examples: "text" lines train on every token, rationale records on the rationale."""
    from undo_cli.prompts import encode_example, student_messages
    from undo_cli.records.io import display_name

    examples = []
    for record in lm_records(path):
        if isinstance(record.get("text"), str) and record["text"].strip():
            ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
            labels = list(ids)
        else:
            ids, labels = encode_example(tokenizer, student_messages(record, template), record["rationale"])
        ids, labels = ids[:max_length], labels[:max_length]
        if any(x != IGNORE_INDEX for x in labels[1:]):
            examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise UndoError(f"{display_name(path)}: no example with a token to learn from within --max-length {max_length}",
                        hint="raise --max-length, or check the file")
    return examples


# --- the batch hook -----------------------------------------------------------------------

class MiniLLMRollout:
    """UndoTrainer's batch hook for --method minillm: sample, score, attach what the loss needs."""

    def __init__(self, sampler, *, teacher, vocab: int, alpha: float, collator, lm_data: list | None = None,
                 seed: int = 0, served=None, packed: bool = False):
        self.sampler, self.teacher, self.vocab, self.alpha = sampler, teacher, vocab, alpha
        self.served, self.packed = served, packed  # a served teacher (teacher None; alpha 0, checked by the config)
        self.collator, self.lm_data = collator, lm_data
        self.rng = random.Random(seed + 2)
        self.fused: dict[str, bool] = {}
        self.steps, self.batches, self.scoring_s = 0, 0, 0.0
        self.step_rewards: list[float] = []

    def next_step_uses_data(self) -> bool:
        return False  # every step trains on the student's samples: nothing to score ahead

    def _fused(self, role: str, model, inputs, keep) -> bool:
        if role not in self.fused:
            from undo_cli.training.distill import check_fusable

            self.fused[role] = check_fusable(model, inputs, keep) is None
        return self.fused[role]

    def __call__(self, trainer, batches: list[dict]) -> list[dict]:
        from transformers import LogitsProcessorList

        device = batches[0]["input_ids"].device
        out, rewards = [], []
        for batch in batches:
            prompts = [prompt_of(*ex) for ex in split_examples(batch)]
            processors = None
            if self.alpha > 0:
                width = max(len(p) for p in prompts)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
                processors = LogitsProcessorList([TeacherMixProcessor(self.teacher, self.alpha, mask, self.vocab)])
            sequences = self.sampler.sample(trainer, prompts, logits_processor=processors)
            started = time.perf_counter()
            scored = to_batch(sequences, self.collator, device)
            keep, targets = response_positions(scored["labels"])
            with generation_model(trainer) as model:
                logq = token_logprobs(model, scored, keep, targets, vocab=self.vocab,
                                      fused=self._fused("student", model, scored, keep))
                if self.served is not None:
                    logp = served_token_logprobs(self.served.topk_tensors(scored, self.packed), keep, targets)
                else:
                    logp = token_logprobs(self.teacher, scored, keep, targets, vocab=self.vocab,
                                          fused=self._fused("teacher", self.teacher, scored, keep))
            stats = rollout_stats(logq, logp, [len(r) for _, r in sequences], self.alpha)
            self.scoring_s += time.perf_counter() - started
            rewards.append(stats["rewards"])
            out.append(self._batch(sequences, stats, device))
        self.steps += 1
        self.batches += len(batches)
        self.step_rewards.append(float(torch.cat(rewards).mean()))
        return out

    def _batch(self, sequences, stats: dict[str, Tensor], device) -> dict:
        """Prompt + sampled response examples carrying the per-token rollout values (at the positions
        that predict each response token), plus --lm-data examples, in one collated batch."""
        values = [stats[k].tolist() for k in ("old_logprobs", "weights", "returns", "rewards")]
        values.append([1.0] * len(values[0]))  # minillm_rl: this token belongs to a sampled response
        examples, at = [], 0
        for prompt, response in sequences:
            n, first = len(response), len(prompt) - 1  # position len(prompt)-1 predicts the first response token
            example = {"input_ids": list(prompt) + list(response),
                       "labels": [IGNORE_INDEX] * len(prompt) + list(response)}
            for key, column in zip(EXTRAS, values):
                row = [0.0] * (len(prompt) + n)
                row[first: first + n] = column[at: at + n]
                example[key] = row
            examples.append(example)
            at += n
        if self.lm_data:
            for example in self.rng.sample(self.lm_data, min(len(sequences), len(self.lm_data))):
                examples.append({**example, **{key: [0.0] * len(example["input_ids"]) for key in EXTRAS}})
        batch = self.collator(examples)
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        batch[SOURCE_KEY] = FRESH
        if self.served is not None:  # the samples' scores are cached: this costs the --lm-data examples only
            self.served.prefetch([batch], self.packed)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state(self.rng), "steps": self.steps, "batches": self.batches, "scoring_s": self.scoring_s,
                "step_rewards": self.step_rewards, "sampler": self.sampler.counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(_rng_from(state["rng"]))
        self.steps, self.batches, self.scoring_s = state["steps"], state["batches"], state["scoring_s"]
        self.step_rewards = state["step_rewards"]
        self.sampler.counts = state["sampler"]

    def summary(self, runtime_s: float) -> dict[str, Any]:
        h = self.step_rewards
        window = max(len(h) // 10, 1)
        c = self.sampler.counts
        return {"mode": "minillm", "teacher_mix": self.alpha,
                "steps": {"fresh": self.steps, "replay": 0, "ground_truth": 0},
                "batches": {"fresh": self.batches, "replay": 0, "ground_truth": 0},
                "sampled_sequences": c["sampled_sequences"],
                "mean_sampled_tokens": round(c["sampled_tokens"] / max(c["sampled_sequences"], 1), 2),
                "mean_reward_first": round(sum(h[:window]) / window, 6) if h else None,
                "mean_reward_final": round(sum(h[-window:]) / window, 6) if h else None,
                "mean_reward": round(sum(h) / len(h), 6) if h else None,
                "generation_s": round(c["generation_s"], 3), "scoring_s": round(self.scoring_s, 3),
                "generation_share": round(self.sampler.session_generation_s / max(runtime_s, 1e-9), 4),
                "lm_data_examples": len(self.lm_data) if self.lm_data else 0}
