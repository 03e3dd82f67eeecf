"""foldops.ops.triangle_multiplication: every backend against the float64 reference.

The ``torch`` backend has two paths: one autograd graph when gradients are needed, and
the memory-bounded channel-chunked path at inference; both are checked, forward and the
gradient of x and of every weight. ``cuequivariance`` is not installed here: it only
appears in the selection and error tests.
"""

import dataclasses
import importlib
import os

import pytest
import torch

from foldops import backends
from foldops.backends import BackendUnavailableError
from foldops.device import autocast
from foldops.ops import triangle_multiplication
from foldops.reference.triangle_multiplication import triangle_multiplication as reference
from foldops.testing import assert_within_baseline, forward_backward, leaves

# The module, not the function that foldops.ops re-exports under the same name.
tm_module = importlib.import_module("foldops.ops.triangle_multiplication")

OP = "triangle_multiplication"
BACKENDS = ("torch", "reference")
DIRECTIONS = ("outgoing", "incoming")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
WEIGHTS = tm_module.WEIGHT_NAMES

# (B, N, D): 1, primes, N = 33 across nothing in particular, small D.
SHAPES = [(1, 1, 4), (2, 2, 8), (1, 7, 12), (2, 13, 8), (1, 33, 6)]


def dtype_id(dtype):
    return str(dtype).split(".")[-1]


