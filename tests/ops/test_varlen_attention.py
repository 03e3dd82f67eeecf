"""foldops.ops.varlen_attention / padded_attention: the ``reference`` and ``torch`` backends
against float64, selection and bad input.

The ``triton`` backend has its own tests next to the kernel (tests/kernels); here it only
appears in the selection and error tests.
"""

import math
import sys

import pytest
import torch

from foldops import backends
from foldops.backends import BackendUnavailableError
from foldops.ops import padded_attention, varlen_attention
from foldops.ops._varlen_torch import plan_buckets
from foldops.reference.varlen_attention import varlen_attention as reference
from foldops.testing import assert_within_baseline

OP = "varlen_attention"
LOW = (torch.float32, torch.bfloat16, torch.float16)
HAS_GPU = torch.cuda.is_available()

# (query lengths, key lengths): one token, empty sequences, Lq != Lk (causal rows
# without keys when Lq > Lk), lengths around 16/32/64.
LENGTHS = {
    "one": ([1], [1]),
    "mixed": ([5, 0, 1, 17, 3], [5, 0, 1, 17, 3]),
    "empty-keys": ([4, 3, 6], [4, 0, 9]),
    "cross": ([7, 1, 12], [3, 5, 12]),
    "blocks": ([15, 16, 17, 31, 33, 64, 65], [15, 16, 17, 31, 33, 64, 65]),
}


def cu(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def make_inputs(lens_q, lens_k, heads, kv_heads, dim, device="cpu"):
    q = torch.randn(sum(lens_q), heads, dim, dtype=torch.float64, device=device)
    k, v = (torch.randn(sum(lens_k), kv_heads, dim, dtype=torch.float64, device=device) for _ in range(2))
    return q, k, v, cu(lens_q, device), cu(lens_k, device)


def run(fn, q, k, v, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return out.detach(), lse, grads


def check_against_fp64(backend, lens_q, lens_k, heads, kv_heads, dim, dtype, causal, device="cpu", slack=0):
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, heads, kv_heads, dim, device)
    max_q, max_k = max(lens_q) + slack, max(lens_k) + slack
    grad_out = torch.randn(q.shape, dtype=torch.float64, device=device)

    def ref(*t):
        return reference(*t, cu_q, cu_k, causal)

    def fast(*t):
        return varlen_attention(*t, cu_q, cu_k, max_q, max_k, causal=causal, return_lse=True, backend=backend)

    exact, exact_lse, exact_g = run(ref, q, k, v, grad_out)
    base, base_lse, base_g = run(ref, *(t.to(dtype) for t in (q, k, v)), grad_out)
    out, lse, g = run(fast, *(t.to(dtype) for t in (q, k, v)), grad_out)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (heads, q.shape[0])
    assert_within_baseline("out", out, exact, base, dtype=dtype)
    # lse: same -inf rows, finite rows within the baseline.
    empty = torch.isneginf(exact_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    lse_dtype = torch.float32 if dtype == torch.float64 else dtype  # lse is fp32 whatever the inputs
    assert_within_baseline("lse", lse[~empty], exact_lse[~empty], base_lse[~empty].float(), dtype=lse_dtype)
    for name, fg, eg, bg in zip(("dq", "dk", "dv"), g, exact_g, base_g):
        assert torch.isfinite(fg).all(), name
        assert_within_baseline(name, fg, eg, bg, dtype=dtype)
    return out, lse, g, empty


@pytest.mark.parametrize("case", list(LENGTHS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [(2, 2), (4, 1), (6, 3)], ids=lambda h: f"H{h[0]}kv{h[1]}")
def test_torch_backend_fp32(case, causal, heads):
    check_against_fp64("torch", *LENGTHS[case], heads[0], heads[1], 16, torch.float32, causal)


@pytest.mark.parametrize("dtype", LOW + (torch.float64,), ids=str)
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backends_every_dtype(backend, dtype, causal):
    check_against_fp64(backend, [5, 0, 1, 17, 3], [6, 2, 0, 17, 3], 4, 2, 8, dtype, causal, slack=7)


def test_rows_without_keys_give_zeros_and_zero_grads():
    out, lse, (dq, dk, dv), empty = check_against_fp64("torch", [4, 3, 6], [4, 0, 2], 2, 1, 8, torch.float32,
                                                        causal=True)
    rows = empty.all(0)  # [total_q]: rows of the empty-key sequence and causal rows i < Lq - Lk
    assert rows.sum() == 3 + 4
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))
    assert torch.equal(dq[rows], torch.zeros_like(dq[rows]))


def test_non_contiguous_inputs():
    lens = [3, 9, 1]
    qkv = torch.randn(sum(lens), 3, 4, 8, dtype=torch.float64)
    q, k, v = qkv.unbind(1)  # strided views, as from one packed projection
    c = cu(lens)
    out = varlen_attention(q.float(), k.float(), v.float(), c, c, 9, 9, backend="torch")
    exact, _ = reference(q, k, v, c, c)
    assert (out.double() - exact).abs().max() < 1e-5


def test_softmax_scale_and_all_empty_batch():
    q, k, v, cu_q, cu_k = make_inputs([3, 4], [5, 2], 2, 2, 8)
    for backend in ("torch", "reference"):
        out = varlen_attention(q, k, v, cu_q, cu_k, 4, 5, softmax_scale=0.3, backend=backend)
        exact, _ = reference(q, k, v, cu_q, cu_k, softmax_scale=0.3)
        assert (out - exact).abs().max() < 1e-12
    z = torch.zeros(0, 2, 8)
    c = torch.zeros(3, dtype=torch.int32)
    out, lse = varlen_attention(z, z, z, c, c, 0, 0, return_lse=True)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)


