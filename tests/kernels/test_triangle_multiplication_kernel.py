"""Triton kernels of the triangle multiplication: the registered ops, the eager path,
masks, layouts; GPU cases at real sizes.

On CPU the kernels run under the Triton interpreter at small sizes (the accuracy sweep
over awkward N, dtypes and directions is in tests/ops/test_triangle_multiplication.py);
tests marked ``gpu`` run the compiled kernels.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from foldops.testing import assert_within_baseline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from test_triangle_multiplication import WEIGHTS, make_mask, make_weights, run  # noqa: E402

pytest.importorskip("triton")
tm = importlib.import_module("foldops.ops.triangle_multiplication")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernel():
    return importlib.import_module("foldops.kernels.triangle_multiplication")


_kernel()  # registers the foldops::triangle_multiplication_* ops


def _inputs(batch, n, dim, dtype, masked=True, device=DEVICE, hidden=None):
    x = torch.randn(batch, n, n, dim, dtype=dtype, device=device)
    mask = make_mask(batch, n).to(device) if masked else None
    w = {k: v.to(device=device, dtype=dtype) for k, v in make_weights(dim, hidden=hidden).items()}
    return x, mask, w


def _op_args(x, mask, w, outgoing=True):
    return (x, mask, *(w[k] for k in WEIGHTS), outgoing, 1e-5, "ieee")


@pytest.mark.parametrize("outgoing", (True, pytest.param(False, marks=[pytest.mark.slow, pytest.mark.skipif(
    not os.environ.get("FOLDOPS_SLOW_TESTS"), reason="slow under the interpreter; FOLDOPS_SLOW_TESTS=1 runs it")])))
def test_opcheck(outgoing):
    """The ops' schemas (the precision a string) with a hidden width H = 12 != C = 8."""
    x, mask, w = _inputs(1, 5, 8, torch.float32, hidden=12)
    args = [t.detach().requires_grad_() for t in (x, *(w[k] for k in WEIGHTS))]
    full = (args[0], mask, *args[1:], outgoing, 1e-5, "tf32")
    torch.library.opcheck(torch.ops.foldops.triangle_multiplication_fwd.default, full)
    out, ab, go, t = torch.ops.foldops.triangle_multiplication_fwd(*_op_args(x, mask, w, outgoing))
    torch.library.opcheck(
        torch.ops.foldops.triangle_multiplication_bwd.default,
        (torch.randn_like(out), x, mask, *(w[k] for k in WEIGHTS), ab, go, t, outgoing, 1e-5, "tf32"),
    )
    assert ab.shape == (1, 24, 25) and t.shape == (1, 12, 25) and go.shape == (1, 25, 8)


def test_eager_registered_and_inference_paths_agree():
    x, mask, w = _inputs(2, 9, 8, torch.float32)
    weights = [w[k] for k in WEIGHTS]
    kernel = _kernel()
    with torch.no_grad():
        inference = kernel.triangle_multiplication(x, mask, weights, True, 1e-5)
    registered = torch.ops.foldops.triangle_multiplication_fwd(*_op_args(x, mask, w))[0]
    leaves = [t.clone().requires_grad_() for t in [x] + weights]
    eager = kernel.triangle_multiplication(leaves[0], mask, leaves[1:], True, 1e-5)
    assert torch.equal(inference, registered) and torch.equal(eager.detach(), registered)
    grads_eager = torch.autograd.grad(eager, leaves, torch.ones_like(eager))
    leaves2 = [t.clone().requires_grad_() for t in [x] + weights]
    out2 = torch.ops.foldops.triangle_multiplication_fwd(leaves2[0], mask, *leaves2[1:], True, 1e-5, "ieee")[0]
    grads_reg = torch.autograd.grad(out2, leaves2, torch.ones_like(out2))
    for a, b in zip(grads_eager, grads_reg):
        assert torch.equal(a, b)


