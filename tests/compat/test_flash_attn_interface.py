"""foldops.compat.flash_attn's functions against flash_attn 2.x's documented semantics."""

import math

import pytest
import torch

import foldops.compat.flash_attn as fa
from foldops.testing import assert_within_baseline


def _attn64(q, k, v, causal=False, scale=None):
    """One sequence in float64: q [Sq, H, D], k/v [Sk, Hk, D]; flash_attn's bottom-right causal
    mask; GQA head h reads kv head h // (H / Hk); a fully masked row gives zeros."""
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    sq, sk = q.shape[0], k.shape[0]
    if causal:
        keep = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)  # [H, Sq]
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("hij,jhd->ihd", p, v), lse


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_func_against_float64_per_sequence(causal):
    lq, lk = [3, 1, 6, 4], [5, 2, 6, 1]
    H, Hk, D = 6, 2, 16  # GQA: q heads 0-2 read kv head 0, 3-5 kv head 1
    q = torch.randn(sum(lq), H, D, requires_grad=True)
    k = torch.randn(sum(lk), Hk, D, requires_grad=True)
    v = torch.randn(sum(lk), Hk, D, requires_grad=True)
    out, lse, probs = fa.flash_attn_varlen_func(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk) + 3, causal=causal,
                                                return_attn_probs=True)
    assert out.shape == q.shape and out.dtype == q.dtype and probs is None
    assert lse.shape == (H, sum(lq)) and lse.dtype == torch.float32
    cq, ck = _cu(lq), _cu(lk)
    exact, exact_lse = [], []
    for b in range(len(lq)):
        o, l = _attn64(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], causal)
        exact.append(o)
        exact_lse.append(l)
    exact = torch.cat(exact)
    baseline = torch.cat([_attn64(q[cq[b]:cq[b + 1]].float(), k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], causal)[0]
                          for b in range(len(lq))]).float()
    assert_within_baseline("out", out, exact, baseline)
    finite = torch.isfinite(torch.cat(exact_lse, -1))
    torch.testing.assert_close(lse[finite].double(), torch.cat(exact_lse, -1)[finite], rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k, v], g)
    want = torch.autograd.grad(exact, [q, k, v], g.double())
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


def test_causal_is_bottom_right_and_masked_rows_are_zero():
    """flash_attn's docstring: seqlen_q=5, seqlen_k=2 causal keeps rows 3-4 only; the rest are zero."""
    q = torch.randn(1, 5, 1, 8)
    k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    out = fa.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
    torch.testing.assert_close(out[0, 3:].double(), _attn64(q[0], k[0], v[0], causal=True)[0][3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fa.flash_attn_func(q, k, v, window_size=(-1, 0)), out)  # (-1, 0) is causal


def test_batches_without_attention_stay_in_the_graph():
    """Zero-length sequences (dense) and all-empty / key-less packed batches: zeros that
    backpropagate zero gradients to every input (lse of rows without keys: -inf)."""
    for sq, sk in ((0, 3), (3, 0)):
        q = torch.randn(2, sq, 4, 8, requires_grad=True)
        k, v = (torch.randn(2, sk, 2, 8, requires_grad=True) for _ in range(2))
        out, lse, _ = fa.flash_attn_func(q, k, v, return_attn_probs=True)
        assert out.grad_fn is not None and lse.shape == (2, 4, sq) and torch.isneginf(lse).all()
        for t, g in zip((q, k, v), torch.autograd.grad(out.sum(), (q, k, v))):
            assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t))
    for lens_q, lens_k in (([0, 0], [0, 0]), ([2, 3], [0, 0])):
        q = torch.randn(sum(lens_q), 4, 8, requires_grad=True)
        kv = torch.randn(0, 2, 2, 8, requires_grad=True)
        out = fa.flash_attn_varlen_kvpacked_func(q, kv, _cu(lens_q), _cu(lens_k), max(lens_q), 0, causal=True)
        assert out.grad_fn is not None and torch.equal(out, torch.zeros_like(out))
        for t, g in zip((q, kv), torch.autograd.grad(out.sum(), (q, kv))):
            assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t))


