"""MiniLLM: rewards, importance weights, normalised future rewards and the clipped objective
against a naive float64 reference on a hand-sized case; teacher-mixed sampling on tiny real
models. `undo train --method minillm` end to end is in test_student_outputs.py, with the
other modes (the same fixtures and held-out measure).
"""

from __future__ import annotations

import math

import pytest
import torch


from undo_cli.training.minillm import (TeacherMixProcessor, minillm_loss, next_returns, rollout_stats,
                                       teacher_logits_kl_fn)

ALPHA, EPS = 0.2, 0.2


def _case():
    """Two sampled responses (4 and 3 tokens) over a 5-token vocabulary."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(7, 5, generator=g, dtype=torch.float64) * 1.5
    teacher = torch.randn(7, 5, generator=g, dtype=torch.float64) * 1.5
    teacher[2, 4] = -math.inf  # the teacher rules a token out: the single-step KL skips it
    tokens = torch.tensor([1, 3, 0, 2, 4, 4, 1])
    return student, teacher, tokens, [4, 3]


def _naive_rollout(student, teacher, tokens, lengths, alpha):
    """Loops and python floats: per token r, mixture, w; per sequence R_{t+1}."""
    rewards, weights, returns = [], [], []
    at = 0
    for n in lengths:
        seq_r = []
        for t in range(n):
            q = torch.softmax(student[at + t], -1)[tokens[at + t]].item()
            p = torch.softmax(teacher[at + t], -1)[tokens[at + t]].item()
            seq_r.append(math.log(p) - math.log(q))
            weights.append(q / (alpha * p + (1 - alpha) * q))
        for t in range(n):
            later = seq_r[t + 1:]
            returns.append(sum(later) / len(later) if later else 0.0)
        rewards += seq_r
        at += n
    return rewards, weights, returns


def test_rewards_weights_and_normalised_returns_match_the_naive_reference():
    student, teacher, tokens, lengths = _case()
    logq = torch.log_softmax(student, -1).gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(teacher, -1).gather(-1, tokens[:, None]).squeeze(-1)
    stats = rollout_stats(logq, logp, lengths, ALPHA)
    rewards, weights, returns = _naive_rollout(student, teacher, tokens, lengths, ALPHA)
    assert stats["rewards"].tolist() == pytest.approx(rewards, abs=1e-12)
    assert stats["weights"].tolist() == pytest.approx(weights, abs=1e-12)
    assert stats["returns"].tolist() == pytest.approx(returns, abs=1e-12)
    assert stats["returns"][3] == 0 and stats["returns"][6] == 0  # each sequence's last token has no future
    # by hand for the second sequence: R = mean(r5, r6), mean(r6), 0
    assert stats["returns"][4].item() == pytest.approx((rewards[5] + rewards[6]) / 2)
    assert next_returns(torch.tensor([1.0, 2.0, 4.0]), [3]).tolist() == [3.0, 4.0, 0.0]
    no_mix = rollout_stats(logq, logp, lengths, 0.0)
    assert torch.equal(no_mix["weights"], torch.ones_like(logq))  # plain on-policy sampling: w = 1


def _naive_loss(student, teacher, tokens, old, w, returns, eps):
    """Autograd through the textbook formulas, one token at a time."""
    total = 0.0
    for t in range(student.shape[0]):
        lq = torch.log_softmax(student[t], -1)
        lp = torch.log_softmax(teacher[t], -1)
        ratio = torch.exp(lq[tokens[t]] - old[t]) * w[t]
        pg = torch.max(-returns[t] * ratio, -returns[t] * torch.clamp(ratio, 1 - eps, 1 + eps))
        support = ~torch.isinf(lp)  # sum over the teacher's support (select first: inf * 0 is nan in backward)
        kl = (lq[support].exp() * (lq[support] - lp[support])).sum()
        total = total + pg + kl
    return total


def test_clipped_objective_and_its_gradient_match_the_naive_reference():
    student, teacher, tokens, lengths = _case()
    logq = torch.log_softmax(student, -1).gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(teacher, -1).gather(-1, tokens[:, None]).squeeze(-1)
    stats = rollout_stats(logq, logp, lengths, 0.6)  # a strong mix: weights far from 1
    w, ret = stats["weights"], stats["returns"]
    # As if the policy had moved since sampling: old log-probs chosen so that the ratios fall
    # below, inside and above the clip range, with both signs of R.
    wanted = torch.tensor([1.0, 0.5, 1.5, 1.1, 0.9, 3.0, 0.7], dtype=torch.float64)
    old = logq.detach() + torch.log(w) - torch.log(wanted)
    ratio = torch.exp(logq - old) * w
    assert (ratio < 1 - EPS).any() and (ratio > 1 + EPS).any() and ((ratio - 1).abs() < EPS).any()
    assert (ret > 0).any() and (ret < 0).any()

    mine_in = student.clone().requires_grad_(True)
    totals = {}
    mine = minillm_loss(mine_in, None, teacher_logits_kl_fn(teacher, 5), tokens, old, w, ret, clip_eps=EPS,
                        chunk_size=3, totals=totals)  # chunks of 3 rows: the sequence boundary falls inside one
    mine.backward()
    ref_in = student.clone().requires_grad_(True)
    ref = _naive_loss(ref_in, teacher, tokens, old, w, ret, EPS)
    ref.backward()
    assert mine.item() == pytest.approx(ref.item(), rel=1e-10)
    assert torch.allclose(mine_in.grad, ref_in.grad, atol=1e-10)
    assert totals["clipped"].item() == int(((ratio - ratio.clamp(1 - EPS, 1 + EPS)).abs() > 0).sum())
    assert torch.isfinite(mine)  # the teacher's -inf token is skipped, not infinite


def test_teacher_mix_processor_returns_the_mixture_of_the_two_models(tiny_model, tiny_teacher, tiny_tokenizer):
    """Under left padding and a KV cache, the processor's mixture uses the teacher's true next-token
    distribution (checked against a full forward of the unpadded sequence) and the student's."""
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    student = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    prompts = [tiny_tokenizer("Question: Sam has 3 apples and buys 4 more.")["input_ids"],
               tiny_tokenizer("How many?")["input_ids"]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    seen = []

    class Spy(TeacherMixProcessor):
        def __call__(self, input_ids, scores):
            out = super().__call__(input_ids, scores)
            seen.append((input_ids.clone(), scores.clone(), out.clone()))
            return out

    torch.manual_seed(0)
    with torch.no_grad():
        out = student.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=4,
                               logits_processor=LogitsProcessorList([Spy(teacher, ALPHA, mask, len(tiny_tokenizer))]),
                               pad_token_id=0, eos_token_id=[])
        assert out.shape[1] == width + 4 and len(seen) == 4
        for input_ids, scores, mixed in seen:
            for row, prompt in enumerate(prompts):
                unpadded = input_ids[row, width - len(prompt):][None]
                lp = torch.log_softmax(teacher(unpadded).logits[0, -1].float(), -1)
                lq = torch.log_softmax(scores[row].float(), -1)
                want = torch.log(ALPHA * lp.exp() + (1 - ALPHA) * lq.exp())
                assert torch.allclose(mixed[row], want, atol=1e-5)

