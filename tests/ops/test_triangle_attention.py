"""foldops.ops.triangle_attention: the ``reference`` and ``torch`` backends against float64.

The ``triton`` backend has its own tests next to the kernel (tests/kernels); here it only
appears in the selection and error tests.
"""

import dataclasses

import pytest
import torch

from foldops import backends
from foldops.backends import BackendUnavailableError
from foldops.device import kernel_support
from foldops.ops import triangle_attention
from foldops.reference.triangle_attention import triangle_attention as reference
from foldops.testing import assert_deterministic, assert_within_baseline, check_against_float64, leaves

OP = "triangle_attention"
BACKENDS = ("torch", "reference")
LOW = (torch.float32, torch.bfloat16, torch.float16)

def backend_dtype_params(dtypes):
    """(backend, dtype) pairs."""
    return [
        pytest.param(backend, dtype, id=f"{backend}-{str(dtype).split('.')[-1]}")
        for backend in BACKENDS
        for dtype in dtypes
    ]


# (B, I, N, H, D): 1, primes, I != N, B = 2, H 1/3, D 8/16.
SHAPES = [
    (1, 1, 1, 1, 8),
    (1, 2, 2, 3, 16),
    (2, 7, 7, 1, 8),
    (1, 13, 13, 3, 16),
    (1, 33, 33, 1, 8),
    (2, 5, 13, 3, 16),
]