def test_dense_and_packed_variants_agree():
    B, S, H, D = 2, 5, 4, 8
    qkv = torch.randn(B, S, 3, H, D, requires_grad=True)
    q, k, v = qkv.unbind(2)
    ref = fa.flash_attn_func(q, k, v, softmax_scale=0.3)
    assert ref.shape == (B, S, H, D)
    torch.testing.assert_close(fa.flash_attn_qkvpacked_func(qkv, softmax_scale=0.3), ref)
    torch.testing.assert_close(fa.flash_attn_kvpacked_func(q, qkv[:, :, 1:], softmax_scale=0.3), ref)
    out, lse, none = fa.flash_attn_qkvpacked_func(qkv, softmax_scale=0.3, return_attn_probs=True)
    assert lse.shape == (B, H, S) and none is None
    torch.testing.assert_close(lse[1].double(), _attn64(q[1], k[1], v[1], scale=0.3)[1], rtol=1e-5, atol=1e-5)
    cu = torch.tensor([0, S, 2 * S], dtype=torch.int32)
    flat = qkv.reshape(B * S, 3, H, D)
    torch.testing.assert_close(fa.flash_attn_varlen_qkvpacked_func(flat, cu, S, softmax_scale=0.3).reshape(B, S, H, D), ref)
    torch.testing.assert_close(
        fa.flash_attn_varlen_kvpacked_func(flat[:, 0], flat[:, 1:], cu, cu, S, S, softmax_scale=0.3).reshape(B, S, H, D), ref)
    out = fa.flash_attn_varlen_qkvpacked_func(flat, cu, S)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and torch.isfinite(qkv.grad).all()


def test_dropout_runs_and_changes_the_output():
    q = torch.randn(1, 6, 2, 8)
    out = fa.flash_attn_func(q, q, q, dropout_p=0.5)
    assert out.shape == q.shape and not torch.allclose(out, fa.flash_attn_func(q, q, q))


def test_unsupported_arguments_are_named():
    q = torch.randn(1, 4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    cases = [
        ("alibi_slopes", lambda: fa.flash_attn_func(q, q, q, alibi_slopes=torch.ones(2))),
        ("window_size", lambda: fa.flash_attn_func(q, q, q, window_size=(2, 2))),
        ("softcap", lambda: fa.flash_attn_func(q, q, q, softcap=30.0)),
        ("return_attn_probs", lambda: fa.flash_attn_func(q, q, q, dropout_p=0.1, return_attn_probs=True)),
        ("block_table", lambda: fa.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 4, 4,
                                                           block_table=torch.zeros(1, 1, dtype=torch.int32))),
        ("qkv", lambda: fa.flash_attn_qkvpacked_func(q)),
        ("kv", lambda: fa.flash_attn_varlen_kvpacked_func(q[0], q[0], cu, cu, 4, 4)),
        ("q", lambda: fa.flash_attn_varlen_func(q, q[0], q[0], cu, cu, 4, 4)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=name):
            call()
    # cu_seqlens are checked by the op and named as flash_attn names them
    with pytest.raises((TypeError, ValueError), match="cu_seqlens_q"):
        fa.flash_attn_varlen_func(q[0], q[0], q[0], cu.long(), cu, 4, 4)


def test_errors_name_the_arguments_the_caller_passed():
    """The op checks q, k, v, cu_seqlens_q/k, max_seqlen_q/k; the packed functions report the
    names of their own arguments (qkv, kv, cu_seqlens, max_seqlen)."""
    qkv = torch.randn(4, 3, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    not_from_zero, short = torch.tensor([1, 4], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)
    cases = [
        (ValueError, "cu_seqlens", lambda: fa.flash_attn_varlen_qkvpacked_func(qkv, not_from_zero, 4)),
        (TypeError, "cu_seqlens", lambda: fa.flash_attn_varlen_qkvpacked_func(qkv, cu.long(), 4)),
        (ValueError, "cu_seqlens", lambda: fa.flash_attn_varlen_qkvpacked_func(qkv, short, 4)),
        (ValueError, "max_seqlen", lambda: fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 3)),
        (ValueError, "max_seqlen", lambda: fa.flash_attn_varlen_qkvpacked_func(qkv, cu, None)),
        (ValueError, "kv", lambda: fa.flash_attn_varlen_kvpacked_func(torch.randn(4, 3, 8), torch.randn(4, 2, 2, 8),
                                                                      cu, cu, 4, 4)),
        (TypeError, "kv", lambda: fa.flash_attn_varlen_kvpacked_func(torch.randn(4, 2, 8),
                                                                     torch.randn(4, 2, 2, 8, dtype=torch.float64),
                                                                     cu, cu, 4, 4)),
        (TypeError, "kv", lambda: fa.flash_attn_kvpacked_func(torch.randn(1, 4, 2, 8),
                                                              torch.randn(1, 4, 2, 2, 8, dtype=torch.float64))),
        (ValueError, "max_seqlen_k", lambda: fa.flash_attn_varlen_kvpacked_func(torch.randn(4, 2, 8),
                                                                                torch.randn(4, 2, 2, 8), cu, cu, 4, 3)),
        (TypeError, "cu_seqlens_q", lambda: fa.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu.long(), cu,
                                                                      4, 4)),
    ]
    for exc_type, name, call in cases:
        with pytest.raises(exc_type) as info:
            call()
        assert str(info.value).startswith(name + ":"), str(info.value)
        if name in ("cu_seqlens", "max_seqlen"):
            assert "_q" not in str(info.value) and "_k" not in str(info.value), str(info.value)
    # max_seqlen as int() takes it (numpy ints, one-element tensors), as before
    out = fa.flash_attn_varlen_qkvpacked_func(qkv, cu, torch.tensor(4))
    torch.testing.assert_close(out, fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 4))


