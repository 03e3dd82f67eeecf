"""foldops.ops.swiglu_transition: every backend against the float64 reference.

The ``torch`` backend runs one autograd graph when gradients are needed and the
position-chunked path at inference; both are checked, forward and the gradient of x
and of every weight.
"""

import dataclasses
import importlib

import pytest
import torch

from foldops import backends
from foldops import budget as chunk_budget
from foldops.backends import BackendUnavailableError
from foldops.device import autocast
from foldops.ops import swiglu_transition
from foldops.reference.transition import swiglu_transition as reference
from foldops.testing import assert_within_baseline, forward_backward, leaves

# The module, not the function that foldops.ops re-exports.
tr_module = importlib.import_module("foldops.ops.transition")

OP = "swiglu_transition"
BACKENDS = ("torch", "reference")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
WEIGHTS = ("norm_weight", "norm_bias", "fc1_weight", "fc2_weight", "fc3_weight")

# (leading dims, D, H, O): 1 position, primes, several leading dims, O != D.
SHAPES = [((1,), 4, 8, 4), ((7,), 8, 12, 8), ((2, 13), 6, 20, 5), ((1, 5, 5), 8, 32, 8), ((33,), 12, 16, 12)]


def dtype_id(dtype):
    return str(dtype).split(".")[-1]


def make_weights(dim, hidden, out_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "norm_weight": 1 + 0.2 * randn(dim),
        "norm_bias": 0.2 * randn(dim),
        "fc1_weight": randn(hidden, dim) / dim**0.5,
        "fc2_weight": randn(hidden, dim) / dim**0.5,
        "fc3_weight": randn(out_dim, hidden) / hidden**0.5,
    }


def run(fn, x, weights, grad_out, view=None, grad=True):
    """Output of ``fn(view(x), **weights)`` and the grads of (out * grad_out).sum() w.r.t.
    x and every weight (in WEIGHTS order), on fresh leaves."""
    inputs = leaves([x] + [weights[k] for k in WEIGHTS], differentiable=grad)

    def call(t, *ws):
        return fn(t if view is None else view(t), **dict(zip(WEIGHTS, ws)))

    if not grad:
        return call(*inputs), None
    (out,), grads, _ = forward_backward(call, inputs, [grad_out])
    return out, grads


def check_against_fp64(backend, x, weights, dtype, view=None, grad=True, **kwargs):
    xv = x if view is None else view(x)
    grad_out = torch.randn(*xv.shape[:-1], weights["fc3_weight"].shape[0], dtype=torch.float64)
    low = {k: w.to(dtype) for k, w in weights.items()}

    def fast_fn(t, **w):
        return swiglu_transition(t, backend=backend, **kwargs, **w)

    exact, exact_g = run(reference, x, weights, grad_out, view)
    base, base_g = run(reference, x.to(dtype), low, grad_out, view)
    if grad:
        fast, fast_g = run(fast_fn, x.to(dtype), low, grad_out, view)
    else:
        with torch.no_grad():
            fast, _ = run(fast_fn, x.to(dtype), low, grad_out, view, grad=False)
    assert fast.dtype == dtype
    assert_within_baseline("out", fast, exact, base, dtype=dtype)
    if grad:
        for name, g, eg, bg in zip(("x",) + WEIGHTS, fast_g, exact_g, base_g):
            assert_within_baseline(f"d{name}", g, eg, bg, dtype=dtype)
    return fast


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0] + s[1:])))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_grads_vs_float64(backend, dtype, shape):
    lead, dim, hidden, out_dim = shape
    x = torch.randn(*lead, dim, dtype=torch.float64)
    check_against_fp64(backend, x, make_weights(dim, hidden, out_dim), dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0] + s[1:])))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_torch_inference_path_vs_float64(dtype, shape):
    lead, dim, hidden, out_dim = shape
    x = torch.randn(*lead, dim, dtype=torch.float64)
    check_against_fp64("torch", x, make_weights(dim, hidden, out_dim), dtype, grad=False)