def test_dropout_reproducible_with_generator():
    q, k, v, cu_q, cu_k = make_inputs([30, 20], [30, 20], 1, 1, 8)
    plain = varlen_attention(q, k, v, cu_q, cu_k, 30, 30, backend="torch")
    outs = []
    for seed in (1, 1, 2):
        g = torch.Generator().manual_seed(seed)
        outs.append(varlen_attention(q, k, v, cu_q, cu_k, 30, 30, dropout_p=0.3, generator=g, backend="torch"))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    assert not torch.allclose(outs[0], plain)
    # Unbiased: the mean over many draws approaches the output without dropout.
    g = torch.Generator().manual_seed(3)
    mean = sum(varlen_attention(q, k, v, cu_q, cu_k, 30, 30, dropout_p=0.3, generator=g, backend="torch")
               for _ in range(40)) / 40
    # (the error of a mean of 40 draws shrinks as 1/sqrt(40) = 0.16 of one draw's)
    assert (mean - plain).abs().mean() < 0.35 * (outs[0] - plain).abs().mean()


# Buckets ---------------------------------------------------------------------------------


def test_buckets_bound_padding_and_memory():
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(20, 201, (64,), generator=g).tolist()
    lens[3] = 0
    buckets = plan_buckets(lens, lens, cell_bytes=100, budget_bytes=10**9)
    members = sorted(b for bucket in buckets for b in bucket)
    assert members == [b for b in range(64) if lens[b]]
    for bucket in buckets:
        longest = max(lens[b] for b in bucket)
        assert len(bucket) * longest <= 1.25 * sum(lens[b] for b in bucket)
    assert len(buckets) <= 12
    small = plan_buckets(lens, lens, cell_bytes=100, budget_bytes=100 * 200 * 200 * 2)
    for bucket in small:
        longest = max(lens[b] for b in bucket)
        assert len(bucket) == 1 or len(bucket) * longest * longest * 100 <= 100 * 200 * 200 * 2


def test_bucketed_path_matches_reference_at_benchmark_lengths():
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(20, 120, (24,), generator=g).tolist()
    q, k, v, c, _ = make_inputs(lens, lens, 2, 2, 16)
    out = varlen_attention(q.float(), k.float(), v.float(), c, c, max(lens), max(lens), backend="torch")
    exact, _ = reference(q, k, v, c, c)
    assert (out.double() - exact).abs().max() < 1e-5



@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bucket_padding_reads_only_its_own_sequence(causal):
    """Bucket padding repeats a sequence's own rows: a NaN in one sequence's k and v
    reaches no other sequence's output or gradients, and each padded row is gathered
    at most twice here (the GPU gather backward is serial over duplicates)."""
    import numpy as np

    from foldops.ops._varlen_torch import _padded_rows

    for m in ([10, 10, 8], [10, 15, 8]):  # within 2x each length (no division), or not
        rows, pos, lens = _padded_rows(np.array([0, 10, 17]), np.array([10, 7, 6]), np.array(m))
        assert rows[10:20].tolist() == [10, 11, 12, 13, 14, 15, 16, 10, 11, 12]
        assert rows[10 + m[1]:].tolist() == [17, 18, 19, 20, 21, 22, 17, 18]
        assert pos[10:20].tolist() == list(range(10)) and lens.tolist() == [10] * 10 + [7] * m[1] + [6] * 8
        assert np.bincount(rows).max() <= (2 if m[1] == 10 else 3)
        if m[1] == 15:  # past 2x the length: the padding wraps twice
            assert rows[10:25].tolist() == [10, 11, 12, 13, 14, 15, 16] * 2 + [10]
    lens = [10, 7, 6, 9]
    q, k, v, c, _ = make_inputs(lens, lens, 2, 1, 8)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    bad = slice(10, 17)  # the second sequence
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[bad], v2[bad] = float("nan"), float("nan")
    k2.requires_grad_(), v2.requires_grad_()
    out = varlen_attention(q, k2, v2, c, c, max(lens), max(lens), causal=causal, backend="torch")
    exact, _ = reference(q.detach().double(), k.detach().double(), v.detach().double(), c, c, causal)
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[bad] = False
    assert torch.isnan(out[bad]).all()
    assert (out[others].double() - exact[others]).abs().max() < 1e-5
    out[others].sum().backward()
    for g in (q.grad, k2.grad, v2.grad):
        assert torch.isfinite(g[others]).all()