def test_max_seqlen_takes_integral_numbers_and_rejects_fractions():
    """Integral numbers (ints, NumPy integers, one-element integer tensors, 7.0) give the
    fp64 answer; a fraction is a ValueError naming the caller's argument, not truncated
    (5.5 became 5 and passed); bool is rejected."""
    np = pytest.importorskip("numpy")
    lengths = [3, 7, 1]
    qkv = torch.randn(sum(lengths), 3, 2, 8, dtype=torch.float64)
    cu = _cu(lengths)
    want = torch.cat([_attn64(*qkv[a:b].unbind(1))[0] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    for max_seqlen in (7, np.int64(7), np.int32(9), torch.tensor(7), 7.0, np.float32(8.0)):
        out = fa.flash_attn_varlen_qkvpacked_func(qkv, cu, max_seqlen)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for bad in (7.5, np.float64(7.5), torch.tensor(7.5)):
        with pytest.raises(ValueError, match=r"^max_seqlen: expected an integer"):
            fa.flash_attn_varlen_qkvpacked_func(qkv, cu, bad)
    with pytest.raises(ValueError, match=r"^max_seqlen_k: expected an integer, got 6.5"):
        fa.flash_attn_varlen_func(*qkv.unbind(1), cu, cu, 7, 6.5)
    with pytest.raises(ValueError, match=r"^max_seqlen: expected a non-negative int, got True"):
        fa.flash_attn_varlen_qkvpacked_func(qkv, cu, True)


def test_bert_padding_round_trip_and_varlen():
    """unpad_input -> flash_attn_varlen_qkvpacked_func -> pad_input, as BERT/ESM ports do."""
    B, S, H, D = 3, 6, 2, 8
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 5 + [0]])
    x = torch.randn(B, S, 3, H, D, requires_grad=True)
    packed, indices, cu, max_seqlen, used = fa.unpad_input(x, mask)
    assert packed.shape == (13, 3, H, D) and max_seqlen == 6
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 6, 8, 13] and used.tolist() == [6, 2, 5]
    out = fa.pad_input(fa.flash_attn_varlen_qkvpacked_func(packed, cu, max_seqlen), indices, B, S)
    assert out.shape == (B, S, H, D) and torch.equal(out[1, 2:], torch.zeros_like(out[1, 2:]))
    alone = fa.flash_attn_qkvpacked_func(x[1:2, :2])
    torch.testing.assert_close(out[1:2, :2], alone)
    out.sum().backward()
    assert torch.equal(x.grad[1, 2:], torch.zeros_like(x.grad[1, 2:]))
    with pytest.raises(ValueError, match="attention_mask"):
        fa.unpad_input(x, mask[:, :4])
