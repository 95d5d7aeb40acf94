"""Cross-tokenizer objectives (uld, gold) against a deliberately naive float64 reference, and byte alignment.

The reference is written from the definitions in docs/objectives.md ("Teachers with another tokenizer")
with plain Python floats: merged span vectors, sorting, an explicit JSD, no torch and no code from
undo_cli.objectives. The autograd reference (`cross_tokenizer_divergence`) is held to it; the chunked
loss `undo train` uses (`cross_loss`: hand-derived gradients, three passes) is held to the autograd
reference, values and gradients, fused (hidden states x head) and on logits, with spans across chunks.
"""

from __future__ import annotations

import math

import pytest
import torch

from undo_cli.objectives.cross_tokenizer import (FullTeacher, SpanRows, TopKTeacher, cross_loss,
                                                 cross_tokenizer_divergence, gold_full, gold_topk, live_teacher, uld_full,
                                                 uld_topk)

ATOL = RTOL = 1e-5


# --- the naive reference -----------------------------------------------------------------

def _softmax(xs):
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [x / sum(e) for x in e]


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _jsd(p, q, beta):
    if beta == 0:
        return _kl(p, q)
    if beta == 1:
        return sum(y * math.log(y / x) for x, y in zip(p, q) if x > 0 and y > 0)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def naive_uld(q_hat, p_hat, k=None):
    """Σ|sorted differences|, zero-padded; with k, ranks >= k lumped into one sum per side."""
    qs, ps = sorted(q_hat, reverse=True), sorted(p_hat, reverse=True)
    width = max(len(qs), len(ps))
    qs, ps = qs + [0.0] * (width - len(qs)), ps + [0.0] * (width - len(ps))
    if k is None:
        return sum(abs(a - b) for a, b in zip(qs, ps))
    return sum(abs(a - b) for a, b in zip(qs[:k], ps[:k])) + abs(sum(qs[k:]) - sum(ps[k:]))


def naive_gold(q_hat, p_hat, pairs, beta):
    """JSD_beta over the shared tokens (pairs of student id, teacher id) plus one bucket per side."""
    p = [p_hat[t] for _, t in pairs]
    q = [q_hat[s] for s, _ in pairs]
    return _jsd(p + [1 - sum(p)], q + [1 - sum(q)], beta)


def naive_spans(student_logits, teacher_logits, s_rows, t_rows, kind, pairs=None, beta=0.5, temperature=1.0):
    """Mean over spans; merged vectors q_first * prod(q at the span's other tokens)."""
    s = [_softmax([x / temperature for x in row]) for row in student_logits.double().tolist()]
    t = [_softmax([x / temperature for x in row]) for row in teacher_logits.double().tolist()]
    values = []
    for k in range(len(s_rows["first"])):
        scale_s = math.prod(s[r][y] for r, y, sp in zip(*s_rows["cont"]) if sp == k)
        scale_t = math.prod(t[r][y] for r, y, sp in zip(*t_rows["cont"]) if sp == k)
        q_hat = [x * scale_s for x in s[s_rows["first"][k]]]
        p_hat = [x * scale_t for x in t[t_rows["first"][k]]]
        values.append(naive_uld(q_hat, p_hat) if kind == "uld" else naive_gold(q_hat, p_hat, pairs, beta))
    return sum(values) / len(values)


# --- fixtures --------------------------------------------------------------------------------

# Six spans over 11 student rows and 9 teacher rows: one-token spans, a 3:1, a 1:2 and a 2:2 span.
S_ROWS = {"first": [0, 1, 4, 5, 6, 8], "cont": ([2, 3, 7, 9], [5, 1, 3, 12], [2, 2, 4, 5])}
T_ROWS = {"first": [0, 1, 2, 4, 5, 7], "cont": ([3, 6, 8], [4, 0, 9], [3, 4, 5])}


def _rows(spec) -> SpanRows:
    cont, target, span = spec["cont"]
    return SpanRows(torch.tensor(spec["first"]), torch.tensor(cont), torch.tensor(span), torch.tensor(target))


def _logits(seed, vs=17, vt=23, ns=11, nt=9, scale=2.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ns, vs, generator=g) * scale, torch.randn(nt, vt, generator=g) * scale


def _shared(vs=17, vt=23):
    """A shared vocabulary: 12 tokens, in another order on each side."""
    g = torch.Generator().manual_seed(99)
    s_ids, t_ids = torch.randperm(vs, generator=g)[:12], torch.randperm(vt, generator=g)[:12]
    return s_ids, t_ids