def test_bucket_path_second_order_and_torch_func():
    """The bucket gathers have their own backward: gradcheck, gradgradcheck,
    torch.func.grad and forward-mode jvp still hold (fp64, causal, Lq != Lk, GQA, a
    sequence without keys)."""
    lq, lk = [3, 1, 2, 2], [2, 3, 0, 1]
    q, k, v, c_q, c_k = make_inputs(lq, lk, 2, 1, 4)

    def f(q, k, v):
        return varlen_attention(q, k, v, c_q, c_k, max(lq), max(lk), causal=True, backend="torch")

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)
    grad_q = torch.func.grad(lambda q: f(q, k, v).sum())(q)
    ref_q = torch.autograd.grad(f(leaves[0], k, v).sum(), leaves[0])[0]
    torch.testing.assert_close(grad_q, ref_q)
    tangent = torch.randn_like(q)
    _, jvp_out = torch.func.jvp(lambda q: f(q, k, v), (q,), (tangent,))
    eps = 1e-6
    torch.testing.assert_close(jvp_out, (f(q + eps * tangent, k, v) - f(q - eps * tangent, k, v)) / (2 * eps),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "lse"])
def test_bucket_plan_is_one_host_to_device_copy(causal, return_lse):
    """The bucketed path sends its whole plan (indices, key masks, causal key limits) to
    the device in one copy, forward and backward (meta tensors: ops dispatch, nothing
    runs); masks are no longer copied per bucket."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from foldops.ops._varlen_torch import torch_buckets

    class CountCopies(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if str(func.overloadpacket) in ("aten._to_copy", "aten.copy_"):
                sources = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                self.copies += any(t.device.type == "cpu" for t in sources) and out.device.type == "meta"
            return out

    for lq, lk in (([5, 9, 3, 0, 7, 30], [5, 2, 3, 4, 7, 28]), ([6, 9, 30, 29, 3], [6, 9, 30, 29, 3])):
        q = torch.empty(sum(lq), 2, 8, device="meta", requires_grad=True)
        k = torch.empty(sum(lk), 1, 8, device="meta", requires_grad=True)
        with CountCopies() as mode:
            out, _ = torch_buckets(q, k, k, torch.tensor(lq), torch.tensor(lk), causal, 0.3, 0.0, None, return_lse)
            out.sum().backward()
        assert out.shape == q.shape and mode.copies == 1


# Dense form ------------------------------------------------------------------------------


def dense_reference(q, k, v, keep, causal):
    """Each batch row through the varlen reference, keys kept by ``keep`` (in order)."""
    outs = []
    for b in range(q.shape[0]):
        kb, vb = k[b], v[b]
        if causal:
            raise AssertionError("use the masked form below")
        if keep is not None:
            kb, vb = kb[keep[b]], vb[keep[b]]
        c_q = cu([q.shape[1]])
        c_k = cu([kb.shape[0]])
        outs.append(reference(q[b], kb, vb, c_q, c_k)[0])
    return torch.stack(outs)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_padded_attention_key_mask(backend, dtype):
    q = torch.randn(3, 7, 4, 8, dtype=torch.float64)
    k, v = (torch.randn(3, 9, 2, 8, dtype=torch.float64) for _ in range(2))
    keep = torch.rand(3, 9) > 0.4
    keep[0, 0] = True
    keep[1] = False  # fully padded keys: zeros
    leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = padded_attention(*leaves, keep.float(), backend=backend)
    exact = dense_reference(q, k, v, keep, False)
    assert (out.double() - exact).abs().max() < (1e-12 if dtype == torch.float64 else 1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert torch.equal(leaves[0].grad[1], torch.zeros_like(leaves[0].grad[1]))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_padded_attention_causal_equals_packed(backend):
    q = torch.randn(2, 6, 2, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 4, 2, 8, dtype=torch.float64) for _ in range(2))
    out = padded_attention(q, k, v, causal=True, backend=backend)
    packed, _ = reference(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu([6, 6]), cu([4, 4]), causal=True)
    assert (out.flatten(0, 1) - packed).abs().max() < 1e-12
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))  # rows i < Lq - Lk see no key


def padded_run(backend, dtype, q, k, v, keep, causal):
    leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = padded_attention(*leaves, keep, causal=causal, backend=backend)
    grad_out = torch.arange(out.numel(), dtype=torch.float64).reshape(out.shape).sin()
    return out.detach(), torch.autograd.grad(out, leaves, grad_out.to(dtype))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("where", ["k", "v", "kv"])
def test_padded_keys_holding_nan_or_inf_contribute_nothing(backend, dtype, causal, where):
    """A padded key (mask False) contributes nothing whatever k and v hold there: with NaN
    or inf at the padded keys, outputs and gradients equal (bitwise) those of the same
    inputs with finite values there (and the float64 reference); padded keys get zero
    gradients; a batch row without keys gives zeros. GQA (4 query heads, 2 kv heads)."""
    torch.manual_seed(0)
    q = torch.randn(3, 5, 4, 8, dtype=torch.float64)
    k, v = (torch.randn(3, 7, 2, 8, dtype=torch.float64) for _ in range(2))
    keep = torch.tensor([[1, 1, 0, 1, 0, 1, 0], [0] * 7, [1, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    finite_out, finite_grads = padded_run(backend, dtype, q, k, v, keep, causal)
    exact_out, exact_grads = padded_run("reference", torch.float64, q, k, v, keep, causal)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for value in (math.nan, math.inf, -math.inf):
        kb, vb = k.clone(), v.clone()
        for name, t in (("k", kb), ("v", vb)):
            if name in where:
                t[~keep] = value
        out, grads = padded_run(backend, dtype, q, kb, vb, keep, causal)
        assert torch.equal(out, finite_out)
        assert (out.double() - exact_out).abs().max() < tol
        for g, g_finite, g_exact in zip(grads, finite_grads, exact_grads):
            assert torch.equal(g, g_finite)
            assert (g.double() - g_exact).abs().max() < tol
        for g in grads[1:]:
            assert torch.equal(g[~keep], torch.zeros_like(g[~keep]))
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))


# Selection and bad input -----------------------------------------------------------------


def test_auto_and_explicit_selection():
    q, k, v, cu_q, cu_k = make_inputs([3], [3], 2, 2, 8)
    assert backends.select(OP, "auto", device=q.device, dtype=torch.float32, head_dim=8).name == "torch"
    with pytest.raises(BackendUnavailableError, match="dtype"):
        backends.select(OP, "triton", device=q.device, dtype=torch.float64, head_dim=8)


def bad_input_cases():
    q, k, v, cu_q, cu_k = make_inputs([3, 5], [3, 5], 4, 2, 8)
    q, k, v = q.float(), k.float(), v.float()
    good = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=5)
    return good, [
        ("int64 cu_seqlens", dict(cu_seqlens_q=cu_q.long()), TypeError, "cu_seqlens_q.*int32"),
        ("not starting at 0", dict(cu_seqlens_k=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError,
         r"cu_seqlens_k.*\[0\] == 0"),
        ("decreasing", dict(cu_seqlens_q=torch.tensor([0, 5, 3, 8], dtype=torch.int32),
                            cu_seqlens_k=torch.tensor([0, 3, 3, 8], dtype=torch.int32)), ValueError,
         "cu_seqlens_q.*non-decreasing"),
        ("not ending at total", dict(cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError,
         "cu_seqlens_q.*packed length 8"),
        ("max_seqlen too small", dict(max_seqlen_k=4), ValueError, "max_seqlen_k.*longest"),
        ("max_seqlen tensor", dict(max_seqlen_q=torch.tensor(5)), TypeError, "max_seqlen_q"),
        ("batch mismatch", dict(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)), ValueError,
         "cu_seqlens_k.*shape"),
        ("dtype mismatch", dict(k=k.double()), TypeError, "k: expected dtype torch.float32"),
        ("v dtype mismatch", dict(v=v.half()), TypeError, "v: expected dtype"),
        ("device mismatch", dict(v=v.to("meta")), ValueError, "v: expected a tensor on cpu"),
        ("cu device mismatch", dict(cu_seqlens_q=cu_q.to("meta")), ValueError, "cu_seqlens_q.*on cpu"),
        ("heads not divisible", dict(k=k[:, :1].expand(8, 3, 8).contiguous(), v=v[:, :1].expand(8, 3, 8)),
         ValueError, "k: expected a number of heads dividing"),
        ("head dim mismatch", dict(k=k[..., :4], v=v[..., :4]), ValueError, "k: expected shape"),
        ("q not 3-D", dict(q=q[None]), ValueError, "q: expected shape"),
        ("dropout", dict(dropout_p=1.0), ValueError, "dropout_p"),
    ]


@pytest.mark.parametrize("index", range(15))
def test_bad_input(index):
    good, cases = bad_input_cases()
    _, change, error, match = cases[index]
    kwargs = dict(good, **change)
    args = [kwargs.pop(name) for name in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                          "max_seqlen_k")]
    with pytest.raises(error, match=match):
        varlen_attention(*args, **kwargs, backend="torch")


def test_max_seqlen_takes_numpy_integers_and_sizes_while_tracing():
    np = pytest.importorskip("numpy")
    q, k, v, cu_q, cu_k = make_inputs([3, 5], [3, 5], 2, 2, 8)
    want = reference(q, k, v, cu_q, cu_k)[0]
    out = varlen_attention(q, k, v, cu_q, cu_k, np.int64(5), np.int32(6), backend="torch")
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for bad in (5.0, 5.5, True, -1, np.int64(-1)):
        with pytest.raises(ValueError, match="max_seqlen_q: expected a non-negative int"):
            varlen_attention(q, k, v, cu_q, cu_k, bad, 5, backend="torch")
    # A symbolic size (torch.compile with dynamic shapes) is taken as it is.
    f = lambda q, k, v, a, b: varlen_attention(q, k, v, a, b, q.shape[0], k.shape[0], backend="torch")  # noqa: E731
    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_head_dim_above_kernel_limit_with_triton():
    q, k, v, cu_q, cu_k = make_inputs([3], [3], 2, 2, 160)
    with pytest.raises(ValueError, match="q: head dim.*128.*triton"):
        varlen_attention(q.float(), k.float(), v.float(), cu_q, cu_k, 3, 3, backend="triton")
    out = varlen_attention(q, k, v, cu_q, cu_k, 3, 3)  # auto: the torch backend runs it
    assert out.shape == q.shape


def test_padded_bad_input():
    q = torch.randn(2, 5, 4, 8)
    k = torch.randn(2, 6, 4, 8)
    with pytest.raises(ValueError, match="key_padding_mask"):
        padded_attention(q, k, k, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="k: expected shape"):
        padded_attention(q, k[:1], k[:1])


def test_cu_seqlens_checked_once_per_tensor_on_accelerators(monkeypatch):
    """Accelerators remember a checked cu_seqlens (a read there is a sync); stand-in: the
    CPU tensors here treated as remembered."""
    module = sys.modules["foldops.ops.varlen_attention"]
    monkeypatch.setattr(module, "_remembered", lambda cu: not cu.is_inference())
    monkeypatch.setattr(module, "_checked", {})  # (CPU tensors remembered here are forgotten after)

    q, k, v, cu_q, cu_k = make_inputs([3, 5], [3, 5], 2, 2, 8)
    varlen_attention(q, k, v, cu_q, cu_k, 5, 5)
    assert module._checked[id(cu_q)][0]() is cu_q  # remembered: later calls read nothing
    cu_q[1] = 9  # an in-place write bumps the version: checked again
    with pytest.raises(ValueError, match="cu_seqlens_q.*non-decreasing"):
        varlen_attention(q, k, v, cu_q, cu_k, 5, 5)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_cpu_cu_seqlens_read_on_every_call(backend):
    """On CPU nothing is remembered: a change the version counter does not see (memory
    shared with NumPy, a write through .data) is seen by the next call, valid (the
    output follows the new lengths, against fp64) or not (rejected)."""
    import numpy as np

    q, k, v, _, _ = make_inputs([3, 5], [3, 5], 2, 2, 8)
    array = np.array([0, 3, 8], dtype=np.int32)
    shared = torch.from_numpy(array)
    first = varlen_attention(q, k, v, shared, shared, 5, 5, backend=backend)
    torch.testing.assert_close(first, reference(q, k, v, cu([3, 5]), cu([3, 5]))[0], rtol=1e-12, atol=1e-12)
    version = shared._version
    array[1] = 6  # lengths [6, 2]
    assert shared._version == version
    second = varlen_attention(q, k, v, shared, shared, 6, 6, backend=backend)
    torch.testing.assert_close(second, reference(q, k, v, cu([6, 2]), cu([6, 2]))[0], rtol=1e-12, atol=1e-12)
    array[1] = 9  # decreasing: rejected
    with pytest.raises(ValueError, match="cu_seqlens_q.*non-decreasing"):
        varlen_attention(q, k, v, shared, shared, 9, 9, backend=backend)
    array[1] = 3
    varlen_attention(q, k, v, shared, shared, 5, 5, backend=backend)
    shared.data[1] = 9  # .data writes do not bump the version either
    with pytest.raises(ValueError, match="cu_seqlens_q.*non-decreasing"):
        varlen_attention(q, k, v, shared, shared, 9, 9, backend=backend)
    hit = sys.modules["foldops.ops.varlen_attention"]._checked.get(id(shared))
    assert hit is None or hit[0]() is not shared  # not remembered (the id may be a dead tensor's)


# GPU: the torch backend at real sizes (torch.nn.attention.varlen for bf16/fp16, buckets
# for fp32) --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_torch_backend_gpu(dtype, causal):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(50, 1023, (12,), generator=g).tolist()
    lens[2] = 1
    check_against_fp64("torch", lens, lens, 8, 2, 64, dtype, causal, device="cuda", slack=5)


# torch.compile: the bucketed torch path is a registered op (opaque to the tracer) -------------


def _compiled(fn, fullgraph):
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", fullgraph=fullgraph)


@pytest.mark.parametrize("causal, return_lse, fullgraph", [(False, False, True), (True, True, True),
                                                           (True, False, False)])
def test_torch_backend_under_torch_compile(causal, return_lse, fullgraph):
    """fp64: forward, lse and gradients of the compiled op against the fp64 reference, and
    equal to eager; an empty sequence, Lq != Lk (causal rows without keys) and GQA."""
    lens_q, lens_k = [5, 0, 1, 9], [6, 2, 0, 7]
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, 4, 2, 8)
    grad_out = torch.randn(q.shape, dtype=torch.float64)

    def fast(q, k, v, cu_q, cu_k):
        result = varlen_attention(q, k, v, cu_q, cu_k, 9, 7, causal=causal, return_lse=return_lse, backend="torch")
        return result if return_lse else (result, None)

    compiled = _compiled(fast, fullgraph)
    got, got_lse, got_g = run(lambda *t: compiled(*t, cu_q, cu_k), q, k, v, grad_out)
    eager, eager_lse, eager_g = run(lambda *t: fast(*t, cu_q, cu_k), q, k, v, grad_out)
    exact, exact_lse, exact_g = run(lambda *t: reference(*t, cu_q, cu_k, causal), q, k, v, grad_out)
    torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    for g, e, x in zip(got_g, eager_g, exact_g):
        torch.testing.assert_close(g, x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    if return_lse:
        assert got_lse.dtype == torch.float32 and got_lse.shape == (4, q.shape[0])
        torch.testing.assert_close(got_lse, exact_lse.float())
        torch.testing.assert_close(got_lse, eager_lse, rtol=0, atol=0)


@pytest.mark.parametrize("return_lse", [False, True], ids=["sdpa", "explicit-softmax"])
def test_compiled_under_autocast_has_eager_dtype_and_values(return_lse):
    """fp32 q under bf16 autocast: eager runs the bucketed path's SDPA / matmuls in bf16;
    the compiled op must declare and return that dtype (its fake says q's dtype), with
    forward and gradients (cast back to fp32 by autograd) as accurate as eager's against
    the fp64 reference. (The compiled op casts its inputs once and runs without autocast,
    so the explicit softmax rounds a little differently from eager.)"""
    q, k, v, cu_q, cu_k = make_inputs([5, 0, 3], [6, 2, 3], 2, 2, 8)
    grad_out = torch.randn(q.shape, dtype=torch.float64)

    def f(q, k, v, a, b):
        out = varlen_attention(q, k, v, a, b, 5, 6, return_lse=return_lse, backend="torch")
        return out if return_lse else (out, None)

    compiled = _compiled(f, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _, got_g = run(lambda *t: compiled(*(x.float() for x in t), cu_q, cu_k), q, k, v, grad_out)
        eager, _, eager_g = run(lambda *t: f(*(x.float() for x in t), cu_q, cu_k), q, k, v, grad_out)
    exact, _, exact_g = run(lambda *t: reference(*t, cu_q, cu_k, False), q, k, v, grad_out)
    assert got.dtype == eager.dtype == torch.bfloat16
    if not return_lse:  # the SDPA path: the same kernels on the same bf16 inputs
        torch.testing.assert_close(got, eager, rtol=0, atol=0)
    assert_within_baseline("out", got.double(), exact, eager.double(), dtype=torch.bfloat16)
    for name, g, e, x in zip("qkv", got_g, eager_g, exact_g):
        assert g.dtype == torch.float64  # the fp64 leaves, through autocast's casts
        assert_within_baseline(f"d{name}", g, x, e, dtype=torch.bfloat16)


def test_the_reported_compile_call_runs():
    """The call of the report: auto backend on CPU, no fullgraph."""
    c = torch.tensor([0, 3, 10, 11], dtype=torch.int32)
    q = torch.randn(11, 4, 16)
    f = lambda q, c: varlen_attention(q, q, q, c, c, 7, 7)  # noqa: E731
    torch.testing.assert_close(_compiled(f, False)(q, c), f(q, c), rtol=0, atol=0)


def test_compiled_dropout_backward_sees_the_forward_mask():
    """out is linear in v with the dropout mask fixed, so <out, G> = <dL/dv, v> exactly
    when the backward (a recomputation) replays the forward's mask."""
    q, k, v, cu_q, cu_k = make_inputs([4, 7], [5, 7], 2, 1, 8)
    v.requires_grad_(True)
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    fn = _compiled(lambda q, k, v, a, b: varlen_attention(q, k, v, a, b, 7, 7, dropout_p=0.5, backend="torch"),
                   True)
    out = fn(q, k, v, cu_q, cu_k)
    (dv,) = torch.autograd.grad(out, v, grad_out)
    assert not torch.allclose(out, varlen_attention(q, k, v, cu_q, cu_k, 7, 7, backend="torch"))  # dropped
    torch.testing.assert_close((out * grad_out).sum(), (dv * v).sum(), rtol=1e-12, atol=0)


def test_registered_torch_op_passes_opcheck():
    q, k, v, cu_q, cu_k = make_inputs([3, 0, 5], [4, 2, 5], 4, 2, 8)
    q, k, v = (t.float().requires_grad_(True) for t in (q, k, v))
    op = torch.ops.foldops.varlen_attention_torch_fwd.default
    torch.library.opcheck(op, (q, k, v, cu_q, cu_k, 5, 5, True, 0.3, 0.0, True, None))
    torch.library.opcheck(op, (q, k, v, cu_q, cu_k, 5, 5, False, 0.3, 0.25, False, torch.tensor([7])))


def test_meta_tensors_give_shapes():
    q = torch.empty(11, 4, 16, device="meta")
    k = torch.empty(9, 2, 16, device="meta")
    c = torch.empty(4, dtype=torch.int32, device="meta")
    out, lse = varlen_attention(q, k, k, c, c, 7, 7, return_lse=True, backend="torch")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (4, 11) and lse.dtype == torch.float32


def test_reference_backend_under_fullgraph_compile():
    q, k, v, cu_q, cu_k = make_inputs([3, 0, 5], [4, 0, 5], 2, 2, 8)
    q.requires_grad_(True)
    f = lambda q, k, v, a, b: varlen_attention(q, k, v, a, b, 5, 5, causal=True, backend="reference")  # noqa: E731
    got = _compiled(f, True)(q, k, v, cu_q, cu_k)
    want = f(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), q)[0], torch.autograd.grad(want.sum(), q)[0],
                               rtol=0, atol=0)