def make_weights(dim, seed=0, hidden=None):
    """fp64 weights of generic scale (Boltz's init zeroes the gates: trivial output);
    ``hidden``: the product's width H (default ``dim``)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = dim if hidden is None else hidden

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "norm_in_weight": 1 + 0.2 * randn(dim),
        "norm_in_bias": 0.2 * randn(dim),
        "p_in_weight": randn(2 * hidden, dim) / dim**0.5,
        "g_in_weight": randn(2 * hidden, dim) / dim**0.5,
        "norm_out_weight": 1 + 0.2 * randn(hidden),
        "norm_out_bias": 0.2 * randn(hidden),
        "p_out_weight": randn(dim, hidden) / hidden**0.5,
        "g_out_weight": randn(dim, dim) / dim**0.5,
    }


def make_mask(batch, n):
    """~80% kept pairs, token 0 padded (row and column 0 fully masked), and in the last
    item row n-1 fully masked on its own."""
    mask = torch.rand(batch, n, n) > 0.2
    if n > 1:
        mask[:, 0, :] = False
        mask[:, :, 0] = False
        mask[-1, -1, :] = False
    return mask


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


def check_against_fp64(backend, x, mask, weights, dtype, direction, view=None, grad=True, **kwargs):
    """fast (``backend`` in ``dtype``) vs exact (reference fp64), baseline: reference in ``dtype``."""
    n_out = x.shape if view is None else view(x).shape
    grad_out = torch.randn(n_out, dtype=torch.float64)
    low = {k: w.to(dtype) for k, w in weights.items()}

    def ref(t, **w):
        return reference(t, mask, direction=direction, **w)

    def fast_fn(t, **w):
        return triangle_multiplication(t, mask, direction=direction, backend=backend, **kwargs, **w)

    exact, exact_g = run(ref, x, weights, grad_out, view)
    base, base_g = run(ref, x.to(dtype), low, grad_out, view)
    if grad:
        fast, fast_g = run(fast_fn, x.to(dtype), low, grad_out, view)
    else:
        with torch.no_grad():
            fast, _ = run(fast_fn, x.to(dtype), low, grad_out, view, grad=False)
    assert fast.dtype == dtype
    assert torch.isfinite(fast).all()
    assert_within_baseline("out", fast, exact, base, dtype=dtype)
    if grad:
        for name, g, eg, bg in zip(("x",) + WEIGHTS, fast_g, exact_g, base_g):
            assert torch.isfinite(g).all(), name
            assert_within_baseline(f"d{name}", g, eg, bg, dtype=dtype)
    return fast


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_forward_and_grads_vs_float64(direction, backend, dtype, shape):
    batch, n, dim = shape
    x = torch.randn(batch, n, n, dim, dtype=torch.float64)
    check_against_fp64(backend, x, make_mask(batch, n), make_weights(dim), dtype, direction)


# The Triton kernels under the interpreter (slow on CPU): N = 1, 13 (positions straddle
# the interpreter's 32-position blocks), 33 (the product's 32-wide tiles), every dtype;
# then (B, N, D, H) with H != D: both directions, fp32 and bf16, H wider and narrower
# than D (a partial last slab of the 2H-wide prologue output at H = 40).
# The whole matrix (every shape, dtype and direction) is the slow test below.
TRITON_CASES = [
    ("outgoing", torch.bfloat16, (2, 13, 8)),
    ("outgoing", torch.float16, (1, 1, 4)),
    ("incoming", torch.float32, (1, 7, 12)),
    ("incoming", torch.float16, (1, 33, 6)),
    ("outgoing", torch.bfloat16, (2, 7, 24, 40)),
    ("incoming", torch.float32, (1, 7, 24, 40)),
    ("outgoing", torch.float32, (1, 13, 48, 16)),
    ("incoming", torch.bfloat16, (1, 13, 48, 16)),
]


@pytest.mark.parametrize("direction, dtype, shape", TRITON_CASES, ids=str)
def test_triton_forward_and_grads_vs_float64(direction, dtype, shape):
    pytest.importorskip("triton")
    batch, n, dim, *hidden = shape
    x = torch.randn(batch, n, n, dim, dtype=torch.float64)
    weights = make_weights(dim, hidden=hidden[0] if hidden else None)
    check_against_fp64("triton", x, make_mask(batch, n), weights, dtype, direction)


# About 3 minutes under the interpreter on 2 cores: opt-in (FOLDOPS_SLOW_TESTS=1).
SLOW = [pytest.mark.slow, pytest.mark.skipif(not os.environ.get("FOLDOPS_SLOW_TESTS"),
                                             reason="slow under the interpreter; FOLDOPS_SLOW_TESTS=1 runs it")]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES[:3], ids=dtype_id)
@pytest.mark.parametrize("direction", DIRECTIONS)
@SLOW[0]
@SLOW[1]
def test_triton_full_matrix_vs_float64(direction, dtype, shape):
    pytest.importorskip("triton")
    batch, n, dim = shape
    x = torch.randn(batch, n, n, dim, dtype=torch.float64)
    check_against_fp64("triton", x, make_mask(batch, n), make_weights(dim), dtype, direction)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_triton_channels_with_a_common_part_vs_float64(direction):
    """a and b with a common offset in every channel: t's channels share a large common
    part that LayerNorm_out removes, so any rounding of t before it (a 16-bit t) costs
    2-3x PyTorch's bf16 error; the kernels keep t in fp32."""
    pytest.importorskip("triton")
    weights = make_weights(8)
    weights["norm_in_bias"] = weights["norm_in_bias"] + 2.0
    weights["p_in_weight"] = weights["p_in_weight"] * 0.1 + 1.0 / 8
    weights["g_in_weight"] = torch.zeros_like(weights["g_in_weight"])
    x = torch.randn(1, 40, 40, 8, dtype=torch.float64)
    check_against_fp64("triton", x, None, weights, torch.bfloat16, direction)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_triton_non_contiguous_and_unmasked(direction):
    pytest.importorskip("triton")
    weights = make_weights(6)
    wide = torch.randn(1, 7, 7, 12, dtype=torch.float64)
    view = lambda t: t[..., :6].transpose(1, 2)  # noqa: E731
    check_against_fp64("triton", wide, make_mask(1, 7), weights, torch.float32, direction, view=view)
    check_against_fp64("triton", wide[..., :6], None, weights, torch.bfloat16, direction)


def test_triton_everything_masked_and_masked_pairs():
    pytest.importorskip("triton")
    test_everything_masked_is_finite_and_input_projections_get_no_grad("incoming", "triton")
    test_masked_pairs_do_not_leak("outgoing", "triton", True)


def test_triton_bf16_autocast_vs_float64():
    pytest.importorskip("triton")
    test_bf16_autocast_vs_float64("triton", True)


# A hidden (product) width H != D (AF2 / OpenFold; GPU MODE's trimul: D = 128 / 384, H
# = 128): wider (D = 24, H = 40: H pads to 64 channels in the kernels, D to 32) and
# narrower (D = 48, H = 16) than the pair, awkward N, masks with padded rows.
HIDDEN_SHAPES = [(2, 7, 24, 40), (1, 13, 48, 16)]  # (B, N, D, H)