@pytest.mark.parametrize("chunk_size", (1, 2, 5, 26, 1000))
def test_inference_chunk_sweep(chunk_size):
    """Chunks of 1, chunks that do not divide the 26 positions, one chunk for all."""
    x = torch.randn(2, 13, 8, dtype=torch.float64)
    weights = make_weights(8, 24, 8)
    fast = check_against_fp64("torch", x, weights, torch.float32, grad=False, chunk_size=chunk_size)
    with torch.no_grad():
        whole = swiglu_transition(x.float(), backend="reference", **{k: w.float() for k, w in weights.items()})
    torch.testing.assert_close(fast, whole, rtol=1e-5, atol=1e-5)


def test_default_chunk_is_bounded(monkeypatch):
    """The default positions per chunk keep [chunk, 2H] at the block budget."""
    seen = []
    real = torch.matmul

    def spy(a, b, **kw):
        seen.append(tuple(a.shape))
        return real(a, b, **kw)

    monkeypatch.setattr(chunk_budget, "CPU_BUDGET_BYTES", 4 * 112)
    monkeypatch.setattr(tr_module.torch, "matmul", spy)
    weights = {k: w.float() for k, w in make_weights(4, 8, 4).items()}
    with torch.no_grad():
        swiglu_transition(torch.randn(11, 4), backend="torch", **weights)
    first_mm = [s for s in seen if s[-1] == 4]  # h @ [fc1; fc2]^T
    assert [s[0] for s in first_mm] == [4, 4, 3]  # 4 positions of 2 * 8 * 4 + 3 * 4 * 4 = 112 bytes