def test_inference_mode_cu_seqlens_are_checked_every_call():
    x = torch.randn(7, 2, 8)
    with torch.inference_mode():
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        out = varlen_attention(x, x, x, cu, cu, 4, 4, backend="torch")
        assert out.shape == x.shape
        cu[1] = 5  # a changed inference tensor is seen
        with pytest.raises(ValueError, match="max_seqlen"):
            varlen_attention(x, x, x, cu, cu, 4, 4, backend="torch")


@pytest.mark.parametrize("causal", (False, True))
def test_torch_varlen_adapts_to_an_older_varlen_attn_signature(monkeypatch, causal):
    """torch 2.11's varlen_attn has no ``enable_gqa``: GQA inputs get their kv heads
    repeated, and only the keywords the installed function takes are passed (a fake with
    that signature computes with the reference here; the real kernel needs a GPU)."""
    pytest.importorskip("torch.nn.attention.varlen")
    import torch.nn.attention.varlen as tv

    from foldops.ops import _varlen_torch

    def old_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1)):
        assert key.shape[1] == query.shape[1], "kv heads must be repeated for this signature"
        return reference(query, key, value, cu_seq_q, cu_seq_k, causal=window_size == (-1, 0), softmax_scale=scale)[0]

    monkeypatch.setattr(tv, "varlen_attn", old_varlen_attn)
    monkeypatch.setattr(_varlen_torch, "_VARLEN_ATTN_PARAMETERS",
                        frozenset(("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "return_aux",
                                   "scale", "window_size")))
    lens_q, lens_k = [3, 7, 1], [5, 7, 2]
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, 4, 2, 16)
    out, lse = _varlen_torch.torch_varlen(q, k, v, cu_q, cu_k, 7, 7, causal, 0.25, False)
    assert lse is None
    expected = reference(q, k, v, cu_q, cu_k, causal=causal, softmax_scale=0.25)[0]
    torch.testing.assert_close(out, expected)