@pytest.mark.parametrize("outgoing", (True, False))
def test_inference_in_row_blocks(monkeypatch, outgoing):
    """At inference t is built a block of rows i at a time (3 rows: a partial last block)."""
    x, mask, w = _inputs(2, 8, 8, torch.float32)
    weights = [w[k] for k in WEIGHTS]
    whole = torch.ops.foldops.triangle_multiplication_fwd(*_op_args(x, mask, w, outgoing))[0]
    monkeypatch.setattr("foldops.budget.rows_per_chunk", lambda device, per_row, rows, chunk=None: 3)
    with torch.no_grad():
        blocks = _kernel().triangle_multiplication(x, mask, weights, outgoing, 1e-5)
    torch.testing.assert_close(blocks, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dim", (8, 40))
def test_prologue_one_program_per_slab_or_all_slabs(monkeypatch, dim):
    """The prologue's two schedules (ALL_SLABS: one program loops over the output slabs)
    write the same a, b, gate and output, with a partial last slab at 40 channels."""
    from foldops.kernels.triangle_multiplication import configs

    x, mask, w = _inputs(1, 6, dim, torch.float32)
    results = []
    for all_slabs in (False, True):
        monkeypatch.setattr(configs, "INTERPRET_PROLOGUE", (32, 16, 1, all_slabs))
        results.append(torch.ops.foldops.triangle_multiplication_fwd(*_op_args(x, mask, w)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    exact = tm.triangle_multiplication(x.double(), mask, direction="outgoing", backend="reference",
                                       **{k: v.double() for k, v in w.items()})
    torch.testing.assert_close(results[1][0].double(), exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dim, dtype, expected", [
    (384, torch.bfloat16, (64, 64, 8, True)), (384, torch.float16, (64, 64, 8, True)),
    # fp32 keeps the tile that passed its GPU tests, its slab narrowed to a 16K-element weight tile
    (384, torch.float32, (16, 32, 4, False)),
    (128, torch.float32, (64, 64, 4, True)), (128, torch.bfloat16, (64, 64, 4, True)),
])
def test_gpu_prologue_tiles_per_width_and_dtype(monkeypatch, dim, dtype, expected):
    launch = importlib.import_module("foldops.kernels.triangle_multiplication.launch")
    monkeypatch.setattr(launch, "triton_interpret", lambda: False)
    assert launch._prologue_config(launch._padded(dim), dtype) == expected


def test_backward_is_deterministic():
    x, mask, w = _inputs(1, 11, 8, torch.bfloat16)
    g = torch.randn(1, 11, 11, 8, dtype=torch.float64)
    fn = lambda t, **ww: tm.triangle_multiplication(t, mask, direction="incoming", backend="triton", **ww)  # noqa
    _, first = run(fn, x, w, g)
    _, second = run(fn, x, w, g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("blocks_per_chunk", [1, 2])
def test_position_chunks_in_backward(monkeypatch, blocks_per_chunk):
    """The backward's position chunks (tiny budget: many chunks, a partial last one,
    which with two blocks per chunk has fewer blocks than the others) give the same
    gradients as one chunk, to fp32 rounding of the chunk sums; batch 2."""
    launch = importlib.import_module("foldops.kernels.triangle_multiplication.launch")
    x, mask, w = _inputs(2, 9, 8, torch.float32)
    g = torch.randn(2, 9, 9, 8, dtype=torch.float64)
    fn = lambda t, **ww: tm.triangle_multiplication(t, mask, direction="outgoing", backend="triton", **ww)  # noqa
    _, whole = run(fn, x, w, g)
    monkeypatch.setattr(launch, "_chunk_positions", lambda x, p, b, block: blocks_per_chunk * block)
    _, chunked = run(fn, x, w, g)
    for name, a, b in zip(("x",) + WEIGHTS, whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_position_chunks_with_hidden_wider_than_channels(monkeypatch, dtype):
    """Chunked backward where the two sides hold separate partial buffers (H = 20 pads
    to 32 lanes, C = 8 to 16: part_o and part_i differ), incoming, batch 3: chunks of
    two 32-position blocks over 81 positions (64 + 17: the last has one block). fp16
    also runs the split (hi + lo) dt in chunks. Chunked equals whole to the rounding of
    the chunk sums (fp32, then one fp16 rounding), and within the baseline rule of fp64."""
    launch = importlib.import_module("foldops.kernels.triangle_multiplication.launch")
    x = torch.randn(3, 9, 9, 8, dtype=torch.float64)
    mask, weights = make_mask(3, 9), make_weights(8, hidden=20)
    g = torch.randn(3, 9, 9, 8, dtype=torch.float64)
    low = {k: v.to(dtype) for k, v in weights.items()}

    def fn(t, **ww):
        return tm.triangle_multiplication(t, mask, direction="incoming", backend="triton", **ww)

    def ref(t, **ww):
        return tm.triangle_multiplication(t, mask, direction="incoming", backend="reference", **ww)

    block = launch.configs.INTERPRET_ROW[0]
    _, whole = run(fn, x.to(dtype), low, g)
    monkeypatch.setattr(launch, "_chunk_positions", lambda x, p, b, blk: 2 * block)
    _, chunked = run(fn, x.to(dtype), low, g)
    _, exact = run(ref, x, weights, g)
    _, base = run(ref, x.to(dtype), low, g)
    for name, a, b, e, bb in zip(("x",) + WEIGHTS, whole, chunked, exact, base):
        # fp16 weight gradients: one chunk's GEMM result is rounded once, chunk sums are
        # added in fp32 and then rounded: they may differ by one fp16 ulp.
        tol = 2**-10 * a.abs().max().item() if dtype == torch.float16 else 1e-5
        torch.testing.assert_close(b, a, rtol=0 if dtype == torch.float16 else tol, atol=tol, msg=name)
        assert_within_baseline(name, b, e, bb, dtype=dtype)


def _product_launches(outgoing, dt, ab, dab, n, c, dt_lo):
    """The backward's two products (da, db) with the launcher's strides."""
    launch = importlib.import_module("foldops.kernels.triangle_multiplication.launch")
    p = n * n
    sb, sdt, sd = ab.stride(0), dt.stride(0), dab.stride(0)
    b_str = (sb, p, n, 1) if outgoing else (sb, p, 1, n)
    o_str = (sd, p, n, 1) if outgoing else (sd, p, 1, n)
    prod = dict(nch=c, m=n, n=n, k=n, split_a=True, precision="ieee", a_lo=dt_lo)
    launch._launch_product(dt, (sdt, p, n, 1), ab[:, c:], b_str, dab[:, :c], o_str, **prod)
    launch._launch_product(dt, (sdt, p, 1, n), ab[:, :c], b_str, dab[:, c:], o_str, **prod)


@pytest.mark.parametrize("outgoing", (True, False), ids=("outgoing", "incoming"))
def test_split_product_with_gpu_tiles(monkeypatch, outgoing):
    """The fp16 backward's split products (dt = hi + lo, two fp16 planes) with the tile
    config compiled kernels use (PRODUCT_SPLIT), at N = 130: two row and column tiles of
    128, the second partial, and a partial last K step; vs fp64 to fp16 output rounding."""
    from foldops.kernels.triangle_multiplication import configs

    monkeypatch.setattr(configs, "INTERPRET_PRODUCT", configs.PRODUCT_SPLIT)
    n, c = 130, 2
    gen = torch.Generator().manual_seed(0)
    dt32 = torch.randn(1, c, n * n, generator=gen) * 100  # the range of masked rows' dt
    hi = dt32.half()
    dt = torch.cat([hi, (dt32 - hi.float()).half()], dim=1)  # [1, 2C, P]: hi planes, then lo
    ab = torch.randn(1, 2 * c, n * n, generator=gen).half()
    dab = torch.empty_like(ab)
    _product_launches(outgoing, dt, ab, dab, n, c, c * n * n)
    t = dt32.double().view(c, n, n)
    a, b = ab.double().view(2, c, n, n)
    if outgoing:  # da = dt b, db = dt^T a
        exact = torch.cat([t @ b, t.transpose(-1, -2) @ a])
    else:  # da^T = dt b^T, db^T = dt^T a^T
        exact = torch.cat([(t @ b.transpose(-1, -2)).transpose(-1, -2),
                           (t.transpose(-1, -2) @ a.transpose(-1, -2)).transpose(-1, -2)])
    got = dab.double().view(2 * c, n, n)
    # fp32 accumulation of exact 16-bit products: only the fp16 rounding of the output.
    assert (got - exact).abs().max() <= exact.abs().max() * 2.0**-10


def test_fp16_backward_with_gpu_product_tiles(monkeypatch):
    """The whole fp16 op (split dt, its two fp16 planes written by the output-side row
    kernel) with the GPU's product tiles, N = 130, outgoing and incoming, vs fp64."""
    from foldops.kernels.triangle_multiplication import configs

    monkeypatch.setattr(configs, "INTERPRET_PRODUCT", configs.PRODUCT_SPLIT)
    # Fewer, larger row programs: the interpreter's cost is per program.
    monkeypatch.setattr(configs, "INTERPRET_ROW", (1024, 16, 1))
    monkeypatch.setattr(configs, "INTERPRET_PROLOGUE", (1024, 16, 1, True))
    from foldops.reference.triangle_multiplication import triangle_multiplication as reference

    n, dim = 130, 4
    x = torch.randn(1, n, n, dim, dtype=torch.float64)
    mask = make_mask(1, n)
    w = make_weights(dim)
    low = {k: v.half() for k, v in w.items()}
    g = torch.randn(x.shape, dtype=torch.float64)
    for direction in ("outgoing", "incoming"):
        ref = lambda t, **ww: reference(t, mask, direction=direction, **ww)  # noqa: E731
        fast = lambda t, **ww: tm.triangle_multiplication(t, mask, direction=direction, backend="triton", **ww)  # noqa
        exact, exact_g = run(ref, x, w, g)
        base, base_g = run(ref, x.half(), low, g)
        out, out_g = run(fast, x.half(), low, g)
        assert_within_baseline(f"{direction} out", out, exact, base, dtype=torch.float16)
        for name, a, e, b in zip(("x",) + WEIGHTS, out_g, exact_g, base_g):
            assert_within_baseline(f"{direction} d{name}", a, e, b, dtype=torch.float16)


def test_auto_never_picks_the_interpreter():
    if torch.cuda.is_available():
        pytest.skip("interpreter only")
    table = dict(tm.backends.availability(tm.OP, device=torch.device("cpu"), dtype=torch.float32, dim=8))
    assert "triton" in table
    x, mask, w = _inputs(1, 3, 4, torch.float32)
    impl = tm.backends.select(tm.OP, "auto", device=x.device, dtype=x.dtype, dim=4)
    assert impl.name == "torch"


def test_too_many_channels_is_refused():
    reason = tm._triton_supports(torch.device(DEVICE), torch.float32, True, dim=640)
    assert reason and "640 channels" in reason
    reason = tm._triton_supports(torch.device(DEVICE), torch.float32, True, dim=128, hidden=640)
    assert reason and "hidden width 640" in reason
    assert tm._triton_supports(torch.device(DEVICE), torch.float32, True, dim=384, hidden=512) is None


def test_bad_precision_is_refused():
    launch = importlib.import_module("foldops.kernels.triangle_multiplication.launch")
    x, mask, w = _inputs(1, 3, 4, torch.float32)
    with pytest.raises(ValueError, match=r"precision: expected one of \('ieee', 'tf32x3', 'tf32'\), got 'fast'"):
        launch.triangle_multiplication_forward(x, mask, *(w[k] for k in WEIGHTS), True, 1e-5, "fast")


@pytest.fixture
def matmul_precision():
    """Sets torch's fp32 matmul precision for the test; restores it after."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def test_dot_precision_follows_float32_matmul_precision(matmul_precision):
    op = importlib.import_module("foldops.kernels.triangle_multiplication.op")
    for level, dot in (("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")):
        matmul_precision(level)
        assert op.dot_precision() == dot


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compile_fullgraph_with_hidden_width_and_tf32(matmul_precision, monkeypatch):
    """torch.compile(fullgraph=True) (``aot_eager``: Dynamo and AOTAutograd trace the
    registered ops) of the op with H != C under "medium": the precision string reaches
    the kernels through the ops' schema; forward and gradients equal eager's."""
    launch = importlib.import_module("foldops.kernels.triangle_multiplication.launch")
    seen = []
    precision = launch._precision
    monkeypatch.setattr(launch, "_precision", lambda dtype, p: seen.append(p) or precision(dtype, p))
    matmul_precision("medium")
    x, mask, w = _inputs(1, 5, 8, torch.float32, hidden=12)

    def fn(t, *ws):
        return tm.triangle_multiplication(t, mask, direction="incoming", backend="triton", **dict(zip(WEIGHTS, ws)))

    results = []
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in [x] + [w[k] for k in WEIGHTS]]
        out = f(*leaves)
        results.append([out, *torch.autograd.grad(out, leaves, torch.ones_like(out))])
    assert set(seen) == {"tf32"}
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _tf32_truncating_dots(monkeypatch):
    """The interpreter's tl.dot ignores input_precision (IEEE fp32 products always):
    for "tf32" its fp32 operands are cut to TF32 here first, as the GPU's tensor cores
    take them (the 13 low mantissa bits dropped, not rounded: Triton's plain TF32 does
    not round its operands, triton-lang/triton#4574), so the tolerance below is tested
    against TF32 products, not IEEE ones."""
    import numpy as np
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def tf32(handle):
        if handle.dtype != tl.float32:
            return handle
        bits = np.ascontiguousarray(handle.data, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32:
            a, b = tf32(a), tf32(b)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", dot)


@pytest.mark.skipif(DEVICE != "cpu", reason="emulates TF32 in the interpreter")
def test_fp32_medium_precision_runs_tf32_within_its_tolerance(monkeypatch, matmul_precision):
    """torch.set_float32_matmul_precision("medium"): every kernel takes plain TF32, and
    the fp32 output and every gradient stay within a TF32 bound of float64.

    The bound: TF32 keeps 10 of fp32's 23 mantissa bits, so a truncated operand is off
    by less than 2**-10 of itself and a product of two by less than 2**-9 = 4 * 2**-11.
    Measured against the largest magnitude of each result, the products chained on the
    way (the input projection, the triangular product, the output projection, and on
    the way back their transposes, with LayerNorms rescaling in between) partly cancel
    and partly add up: two such worst cases, 8 * 2**-11 = 2**-8. In this test the
    errors reach about 1-4.5 * 2**-11 (IEEE fp32 products: about 1e-3 * 2**-11); operands
    rounded to bf16's 7 mantissa bits instead would give 6-20 * 2**-11, past it.
    """
    from foldops.reference.triangle_multiplication import triangle_multiplication as reference

    direction = "incoming"  # transposed operands; outgoing differs by strides only
    _tf32_truncating_dots(monkeypatch)
    launch = importlib.import_module("foldops.kernels.triangle_multiplication.launch")
    seen = []
    wrap = launch.launcher

    class Spy:  # records each launch's kernel and PRECISION, then launches
        def __init__(self, kernel):
            self.name, self.launcher = kernel.__name__, wrap(kernel)

        def __getitem__(self, grid):
            def launch_(*args, **kwargs):
                seen.append((self.name, kwargs["PRECISION"]))
                return self.launcher[grid](*args, **kwargs)
            return launch_

    monkeypatch.setattr(launch, "launcher", Spy)
    dim, hidden, n = 16, 24, 9
    x = torch.randn(1, n, n, dim, dtype=torch.float64)
    mask, w = make_mask(1, n), make_weights(dim, hidden=hidden)
    g = torch.randn(x.shape, dtype=torch.float64)
    exact = run(lambda t, **ww: reference(t, mask, direction=direction, **ww), x, w, g)
    w32 = {k: v.float() for k, v in w.items()}
    fast = lambda t, **ww: tm.triangle_multiplication(t, mask, direction=direction, backend="triton", **ww)  # noqa
    results = {}
    for level in ("medium", "highest"):
        matmul_precision(level)
        seen.clear()
        results[level] = run(fast, x.float(), w32, g)
        kernels = {"_prologue_kernel", "_product_kernel", "_epilogue_kernel", "_out_bwd_kernel", "_in_bwd_kernel"}
        assert {name for name, _ in seen} == kernels
        assert {p for _, p in seen} == {"tf32" if level == "medium" else "ieee"}
    bound = 2.0**-8
    for i, name in enumerate(("out", "x") + WEIGHTS):
        e = (exact[0], *exact[1])[i]
        tf32, ieee = ((r[0], *r[1])[i] for r in (results["medium"], results["highest"]))
        scale = e.abs().max().item()
        err, err_ieee = ((r.double() - e).abs().max().item() for r in (tf32, ieee))
        assert err <= bound * scale, f"{name}: error {err:.3e} > 2**-8 x {scale:.3e}"
        assert err > 16 * err_ieee, f"{name}: TF32 error {err:.3e} not above IEEE's {err_ieee:.3e}"


# GPU: compiled kernels at real sizes ----------------------------------------------------


def _gpu_check(batch, n, dim, dtype, direction, masked=True, hidden=None):
    from foldops.reference.triangle_multiplication import triangle_multiplication as reference

    x = torch.randn(batch, n, n, dim, dtype=torch.float64, device="cuda")
    mask = make_mask(batch, n).cuda() if masked else None
    w = {k: v.cuda() for k, v in make_weights(dim, hidden=hidden).items()}
    low = {k: v.to(dtype) for k, v in w.items()}
    g = torch.randn(x.shape, dtype=torch.float64, device="cuda")
    ref = lambda t, **ww: reference(t, mask, direction=direction, **ww)  # noqa: E731
    fast = lambda t, **ww: tm.triangle_multiplication(t, mask, direction=direction, backend="triton", **ww)  # noqa
    exact, exact_g = run(ref, x, w, g)
    base, base_g = run(ref, x.to(dtype), low, g)
    out, out_g = run(fast, x.to(dtype), low, g)
    assert_within_baseline("out", out, exact, base, dtype=dtype)
    for name, a, e, b in zip(("x",) + WEIGHTS, out_g, exact_g, base_g):
        assert_within_baseline(f"d{name}", a, e, b, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ("outgoing", "incoming"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("shape", [(1, 256, 128), (2, 131, 64), (1, 300, 32), (1, 97, 384)], ids=str)
def test_gpu_matches_reference(shape, dtype, direction):
    _gpu_check(*shape, dtype, direction)


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ("outgoing", "incoming"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("shape", [(1, 160, 384, 128), (2, 97, 48, 80)], ids=str)  # (B, N, D, H)
def test_gpu_hidden_width_matches_reference(shape, dtype, direction):
    """H != D (AF2 / OpenFold; GPU MODE's D = 384, H = 128) with the compiled tiles."""
    batch, n, dim, hidden = shape
    _gpu_check(batch, n, dim, dtype, direction, hidden=hidden)


@pytest.mark.gpu
def test_gpu_position_chunks_with_batch(monkeypatch):
    """The backward's position chunks at the GPU tiles, batch 2, a last chunk of fewer
    blocks than the others (the case whose LayerNorm-weight partials were misread)."""
    launch = importlib.import_module("foldops.kernels.triangle_multiplication.launch")
    monkeypatch.setattr(launch, "_chunk_positions", lambda x, p, b, block: 3 * block)
    _gpu_check(2, 75, 64, torch.float32, "outgoing", hidden=96)


@pytest.mark.gpu
def test_gpu_pairformer_layer_compiles():
    """A PairformerLayer (both triangle multiplications on the kernels) compiles with
    fullgraph=True under bf16 autocast and trains like eager."""
    from foldops.nn.pairformer import PairformerLayer

    layer = PairformerLayer(64, 32, num_heads=4, dropout=0.0, backend="auto", device="cuda")
    s = torch.randn(1, 80, 64, device="cuda", requires_grad=True)
    z = torch.randn(1, 80, 80, 32, device="cuda", requires_grad=True)
    mask = torch.ones(1, 80, device="cuda")
    mask[:, -7:] = 0
    pair_mask = mask[:, :, None] * mask[:, None, :]
    compiled = torch.compile(layer, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        s_e, z_e = layer(s, z, mask, pair_mask)
        s_c, z_c = compiled(s, z, mask, pair_mask)
    loss_e = s_e.float().square().mean() + z_e.float().square().mean()
    loss_c = s_c.float().square().mean() + z_c.float().square().mean()
    for a, b in zip(torch.autograd.grad(loss_c, [s, z]), torch.autograd.grad(loss_e, [s, z])):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(z_c, z_e, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dim, hidden", [(128, 128), (384, 384), (384, 128)])
def test_grids_fit_cuda_axis_limits_at_large_n(monkeypatch, dim, hidden):
    """Every launch grid keeps axes 1 and 2 within CUDA's 65535 programs at N = 2048
    (P / BLOCK_P alone passes it there). Launchers run on meta tensors with the GPU tile
    tables and a recorder in place of the launch: only the grids are checked."""
    launch = importlib.import_module("foldops.kernels.triangle_multiplication.launch")
    grids = []

    class Record:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: grids.append((self.fn.__name__, grid))

    monkeypatch.setattr(launch, "launcher", Record)
    monkeypatch.setattr(launch, "triton_interpret", lambda: False)  # GPU tiles, no skipped launches
    n = 2048
    x = torch.empty(1, n, n, dim, dtype=torch.bfloat16, device="meta")
    w = [torch.empty(s, dtype=torch.bfloat16, device="meta")
         for s in [(dim,), (dim,), (2 * hidden, dim), (2 * hidden, dim), (hidden,), (hidden,), (dim, hidden),
                   (dim, dim)]]
    launch.triangle_multiplication_forward(x, None, *w, True, 1e-5, "ieee")
    assert {name for name, _ in grids} == {"_prologue_kernel", "_product_kernel", "_epilogue_kernel"}
    for name, grid in grids:
        assert all(0 < g <= 65535 for g in grid[1:]), (name, grid)
        assert grid[0] < 2**31, (name, grid)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("outgoing", (True, False), ids=("outgoing", "incoming"))
def test_fp16_dt_past_fp16_range_gives_inf_not_nan(monkeypatch, outgoing):
    """fp16 dt is stored as hi + lo planes: where |dt| passes 65504, hi = +-inf and lo
    must be 0 (dt - hi = -+inf made the two products' sum NaN). A large upstream gradient
    at one pair only: each of da, db then sums one inf term per element (fp64 check)."""
    launch = importlib.import_module("foldops.kernels.triangle_multiplication.launch")
    seen = []
    product = launch._launch_product

    def record(a, a_strides, bm, b_strides, out, *args, **kwargs):
        product(a, a_strides, bm, b_strides, out, *args, **kwargs)
        seen.append((a, bm, out))

    monkeypatch.setattr(launch, "_launch_product", record)
    n, c = 5, 8
    x, _, w = _inputs(1, n, c, torch.float16, masked=False)
    w["norm_out_weight"] = torch.full_like(w["norm_out_weight"], 100.0)
    g = torch.zeros_like(x)
    g[0, 2, 3] = 6e4
    args = _op_args(x, None, w, outgoing)
    _, ab, go, t = torch.ops.foldops.triangle_multiplication_fwd(*args)
    seen.clear()  # the backward's two products only
    torch.ops.foldops.triangle_multiplication_bwd(g, *args[:10], ab, go, t, outgoing, 1e-5, "ieee")
    (dt, _, _), _ = seen
    hi, lo = dt[0, :c].double(), dt[0, c:].double()
    assert hi.isinf().any()
    assert lo.isfinite().all() and (lo[hi.isinf()] == 0).all()
    # da, db against the products of the stored planes in fp64 (elementwise IEEE sums).
    d = (hi + lo).view(c, n, n)
    a, b = ab[0].double().view(2, c, n, n)
    if not outgoing:
        a, b = a.transpose(-1, -2), b.transpose(-1, -2)
    da = (d[:, :, :, None] * b[:, None, :, :]).sum(2)  # da[i, k] = sum_j dt[i, j] b[j, k]
    db = (d.transpose(-1, -2)[:, :, :, None] * a[:, None, :, :]).sum(2)
    if not outgoing:
        da, db = da.transpose(-1, -2), db.transpose(-1, -2)
    got = torch.stack([out[0].double().view(c, n, n) for _, _, out in seen]).view(2 * c, n, n)
    exact = torch.cat([da, db])
    assert exact.isinf().any() and not exact.isnan().any()
    assert not got.isnan().any()
    assert torch.equal(got.isinf(), exact.isinf())