def _close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=atol, rtol=rtol)


# --- values against the naive reference ------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_matches_the_naive_reference(temperature):
    student, teacher = _logits(1)
    got = cross_tokenizer_divergence(student, teacher, _rows(S_ROWS), _rows(T_ROWS), "uld", temperature=temperature)
    _close(got, naive_spans(student, teacher, S_ROWS, T_ROWS, "uld", temperature=temperature))


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_gold_matches_the_naive_reference(beta):
    student, teacher = _logits(2)
    shared = _shared()
    pairs = list(zip(shared[0].tolist(), shared[1].tolist()))
    got = cross_tokenizer_divergence(student, teacher, _rows(S_ROWS), _rows(T_ROWS), "gold", beta=beta, shared=shared)
    _close(got, naive_spans(student, teacher, S_ROWS, T_ROWS, "gold", pairs, beta))


def test_uld_of_a_student_with_a_larger_vocabulary_pads_the_teacher():
    student, teacher = _logits(3, vs=31, vt=13)
    got = cross_tokenizer_divergence(student, teacher, _rows(S_ROWS), _rows(T_ROWS), "uld")
    _close(got, naive_spans(student, teacher, S_ROWS, T_ROWS, "uld"))


def test_identical_distributions_give_zero():
    student, _ = _logits(4, ns=11)
    rows = _rows({"first": [0, 1, 4, 5, 6, 8], "cont": ([2, 3, 7, 9], [5, 1, 3, 12], [2, 2, 4, 5])})
    ids = torch.arange(17)
    for kind in ("uld", "gold"):
        got = cross_tokenizer_divergence(student, student.clone(), rows, rows, kind, shared=(ids, ids))
        assert float(got) == pytest.approx(0.0, abs=1e-6), kind


def _topk_teacher(lp_first, lt, rank_k, mapping):
    """The top-K view of a full teacher: every token recorded (K = the vocabulary)."""
    m, vt = lp_first.shape
    return TopKTeacher(lp_first, torch.ones_like(lp_first, dtype=torch.bool), torch.full((m,), rank_k),
                       mapping[None, :].expand(m, -1), lt)