# Batches without attention: outputs stay in the autograd graph -------------------------------

# (query lengths, key lengths): no sequence (B = 0), every sequence empty, queries but no
# keys anywhere, keys but no queries.
EMPTY_BATCHES = {"no-sequence": ([], []), "all-empty": ([0, 0, 0], [0, 0, 0]),
                 "no-keys": ([3, 5, 1], [0, 0, 0]), "no-queries": ([0, 0], [2, 4])}


def check_empty_batch(backend, lens_q, lens_k, dtype, causal, return_lse, device="cpu"):
    """out == 0 with a grad_fn, lse == -inf (fp32 [H, total_q]); backward gives zero
    gradients shaped and typed as q, k, v."""
    heads, kv_heads, dim = 4, 2, 8
    q = torch.randn(sum(lens_q), heads, dim, dtype=dtype, device=device, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), kv_heads, dim, dtype=dtype, device=device, requires_grad=True)
            for _ in range(2))
    result = varlen_attention(q, k, v, cu(lens_q, device), cu(lens_k, device), max(lens_q, default=0),
                              max(lens_k, default=0), causal=causal, return_lse=return_lse, backend=backend)
    out, lse = result if return_lse else (result, None)
    assert out.grad_fn is not None and out.shape == q.shape and out.dtype == dtype
    assert torch.equal(out, torch.zeros_like(out))
    if return_lse:
        assert lse.dtype == torch.float32 and lse.shape == (heads, q.shape[0]) and torch.isneginf(lse).all()
    out.sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.grad is not None, name
        assert t.grad.shape == t.shape and t.grad.dtype == dtype, name
        assert torch.equal(t.grad, torch.zeros_like(t)), name


