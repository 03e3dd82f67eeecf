"""The ``triton`` backend of varlen attention against float64: under the interpreter at
small sizes (tiles of 16, so lengths 15/16/17/33 straddle blocks), on the GPU at real
sizes (``gpu`` marker)."""

import pytest
import torch

from foldops.device import kernel_support
from foldops.ops import padded_attention, varlen_attention
from foldops.reference.varlen_attention import varlen_attention as reference
from foldops.testing import assert_within_baseline

pytestmark = pytest.mark.skipif(kernel_support("cuda" if torch.cuda.is_available() else "cpu") is not None,
                                reason="Triton kernels cannot run here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = (torch.float32, torch.bfloat16, torch.float16)


def cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def run(fn, tensors, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out, lse = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    return out.detach(), lse, [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def check(lens_q, lens_k, heads, kv_heads, dim, dtype, causal, slack=0, layout=None):
    q = torch.randn(sum(lens_q), heads, dim, dtype=torch.float64, device=DEVICE)
    k, v = (torch.randn(sum(lens_k), kv_heads, dim, dtype=torch.float64, device=DEVICE) for _ in range(2))
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    grad_out = torch.randn(q.shape, dtype=torch.float64, device=DEVICE)

    def ref(*t):
        return reference(*t, cu_q, cu_k, causal)

    def fast(*t):
        if layout == "strided":  # q/k/v as views with padded token and head strides
            t = [torch.cat([x, torch.zeros_like(x)], 1)[:, : x.shape[1]] for x in t]
        return varlen_attention(*t, cu_q, cu_k, max(lens_q) + slack, max(lens_k) + slack, causal=causal,
                                return_lse=True, backend="triton")

    exact, exact_lse, exact_g = run(ref, (q, k, v), grad_out)
    low = [t.to(dtype) for t in (q, k, v)]
    base, base_lse, base_g = run(ref, low, grad_out)
    out, lse, grads = run(fast, low, grad_out)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (heads, q.shape[0])
    assert_within_baseline("out", out, exact, base, dtype=dtype)
    empty = torch.isneginf(exact_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert_within_baseline("lse", lse[~empty], exact_lse[~empty], base_lse[~empty].float(), dtype=dtype)
    for name, g, eg, bg in zip(("dq", "dk", "dv"), grads, exact_g, base_g):
        assert torch.isfinite(g).all(), name
        assert_within_baseline(name, g, eg, bg, dtype=dtype)
    return out, grads, empty


CASES = {  # name: (query lengths, key lengths, H, H_kv, D)
    "blocks": ([15, 16, 17, 33], [15, 16, 17, 33], 2, 2, 16),
    "empty-one": ([5, 0, 1, 17, 3], [6, 2, 0, 17, 3], 4, 2, 8),
    "cross-mqa": ([7, 1, 20], [3, 5, 36], 3, 1, 24),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_triton_fp32(case, causal):
    check(*CASES[case], torch.float32, causal, slack=5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_triton_16bit(dtype, causal):
    check([15, 1, 33], [17, 4, 33], 4, 2, 16, dtype, causal)


def test_strided_inputs_and_rows_without_keys():
    out, (dq, _, _), empty = check([4, 3, 6], [4, 0, 2], 2, 1, 16, torch.float32, True, layout="strided")
    rows = empty.all(0)
    assert rows.sum() == 3 + 4  # the empty-key sequence; causal rows i < Lq - Lk
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))
    assert torch.equal(dq[rows], torch.zeros_like(dq[rows]))


def test_backward_is_deterministic():
    lens = [9, 20, 3]
    q, k, v = (torch.randn(sum(lens), 4, 16, device=DEVICE) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA: dK/dV sum over two query heads
    c = cu(lens)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = varlen_attention(*leaves, c, c, 20, 20, backend="triton")
        grads.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_padded_attention_triton_matches_reference():
    q = torch.randn(3, 7, 2, 16, device=DEVICE)
    k, v = (torch.randn(3, 18, 2, 16, device=DEVICE) for _ in range(2))
    keep = torch.rand(3, 18, device=DEVICE) > 0.4
    keep[1] = False
    keep[0, 3] = True
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = padded_attention(*leaves, keep, backend="triton")
    exact = padded_attention(q.double(), k.double(), v.double(), keep, backend="reference")
    assert (out.double() - exact).abs().max() < 1e-5
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    causal = padded_attention(q, k, v, causal=True, backend="triton")
    exact = padded_attention(q.double(), k.double(), v.double(), causal=True, backend="reference")
    assert (causal.double() - exact).abs().max() < 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_mask_is_philox_and_backward_redraws_it(causal):
    """Read the kernel's dropout mask Z through one-hot values (out[i, j] = P_ij Z_ij / (1-p)
    when v[j] = e_j), then check output and gradients for random values against float64
    with that mask: the backward must redraw the forward's mask."""
    lens, heads, dim, p = [16, 9, 13], 2, 16, 0.3
    c = cu(lens)
    q = torch.randn(sum(lens), heads, dim, device=DEVICE)
    k = torch.randn(sum(lens), 1, dim, device=DEVICE)
    onehot = torch.cat([torch.eye(n, dim, device=DEVICE) for n in lens])[:, None, :]

    def fast(q, k, v, seed):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        return varlen_attention(q, k, v, c, c, 16, 16, causal=causal, dropout_p=p, generator=g, backend="triton")

    weights = varlen_attention(q, k, onehot, c, c, 16, 16, causal=causal, backend="triton")  # P
    dropped = fast(q, k, onehot, 7)
    visible = weights > 0
    keep = (dropped > 0) & visible
    assert torch.allclose(dropped[keep], weights[keep] / (1 - p), rtol=1e-5, atol=1e-7)
    rate = keep.sum() / visible.sum()
    count = visible.sum().item()
    assert abs(rate.item() - (1 - p)) < 5 * ((p * (1 - p) / count) ** 0.5)
    assert not torch.equal(dropped, fast(q, k, onehot, 8))  # another seed, another mask
    assert torch.equal(dropped, fast(q, k, onehot, 7))

    v = torch.randn(sum(lens), 1, dim, device=DEVICE)
    grad_out = torch.randn(q.shape, device=DEVICE)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = fast(*leaves, 7)
    grads = torch.autograd.grad(out, leaves, grad_out)
    exact_leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    outs, start = [], 0
    for n in lens:  # float64: softmax, the kernel's mask, values
        qs, ks, vs = (t[start:start + n] for t in exact_leaves)
        logits = torch.einsum("ihd,jd->hij", qs, ks[:, 0]) / dim ** 0.5
        if causal:
            logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
        z = keep[start:start + n, :, :n].permute(1, 0, 2).double()  # [H, i, j]
        outs.append(torch.einsum("hij,jd->ihd", torch.softmax(logits, -1) * z / (1 - p), vs[:, 0]))
        start += n
    exact = torch.cat(outs)
    exact_grads = torch.autograd.grad(exact, exact_leaves, grad_out.double())
    assert (out.double() - exact).abs().max() < 1e-5
    for name, g, eg in zip(("dq", "dk", "dv"), grads, exact_grads):
        assert (g.double() - eg).abs().max() < 1e-4 * max(1.0, eg.abs().max().item()), name


def test_opcheck():
    from foldops.kernels.varlen_attention import varlen_attention as _entry  # noqa: F401  (registers the ops)

    lens = [5, 0, 17]
    q = torch.randn(22, 2, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(22, 1, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    c = cu(lens)
    torch.library.opcheck(torch.ops.foldops.varlen_attention_fwd.default, (q, k, v, c, c, 17, 17, True, 0.25, 0.0, None))
    seed = torch.tensor([5], device=DEVICE)
    torch.library.opcheck(torch.ops.foldops.varlen_attention_fwd.default, (q, k, v, c, c, 17, 17, False, 0.25, 0.2, seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("lens", [([], []), ([0, 0, 0], [0, 0, 0]), ([3, 5, 1], [0, 0, 0]), ([0, 0], [2, 4])],
                         ids=["no-sequence", "all-empty", "no-keys", "no-queries"])
def test_empty_batches_stay_in_the_graph(dtype, lens):
    """out == 0 with a grad_fn, lse == -inf; zero gradients shaped and typed as q, k, v."""
    lens_q, lens_k = lens
    for return_lse in (False, True):
        q = torch.randn(sum(lens_q), 4, 8, dtype=dtype, device=DEVICE, requires_grad=True)
        k, v = (torch.randn(sum(lens_k), 2, 8, dtype=dtype, device=DEVICE, requires_grad=True) for _ in range(2))
        result = varlen_attention(q, k, v, cu(lens_q), cu(lens_k), max(lens_q, default=0), max(lens_k, default=0),
                                  causal=bool(lens_q) and lens_q[0] == 3, return_lse=return_lse, backend="triton")
        out, lse = result if return_lse else (result, None)
        assert out.grad_fn is not None and out.dtype == dtype and torch.equal(out, torch.zeros_like(out))
        if return_lse:
            assert lse.dtype == torch.float32 and lse.shape == (4, q.shape[0]) and torch.isneginf(lse).all()
        out.sum().backward()
        for t in (q, k, v):
            assert t.grad.shape == t.shape and t.grad.dtype == dtype and torch.equal(t.grad, torch.zeros_like(t))


def test_empty_batch_under_compile_fullgraph():
    """Traced calls (no host read of cu_seqlens) on an all-empty and a no-key batch."""
    def fn(q, k, v, cq, ck):
        out, lse = varlen_attention(q, k, v, cq, ck, 3, 0, causal=True, return_lse=True, backend="triton")
        return out, lse

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for lens_q in ([0, 0], [3, 2]):
        q = torch.randn(sum(lens_q), 2, 8, device=DEVICE, requires_grad=True)
        k, v = (torch.randn(0, 1, 8, device=DEVICE, requires_grad=True) for _ in range(2))
        out, lse = compiled(q, k, v, cu(lens_q), cu([0, 0]))
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
        out.sum().backward()
        for t in (q, k, v):
            assert torch.equal(t.grad, torch.zeros_like(t))


def test_masked_keys_get_zero_weight_at_extreme_logits():
    """As tests/ops: q = e0, k[j] = logit_j e0, v one-hot; row 0 sees keys 0 and 1 only."""
    for logits in ((-5000.0, -5000.0, 30000.0), (-40000.0, -40000.0, -40000.0)):
        q = torch.zeros(2, 1, 8, dtype=torch.float16, device=DEVICE)
        q[:, 0, 0] = 1
        k = torch.zeros(3, 1, 8, dtype=torch.float16, device=DEVICE)
        k[:, 0, 0] = torch.tensor(logits)
        v = torch.eye(3, 8, dtype=torch.float16, device=DEVICE)[:, None]
        out = varlen_attention(q, k, v, cu([2]), cu([3]), 2, 3, causal=True, softmax_scale=1.0, backend="triton")
        assert out[0, 0, :4].float().tolist() == [0.5, 0.5, 0.0, 0.0]


# GPU at real sizes ------------------------------------------------------------------------


def protein_lengths(count, low, high, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (count,), generator=g).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dims", [(8, 8, 64), (8, 2, 128), (6, 3, 48)], ids=lambda d: "H{}kv{}D{}".format(*d))
def test_triton_gpu(dtype, causal, dims):
    lens = protein_lengths(16, 50, 1022)
    lens[3], lens[7] = 1, 0
    check(lens, lens, *dims, dtype, causal, slack=9)


@pytest.mark.gpu
def test_triton_gpu_cross_lengths_and_compile():
    lens_q, lens_k = protein_lengths(8, 1, 300, seed=1), protein_lengths(8, 0, 300, seed=2)
    check(lens_q, lens_k, 4, 4, 64, torch.bfloat16, True)
    q = torch.randn(sum(lens_q), 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    cq, ck = cu(lens_q), cu(lens_k)

    def fn(q, k, v):
        return varlen_attention(q, k, v, cq, ck, 300, 300, backend="triton")

    eager = fn(q, k, v)
    compiled = torch.compile(fn, fullgraph=False)(q, k, v)
    assert torch.equal(eager, compiled)
    compiled.float().sum().backward()