@pytest.mark.parametrize("shape", HIDDEN_SHAPES, ids=lambda s: "B{}N{}D{}H{}".format(*s))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_hidden_width_forward_and_grads_vs_float64(direction, backend, dtype, shape):
    batch, n, dim, hidden = shape
    x = torch.randn(batch, n, n, dim, dtype=torch.float64)
    weights = make_weights(dim, hidden=hidden)
    fast = check_against_fp64(backend, x, make_mask(batch, n), weights, dtype, direction)
    assert fast.shape == x.shape


@pytest.mark.parametrize("chunk_size", (None, 3))
@pytest.mark.parametrize("shape", HIDDEN_SHAPES, ids=lambda s: "B{}N{}D{}H{}".format(*s))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_hidden_width_torch_inference_path_vs_float64(direction, dtype, shape, chunk_size):
    """The chunked path with H != D: chunks of the H hidden channels (3 does not divide
    either H), the output step's LayerNorm over H and projection H -> D."""
    batch, n, dim, hidden = shape
    x = torch.randn(batch, n, n, dim, dtype=torch.float64)
    check_against_fp64("torch", x, make_mask(batch, n), make_weights(dim, hidden=hidden), dtype, direction,
                       grad=False, chunk_size=chunk_size)


def test_triton_hidden_width_inference_vs_float64():
    pytest.importorskip("triton")
    x = torch.randn(1, 13, 13, 48, dtype=torch.float64)
    check_against_fp64("triton", x, make_mask(1, 13), make_weights(48, hidden=16), torch.bfloat16, "incoming",
                       grad=False)


def test_hidden_width_equal_to_dim_is_the_default_form():
    """H = D through p_in_weight [2D, D] is Boltz-2's op, the same call as ever."""
    weights = make_weights(8)
    assert weights["p_in_weight"].shape == (16, 8) and weights["p_out_weight"].shape == (8, 8)
    assert make_weights(8, hidden=8).keys() == weights.keys()
    assert all(torch.equal(weights[k], make_weights(8, hidden=8)[k]) for k in weights)