@pytest.mark.parametrize("case", list(EMPTY_BATCHES))
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "lse"])
def test_empty_batch_stays_in_the_graph(case, backend, dtype, return_lse):
    check_empty_batch(backend, *EMPTY_BATCHES[case], dtype, causal=case == "no-keys", return_lse=return_lse)


def test_torch_varlen_without_queries_or_keys_skips_the_kernel():
    """torch.nn.attention.varlen (GPU only) is not called on empty q or k: the shapes
    alone give zeros in the graph and lse = -inf."""
    from foldops.ops import _varlen_torch

    for lens_q, lens_k in (([0, 0], [0, 0]), ([2, 3], [0, 0]), ([0, 0], [4, 1])):
        q, k, v, cu_q, cu_k = (t.requires_grad_(t.is_floating_point()) for t in make_inputs(lens_q, lens_k, 4, 2, 8))
        out, lse = _varlen_torch.torch_varlen(q, k, v, cu_q, cu_k, 3, 4, True, 0.25, True)
        assert torch.equal(out, torch.zeros_like(q)) and lse.shape == (4, q.shape[0]) and torch.isneginf(lse).all()
        for t, g in zip((q, k, v), torch.autograd.grad(out.sum(), (q, k, v))):
            assert torch.equal(g, torch.zeros_like(t))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_empty_batch_stays_in_the_graph_gpu(dtype):
    for case, (lens_q, lens_k) in EMPTY_BATCHES.items():
        for return_lse in (False, True):
            check_empty_batch("torch", lens_q, lens_k, dtype, case == "no-keys", return_lse, device="cuda")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("shape", [(0, 3, 3), (2, 0, 3), (2, 3, 0), (2, 3, 4)], ids=lambda s: "B{}L{}Lk{}".format(*s))