def make_inputs(batch, rows, n, heads, dim, *, masked=True):
    """fp64 inputs; the mask keeps ~70% of keys and fully masks row 0 (when I > 1)."""
    q, k, v = (torch.randn(batch, rows, n, heads, dim, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(batch, heads, n, n, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(batch, rows, n) > 0.3
        mask[..., -1] = True
        if rows > 1:
            mask[:, 0] = False
    return q, k, v, bias, mask


def run(fn, q, k, v, bias, grad_out, **kwargs):
    """Output and the gradients of (out * grad_out).sum() w.r.t. q, k, v, bias."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
    out = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), grads


def check_against_fp64(backend, inputs, dtype, bias_dtype=None):
    q, k, v, bias, mask = inputs
    fast = check_against_float64(
        lambda *t: triangle_attention(*t, backend=backend),
        reference,
        (q, k, v, bias, mask),
        (dtype, dtype, dtype, bias_dtype or dtype, None),
        names=("q", "k", "v", "bias", "mask"),
        compare_dtype=dtype,
    )
    return fast.outputs[0], fast.grads[:4]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend, dtype", backend_dtype_params(LOW + (torch.float64,)))
def test_forward_and_grads_vs_float64(backend, dtype, shape):
    check_against_fp64(backend, make_inputs(*shape), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    """Two runs give bitwise equal outputs and gradients of q, k, v and the bias."""
    q, k, v, bias, mask = make_inputs(2, 5, 9, 3, 8)
    inputs = leaves((q, k, v, bias), torch.float32)
    assert_deterministic(lambda *t: triangle_attention(*t, mask, backend=backend), inputs, names="q k v bias".split())


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_mask(backend):
    check_against_fp64(backend, make_inputs(2, 5, 7, 3, 16, masked=False), torch.float32)


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(LOW))
def test_fully_masked_rows_give_zeros_and_zero_grads(backend, dtype):
    q, k, v, bias, mask = make_inputs(2, 6, 9, 3, 16)
    mask[1, 2:4] = False
    low = [t.to(dtype) for t in (q, k, v, bias)]
    out, (dq, dk, dv, dbias) = run(
        lambda *t: triangle_attention(*t, mask, backend=backend), *low, torch.randn(q.shape, dtype=torch.float64)
    )
    dead = ~mask.any(-1)  # [B, I]
    assert dead.sum() == 4
    for t in (out, dq, dk, dv, dbias):
        assert torch.isfinite(t).all()
    assert (out[dead] == 0).all()
    assert (dq[dead] == 0).all()
    # Masked keys get no gradient; nor does the bias of a masked key.
    assert (dk[~mask] == 0).all() and (dv[~mask] == 0).all()
    everywhere_masked_key = ~mask.any(1)  # [B, N]: key masked in every row
    for b in range(2):
        assert (dbias[b][..., everywhere_masked_key[b]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_everything_masked(backend):
    q, k, v, bias, _ = make_inputs(1, 3, 4, 2, 8)
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    out, grads = run(
        lambda *t: triangle_attention(*t, mask, backend=backend), *(t.float() for t in (q, k, v, bias)),
        torch.randn(q.shape, dtype=torch.float64),
    )
    assert (out == 0).all()
    for g in grads:
        assert (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_equals_bool_mask(backend):
    q, k, v, bias, mask = (t.float() if t.is_floating_point() else t for t in make_inputs(2, 5, 7, 3, 8))
    out_bool = triangle_attention(q, k, v, bias, mask, backend=backend)
    out_float = triangle_attention(q, k, v, bias, mask.float(), backend=backend)
    out_int = triangle_attention(q, k, v, bias, mask.to(torch.uint8), backend=backend)
    assert torch.equal(out_bool, out_float) and torch.equal(out_bool, out_int)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_ending_node_views(backend):
    """The ending node passes transposed views of q, k, v, the bias and the mask."""
    batch, n, heads, dim = 2, 11, 3, 16
    q, k, v = (torch.randn(batch, n, n, heads, dim, dtype=torch.float64) for _ in range(3))
    tri = torch.randn(batch, n, n, heads, dtype=torch.float64)  # a [B, N, N, H] projection
    pair_mask = torch.rand(batch, n, n) > 0.3
    pair_mask[:, :, 3] = False  # column 3 -> fully masked row of the transposed problem
    views = [t.transpose(1, 2) for t in (q, k, v)] + [tri.permute(0, 3, 2, 1)]
    mask_view = pair_mask.transpose(1, 2)
    assert not any(t.is_contiguous() for t in views + [mask_view])
    contiguous = [t.contiguous() for t in views]
    grad_out = torch.randn(batch, n, n, heads, dim, dtype=torch.float64)
    exact, exact_g = run(lambda *t: reference(*t, mask_view.contiguous()), *contiguous, grad_out)
    base, base_g = run(lambda *t: reference(*t, mask_view.contiguous()), *(t.float() for t in contiguous), grad_out)
    fast, fast_g = run(
        lambda *t: triangle_attention(*t, mask_view, backend=backend), *(t.float() for t in views), grad_out
    )
    assert_within_baseline("out", fast, exact, base)
    for name, g, eg, bg in zip(("dq", "dk", "dv", "dbias"), fast_g, exact_g, base_g):
        assert_within_baseline(name, g, eg, bg)
    assert (fast[:, 3] == 0).all()


@pytest.mark.parametrize("backend, dtype", backend_dtype_params((torch.bfloat16, torch.float16)))
def test_fp32_bias_with_low_precision_q(backend, dtype):
    check_against_fp64(backend, make_inputs(1, 7, 13, 3, 16), dtype, bias_dtype=torch.float32)


@pytest.mark.parametrize("chunk_size", (1, 2, 5, 7, 100))
def test_torch_backend_chunk_size_sweep(chunk_size):
    q, k, v, bias, mask = (t.float() if t.is_floating_point() else t for t in make_inputs(2, 7, 13, 3, 16))
    exact = reference(*(t.double() for t in (q, k, v, bias)), mask)
    base = reference(q, k, v, bias, mask)
    with torch.no_grad():
        chunked = triangle_attention(q, k, v, bias, mask, chunk_size=chunk_size, backend="torch")
        whole = triangle_attention(q, k, v, bias, mask, chunk_size=7, backend="torch")
    assert_within_baseline("out", chunked, exact, base)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_chunk_size_is_ignored_under_autograd():
    q, k, v, bias, mask = make_inputs(1, 6, 6, 2, 8)
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    a, ga = run(lambda *t: triangle_attention(*t, mask, chunk_size=1, backend="torch"), q, k, v, bias, grad_out)
    b, gb = run(lambda *t: triangle_attention(*t, mask, backend="torch"), q, k, v, bias, grad_out)
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_explicit_scale():
    q, k, v, bias, mask = make_inputs(1, 4, 5, 2, 8)
    for backend in BACKENDS:
        out = triangle_attention(q, k, v, bias, mask, scale=0.5, backend=backend)
        torch.testing.assert_close(out, reference(q, k, v, bias, mask, scale=0.5))
        # scale = 0.5 with D = 8 is not the default 1/sqrt(8)
        assert not torch.allclose(out, triangle_attention(q, k, v, bias, mask, backend=backend))


# Backend selection ------------------------------------------------------------------------


@pytest.fixture
def spies(monkeypatch):
    """Wrap every registered backend of the op so tests can see which one ran."""
    calls = []
    for name, backend in list(backends._REGISTRY[OP].items()):
        def spy(*args, _fn=backend.fn, _name=name):
            calls.append(_name)
            return _fn(*args)
        monkeypatch.setitem(backends._REGISTRY[OP], name, dataclasses.replace(backend, fn=spy))
    monkeypatch.delenv("FOLDOPS_BACKEND", raising=False)
    monkeypatch.delenv("FOLDOPS_BACKEND_TRIANGLE_ATTENTION", raising=False)
    return calls


def small():
    return make_inputs(1, 3, 4, 2, 8)


def test_auto_on_cpu_picks_torch(spies):
    triangle_attention(*small())
    assert spies == ["torch"]


def test_env_per_op_override(spies, monkeypatch):
    monkeypatch.setenv("FOLDOPS_BACKEND_TRIANGLE_ATTENTION", "reference")
    triangle_attention(*small())
    assert spies == ["reference"]


def test_env_global_override(spies, monkeypatch):
    monkeypatch.setenv("FOLDOPS_BACKEND", "reference")
    triangle_attention(*small())
    assert spies == ["reference"]


def test_env_global_unknown_name_raises(spies, monkeypatch):
    """A name no op has is a typo, not a choice: it names the valid ones."""
    monkeypatch.setenv("FOLDOPS_BACKEND", "no_such_backend")
    with pytest.raises(BackendUnavailableError, match="FOLDOPS_BACKEND: unknown backend 'no_such_backend'; valid: "):
        triangle_attention(*small())
    assert spies == []


def test_env_per_op_beats_global(spies, monkeypatch):
    monkeypatch.setenv("FOLDOPS_BACKEND", "reference")
    monkeypatch.setenv("FOLDOPS_BACKEND_TRIANGLE_ATTENTION", "torch")
    triangle_attention(*small())
    assert spies == ["torch"]


def test_backend_argument_beats_env(spies, monkeypatch):
    monkeypatch.setenv("FOLDOPS_BACKEND_TRIANGLE_ATTENTION", "reference")
    triangle_attention(*small(), backend="torch")
    assert spies == ["torch"]


def test_env_per_op_unknown_name_raises(spies, monkeypatch):
    monkeypatch.setenv("FOLDOPS_BACKEND_TRIANGLE_ATTENTION", "no_such_backend")
    with pytest.raises(BackendUnavailableError, match="FOLDOPS_BACKEND_TRIANGLE_ATTENTION.*no_such_backend"):
        triangle_attention(*small())
    assert spies == []


def test_explicit_unknown_backend_raises():
    with pytest.raises(BackendUnavailableError, match="no backend 'nope'"):
        triangle_attention(*small(), backend="nope")


def test_explicit_backend_must_be_a_string():
    with pytest.raises(TypeError, match="backend"):
        triangle_attention(*small(), backend=3)


def test_explicit_triton_that_cannot_run_raises():
    # fp64 is never a kernel dtype; without Triton or a GPU the reason is that instead.
    with pytest.raises(BackendUnavailableError, match="backend 'triton' cannot run triangle_attention"):
        triangle_attention(*small(), backend="triton")


@pytest.mark.parametrize("scale, masked", [(0.0, True), (float("nan"), False), (float("inf"), True)])
def test_triton_declines_scales_it_cannot_run(scale, masked):
    """The kernels add a key mask before scaling: scale 0 with a mask, or a non-finite
    scale, goes to another backend (auto) or names the reason (explicit)."""
    if kernel_support("cpu") is not None:
        pytest.skip("no Triton kernels here")
    ctx = dict(device=torch.device("cpu"), dtype=torch.float32, head_dim=32)
    reasons = dict(backends.availability(OP, **ctx, scale=scale, masked=masked))
    assert "scale" in reasons["triton"]
    assert dict(backends.availability(OP, **ctx, scale=0.0, masked=False))["triton"] is None


def test_availability_lists_every_backend():
    names = [name for name, _ in backends.availability(OP, device=torch.device("cpu"), dtype=torch.float32, head_dim=32)]
    assert names == ["triton", "torch", "reference"]


# Bad inputs --------------------------------------------------------------------------------


def good():
    q, k, v, bias, mask = make_inputs(2, 3, 5, 2, 8)
    return dict(q=q.float(), k=k.float(), v=v.float(), bias=bias.float(), mask=mask)


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (dict(q=torch.randn(2, 3, 5, 2)), ValueError, r"q: expected shape .*, got \(2, 3, 5, 2\)"),
        (dict(q=[1.0]), TypeError, "q: expected a torch.Tensor, got list"),
        (dict(q=torch.zeros(2, 3, 5, 2, 8, dtype=torch.int32)), TypeError, "q: expected dtype"),
        (dict(k=torch.randn(2, 3, 4, 2, 8)), ValueError, r"k: expected shape \(2, 3, 5, 2, 8\), got \(2, 3, 4, 2, 8\)"),
        (dict(v=torch.randn(2, 3, 5, 2, 4)), ValueError, r"v: expected shape \(2, 3, 5, 2, 8\)"),
        (dict(k=torch.randn(2, 3, 5, 2, 8, dtype=torch.float16)), TypeError, "k: expected dtype torch.float32"),
        (dict(bias=torch.randn(2, 2, 5, 4)), ValueError, r"bias: expected shape \(2, 2, 5, 5\), got \(2, 2, 5, 4\)"),
        (dict(bias=torch.randn(2, 2, 5, 5, dtype=torch.float64)), TypeError, "bias: expected dtype"),
        (dict(mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"mask: expected shape \(2, 3, 5\), got \(2, 5\)"),
        (dict(mask=torch.ones(2, 3, 5, dtype=torch.complex64)), TypeError, "mask: expected a bool or 0/1 numeric mask"),
        (dict(mask=[[1]]), TypeError, "mask: expected a torch.Tensor or None, got list"),
        (dict(k=torch.randn(2, 3, 5, 2, 8, device="meta")), ValueError, "k: expected a tensor on cpu, got one on meta"),
    ],
)
def test_bad_inputs(change, error, pattern):
    args = good()
    args.update(change)
    with pytest.raises(error, match=pattern):
        triangle_attention(args["q"], args["k"], args["v"], args["bias"], args["mask"])


@pytest.mark.parametrize("chunk_size", (0, -1, 2.5, True))
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        triangle_attention(*good().values(), chunk_size=chunk_size)