def test_hidden_width_explicit_formula():
    """The reference with H != D pinned to the AF2 / OpenFold formulas, written out
    (OpenFold's linear_a_p | linear_b_p stacked are p_in, linear_a_g | linear_b_g g_in,
    linear_z p_out, linear_g g_out applied after linear_z)."""
    dim, hidden = 3, 5
    w = make_weights(dim, hidden=hidden)
    x = torch.randn(1, 4, 4, dim, dtype=torch.float64)
    mask = make_mask(1, 4)
    F = torch.nn.functional
    z = F.layer_norm(x, (dim,), w["norm_in_weight"], w["norm_in_bias"])
    keep = mask[..., None].double()
    a_p, b_p = w["p_in_weight"][:hidden], w["p_in_weight"][hidden:]
    a_g, b_g = w["g_in_weight"][:hidden], w["g_in_weight"][hidden:]
    a = keep * torch.sigmoid(z @ a_g.T) * (z @ a_p.T)
    b = keep * torch.sigmoid(z @ b_g.T) * (z @ b_p.T)
    for direction, eq in (("outgoing", "bikc,bjkc->bijc"), ("incoming", "bkic,bkjc->bijc")):
        t = F.layer_norm(torch.einsum(eq, a, b), (hidden,), w["norm_out_weight"], w["norm_out_bias"])
        expected = (t @ w["p_out_weight"].T) * torch.sigmoid(z @ w["g_out_weight"].T)
        for backend in BACKENDS:
            got = triangle_multiplication(x, mask, direction=direction, backend=backend, **w)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_torch_inference_path_vs_float64(direction, dtype, shape):
    batch, n, dim = shape
    x = torch.randn(batch, n, n, dim, dtype=torch.float64)
    check_against_fp64("torch", x, make_mask(batch, n), make_weights(dim), dtype, direction, grad=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_without_mask(direction, backend):
    x = torch.randn(2, 9, 9, 8, dtype=torch.float64)
    check_against_fp64(backend, x, None, make_weights(8), torch.float32, direction)
    check_against_fp64(backend, x, None, make_weights(8), torch.float32, direction, grad=False)


@pytest.mark.parametrize("chunk_size", (1, 3, 5, 8, 100))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_inference_chunks_and_blocks_sweep(direction, chunk_size, monkeypatch):
    """Channel chunks that do not divide D and position blocks that do not divide N*N."""
    monkeypatch.setattr(tm_module, "_position_block", lambda device, positions, dim, workspace, hidden: 97 // dim + 1)
    x = torch.randn(2, 11, 11, 8, dtype=torch.float64)
    mask, weights = make_mask(2, 11), make_weights(8)
    fast = check_against_fp64(
        "torch", x, mask, weights, torch.float32, direction, grad=False, chunk_size=chunk_size
    )
    with torch.no_grad():
        whole = triangle_multiplication(
            x.float(), mask, direction=direction, backend="reference", **{k: w.float() for k, w in weights.items()}
        )
    torch.testing.assert_close(fast, whole, rtol=1e-5, atol=1e-5)


def test_default_chunk_follows_the_budget(monkeypatch):
    """CPU: a 16 MiB budget over a, b, gate (and projection) per channel; at least 8
    channels. Accelerators: every channel while the budget holds them, else chunks
    capped at a workspace the size of h."""
    monkeypatch.delenv("FOLDOPS_CHUNK_BUDGET_MB", raising=False)
    cpu = torch.device("cpu")
    assert tm_module._default_chunk(cpu, 1, 4, 4, 4) == 4
    assert tm_module._default_chunk(cpu, 256, 128, 4, 4) == 16  # 2 * 256^2 * 8 B = 1 MiB per channel
    assert tm_module._default_chunk(cpu, 2048, 128, 4, 4) == 8  # never thinner than 8 channels
    assert tm_module._default_chunk(cpu, 2048, 4, 4, 4) == 4
    monkeypatch.setattr("foldops.budget._free_bytes", lambda device: 80 * 2**30)
    gpu = torch.device("meta")  # any non-CPU device: 25% of (patched) free memory
    # bf16 compute, fp32 product: 2 * N^2 * (4 + 2 + 2) B per channel; h is N^2 * 128 * 2 B.
    assert tm_module._default_chunk(gpu, 1024, 128, 4, 2) == 128  # 2 GiB: within 20 GiB
    assert tm_module._default_chunk(gpu, 4096, 128, 4, 2) == 16  # 32 GiB: chunks, capped at h
    # h and t of 32 items at N = 1024 (24 GiB) leave no room in 20 GiB for 2 GiB: capped
    fixed = 32 * 1024 * 1024 * 128 * (2 + 4)
    assert tm_module._default_chunk(gpu, 1024, 128, 4, 2, fixed) == 16
    assert tm_module._default_chunk(gpu, 1024, 128, 4, 2, fixed // 32) == 128
    assert tm_module._position_block(gpu, 1024 * 1024, 128, 16 * 2**20) == 16 * 2**20 // (128 * 12)


def test_inference_on_an_accelerator_budget_matches(monkeypatch):
    """The accelerator rule (large chunks and position blocks) gives the CPU result."""
    x = torch.randn(2, 11, 11, 8)
    mask, weights = make_mask(2, 11), {k: w.float() for k, w in make_weights(8).items()}
    with torch.no_grad():
        small = triangle_multiplication(x, mask, direction="incoming", backend="torch", **weights)
        monkeypatch.setattr(tm_module, "_position_block", lambda device, positions, dim, workspace, hidden: positions)
        big = triangle_multiplication(x, mask, direction="incoming", backend="torch", chunk_size=8, **weights)
    torch.testing.assert_close(big, small, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad", (True, False), ids=("autograd", "inference"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_non_contiguous_x(direction, backend, grad):
    weights = make_weights(6)
    mask = make_mask(2, 7)
    wide = torch.randn(2, 7, 7, 12, dtype=torch.float64)
    # A channel slice (stride 2) and a transposed view of the pair dims.
    for view in (lambda t: t[..., ::2], lambda t: t[..., :6].transpose(1, 2)):
        assert not view(wide).is_contiguous()
        check_against_fp64(backend, wide, mask, weights, torch.float32, direction, view=view, grad=grad)


@pytest.mark.parametrize("grad", (True, False), ids=("autograd", "inference"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_vs_float64(backend, grad):
    """Under autocast the projections run in bf16, the product and LayerNorms in fp32;
    baseline: the reference under the same autocast."""
    weights = make_weights(8)
    x = torch.randn(2, 9, 9, 8, dtype=torch.float64)
    mask = make_mask(2, 9)
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    w32 = {k: w.float() for k, w in weights.items()}
    exact, exact_g = run(lambda t, **w: reference(t, mask, direction="outgoing", **w), x, weights, grad_out)
    with autocast(x, torch.bfloat16):
        base, base_g = run(lambda t, **w: reference(t, mask, direction="outgoing", **w), x.float(), w32, grad_out)
        fn = lambda t, **w: triangle_multiplication(t, mask, direction="outgoing", backend=backend, **w)  # noqa: E731
        if grad:
            fast, fast_g = run(fn, x.float(), w32, grad_out)
        else:
            with torch.no_grad():
                fast, fast_g = run(fn, x.float(), w32, grad_out, grad=False)
    assert base.dtype == fast.dtype == torch.bfloat16
    assert_within_baseline("out", fast, exact, base, dtype=torch.bfloat16)
    if grad:
        for name, g, eg, bg in zip(("x",) + WEIGHTS, fast_g, exact_g, base_g):
            assert g.dtype == torch.float32
            assert_within_baseline(f"d{name}", g, eg, bg, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_and_int_masks_equal_bool_mask(backend):
    x = torch.randn(2, 7, 7, 8)
    weights = {k: w.float() for k, w in make_weights(8).items()}
    mask = make_mask(2, 7)
    with torch.no_grad():
        outs = [
            triangle_multiplication(x, m, direction="incoming", backend=backend, **weights)
            for m in (mask, mask.float(), mask.to(torch.uint8), mask.double())
        ]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@pytest.mark.parametrize("grad", (True, False), ids=("autograd", "inference"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_masked_pairs_do_not_leak(direction, backend, grad):
    """Changing x at masked pairs leaves the output at every kept pair bit-identical."""
    weights = {k: w.float() for k, w in make_weights(8).items()}
    mask = make_mask(2, 9)
    x = torch.randn(2, 9, 9, 8)
    noisy = torch.where(mask[..., None], x, 1e3 * torch.randn_like(x))
    with torch.set_grad_enabled(grad):
        leaf = weights["p_in_weight"].requires_grad_(grad)
        outs = [
            triangle_multiplication(t, mask, direction=direction, backend=backend, **{**weights, "p_in_weight": leaf})
            for t in (x, noisy)
        ]
    assert torch.equal(outs[0][mask], outs[1][mask])
    assert not torch.equal(outs[0][~mask], outs[1][~mask])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_everything_masked_is_finite_and_input_projections_get_no_grad(direction, backend):
    weights = make_weights(8)
    x = torch.randn(1, 5, 5, 8, dtype=torch.float64)
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        low = {k: w.to(dtype) for k, w in weights.items()}
        fn = lambda t, **w: triangle_multiplication(t, mask, direction=direction, backend=backend, **w)  # noqa: E731
        out, grads = run(fn, x.to(dtype), low, torch.randn(x.shape, dtype=torch.float64))
        with torch.no_grad():
            out_inf, _ = run(fn, x.to(dtype), low, None, grad=False)
        for t in (out, out_inf, *grads):
            assert torch.isfinite(t).all()
        named = dict(zip(("x",) + WEIGHTS, grads))
        assert not named["p_in_weight"].any() and not named["g_in_weight"].any()
        # t = 0 everywhere, so LayerNorm_out gives its bias: out = (b_out p_out^T) * gate.
        h = torch.nn.functional.layer_norm(x.to(dtype), (8,), low["norm_in_weight"], low["norm_in_bias"])
        expected = (low["norm_out_bias"] @ low["p_out_weight"].T) * torch.sigmoid(h @ low["g_out_weight"].T)
        torch.testing.assert_close(out_inf, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_incoming_is_outgoing_of_the_transpose(backend):
    """t_in(x)[i,j] = sum_k a[k,i] b[k,j] = t_out(x^T)[i,j]; with a constant output gate
    (g_out = 0) the whole update obeys the same identity."""
    weights = make_weights(8)
    weights["g_out_weight"] = torch.zeros_like(weights["g_out_weight"])
    x = torch.randn(2, 7, 7, 8, dtype=torch.float64)
    mask = make_mask(2, 7)
    inc = triangle_multiplication(x, mask, direction="incoming", backend=backend, **weights)
    out = triangle_multiplication(
        x.transpose(1, 2), mask.transpose(1, 2), direction="outgoing", backend=backend, **weights
    )
    torch.testing.assert_close(inc, out, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(inc, triangle_multiplication(x, mask, direction="outgoing", backend=backend, **weights))


def test_explicit_product_formula():
    """Pins the reference itself to the AF3 formula on a tiny case, written out by loops."""
    weights = make_weights(3)
    x = torch.randn(1, 4, 4, 3, dtype=torch.float64)
    mask = make_mask(1, 4)
    F = torch.nn.functional
    h = F.layer_norm(x, (3,), weights["norm_in_weight"], weights["norm_in_bias"])
    ab = (h @ weights["p_in_weight"].T) * torch.sigmoid(h @ weights["g_in_weight"].T) * mask[..., None]
    a, b = ab[..., :3], ab[..., 3:]
    for direction in DIRECTIONS:
        t = torch.zeros(1, 4, 4, 3, dtype=torch.float64)
        for i in range(4):
            for j in range(4):
                for k in range(4):
                    t[0, i, j] += a[0, i, k] * b[0, j, k] if direction == "outgoing" else a[0, k, i] * b[0, k, j]
        t = F.layer_norm(t, (3,), weights["norm_out_weight"], weights["norm_out_bias"])
        expected = (t @ weights["p_out_weight"].T) * torch.sigmoid(h @ weights["g_out_weight"].T)
        for backend in BACKENDS:
            got = triangle_multiplication(x, mask, direction=direction, backend=backend, **weights)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_empty_input():
    weights = {k: w.float() for k, w in make_weights(4).items()}
    for backend in BACKENDS:
        out = triangle_multiplication(torch.randn(1, 0, 0, 4), None, direction="outgoing", backend=backend, **weights)
        assert out.shape == (1, 0, 0, 4)


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
    monkeypatch.delenv("FOLDOPS_BACKEND_TRIANGLE_MULTIPLICATION", raising=False)
    return calls


def good():
    weights = {k: w.float() for k, w in make_weights(4).items()}
    return dict(x=torch.randn(2, 3, 3, 4), mask=make_mask(2, 3), direction="outgoing", **weights)


def call(args, **kwargs):
    args = dict(args)
    x, mask = args.pop("x"), args.pop("mask")
    return triangle_multiplication(x, mask, **args, **kwargs)


def test_auto_on_cpu_picks_torch(spies):
    call(good())
    assert spies == ["torch"]


def test_env_per_op_override(spies, monkeypatch):
    monkeypatch.setenv("FOLDOPS_BACKEND_TRIANGLE_MULTIPLICATION", "reference")
    call(good())
    assert spies == ["reference"]


def test_backend_argument_beats_env(spies, monkeypatch):
    monkeypatch.setenv("FOLDOPS_BACKEND", "reference")
    call(good(), backend="torch")
    assert spies == ["torch"]


def test_cuequivariance_named_but_unavailable_raises():
    with pytest.raises(BackendUnavailableError, match="backend 'cuequivariance' cannot run triangle_multiplication"):
        call(good(), backend="cuequivariance")


def test_availability_lists_every_backend():
    table = dict(backends.availability(OP, device=torch.device("cpu"), dtype=torch.float32, dim=4))
    assert list(table) == ["triton", "torch", "cuequivariance", "reference"]
    assert table["torch"] is None and table["reference"] is None
    assert table["cuequivariance"]  # a reason: not installed here, or not an NVIDIA GPU


def test_cuequivariance_is_never_picked_by_auto():
    assert not backends._REGISTRY[OP]["cuequivariance"].auto
    assert not backends._REGISTRY[OP]["reference"].auto


# Bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (dict(x=torch.randn(3, 3, 4)), ValueError, r"x: expected shape \(B, N, N, D\), got \(3, 3, 4\)"),
        (dict(x=torch.randn(2, 3, 5, 4)), ValueError, r"x: expected shape \(B, N, N, D\), got \(2, 3, 5, 4\)"),
        (dict(x=[1.0]), TypeError, "x: expected a torch.Tensor, got list"),
        (dict(x=torch.zeros(2, 3, 3, 4, dtype=torch.int32)), TypeError, "x: expected dtype"),
        (dict(x=torch.randn(2, 3, 3, 5)), ValueError, r"norm_in_weight: expected shape \(5,\), got \(4,\)"),
        (dict(p_in_weight=torch.randn(7, 4)), ValueError, r"p_in_weight: expected shape \(2H, 4\) .*got \(7, 4\)"),
        (dict(p_in_weight=torch.randn(8, 5)), ValueError, r"p_in_weight: expected shape \(2H, 4\) .*got \(8, 5\)"),
        (dict(p_in_weight=torch.randn(8)), ValueError, r"p_in_weight: expected shape \(2H, 4\) .*got \(8,\)"),
        # p_in_weight [4, 4] is a hidden width H = 2: the other weights must follow it.
        (dict(p_in_weight=torch.randn(4, 4)), ValueError,
         r"g_in_weight: expected shape \(4, 4\), got \(8, 4\) \(D = 4 from x, H = 2 from p_in_weight"),
        (dict(norm_out_weight=torch.randn(6)), ValueError, r"norm_out_weight: expected shape \(4,\), got \(6,\)"),
        (dict(p_out_weight=torch.randn(4, 6)), ValueError, r"p_out_weight: expected shape \(4, 4\), got \(4, 6\)"),
        (dict(g_out_weight=torch.randn(4, 8)), ValueError, r"g_out_weight: expected shape \(4, 4\), got \(4, 8\)"),
        (dict(norm_out_bias=torch.randn(4, dtype=torch.float64)), TypeError,
         "norm_out_bias: expected dtype torch.float32 \\(as x\\), got torch.float64"),
        (dict(p_out_weight=torch.randn(4, 4, device="meta")), ValueError,
         "p_out_weight: expected a tensor on cpu, got one on meta"),
        (dict(g_in_weight=None), TypeError, "g_in_weight: expected a torch.Tensor, got NoneType"),
        (dict(mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, r"mask: expected shape \(2, 3, 3\), got \(2, 3\)"),
        (dict(mask=torch.ones(2, 3, 3, dtype=torch.complex64)), TypeError, "mask: expected a bool or 0/1"),
        (dict(mask=torch.ones(2, 3, 3, device="meta")), ValueError, "mask: expected a tensor on cpu, got one on meta"),
        (dict(direction="sideways"), ValueError, "direction: expected one of .*'sideways'"),
        (dict(eps=0.0), ValueError, "eps: expected a positive float, got 0.0"),
        (dict(eps="1e-5"), ValueError, "eps: expected a positive float"),
    ],
)
def test_bad_inputs(change, error, pattern):
    args = good()
    args.update(change)
    with pytest.raises(error, match=pattern):
        call(args)


@pytest.mark.parametrize("chunk_size", (0, -1, 2.5, True))
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        call(good(), chunk_size=chunk_size)


def test_size_rules_get_tokens_and_mode(monkeypatch):
    """auto hands the size rules n = N (tokens) and whether autograd records the call
    (x or any weight requiring grad)."""
    from foldops import backend_rules

    seen = []
    original = backend_rules.preferred
    monkeypatch.setattr(backend_rules, "preferred",
                        lambda op, **ctx: seen.append((op, ctx["n"], ctx["training"])) or original(op, **ctx))
    x, w = torch.randn(1, 6, 6, 4, dtype=torch.float64), make_weights(4)
    triangle_multiplication(x, None, direction="outgoing", **w)
    w["p_out_weight"].requires_grad_()
    triangle_multiplication(x, None, direction="outgoing", **w)
    with torch.no_grad():
        triangle_multiplication(x, None, direction="outgoing", **w)
    assert seen == [(OP, 6, False), (OP, 6, True), (OP, 6, False)]