@pytest.mark.parametrize("grad", (True, False), ids=("autograd", "inference"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_x(backend, grad):
    weights = make_weights(6, 16, 6)
    wide = torch.randn(5, 7, 12, dtype=torch.float64)
    for view in (lambda t: t[..., ::2], lambda t: t[..., :6].transpose(0, 1)):
        assert not view(wide).is_contiguous()
        check_against_fp64(backend, wide, weights, torch.float32, view=view, grad=grad, chunk_size=4)


@pytest.mark.parametrize("grad", (True, False), ids=("autograd", "inference"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_vs_float64(backend, grad):
    weights = make_weights(8, 32, 8)
    x = torch.randn(3, 11, 8, dtype=torch.float64)
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    w32 = {k: w.float() for k, w in weights.items()}
    exact, exact_g = run(reference, x, weights, grad_out)
    with autocast(x, torch.bfloat16):
        base, base_g = run(reference, x.float(), w32, grad_out)
        fn = lambda t, **w: swiglu_transition(t, backend=backend, **w)  # noqa: E731
        if grad:
            fast, fast_g = run(fn, x.float(), w32, grad_out)
        else:
            with torch.no_grad():
                fast, _ = run(fn, x.float(), w32, grad_out, grad=False)
    assert base.dtype == fast.dtype == torch.bfloat16
    assert_within_baseline("out", fast, exact, base, dtype=torch.bfloat16)
    if grad:
        for name, g, eg, bg in zip(("x",) + WEIGHTS, fast_g, exact_g, base_g):
            assert g.dtype == torch.float32
            assert_within_baseline(f"d{name}", g, eg, bg, dtype=torch.bfloat16)


def test_explicit_formula():
    weights = make_weights(4, 6, 3)
    x = torch.randn(5, 4, dtype=torch.float64)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    h = (x - mu) / torch.sqrt(var + 1e-5) * weights["norm_weight"] + weights["norm_bias"]
    u, v = h @ weights["fc1_weight"].T, h @ weights["fc2_weight"].T
    expected = (u * torch.sigmoid(u) * v) @ weights["fc3_weight"].T
    for backend in BACKENDS:
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                leaf = weights["fc3_weight"].clone().requires_grad_(grad)
                got = swiglu_transition(x, backend=backend, **{**weights, "fc3_weight": leaf})
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_eps_is_used():
    weights = make_weights(4, 6, 4)
    x = 1e-3 * torch.randn(5, 4, dtype=torch.float64)  # variance ~1e-6: eps matters
    for backend in BACKENDS:
        with torch.no_grad():
            a = swiglu_transition(x, backend=backend, eps=1e-5, **weights)
            b = swiglu_transition(x, backend=backend, eps=1e-3, **weights)
        torch.testing.assert_close(a, reference(x, eps=1e-5, **weights))
        torch.testing.assert_close(b, reference(x, eps=1e-3, **weights))
        assert not torch.allclose(a, b)


def test_empty_input():
    weights = {k: w.float() for k, w in make_weights(4, 8, 3).items()}
    for backend in BACKENDS:
        assert swiglu_transition(torch.randn(2, 0, 4), backend=backend, **weights).shape == (2, 0, 3)


# Backend selection ------------------------------------------------------------------------


@pytest.fixture
def spies(monkeypatch):
    calls = []
    for name, backend in list(backends._REGISTRY[OP].items()):
        def spy(*args, _fn=backend.fn, _name=name):
            calls.append(_name)
            return _fn(*args)
        monkeypatch.setitem(backends._REGISTRY[OP], name, dataclasses.replace(backend, fn=spy))
    monkeypatch.delenv("FOLDOPS_BACKEND", raising=False)
    monkeypatch.delenv("FOLDOPS_BACKEND_SWIGLU_TRANSITION", raising=False)
    return calls


def good():
    return dict(x=torch.randn(2, 3, 4), **{k: w.float() for k, w in make_weights(4, 8, 4).items()})


def test_auto_on_cpu_picks_torch(spies):
    swiglu_transition(**good())
    assert spies == ["torch"]


def test_env_per_op_override(spies, monkeypatch):
    monkeypatch.setenv("FOLDOPS_BACKEND_SWIGLU_TRANSITION", "reference")
    swiglu_transition(**good())
    assert spies == ["reference"]


def test_explicit_unknown_backend_raises():
    with pytest.raises(BackendUnavailableError, match="no backend 'nope'"):
        swiglu_transition(**good(), backend="nope")


def test_availability_lists_every_backend():
    names = [name for name, _ in backends.availability(OP, device=torch.device("cpu"), dtype=torch.float32)]
    assert names == ["torch", "reference"]


# Bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (dict(x=torch.tensor(1.0)), ValueError, r"x: expected shape \(..., D\) with at least 1 dim, got \(\)"),
        (dict(x=[1.0]), TypeError, "x: expected a torch.Tensor, got list"),
        (dict(x=torch.zeros(2, 3, 4, dtype=torch.int64)), TypeError, "x: expected dtype"),
        (dict(x=torch.randn(2, 3, 5)), ValueError, r"fc1_weight: expected shape \('\*', 5\), got \(8, 4\)"),
        (dict(fc2_weight=torch.randn(7, 4)), ValueError, r"fc2_weight: expected shape \(8, 4\), got \(7, 4\)"),
        (dict(fc3_weight=torch.randn(4, 7)), ValueError, r"fc3_weight: expected shape \('\*', 8\), got \(4, 7\)"),
        (dict(norm_weight=torch.randn(5)), ValueError, r"norm_weight: expected shape \(4,\), got \(5,\)"),
        (dict(norm_bias=torch.randn(4, dtype=torch.float16)), TypeError,
         r"norm_bias: expected dtype torch.float32 \(as x\), got torch.float16"),
        (dict(fc3_weight=torch.randn(4, 8, dtype=torch.float64)), TypeError, "fc3_weight: expected dtype torch.float32"),
        (dict(fc1_weight=torch.randn(8, 4, device="meta")), ValueError, "fc1_weight: expected a tensor on cpu, got one on meta"),
        (dict(eps=-1.0), ValueError, "eps: expected a positive float, got -1.0"),
    ],
)
def test_bad_inputs(change, error, pattern):
    args = good()
    args.update(change)
    with pytest.raises(error, match=pattern):
        swiglu_transition(**args)


@pytest.mark.parametrize("chunk_size", (0, -3, 1.5, False))
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        swiglu_transition(**good(), chunk_size=chunk_size)
