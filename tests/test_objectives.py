"""White-box objectives against a deliberately naive float64 reference.

The reference below is written from the definitions in docs/objectives.md with plain
Python floats: explicit probabilities, loops and `math.log`, no torch and no
code from undo_cli.objectives. Every fast path (full-logits autograd, chunked,
fused with the output layer, offline top-K) is checked against it or against
each other, values and gradients.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from undo_cli.objectives import (KINDS, VocabSizeMismatchWarning, align_teacher_logprobs, chunked_divergence,
                                 collate_teacher_topk, divergence, fused_linear_divergence,
                                 fused_linear_topk_divergence, parse_teacher_logprobs, topk_divergence)

ATOL = RTOL = 1e-5   # float32 implementation vs float64 reference
PARAMS = {"alpha": 0.1, "beta": 0.5}


# --- the naive reference ---------------------------------------------------------------

def _softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    e = [math.exp(x - top) for x in xs]  # exp(-inf) = 0: a teacher's forbidden token
    total = sum(e)
    return [x / total for x in e]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b) if ai > 0)  # 0·log 0 = 0


def _rkl(p: list[float], q: list[float]) -> float:
    # KL(q‖p) over the teacher's support (MiniLLM/DistiLLM inf_mask): +inf otherwise.
    return sum(qi * math.log(qi / pi) for pi, qi in zip(p, q) if pi > 0)


def naive_token(p: list[float], q: list[float], kind: str, alpha: float = 0.1, beta: float = 0.5) -> float:
    if kind == "fkl":
        return _kl(p, q)
    if kind == "rkl":
        return _rkl(p, q)
    if kind == "jsd":
        if beta == 0:
            return _kl(p, q)
        if beta == 1:
            return _rkl(p, q)
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if kind == "skl":
        return _kl(p, [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)])
    if kind == "srkl":
        if alpha == 0:
            return _rkl(p, q)
        return _kl(q, [(1 - alpha) * pi + alpha * qi for pi, qi in zip(p, q)])
    if kind == "tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
    raise AssertionError(kind)


def naive(student, teacher, mask, kind, *, alpha=0.1, beta=0.5, temperature=1.0) -> float:
    """Mean over masked positions of the per-token divergence, in float64 Python."""
    vocab = student.shape[-1]
    rows_s = student.double().reshape(-1, vocab).tolist()
    rows_t = teacher.double().reshape(-1, vocab).tolist()
    keep = mask.reshape(-1).tolist()
    values = [naive_token(_softmax([x / temperature for x in t]), _softmax([x / temperature for x in s]),
                          kind, alpha, beta)
              for s, t, k in zip(rows_s, rows_t, keep) if k]
    return sum(values) / len(values)


def naive_topk(student, teacher, mask, ids, kind, **params) -> float:
    """The offline approximation from its definition: top-K categories plus one tail bucket."""
    vocab = student.shape[-1]
    values = []
    for s, t, k, support in zip(student.double().reshape(-1, vocab).tolist(), teacher.double().reshape(-1, vocab).tolist(),
                                mask.reshape(-1).tolist(), ids.reshape(-1, ids.shape[-1]).tolist()):
        if not k:
            continue
        p, q = _softmax(t), _softmax(s)
        p_bar = [p[i] for i in support] + [1 - sum(p[i] for i in support)]
        q_bar = [q[i] for i in support] + [sum(q[i] for i in range(vocab) if i not in support)]
        values.append(naive_token(p_bar, q_bar, kind, **params))
    return sum(values) / len(values)


# --- fixtures ----------------------------------------------------------------------------

def _logits(seed: int, shape=(2, 7, 23), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=g) * scale
    teacher = torch.randn(shape, generator=g) * scale
    mask = torch.rand(shape[:-1], generator=g) > 0.3
    mask[0, 0] = True
    return student, teacher, mask


def _hidden(seed: int, n=(3, 11), hidden=8, vocab=29, teacher_hidden=12):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(*n, hidden, generator=g).requires_grad_()
    ws = (torch.randn(vocab, hidden, generator=g) * 0.8).requires_grad_()
    ht = torch.randn(*n, teacher_hidden, generator=g)
    wt = torch.randn(vocab, teacher_hidden, generator=g) * 0.8
    mask = torch.rand(n, generator=g) > 0.25
    return hs, ws, ht, wt, mask


def _close(a, b, atol=ATOL, rtol=RTOL):
    return torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                                      atol=atol, rtol=rtol)


# --- values against the reference ---------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_every_objective_matches_the_naive_reference(kind, temperature):
    student, teacher, mask = _logits(1)
    got = divergence(student, teacher, mask, kind, temperature=temperature, **PARAMS)
    _close(got, naive(student, teacher, mask, kind, temperature=temperature, **PARAMS))


@pytest.mark.parametrize("kind,params", [("jsd", {"beta": 0.2}), ("jsd", {"beta": 0.9}), ("skl", {"alpha": 0.3}),
                                         ("srkl", {"alpha": 0.3}), ("skl", {"alpha": 0.0}), ("srkl", {"alpha": 0.0})])
def test_alpha_and_beta_follow_the_definitions(kind, params):
    student, teacher, mask = _logits(2)
    _close(divergence(student, teacher, mask, kind, **params), naive(student, teacher, mask, kind, **params))


def test_jsd_endpoints_follow_trl_convention():
    """TRL's generalized_jsd_loss: β = 0 is forward KL, β = 1 reverse KL; in between the formula
    (which itself tends to 0 at both ends, so the endpoints are special cases)."""
    student, teacher, mask = _logits(3)
    fkl, rkl = naive(student, teacher, mask, "fkl"), naive(student, teacher, mask, "rkl")
    _close(divergence(student, teacher, mask, "jsd", beta=0.0), fkl)
    _close(divergence(student, teacher, mask, "jsd", beta=1.0), rkl)
    assert float(divergence(student, teacher, mask, "jsd", beta=1e-4)) < 0.01 * fkl
    assert fkl != pytest.approx(rkl, rel=1e-3)  # the test data tells the two apart


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_fused_and_offline_values_match_the_reference(kind):
    hs, ws, ht, wt, mask = _hidden(4)
    with torch.no_grad():
        student, teacher = hs @ ws.T, ht @ wt.T
    expected = naive(student, teacher, mask, kind, temperature=1.5, **PARAMS)
    _close(fused_linear_divergence(hs, ws, ht, wt, mask, kind, temperature=1.5, chunk_size=4, **PARAMS), expected)
    _close(chunked_divergence(student, teacher, mask, kind, temperature=1.5, chunk_size=5, **PARAMS), expected)
    # The offline path on K < V follows its own definition (top-K + tail bucket) ...
    top = torch.log_softmax(teacher, -1).topk(6, dim=-1)
    offline = fused_linear_topk_divergence(hs, ws, top.indices, top.values, mask, kind, chunk_size=4, **PARAMS)
    _close(offline, naive_topk(student, teacher, mask, top.indices, kind, **PARAMS))
    # ... and, lumping categories being a coarse-graining, never exceeds the full divergence.
    assert float(offline.detach()) <= naive(student, teacher, mask, kind, **PARAMS) + ATOL


# --- gradients -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_autograd_and_fused_gradients_match_finite_differences(kind):
    torch.manual_seed(5)
    student = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 9, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False])
    assert torch.autograd.gradcheck(lambda s: divergence(s, teacher, mask, kind, temperature=1.3, **PARAMS), (student,),
                                    fast_mode=True)
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(5, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w: fused_linear_divergence(h, w, ht, wt, mask, kind, temperature=1.3, chunk_size=2, **PARAMS), (h, w),
        fast_mode=True)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked_values_and_gradients(kind):
    hs, ws, ht, wt, mask = _hidden(6)
    expected = divergence(hs @ ws.T, ht @ wt.T, mask, kind, temperature=0.7, **PARAMS)
    grads = torch.autograd.grad(expected, (hs, ws))
    for chunk_size in (1, 5, 1024):
        got = fused_linear_divergence(hs, ws, ht, wt, mask, kind, temperature=0.7, chunk_size=chunk_size, **PARAMS)
        _close(got, expected)
        for a, b in zip(torch.autograd.grad(got * 3.0, (hs, ws)), grads):  # grad_output != 1 too
            _close(a, 3.0 * b)
    logits = (hs @ ws.T).detach().requires_grad_()
    got = chunked_divergence(logits, ht @ wt.T, mask, kind, temperature=0.7, chunk_size=4, **PARAMS)
    ref = divergence(logits, ht @ wt.T, mask, kind, temperature=0.7, **PARAMS)
    _close(torch.autograd.grad(got, logits)[0], torch.autograd.grad(ref, logits)[0])


def test_sum_reduction_and_bfloat16_inputs():
    hs, ws, ht, wt, mask = _hidden(7)
    mean = fused_linear_divergence(hs, ws, ht, wt, mask, "skl")
    _close(fused_linear_divergence(hs, ws, ht, wt, mask, "skl", reduction="sum"), mean * int(mask.sum()))
    # bf16 models: logits are formed in bf16 and upcast; the result stays close to float32.
    h16, w16 = hs.detach().bfloat16().requires_grad_(), ws.detach().bfloat16().requires_grad_()
    loss = fused_linear_divergence(h16, w16, ht.bfloat16(), wt.bfloat16(), mask, "skl", chunk_size=8)
    loss.backward()
    assert loss.dtype == torch.float32 and w16.grad.dtype == torch.bfloat16
    _close(loss, mean, atol=0.05, rtol=0.05)


# --- masking, -inf, no teacher gradient ---------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_masked_positions_do_not_change_the_loss(kind):
    student, teacher, mask = _logits(8)
    clean = divergence(student, teacher, mask, kind)
    dirty_s, dirty_t = student.clone().requires_grad_(False), teacher.clone()
    dirty_s[~mask] = float("nan")
    dirty_t[~mask] = float("-inf")  # a whole masked row of -inf would be NaN if it were computed
    dirty_s.requires_grad_()
    got = divergence(dirty_s, dirty_t, mask, kind)
    _close(got, clean)
    got.backward()
    assert torch.isfinite(dirty_s.grad).all() and (dirty_s.grad[~mask] == 0).all()
    _close(chunked_divergence(dirty_s, dirty_t, mask, kind, chunk_size=3), clean)


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_neg_inf_gives_finite_loss_and_gradients(kind):
    student, teacher, mask = _logits(9)
    teacher[..., ::3] = float("-inf")    # the teacher forbids a third of the vocabulary everywhere
    teacher[1, 2, :-1] = float("-inf")   # and is certain at one position
    student.requires_grad_()
    loss = divergence(student, teacher, mask, kind, **PARAMS)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    _close(loss, naive(student.detach(), teacher, mask, kind, **PARAMS))
    chunked = chunked_divergence(student, teacher, mask, kind, chunk_size=4, **PARAMS)
    grad = torch.autograd.grad(chunked, student)[0]
    _close(chunked, loss)
    _close(grad, student.grad)


def test_no_gradient_reaches_the_teacher():
    hs, ws, ht, wt, mask = _hidden(10)
    ht.requires_grad_(), wt.requires_grad_()
    teacher_logits = (ht @ wt.T)
    for loss in (divergence(hs @ ws.T, teacher_logits, mask, "jsd"),
                 chunked_divergence(hs @ ws.T, teacher_logits, mask, "jsd"),
                 fused_linear_divergence(hs, ws, ht, wt, mask, "jsd")):
        loss.backward()
    assert ht.grad is None and wt.grad is None
    assert hs.grad is not None and ws.grad is not None


def test_an_empty_mask_gives_zero_and_zero_gradients():
    hs, ws, ht, wt, mask = _hidden(11)
    none = torch.zeros_like(mask)
    for loss in (divergence(hs @ ws.T, ht @ wt.T, none, "fkl"), fused_linear_divergence(hs, ws, ht, wt, none, "fkl")):
        assert float(loss.detach()) == 0.0
        loss.backward()
    assert (hs.grad == 0).all() and (ws.grad == 0).all()


# --- vocabulary sizes and parameters ------------------------------------------------------

def test_padded_vocabularies_are_sliced_with_a_warning():
    hs, ws, ht, wt, mask = _hidden(12, vocab=29)
    wt_padded = torch.cat([wt, torch.randn(3, wt.shape[1])])  # the teacher pads its embedding to 32
    with pytest.warns(VocabSizeMismatchWarning, match="first 29"):
        fused = fused_linear_divergence(hs, ws, ht, wt_padded, mask, "fkl")
    with pytest.warns(VocabSizeMismatchWarning):
        full = divergence(hs @ ws.T, ht @ wt_padded.T, mask, "fkl")
    _close(fused, naive(hs @ ws.T, ht @ wt.T, mask, "fkl"))
    _close(full, fused)
    fused.backward()
    assert ws.grad.shape == ws.shape
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal sizes: silent
        fused_linear_divergence(hs, ws, ht, wt, mask, "fkl")


@pytest.mark.parametrize("bad,match", [({"kind": "kl"}, "unknown objective"), ({"alpha": 1.0}, "alpha"),
                                       ({"beta": 1.5}, "beta"), ({"temperature": 0.0}, "temperature")])
def test_meaningless_settings_are_refused(bad, match):
    student, teacher, mask = _logits(13)
    kwargs = {"kind": "skl", **bad}
    with pytest.raises(ValueError, match=match):
        divergence(student, teacher, mask, kwargs.pop("kind"), **kwargs)


# --- the offline top-K path ---------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_offline_path_equals_the_live_path_when_k_is_the_whole_vocabulary(kind):
    hs, ws, ht, wt, mask = _hidden(14)
    teacher_logprobs = torch.log_softmax(ht @ wt.T, dim=-1)
    vocab = ws.shape[0]
    ids = torch.arange(vocab).expand(*mask.shape, vocab)
    live = divergence(hs @ ws.T, ht @ wt.T, mask, kind, **PARAMS)
    grads = torch.autograd.grad(live, (hs, ws))
    offline = fused_linear_topk_divergence(hs, ws, ids, teacher_logprobs, mask, kind, chunk_size=5, **PARAMS)
    _close(offline, live)
    for a, b in zip(torch.autograd.grad(offline, (hs, ws)), grads):
        _close(a, b)
    logits = (hs @ ws.T).detach()
    _close(topk_divergence(logits, ids, teacher_logprobs, mask, kind, **PARAMS), live)


def test_offline_path_refuses_temperature_and_foreign_ids():
    hs, ws, ht, wt, mask = _hidden(15)
    top = torch.log_softmax(ht @ wt.T, -1).topk(4, dim=-1)
    with pytest.raises(ValueError, match="temperature 1"):
        fused_linear_topk_divergence(hs, ws, top.indices, top.values, mask, "fkl", temperature=2.0)
    with pytest.raises(ValueError, match="outside the student's vocabulary"):
        fused_linear_topk_divergence(hs, ws, top.indices + 100, top.values, mask, "fkl")


def test_records_align_with_encoded_examples_and_collate(tiny_tokenizer):
    from undo_cli.prompts import encode_example

    messages = [{"role": "user", "content": "Sam has 3 apples and buys 4 more. How many?"}]
    ids, labels = encode_example(tiny_tokenizer, messages, "3 + 4 = 7.\n#### 7")
    response = [t for t in labels if t != -100]
    # What `undo generate --logprobs 2` records: the sampled token, its log-prob, the top 2.
    rows = [[t, -0.1, [[t, -0.1], [(t + 1) % 50, -2.5]]] for t in response[:-1]]  # no trailing newline
    rows[0][2] = [[(response[0] + 1) % 50, -0.3], [(response[0] + 2) % 50, -2.0]]  # sampled token outside top-2
    aligned = align_teacher_logprobs(labels, rows)
    assert [p for p, _ in aligned] == [i for i, t in enumerate(labels) if t != -100][:-1]
    assert aligned[0][1][-1] == (response[0], -0.1) and len(aligned[0][1]) == 3
    # A re-tokenisation mismatch means no KD for the example.
    edited = [list(r) for r in rows]
    edited[3][0] = (edited[3][0] + 7) % 50
    assert align_teacher_logprobs(labels, edited) is None
    with pytest.raises(ValueError, match="token 1"):
        parse_teacher_logprobs([rows[0], [1, "x"]])

    batch = collate_teacher_topk([aligned, None], length=len(ids) + 2, vocab_size=len(tiny_tokenizer))
    assert batch["teacher_topk_ids"].shape == (2, len(ids) + 2, 3)
    assert batch["teacher_kd_mask"][0].sum() == len(response) - 1 and not batch["teacher_kd_mask"][1].any()
    first = labels.index(response[0])
    assert batch["teacher_topk_valid"][0, first].all() and batch["teacher_topk_valid"][0, first + 1].sum() == 2
    # The collated tensors drive the loss directly (shifted like the labels).
    torch.manual_seed(0)
    logits = torch.randn(2, len(ids) + 2, len(tiny_tokenizer), requires_grad=True)
    shift = {k: v[:, 1:] for k, v in batch.items()}
    loss = topk_divergence(logits[:, :-1], shift["teacher_topk_ids"], shift["teacher_topk_logprobs"],
                           shift["teacher_kd_mask"], "skl", topk_valid=shift["teacher_topk_valid"])
    loss.backward()
    assert torch.isfinite(loss) and float(loss) > 0 and logits.grad[1].abs().sum() == 0


def test_cross_entropy_shares_the_chunk_pass():
    """DistiLLM's skl + 1.0 x LM loss from one projection: equals the two losses computed apart."""
    from undo_cli.objectives.chunked import ChunkedObjective, live_teacher_chunk_fn, with_cross_entropy

    hs, ws, ht, wt, mask = _hidden(16)
    h, t = hs[mask], ht[mask]
    targets = torch.randint(0, ws.shape[0], (h.shape[0],), generator=torch.Generator().manual_seed(0))
    logits = h @ ws.T
    expected = 0.7 * divergence(logits, t @ wt.T, None, "skl", reduction="sum") \
        + 1.3 * torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    grads = torch.autograd.grad(expected, (hs, ws))
    totals = {}
    kd = live_teacher_chunk_fn(t, wt, "skl", alpha=0.1, beta=0.5, temperature=1.0, vocab=ws.shape[0])
    fn = with_cross_entropy(kd, targets, kd_weight=0.7, lm_weight=1.3, totals=totals)
    got = ChunkedObjective.apply(hs[mask], ws, fn, 4, 1.0)
    _close(got, expected)
    for a, b in zip(torch.autograd.grad(got, (hs, ws)), grads):
        _close(a, b)
    _close(totals["ce"], torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
    assert int(totals["correct"]) == int((logits.argmax(-1) == targets).sum())
    # Cross-entropy alone (no divergence) is plain SFT, chunked.
    sft = ChunkedObjective.apply(h, ws, with_cross_entropy(None, targets, lm_weight=1.0), 3, 1.0)
    _close(sft, torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