def test_padded_attention_without_keys_stays_in_the_graph(backend, shape):
    batch, lq, lk = shape
    q = torch.randn(batch, lq, 4, 8, requires_grad=True)
    k, v = (torch.randn(batch, lk, 2, 8, requires_grad=True) for _ in range(2))
    keep = torch.zeros(batch, lk, dtype=torch.bool)  # no key kept (ignored where Lk = 0)
    for causal in (False, True):
        out = padded_attention(q, k, v, keep, causal=causal, backend=backend)
        assert out.grad_fn is not None and torch.equal(out, torch.zeros_like(out))
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        for t, g in zip((q, k, v), grads):
            assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t))


# Masks: masked keys get exactly zero weight at any logit --------------------------------------

# One head, q = e0 and k[j] = logit_j * e0, so with softmax_scale=1 the logits are exact
# (fp16 holds them), and v = one-hot rows: out[i] is row i's attention weights.
def one_hot_logits(logits, dtype, rows):
    q = torch.zeros(rows, 1, 8, dtype=dtype)
    q[:, 0, 0] = 1
    k = torch.zeros(len(logits), 1, 8, dtype=dtype)
    k[:, 0, 0] = torch.tensor(logits, dtype=dtype)
    v = torch.eye(len(logits), 8, dtype=dtype)[:, None]
    return q, k, v


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("return_lse", [False, True], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("logits", [(-5000.0, -5000.0, 30000.0), (-40000.0, -40000.0, -40000.0)],
                         ids=["masked-key-far-above", "visible-keys-far-below"])
def test_masked_keys_get_zero_weight_at_extreme_logits(dtype, return_lse, logits):
    """Lq = 2 against Lk = 3, causal: row 0 sees keys 0 and 1 (equal logits), not key 2.
    A finite fp16 mask value (finfo.min / 2 = -32752) is beaten by a masked key's large
    logit (added: -2752 > -5000) and sits above visible logits (filled: -32752 > -40000);
    -inf is neither."""
    q, k, v = one_hot_logits(logits, dtype, 2)
    c_q, c_k = cu([2]), cu([3])
    result = varlen_attention(q, k, v, c_q, c_k, 2, 3, causal=True, softmax_scale=1.0, return_lse=return_lse,
                              backend="torch")
    out = result[0] if return_lse else result
    assert out[0, 0, :4].float().tolist() == [0.5, 0.5, 0.0, 0.0]
    if return_lse:
        expected = k[0, 0, 0].item() + math.log(2.0)  # the logit as rounded to dtype
        assert abs(result[1][0, 0].item() - expected) <= 1e-6 * abs(expected)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_padded_attention_padding_gets_zero_weight_at_extreme_logits(dtype):
    q, k, v = one_hot_logits([-5000.0, -5000.0, 30000.0], dtype, 1)
    q, k, v = (t[None].requires_grad_(True) for t in (q, k, v))
    keep = torch.tensor([[True, True, False]])
    out = padded_attention(q, k, v, keep, softmax_scale=1.0, backend="torch")
    assert out[0, 0, 0, :4].float().tolist() == [0.5, 0.5, 0.0, 0.0]
    _, dk, dv = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert torch.equal(dk[0, 2], torch.zeros_like(dk[0, 2])) and torch.equal(dv[0, 2], torch.zeros_like(dv[0, 2]))


def _rule_contexts(monkeypatch):
    from foldops import backend_rules

    seen = []
    original = backend_rules.preferred
    monkeypatch.setattr(backend_rules, "preferred",
                        lambda op, **ctx: seen.append((op, ctx["n"], ctx["training"])) or original(op, **ctx))
    return seen


def test_size_rules_get_keys_and_mode(monkeypatch):
    """auto hands the size rules n = max_seqlen_k (the int argument, not cu_seqlens) and
    the mode; padded_attention hands them its key length."""
    seen = _rule_contexts(monkeypatch)
    q, k, v, cu_q, cu_k = make_inputs([3, 2], [4, 5], 2, 2, 8)
    q.requires_grad_()
    varlen_attention(q, k, v, cu_q, cu_k, 3, 6)
    with torch.no_grad():
        varlen_attention(q, k, v, cu_q, cu_k, 3, 6)
    qd, kd = torch.randn(2, 3, 2, 8), torch.randn(2, 7, 2, 8, requires_grad=True)
    padded_attention(qd, kd, kd)
    with torch.no_grad():
        padded_attention(qd, kd, kd)
    assert seen == [(OP, 6, True), (OP, 6, False), (OP, 7, True), (OP, 7, False)]