def test_top_k_with_k_covering_the_vocabulary_equals_the_full_teacher_value_and_gradient():
    g = torch.Generator().manual_seed(5)
    lq = torch.log_softmax(torch.randn(6, 17, generator=g, dtype=torch.float64) * 2, -1)
    lp = torch.log_softmax(torch.randn(6, 23, generator=g, dtype=torch.float64) * 2, -1)
    ls, lt = -torch.rand(6, generator=g, dtype=torch.float64), -torch.rand(6, generator=g, dtype=torch.float64)
    s_ids, t_ids = _shared()
    mapping = torch.full((23,), -1)
    mapping[t_ids] = s_ids
    full, top = FullTeacher(lp, lt), _topk_teacher(lp, lt, 23, mapping)
    for a, b in ((uld_full(lq, ls, full, grad=True), uld_topk(lq, ls, top, grad=True)),
                 (gold_full(lq, ls, full, s_ids, t_ids, beta=0.5, grad=True),
                  gold_topk(lq, ls, top, beta=0.5, grad=True))):
        for x, y in zip(a, b):
            _close(x, y, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_uld_top_k_matches_the_naive_lumped_reference(k):
    student, teacher = _logits(6)
    lq = torch.log_softmax(student.double()[:4], -1)
    lp = torch.log_softmax(teacher.double()[:4], -1)
    ls, lt = torch.tensor([0.0, -0.3, 0.0, -1.2], dtype=torch.float64), torch.tensor([0.0, 0.0, -0.5, -0.1],
                                                                                      dtype=torch.float64)
    top = lp.topk(k, dim=-1)
    # the written token recorded beside the top k (lower than all of them): the largest k are the exact ranks
    extra = lp.topk(k + 2, dim=-1)
    lps = torch.cat([top.values, extra.values[:, -1:]], dim=-1)
    teacher_k = TopKTeacher(lps, torch.ones_like(lps, dtype=torch.bool), torch.full((4,), k),
                            torch.full(lps.shape, -1), lt)
    got, _, _ = uld_topk(lq, ls, teacher_k)
    for row in range(4):
        q_hat = [math.exp(x + float(ls[row])) for x in lq[row].tolist()]
        p_hat = [math.exp(x + float(lt[row])) for x in lp[row].tolist()]
        assert float(got[row]) == pytest.approx(naive_uld(q_hat, p_hat, k), rel=1e-9, abs=1e-12)


# --- the chunked loss against the autograd reference -------------------------------------------

def _reference_grads(student, teacher, kind, shared, beta=0.5, temperature=1.0):
    student = student.detach().double().requires_grad_()
    value = cross_tokenizer_divergence(student, teacher.double(), _rows(S_ROWS), _rows(T_ROWS), kind, beta=beta,
                                       shared=shared, temperature=temperature, reduction="sum")
    value.backward()
    return float(value.detach()), student.grad


def _live(teacher_logits, t_rows: SpanRows, temperature=1.0):
    lp_all = torch.log_softmax(teacher_logits / temperature, -1)
    lt = torch.zeros(t_rows.count, dtype=lp_all.dtype).index_add_(0, t_rows.cont_span,
                                                                   lp_all[t_rows.cont, t_rows.cont_target])
    return lambda spans: FullTeacher(lp_all[t_rows.first[spans]], lt[spans])


@pytest.mark.parametrize("kind", ["uld", "gold"])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunked_loss_on_logits_matches_the_autograd_reference(kind, chunk_size):
    student, teacher = _logits(7)
    shared = _shared()
    value, grad = _reference_grads(student, teacher, kind, shared, temperature=1.5)
    z = student.detach().double().requires_grad_()
    targets = torch.zeros(11, dtype=torch.long)  # the LM term is off (lm_weight 0)
    got = cross_loss(z, None, targets=targets, rows=_rows(S_ROWS), teacher_at=_live(teacher.double(), _rows(T_ROWS),
                                                                                     1.5),
                     kind=kind, shared=shared, temperature=1.5, chunk_size=chunk_size)
    got.backward()
    _close(got, value, atol=1e-10, rtol=1e-10)
    _close(z.grad, grad, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("kind", ["uld", "gold"])
def test_fused_loss_matches_the_reference_with_the_lm_term(kind):
    """Hidden states x head (float32, as `undo train` runs it) + cross-entropy: value and both gradients."""
    g = torch.Generator().manual_seed(8)
    hs = torch.randn(11, 6, generator=g).requires_grad_()
    ws = (torch.randn(17, 6, generator=g) * 0.8).requires_grad_()
    teacher = torch.randn(9, 23, generator=g) * 2
    targets = torch.randint(0, 17, (11,), generator=g)
    shared = _shared()
    loss = cross_loss(hs, ws, targets=targets, rows=_rows(S_ROWS), teacher_at=_live(teacher, _rows(T_ROWS)),
                      kind=kind, shared=shared, kd_weight=0.7, lm_weight=1.3, chunk_size=4)
    loss.backward()
    h64, w64 = hs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
    logits = h64 @ w64.T
    ref = 0.7 * cross_tokenizer_divergence(logits, teacher.double(), _rows(S_ROWS), _rows(T_ROWS), kind,
                                           shared=shared, reduction="sum")
    ref = ref + 1.3 * torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    ref.backward()
    _close(loss, ref, atol=1e-4, rtol=1e-5)
    _close(hs.grad, h64.grad, atol=1e-4, rtol=1e-4)
    _close(ws.grad, w64.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["uld", "gold"])
@pytest.mark.parametrize("teacher_vocab, block", [(23, 1), (23, 2), (23, 64), (13, 2)])
@pytest.mark.parametrize("fused", [True, False])
def test_the_live_teacher_in_blocks_equals_the_whole_teacher_distribution(kind, teacher_vocab, block, fused):
    """`live_teacher` (what `undo train` runs: the teacher's distribution formed for `block` spans at a time and
    reduced to what the objective reads) against the whole [spans x V_t] log-softmax in one block: loss, both
    gradients, health sums."""
    g = torch.Generator().manual_seed(12)
    hs = torch.randn(11, 6, generator=g).requires_grad_()
    ws = (torch.randn(17, 6, generator=g) * 0.8).requires_grad_()
    ht, wt = torch.randn(9, 5, generator=g), torch.randn(teacher_vocab, 5, generator=g) * 1.5
    targets = torch.randint(0, 17, (11,), generator=g)
    shared = _shared(vt=teacher_vocab)
    t_rows = _rows(T_ROWS)
    rows, weight = (ht, wt) if fused else (ht @ wt.T, None)
    teachers = {"whole": _live(ht @ wt.T, t_rows, 1.5),
                "blocks": live_teacher(rows, weight, t_rows, kind, student_vocab=17, shared_teacher=shared[1],
                                       temperature=1.5, chunk_size=3)}
    got = {}
    for name, teacher_at in teachers.items():
        hs.grad = ws.grad = None
        stats = {}
        loss = cross_loss(hs, ws, targets=targets, rows=_rows(S_ROWS), teacher_at=teacher_at, kind=kind,
                          shared=shared, temperature=1.5, kd_weight=0.7, lm_weight=1.3, chunk_size=64, stats=stats,
                          block=block if name == "blocks" else 64)
        loss.backward()
        got[name] = (loss.detach(), hs.grad.clone(), ws.grad.clone(), stats["teacher_entropy"], stats["student_entropy"])
    for whole, blocks in zip(got["whole"], got["blocks"]):
        _close(blocks, whole, atol=1e-5, rtol=1e-5)


def test_no_gradient_reaches_the_teacher_and_evaluation_skips_gradients():
    student, teacher = _logits(9)
    teacher = teacher.requires_grad_()
    with torch.no_grad():
        value = cross_loss(student, None, targets=torch.zeros(11, dtype=torch.long), rows=_rows(S_ROWS),
                           teacher_at=_live(teacher.detach(), _rows(T_ROWS)), kind="uld")
    assert value.requires_grad is False and teacher.grad is None


# --- byte alignment -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_tokenizers():
    from undo_cli.tiny import train_tokenizer

    student = train_tokenizer([])
    teacher = train_tokenizer(["Sam has 3 apples and buys 4 more. 你好 How many?"] * 20, vocab_size=400,
                              flavor="chatml")
    return student, teacher


def test_spans_spell_the_same_bytes_on_both_sides_even_inside_characters(two_tokenizers):
    from undo_cli.tokenization import TokenBytes, align_spans, cover

    student, teacher = two_tokenizers
    text = "Sam starts with 3 apples, 你好 🙂 buys 4 more.\n#### 7"
    pieces = []
    for tok in (student, teacher):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces.append(cover(TokenBytes.of(tok).pieces(ids), text.encode()))
        assert b"".join(pieces[-1]) == text.encode()
    spans = align_spans(*pieces)
    assert spans[0][0] == 0 and spans[0][2] == 0 and spans[-1][1] == len(pieces[0]) and spans[-1][3] == len(pieces[1])
    for (a, b, c, d), nxt in zip(spans, spans[1:] + [None]):
        assert b"".join(pieces[0][a:b]) == b"".join(pieces[1][c:d]) and b > a and d > c
        if nxt:
            assert nxt[0] == b and nxt[2] == d  # contiguous
    assert any(b - a > 1 or d - c > 1 for a, b, c, d in spans)  # the tokenizers really split differently


def test_only_the_common_prefix_is_aligned():
    from undo_cli.tokenization import align_spans

    student = [b"ab", b"c", b"<|end|>", b"\n"]
    teacher = [b"a", b"bc", b"<|im_end|>"]
    assert align_spans(student, teacher) == [(0, 2, 0, 2)]  # "abc"; the end markers differ after it
    assert align_spans([b"", b"x", b"", b"y"], [b"xy"]) == [(1, 4, 0, 1)]  # a zero-width token inside a span
    assert align_spans([b"x", b"y", b""], [b"x", b"y"]) == [(0, 1, 0, 1), (1, 2, 1, 2)]  # after the text: none


def test_shared_vocabulary_matches_bytes_not_ids(two_tokenizers):
    from undo_cli.tokenization import TokenBytes, shared_vocabulary

    student, teacher = two_tokenizers
    sb, tb = TokenBytes.of(student), TokenBytes.of(teacher)
    s_ids, t_ids = shared_vocabulary(sb, tb)
    assert len(s_ids) == len(set(s_ids)) == len(set(t_ids)) > 200
    assert all(sb.table[i] == tb.table[j] for i, j in zip(s_ids, t_ids))
    assert any(i != j for i, j in zip(s_ids, t_ids))  # the same token under another id
    assert not set(s_ids) & set(student.all_special_ids)


def test_tokenizer_comparison_names_each_kind_of_mismatch(two_tokenizers):
    from undo_cli.tiny import train_tokenizer
    from undo_cli.tokenization import compare

    student, teacher = two_tokenizers
    same_size = train_tokenizer(["a student trained on quite different words"] * 50)
    texts = ["Sam has 3 apples.", "#### 7"]
    assert compare(student, student, texts).relation == "identical"
    assert compare(student, student, texts).texts_same_ids == 2
    other = compare(same_size, student, texts)
    assert other.relation == "same vocabulary size, different" and "id" in other.difference
    assert compare(teacher, student, texts).relation == "different"
