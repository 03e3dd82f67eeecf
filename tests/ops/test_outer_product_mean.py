"""foldops.ops.outer_product_mean: the ``torch`` and ``reference`` backends against float64.

The torch backend has two contraction orders (``outer``, ``fold``) and a hand-written
backward; both orders are exercised directly, at several chunk sizes, besides the
public op (which picks the order by FLOP count).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from foldops.backends import BackendUnavailableError
from foldops.device import autocast
from foldops.ops import outer_product_mean
from foldops.ops.outer_product_mean import _torch_backend, choose_order, contraction_flops, matmul_dtype
from foldops.reference.outer_product_mean import outer_product_mean as reference
from foldops.testing import assert_within_baseline, check_against_float64, forward_backward, leaves

LOW = (torch.float32, torch.bfloat16, torch.float16)
NAMES = ("da", "db", "dweight", "dbias")

# (B, S, N, C, D, O): N in 1, 2, 7, 13; S in 1, 3, 5; C != D; B = 2.
SHAPES = [
    (1, 1, 1, 3, 3, 4),
    (2, 3, 2, 4, 3, 5),
    (1, 5, 7, 3, 4, 6),
    (2, 3, 13, 4, 4, 7),
    (1, 1, 13, 5, 3, 4),
    (1, 5, 13, 2, 5, 3),
]


def shape_id(shape):
    return "x".join(map(str, shape))


def make_inputs(batch, rows, n, c, d, o, *, masked=True):
    """fp64 inputs; the mask keeps ~70%, fully masks MSA row 0 (S > 1) and token 0 (N > 1)."""
    a = torch.randn(batch, rows, n, c, dtype=torch.float64)
    b = torch.randn(batch, rows, n, d, dtype=torch.float64)
    weight = torch.randn(o, c * d, dtype=torch.float64) / (c * d) ** 0.5
    bias = torch.randn(o, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(batch, rows, n) > 0.3
        mask[:, -1] = True
        if rows > 1:
            mask[:, 0] = False
        if n > 1:
            mask[:, :, 0] = False
    return a, b, mask, weight, bias


def check_against_fp64(fn, inputs, dtype, weight_dtype=None):
    """fn(a, b, weight, bias) in ``dtype`` vs the fp64 reference, baseline = reference in dtype."""
    a, b, mask, weight, bias = inputs
    weight_dtype = weight_dtype or dtype
    fast = check_against_float64(
        fn, lambda a, b, w, bias: reference(a, b, mask, w, bias), (a, b, weight, bias),
        (dtype, dtype, weight_dtype, weight_dtype), names=NAMES, compare_dtype=dtype,
    )
    return fast.outputs[0], fast.grads


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", LOW + (torch.float64,), ids=str)
@pytest.mark.parametrize("backend", ("torch", "reference"))
def test_forward_and_grads_vs_float64(backend, dtype, shape):
    inputs = make_inputs(*shape)
    mask = inputs[2]
    check_against_fp64(lambda a, b, w, bias: outer_product_mean(a, b, mask, w, bias, backend=backend), inputs, dtype)


@pytest.mark.parametrize("chunk", (1, 3, None), ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("order", ("outer", "fold"))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3]], ids=shape_id)
def test_both_orders_every_chunking(shape, dtype, order, chunk):
    inputs = make_inputs(*shape)
    mask = inputs[2]
    fn = lambda a, b, w, bias: _torch_backend(a, b, mask, w, bias, chunk, order)  # noqa: E731
    check_against_fp64(fn, inputs, dtype)


@pytest.mark.parametrize("chunk", (1, 3, None), ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], (1, 16, 9, 8, 8, 16)], ids=shape_id)
def test_half_precision_matmuls(shape, dtype, chunk):
    """The accelerator path (fp16/bf16 matmuls, fp32 sums), forced on CPU."""
    inputs = make_inputs(*shape)
    mask = inputs[2]
    fn = lambda a, b, w, bias: _torch_backend(a, b, mask, w, bias, chunk, "outer", half_matmuls=True)  # noqa: E731
    check_against_fp64(fn, inputs, dtype)


def test_matmul_dtype_policy():
    x = torch.zeros(1, dtype=torch.bfloat16)
    assert matmul_dtype(x) == torch.float32  # CPU: fp32 matmuls
    assert matmul_dtype(x, half_matmuls=True) == torch.bfloat16
    assert matmul_dtype(x.half(), half_matmuls=True) == torch.float16
    assert matmul_dtype(x.float(), half_matmuls=True) == torch.float32
    assert matmul_dtype(x.double(), half_matmuls=True) == torch.float64
    assert matmul_dtype(torch.zeros(1, dtype=torch.bfloat16, device="meta")) == torch.bfloat16


@pytest.mark.parametrize("order", ("outer", "fold"))
def test_inference_chunks_match_training_path(order):
    a, b, mask, weight, bias = (t.float() if t is not None and t.is_floating_point() else t for t in make_inputs(2, 5, 13, 4, 3, 6))
    with torch.no_grad():
        one = _torch_backend(a, b, mask, weight, bias, 13, order)
        many = _torch_backend(a, b, mask, weight, bias, 2, order)
    torch.testing.assert_close(many, one, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ("torch", "reference"))
def test_without_mask(backend):
    inputs = make_inputs(2, 3, 7, 4, 4, 5, masked=False)
    check_against_fp64(
        lambda a, b, w, bias: outer_product_mean(a, b, None, w, bias, backend=backend), inputs, torch.float32
    )


def test_without_bias_and_float_mask():
    a, b, mask, weight, _ = make_inputs(1, 3, 7, 3, 3, 4)
    out = outer_product_mean(a, b, mask.double(), weight, None, backend="torch")
    exact = reference(a, b, mask, weight, None)
    torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", ("outer", "fold"))
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fully_masked_tokens_give_bias_and_zero_grads(dtype, order):
    a, b, mask, weight, bias = make_inputs(2, 5, 7, 4, 3, 6)
    mask[1] = False  # a whole batch element padded
    low = [a.to(dtype), b.to(dtype), weight.to(dtype), bias.to(dtype)]
    grad_out = torch.randn(2, 7, 7, 6, dtype=torch.float64)
    (out,), (da, db, dw, dbias), _ = forward_backward(
        lambda *t: _torch_backend(t[0], t[1], mask, t[2], t[3], 2, order), leaves(low), [grad_out]
    )
    for t in (out, da, db, dw, dbias):
        assert torch.isfinite(t).all()
    # Token 0 is masked in every MSA row, batch element 1 everywhere: pairs with no
    # MSA row keeping both ends give exactly the bias.
    dead = torch.zeros(2, 7, 7, dtype=torch.bool)
    dead[:, 0, :] = dead[:, :, 0] = True
    dead[1] = True
    assert (out[dead] == low[3]).all()
    # Masked MSA positions get no gradient.
    assert (da[~mask] == 0).all() and (db[~mask] == 0).all()


def test_masked_positions_do_not_leak():
    a, b, mask, weight, bias = make_inputs(2, 5, 7, 4, 3, 6)
    garbage_a = torch.where(mask[..., None], a, 1e4 * torch.randn_like(a))
    garbage_b = torch.where(mask[..., None], b, -1e4 * torch.randn_like(b))
    for backend in ("torch", "reference"):
        clean = outer_product_mean(a, b, mask, weight, bias, backend=backend)
        dirty = outer_product_mean(garbage_a, garbage_b, mask, weight, bias, backend=backend)
        assert torch.equal(clean, dirty), backend


@pytest.mark.parametrize("order", ("outer", "fold"))
def test_non_contiguous_inputs(order):
    a, b, mask, weight, bias = make_inputs(2, 5, 7, 4, 3, 6)
    # a, b as channel slices of one projection, S and N swapped in memory, weight transposed.
    ab = torch.cat([a, b], dim=-1).transpose(1, 2).contiguous().transpose(1, 2)
    a_v, b_v = ab[..., :4], ab[..., 4:]
    w_v = weight.t().contiguous().t()
    assert not (a_v.is_contiguous() or b_v.is_contiguous() or w_v.is_contiguous())
    inputs = (a_v, b_v, mask, w_v, bias)
    check_against_fp64(lambda a, b, w, bias: _torch_backend(a, b, mask, w, bias, 3, order), inputs, torch.float32)


def test_fp32_weight_with_bf16_features_and_autocast():
    a, b, mask, weight, bias = make_inputs(1, 3, 7, 4, 4, 5)
    check_against_fp64(
        lambda a, b, w, bias: outer_product_mean(a, b, mask, w, bias, backend="torch"),
        (a, b, mask, weight, bias),
        torch.bfloat16,
        weight_dtype=torch.float32,
    )
    with autocast(a, dtype=torch.bfloat16):
        out = outer_product_mean(a.bfloat16(), b.bfloat16(), mask, weight.float(), bias.float())
    assert out.dtype == torch.bfloat16
    exact = reference(a, b, mask, weight, bias)
    base = reference(a.bfloat16(), b.bfloat16(), mask, weight.float(), bias.float())
    assert_within_baseline("out under autocast", out, exact, base, dtype=torch.bfloat16)


def test_order_choice_follows_flops():
    # Single-sequence input: folding the weight in is far cheaper.
    assert choose_order(rows=1, n=256, c=32, d=32, o=128) == "fold"
    # A deep MSA: the outer product first.
    assert choose_order(rows=1024, n=256, c=32, d=32, o=128) == "outer"
    for rows in (1, 16, 64, 256):
        order = choose_order(rows, 128, 32, 32, 128)
        other = "fold" if order == "outer" else "outer"
        assert contraction_flops(order, rows, 128, 32, 32, 128) <= contraction_flops(other, rows, 128, 32, 32, 128)
    with pytest.raises(ValueError, match="order"):
        contraction_flops("sideways", 1, 1, 1, 1, 1)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("order", ("outer", "fold"))
def test_never_materialises_the_outer_product(order):
    batch, rows, n, c, o = 1, 8, 48, 8, 4
    a, b = torch.randn(batch, rows, n, c, requires_grad=True), torch.randn(batch, rows, n, c, requires_grad=True)
    weight, bias = torch.randn(o, c * c, requires_grad=True), torch.randn(o, requires_grad=True)
    mask = torch.rand(batch, rows, n) > 0.2
    full = batch * n * n * c * c
    probe = _LargestTensor()
    with probe:
        out = _torch_backend(a, b, mask, weight, bias, 4, order)
        out.sum().backward()
    assert probe.largest < full // 4, (probe.largest, full)


def test_bad_inputs_name_the_argument():
    a, b, mask, weight, bias = make_inputs(1, 3, 5, 4, 4, 6)
    with pytest.raises(ValueError, match=r"a: expected shape"):
        outer_product_mean(a[0], b, mask, weight, bias)
    with pytest.raises(ValueError, match=r"b: expected shape \(1, 3, 5, '\*'\), got \(1, 3, 4, 4\)"):
        outer_product_mean(a, b[:, :, :4], mask, weight, bias)
    with pytest.raises(TypeError, match=r"b: expected dtype torch.float64 \(as a\), got torch.float32"):
        outer_product_mean(a, b.float(), mask, weight, bias)
    with pytest.raises(TypeError, match=r"a: expected dtype in"):
        outer_product_mean(a.long(), b.long(), mask, weight, bias)
    with pytest.raises(ValueError, match=r"out_weight: expected shape \('\*', 16\), got \(6, 15\)"):
        outer_product_mean(a, b, mask, weight[:, :15], bias)
    with pytest.raises(TypeError, match=r"out_weight: expected dtype torch.float64 or torch.float32, got torch.float16"):
        outer_product_mean(a, b, mask, weight.half(), bias.half())
    with pytest.raises(ValueError, match=r"out_bias: expected shape \(6,\), got \(5,\)"):
        outer_product_mean(a, b, mask, weight, bias[:5])
    with pytest.raises(TypeError, match=r"out_bias: expected dtype torch.float64 \(as out_weight\)"):
        outer_product_mean(a, b, mask, weight, bias.float())
    with pytest.raises(ValueError, match=r"mask: expected shape \(1, 3, 5\), got \(1, 5\)"):
        outer_product_mean(a, b, mask[:, 0], weight, bias)
    with pytest.raises(TypeError, match=r"mask: expected a bool or 0/1 numeric mask"):
        outer_product_mean(a, b, mask.to(torch.complex64), weight, bias)
    with pytest.raises(ValueError, match=r"b: expected a tensor on cpu, got one on meta"):
        outer_product_mean(a, b.to("meta"), mask, weight, bias)
    with pytest.raises(ValueError, match=r"out_weight: expected a tensor on cpu, got one on meta"):
        outer_product_mean(a, b, mask, weight.to("meta"), bias)
    with pytest.raises(ValueError, match=r"chunk_size: expected a positive int"):
        outer_product_mean(a, b, mask, weight, bias, chunk_size=0)
    with pytest.raises(BackendUnavailableError, match=r"has no backend 'triton'"):
        outer_product_mean(a, b, mask, weight, bias, backend="triton")


def test_environment_override(monkeypatch):
    a, b, mask, weight, bias = make_inputs(1, 3, 5, 4, 4, 6)
    monkeypatch.setenv("FOLDOPS_BACKEND_OUTER_PRODUCT_MEAN", "reference")
    via_env = outer_product_mean(a, b, mask, weight, bias)
    assert torch.equal(via_env, reference(a, b, mask, weight, bias))
    monkeypatch.setenv("FOLDOPS_BACKEND_OUTER_PRODUCT_MEAN", "nonsense")
    with pytest.raises(BackendUnavailableError, match="FOLDOPS_BACKEND_OUTER_PRODUCT_MEAN"):
        outer_product_mean(a, b, mask, weight, bias)
