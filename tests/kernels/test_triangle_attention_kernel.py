"""Triton triangle attention kernels against the float64 reference.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set in
conftest) at small odd sizes; tests marked ``gpu`` run the compiled kernels at real
sizes. Every case checks the output and the gradients of q, k, v and the bias with
the accuracy rule of ``foldops.testing.assert_within_baseline``: error against fp64 at
most 2x the error of plain PyTorch (the reference) run in the same dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

from foldops.device import kernel_support
from foldops.reference.triangle_attention import triangle_attention as reference
from foldops.testing import (
    assert_deterministic,
    assert_within_baseline,
    check_against_float64,
    forward_backward,
    leaves,
)

pytestmark = pytest.mark.skipif(
    kernel_support("cpu" if not torch.cuda.is_available() else "cuda") is not None,
    reason="Triton kernels cannot run here",
)

if pytestmark.args[0]:  # pragma: no cover - no Triton
    kernel = None
else:
    import triton

    from foldops.kernels import triangle_attention as kernel
    from foldops.kernels.triangle_attention import backward, configs, dbias_splits, launch, op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _make_qkv(batch, rows, n, heads, d, dtype, layout, device=DEVICE):
    """q, k, v [B, I, N, H, D] laid out as the layers produce them."""
    if layout == "contiguous":
        return [torch.randn(batch, rows, n, heads, d, device=device).to(dtype) for _ in range(3)]
    if layout == "start":  # views of one projection [B, I, N, 4, H, D]
        proj = torch.randn(batch, rows, n, 4, heads, d, device=device).to(dtype)
        return list(proj.unbind(3)[:3])
    if layout == "end":  # transposed views of a projection [B, N, I, 4, H, D]
        proj = torch.randn(batch, n, rows, 4, heads, d, device=device).to(dtype)
        return [t.transpose(1, 2) for t in proj.unbind(3)[:3]]
    raise ValueError(layout)


def _make_bias(batch, heads, n, dtype, layout, device=DEVICE):
    if layout == "contiguous":
        return torch.randn(batch, heads, n, n, device=device).to(dtype)
    lin = torch.randn(batch, n, n, heads, device=device).to(dtype)  # a Linear's output
    return lin.permute(0, 3, 1, 2) if layout == "start" else lin.permute(0, 3, 2, 1)


def _make_mask(batch, rows, n, kind, device=DEVICE):
    if kind == "none":
        return None
    mask = torch.rand(batch, rows, n, device=device) > 0.25
    mask[0, 0] = False  # a fully masked row
    if rows > 2:
        mask[-1, 2, :] = False
        mask[-1, 2, n - 1] = True  # a single kept key
    if kind == "float":
        return mask.to(torch.float32)
    return mask


def _check_case(batch, rows, n, heads, d, dtype, mask_kind="bool", layout="contiguous", bias_dtype=None,
                scale=None):
    q, k, v = _make_qkv(batch, rows, n, heads, d, dtype, layout)
    bias = _make_bias(batch, heads, n, bias_dtype or dtype, layout)
    mask = _make_mask(batch, rows, n, mask_kind)
    keep = None if mask is None else mask.bool()
    scale = d**-0.5 if scale is None else scale
    # Leaves keep the layout of the views (non-contiguous where the layer's are).
    fast = check_against_float64(
        lambda *t: kernel.triangle_attention(*t, keep, scale), lambda *t: reference(*t, keep, scale),
        (q, k, v, bias), None, names=("q", "k", "v", "bias"), compare_dtype=dtype,
        grad_outs=[torch.randn(q.shape, device=q.device).to(dtype).double()],
    )
    (out,), grads = fast.outputs, fast.grads
    assert out.dtype == dtype and out.shape == q.shape
    if keep is not None:
        dead = ~keep.any(-1)  # [B, I]: rows whose keys are all masked
        assert dead.any()
        assert (out[dead] == 0).all()
        for g in grads[:3]:
            assert (g[dead] == 0).all()
    return out, grads


# Interpreter-sized cases (CPU in CI; also run on the GPU). Sizes cross the 16-wide
# interpreter blocks: 1, 7 (one partial block), 17, 33 (partial last block), 32 (even).
CASES = [
    # batch, rows, n, heads, d, dtype, mask, layout, bias dtype
    pytest.param(1, 2, 2, 1, 16, torch.float32, "none", "contiguous", None, id="n2-fp32"),
    pytest.param(2, 3, 7, 2, 16, torch.float32, "bool", "contiguous", None, id="n7-fp32-mask"),
    pytest.param(1, 3, 33, 2, 16, torch.bfloat16, "bool", "start", None, id="n33-bf16-start"),
    pytest.param(1, 4, 17, 1, 32, torch.float16, "float", "end", None, id="n17-fp16-end-floatmask"),
    pytest.param(1, 3, 13, 2, 32, torch.bfloat16, "bool", "end", torch.float32, id="n13-bf16-fp32bias-end"),
    pytest.param(2, 2, 32, 1, 16, torch.float16, "none", "contiguous", None, id="n32-fp16-even"),
    pytest.param(1, 5, 32, 2, 16, torch.bfloat16, "bool", "end", None, id="n32-bf16-even-mask"),
    pytest.param(1, 1, 40, 2, 16, torch.float32, "bool", "start", None, id="i1-n40-fp32"),  # I << N
    # delta takes 4 heads per program at D = 64: two head groups, the second partial.
    pytest.param(1, 2, 9, 5, 64, torch.bfloat16, "bool", "end", None, id="n9-bf16-h5-d64"),
    # Head dims other than 16/32/64/128 run zero-padded to the next one.
    pytest.param(1, 3, 13, 2, 24, torch.bfloat16, "bool", "start", None, id="n13-bf16-d24"),
    pytest.param(1, 2, 9, 1, 8, torch.float32, "float", "end", None, id="n9-fp32-d8"),
    pytest.param(1, 2, 11, 1, 40, torch.float16, "none", "contiguous", None, id="n11-fp16-d40"),
]


@pytest.mark.parametrize("batch, rows, n, heads, d, dtype, mask_kind, layout, bias_dtype", CASES)
def test_matches_reference(batch, rows, n, heads, d, dtype, mask_kind, layout, bias_dtype):
    _check_case(batch, rows, n, heads, d, dtype, mask_kind, layout, bias_dtype)


@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
def test_scale_sign(scale):
    """The forward and dBias add the mask before scaling, with the infinity's sign
    chosen by the scale's; scale 0 runs without a mask."""
    _check_case(1, 3, 19, 2, 16, torch.float32, mask_kind="bool" if scale else "none", scale=scale)


def test_single_key():
    """N = 1: the softmax is identically 1, so out = v and the exact gradients of q, k
    and the bias are 0. fp64 autograd returns exact zeros; the kernel's dS = P (dP -
    delta) cancels two fp32 dot products summed in different orders, so it may leave
    rounding noise: bounded here by fp32 epsilon times the size of those products."""
    q, k, v = (t.requires_grad_() for t in _make_qkv(2, 3, 1, 2, 16, torch.float32, "contiguous"))
    bias = _make_bias(2, 2, 1, torch.float32, "contiguous").requires_grad_()
    out = kernel.triangle_attention(q, k, v, bias, None, 0.25)
    grad_out = torch.randn_like(out)
    dq, dk, dv, dbias = torch.autograd.grad(out, [q, k, v, bias], grad_out)
    torch.testing.assert_close(out, v, rtol=0, atol=0)
    torch.testing.assert_close(dv, grad_out, rtol=0, atol=0)
    noise = 4 * torch.finfo(torch.float32).eps * (grad_out.abs() * v.abs()).sum(-1).max().item()
    for g, other in ((dq, k), (dk, q)):
        assert g.abs().max().item() <= noise * 0.25 * other.abs().max().item()
    assert dbias.abs().max().item() <= 3 * noise  # sums 3 rows of dS


def test_output_layout_follows_q():
    q, k, v = _make_qkv(1, 3, 5, 2, 16, torch.float32, "end")
    bias = _make_bias(1, 2, 5, torch.float32, "end")
    out = kernel.triangle_attention(q, k, v, bias, None, 0.25)
    # The ending node transposes back: that must be a free view, not a copy.
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("splits", [1, 3], ids=["one-pass", "split-rows"])
def test_bias_grad_split_and_deterministic(monkeypatch, splits):
    """Both bias-gradient paths (rows split over programs, or one pass) agree with fp64
    and repeat bit for bit."""
    monkeypatch.setattr(dbias_splits, "bias_splits", lambda *args: splits)
    launched = []
    wrap = launch.launcher
    monkeypatch.setattr(launch, "launcher", lambda fn: launched.append(fn.__name__) or wrap(fn))
    batch, rows, n, heads, d = 1, 5, 9, 2, 16
    q, k, v = _make_qkv(batch, rows, n, heads, d, torch.float32, "contiguous")
    bias = _make_bias(batch, heads, n, torch.float32, "contiguous").requires_grad_()
    mask = _make_mask(batch, rows, n, "bool")
    first = assert_deterministic(
        lambda *t: kernel.triangle_attention(*t, mask, 0.25), leaves((q, k, v, bias)), names=("q", "k", "v", "bias")
    ).grads[3]
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(q)
    assert ("_sum_splits_kernel" in launched) == (splits > 1)  # the path named in the id ran
    exact_bias = bias.detach().double().requires_grad_()
    exact = reference(q.double(), k.double(), v.double(), exact_bias, mask, 0.25)
    exact_grad = torch.autograd.grad(exact, exact_bias, grad_out.double())[0]
    base = torch.autograd.grad(reference(q, k, v, bias, mask, 0.25), bias, grad_out)[0]
    assert_within_baseline("dbias", first, exact_grad, base)


def test_bias_grad_splits_and_head_groups_with_batch(monkeypatch):
    """Batch 2 through the per-(split, batch, head) buffers: the bias gradient's row
    splits (5 rows in 3 splits of 2, 2, 1: the last has fewer) and delta's head groups
    (5 heads of D = 64 in groups of 4: the second has one head), against fp64."""
    batch, rows, n, heads, d = 2, 5, 9, 5, 64
    monkeypatch.setattr(dbias_splits, "bias_splits", lambda *args: 3)
    launched = []
    wrap = launch.launcher
    monkeypatch.setattr(launch, "launcher", lambda fn: launched.append(fn.__name__) or wrap(fn))
    _check_case(batch, rows, n, heads, d, torch.bfloat16, "bool", "start")
    assert "_sum_splits_kernel" in launched


def test_bias_splits_rule(monkeypatch):
    """The split count minimises waves x rows per program (+1% per split) among those
    that give every SM a program and keep a split's rows within 80 MiB, never more than
    the rows or 16; the H100 cases measured in the docs."""
    monkeypatch.setattr(dbias_splits, "num_sms", lambda device: 132)
    cpu = torch.device("cpu")
    # (programs, rows, warps) -> splits: N = 256 / 384 / 512 with 128x64 tiles, 8 warps
    # (one program per SM); N = 768 / 1024 with 64x64 tiles, 4 warps (three per SM).
    assert dbias_splits.bias_splits(32, 256, 8, cpu) == 8  # 256 programs, two waves of 32 rows
    assert dbias_splits.bias_splits(72, 384, 8, cpu) == 11  # 792 programs, 6 waves of 35 rows
    assert dbias_splits.bias_splits(128, 512, 8, cpu) == 2  # 1 split would leave 4 SMs idle
    assert dbias_splits.bias_splits(576, 768, 4, cpu) == 2  # 1152 programs, 3 waves of 384 rows
    assert dbias_splits.bias_splits(1024, 1024, 4, cpu) == 5
    assert dbias_splits.bias_splits(4, 3, 4, cpu) == 3  # capped by the rows
    assert dbias_splits.bias_splits(1, 4096, 8, cpu) == 16  # and by 16
    assert dbias_splits.bias_splits(100_000, 1024, 4, cpu) == 1  # many tiles: no split
    # With the bytes a split streams (q, k, v, dO rows of one head, bf16, D = 32): 768 and
    # 1024 keep the makespan choice; 1536 and 2048 take the fewest splits within 80 MiB.
    row_bytes = lambda n: 4 * n * 32 * 2  # noqa: E731
    assert dbias_splits.bias_splits(576, 768, 4, cpu, row_bytes(768)) == 2
    assert dbias_splits.bias_splits(1024, 1024, 4, cpu, row_bytes(1024)) == 5
    assert dbias_splits.bias_splits(2304, 1536, 4, cpu, row_bytes(1536)) == 8
    assert dbias_splits.bias_splits(4096, 2048, 4, cpu, row_bytes(2048)) == 13
    assert dbias_splits.bias_splits(4096, 2048, 4, cpu) == 2  # the makespan model alone
    assert dbias_splits.bias_splits(4096, 8192, 4, cpu, row_bytes(8192)) == 16  # never above 16


def test_fp32_tiles_only_for_fma_products(monkeypatch):
    """fp32 without TF32 takes its own tiles (tuned on the FMA units), with their own
    small-N overrides; TF32 and 16-bit inputs keep theirs; head dims without fp32 tiles
    keep the clamped ones."""
    monkeypatch.setattr(launch, "_interpreting", lambda: False)
    for kind in ("fwd", "dq", "dkdv", "dbias"):
        key = (kind, 32, True)
        assert launch._config(kind, 1024, 32, torch.float32) == configs.CONFIGS[key]
        assert launch._config(kind, 512, 32, torch.float32) == configs.CONFIGS_SMALL_N.get(key, configs.CONFIGS[key])
        for n in (512, 1024):
            assert launch._config(kind, n, 32, torch.float32) != launch._config(kind, n, 32, torch.float32,
                                                                                  allow_tf32=True)
        assert launch._config(kind, 1024, 32, torch.bfloat16) == configs.CONFIGS[(kind, 32, False)]
    # The 16-bit small-N dBias tile (8 warps) reaches neither fp32 path.
    assert launch._config("dbias", 512, 32, torch.float32) != configs.CONFIGS_SMALL_N[("dbias", 32, False)]
    assert launch._config("dbias", 512, 32, torch.float32, allow_tf32=True)[2] == 4
    assert (("dkdv", 64, True)) not in configs.CONFIGS
    assert launch._config("dkdv", 512, 64, torch.float32)[3] <= 2  # the clamp: at most 2 stages


def test_fp32_delta_is_one_fma_chain():
    """fp32 delta = rowsum(dO * O) as one FMA chain over d from 0, the rounding of the
    kernels' fp32 dP products (so a row with a single kept key gets dS = 0 exactly; the
    end-to-end effect shows only on the GPU, whose dot is that chain). Bitwise against
    the chain emulated with exact fp64 products and one fp32 rounding per step."""
    batch, rows, n, heads, d = 1, 2, 7, 3, 16
    do, o = (torch.randn(batch, rows, n, heads, d, device=DEVICE) * s for s in (1, 3))

    def delta(fma_chain):
        out = torch.empty(batch, rows, heads, n, device=DEVICE)
        bh = min(triton.next_power_of_2(heads), max(1, 256 // d))
        backward._bwd_delta_kernel[(1, rows, batch * triton.cdiv(heads, bh))](
            o, do, out, *o.stride(), *do.stride(), rows, n, heads,
            D=d, BLOCK_J=16, BLOCK_H=bh, FMA_CHAIN=fma_chain, num_warps=4)
        return out

    chain = torch.zeros(batch, rows, n, heads, dtype=torch.float64)
    for dd in range(d):
        chain = (do[..., dd].double() * o[..., dd].double() + chain).float().double()
    chain = chain.float().permute(0, 1, 3, 2)
    assert torch.equal(delta(True), chain)
    tree = delta(False)  # the 16-bit path's tree sum: close, but not these bits
    assert not torch.equal(tree, chain) and torch.allclose(tree, chain, rtol=1e-5, atol=1e-5)


def test_bias_grad_skipped_when_not_needed(monkeypatch):
    calls = []
    original = dbias_splits.bias_splits
    monkeypatch.setattr(dbias_splits, "bias_splits", lambda *a: calls.append(1) or original(*a))
    q, k, v = (t.requires_grad_() for t in _make_qkv(1, 2, 5, 1, 16, torch.float32, "contiguous"))
    bias = _make_bias(1, 1, 5, torch.float32, "contiguous")  # no grad
    out = kernel.triangle_attention(q, k, v, bias, None, 0.25)
    dq, = torch.autograd.grad(out, [q], torch.randn_like(out))
    assert torch.isfinite(dq).all() and dq.abs().sum() > 0
    assert calls == []


@pytest.mark.parametrize("mask_kind", ["bool", "none"])
def test_eager_registered_and_inference_paths_agree(monkeypatch, mask_kind):
    """Eager calls run an autograd.Function over the launchers; torch.compile, fake
    tensors and dispatch modes the registered custom ops; calls without autograd skip
    the lse. The same kernels either way: the same bits."""
    q, k, v = _make_qkv(1, 3, 17, 2, 16, torch.bfloat16, "end")
    bias = _make_bias(1, 2, 17, torch.bfloat16, "start")
    keep = _make_mask(1, 3, 17, mask_kind)
    grad_out = torch.randn(q.shape, device=DEVICE).to(torch.bfloat16)

    def fwd_bwd(registered):
        monkeypatch.setattr(op, "_use_registered_ops", lambda _q: registered)
        leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
        out = kernel.triangle_attention(*leaves, keep, 0.3)
        return (out, *torch.autograd.grad(out, leaves, grad_out))

    eager, registered = fwd_bwd(False), fwd_bwd(True)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dbias"), eager, registered):
        assert torch.equal(a, b), name
    monkeypatch.undo()

    lse_sizes = []
    forward = op.triangle_attention_forward
    monkeypatch.setattr(op, "triangle_attention_forward",
                        lambda *a, **kw: (lambda r: lse_sizes.append(r[1].numel()) or r)(forward(*a, **kw)))
    with torch.no_grad():
        out = kernel.triangle_attention(q, k, v, bias, keep, 0.3)
    assert torch.equal(out, eager[0])
    assert lse_sizes == [0]


def test_backward_needs_the_lse():
    q, k, v = (t.requires_grad_() for t in _make_qkv(1, 2, 5, 1, 16, torch.float32, "contiguous"))
    bias = _make_bias(1, 1, 5, torch.float32, "contiguous")
    out, lse = torch.ops.foldops.triangle_attention_fwd(q, k, v, bias, None, 0.25, False, False)
    assert lse.numel() == 0
    with pytest.raises(RuntimeError, match="need_lse=False"):
        out.sum().backward()


def test_all_rows_masked_gives_zeros():
    q, k, v = (t.requires_grad_() for t in _make_qkv(1, 2, 6, 1, 16, torch.float32, "contiguous"))
    bias = _make_bias(1, 1, 6, torch.float32, "contiguous").requires_grad_()
    mask = torch.zeros(1, 2, 6, dtype=torch.bool, device=DEVICE)
    out = kernel.triangle_attention(q, k, v, bias, mask, 0.25)
    grads = torch.autograd.grad(out, [q, k, v, bias], torch.randn_like(out))
    assert (out == 0).all()
    for g in grads:
        assert (g == 0).all()


def test_public_op_uses_kernel():
    import foldops.ops as ops

    q, k, v = _make_qkv(1, 3, 7, 2, 16, torch.float32, "start")
    bias = _make_bias(1, 2, 7, torch.float32, "start")
    mask = _make_mask(1, 3, 7, "float")
    out = ops.triangle_attention(q, k, v, bias, mask, backend="triton")
    exact = reference(q.double(), k.double(), v.double(), bias.double(), mask.bool())
    assert_within_baseline("out", out, exact, reference(q, k, v, bias, mask.bool()))


def test_empty_inputs():
    q, k, v = (torch.randn(1, 0, 4, 1, 16, device=DEVICE) for _ in range(3))
    out = kernel.triangle_attention(q, k, v, torch.randn(1, 1, 4, 4, device=DEVICE), None, 0.25)
    assert out.shape == q.shape


@pytest.mark.parametrize(
    "change, error, name",
    [
        (dict(d=136), ValueError, "q: head dim"),
        (dict(dtype=torch.float64), TypeError, "q: expected dtype"),
        (dict(bias_shape=(1, 1, 5, 4)), ValueError, "bias: expected shape"),
        (dict(bias_dtype=torch.float16), TypeError, "bias: expected dtype"),
        (dict(mask_dtype=torch.float32), TypeError, "mask: expected dtype"),
        (dict(mask_shape=(1, 2, 4)), ValueError, "mask: expected shape"),
        (dict(k_shape=(1, 2, 5, 1, 32)), ValueError, "k: expected shape"),
        (dict(scale=0.0), ValueError, "scale: expected a nonzero number with a key mask"),
        (dict(scale=float("nan")), ValueError, "scale: expected a finite number"),
        (dict(scale=float("inf")), ValueError, "scale: expected a finite number"),
    ],
)
def test_bad_inputs(change, error, name):
    d = change.get("d", 16)
    dtype = change.get("dtype", torch.float32)
    q = torch.randn(1, 2, 5, 1, d, dtype=dtype, device=DEVICE)
    k = torch.randn(*change.get("k_shape", q.shape), dtype=dtype, device=DEVICE)
    bias = torch.randn(*change.get("bias_shape", (1, 1, 5, 5)), dtype=change.get("bias_dtype", dtype), device=DEVICE)
    mask = torch.ones(*change.get("mask_shape", (1, 2, 5)), dtype=change.get("mask_dtype", torch.bool), device=DEVICE)
    with pytest.raises(error, match=name):
        kernel.triangle_attention(q, k, q, bias, mask, change.get("scale", 0.25))


def test_opcheck():
    q, k, v = _make_qkv(1, 2, 5, 1, 16, torch.float32, "end")
    bias = _make_bias(1, 1, 5, torch.float32, "end")
    mask = _make_mask(1, 2, 5, "bool")
    args = [t.detach().requires_grad_() for t in (q, k, v, bias)]
    torch.library.opcheck(torch.ops.foldops.triangle_attention_fwd.default, (*args, mask, 0.25, False, True))
    # Without the lse there is no backward: inputs that need no gradient.
    torch.library.opcheck(torch.ops.foldops.triangle_attention_fwd.default, (q, k, v, bias, mask, 0.25, False, False))
    out, lse = torch.ops.foldops.triangle_attention_fwd(q, k, v, bias, mask, 0.25, False, True)
    grad_out = torch.randn_like(out)
    for need_dbias in (True, False):
        torch.library.opcheck(
            torch.ops.foldops.triangle_attention_bwd.default,
            (grad_out, q, k, v, bias, mask, out, lse, 0.25, False, need_dbias),
        )


# GPU: compiled kernels at real sizes ----------------------------------------------------

GPU_CASES = [
    pytest.param(1, 64, 128, 2, 32, torch.bfloat16, "bool", "start", None, id="n128-bf16-start"),
    pytest.param(1, 41, 257, 2, 32, torch.bfloat16, "bool", "end", None, id="i41-n257-bf16-end"),
    pytest.param(2, 24, 200, 2, 16, torch.float16, "float", "start", None, id="n200-fp16-d16"),
    pytest.param(1, 24, 192, 2, 64, torch.bfloat16, "bool", "end", torch.float32, id="n192-bf16-d64-fp32bias"),
    pytest.param(1, 16, 129, 2, 128, torch.float16, "bool", "start", None, id="n129-fp16-d128"),
    pytest.param(1, 16, 160, 2, 128, torch.bfloat16, "none", "contiguous", None, id="n160-bf16-d128"),
    pytest.param(1, 33, 161, 2, 32, torch.float32, "bool", "end", None, id="i33-n161-fp32"),
    pytest.param(1, 16, 96, 2, 64, torch.float32, "bool", "start", None, id="n96-fp32-d64"),
    pytest.param(1, 9, 300, 2, 32, torch.float32, "bool", "end", None, id="i9-n300-fp32"),
    pytest.param(1, 64, 512, 4, 32, torch.bfloat16, "bool", "start", None, id="n512-bf16"),
    pytest.param(2, 1, 384, 16, 24, torch.bfloat16, "bool", "start", None, id="i1-n384-bf16-d24"),  # Boltz APB
]


@pytest.mark.gpu
@pytest.mark.parametrize("batch, rows, n, heads, d, dtype, mask_kind, layout, bias_dtype", GPU_CASES)
def test_gpu_matches_reference(batch, rows, n, heads, d, dtype, mask_kind, layout, bias_dtype):
    _check_case(batch, rows, n, heads, d, dtype, mask_kind, layout, bias_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("n, dtype, layout", [(300, torch.bfloat16, "start"), (512, torch.bfloat16, "end"),
                                              (200, torch.float32, "contiguous")],
                         ids=["n300-bf16-start", "n512-bf16-end", "n200-fp32"])
def test_gpu_non_finite_values_at_masked_keys(n, dtype, layout):
    """NaN/inf in k, v and the bias at masked keys (padding masked in every row, one key
    masked in one row only) at the compiled tiles: every result finite, masked keys get
    zero dK/dV, and the results match the clean run's.

    The fast loops meet NaN there and the forward and dQ programs rerun with the masked
    keys selected out (``_fwd_exact``, ``_dq_exact``). A rerun is a loop compiled apart
    from the fast one, and its sums (the softmax row sum, the tensor-core products)
    need not round alike on a GPU; the interpreter's are bitwise equal
    (tests/test_malformed_inputs.py, and with the GPU tiles too). In 16-bit an output
    element rounded the other way moves delta = rowsum(dO * O) by ~dO x ulp(O), hence
    dQ by far more than assert_close's bf16 tolerance at elements near zero. So the
    forward is compared at the output's tolerance; the backward is compared given the
    same (out, lse), where only the dQ rerun differs (to one ulp of dQ's largest
    element); and the whole dirty run is held
    to the accuracy rule against the float64 reference of the clean inputs.
    """
    batch, rows, heads, d = 1, 8, 2, 32
    scale = d**-0.5
    q, k, v = _make_qkv(batch, rows, n, heads, d, dtype, layout)
    bias = _make_bias(batch, heads, n, dtype, layout)
    pad = n - n // 8  # keys from here on are padding
    mask = torch.ones(batch, rows, n, dtype=torch.bool, device=DEVICE)
    mask[:, :, pad:] = False
    mask[:, rows - 1] = False  # a padded row: every key masked
    mask[0, 1, 5] = False  # one key masked in one row only
    grad_out = torch.randn(batch, rows, n, heads, d, device=DEVICE).to(dtype)
    names = ("out", "dq", "dk", "dv", "dbias")

    def run(k, v, bias):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
        out = kernel.triangle_attention(*leaves, mask, scale)
        return (out, *torch.autograd.grad(out, leaves, grad_out))

    def close(a, b, name):
        same = "bitwise equal" if torch.equal(a, b) else "not bitwise equal"
        torch.testing.assert_close(a, b, msg=lambda m: f"{name} ({same}): {m}")

    def close_sum(a, b, name):
        # A rerun's sums round on their own: an element near zero of a long sum (dQ) can
        # differ by ulps of the tensor's scale, far above assert_close's per-element
        # relative tolerance. dQ is an fp32 sum over key tiles of 64 (or fewer) keys,
        # each tile's partial added in its own order, each addition rounding by up to
        # an ulp of the running sum: one fp32 ulp of the largest element per key tile,
        # or one ulp of the stored dtype if that is coarser.
        same = "bitwise equal" if torch.equal(a, b) else "not bitwise equal"
        ulps = max(torch.finfo(dtype).eps, -(-n // 64) * torch.finfo(torch.float32).eps)
        atol = ulps * b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m: f"{name} ({same}): {m}")

    clean = run(k, v, bias)
    dirty_k, dirty_v, dirty_bias = k.detach().clone(), v.detach().clone(), bias.detach().clone()
    dirty_k[:, :, pad:] = math.nan
    dirty_v[:, :, pad:] = math.inf
    dirty_k[0, 1, 5], dirty_v[0, 1, 5] = math.inf, math.nan
    dirty_bias[:, :, :, pad:] = math.nan
    dirty = run(dirty_k, dirty_v, dirty_bias)
    for name, a in zip(names, dirty):
        assert torch.isfinite(a).all(), name
    assert (dirty[2][~mask] == 0).all() and (dirty[3][~mask] == 0).all()
    close(dirty[0], clean[0], "out")

    # The backward alone, from the same forward results.
    out, lse = kernel.triangle_attention_forward(q, k, v, bias, mask, scale)
    from_clean = kernel.triangle_attention_backward(grad_out, q, k, v, bias, mask, out, lse, scale)
    from_dirty = kernel.triangle_attention_backward(grad_out, q, dirty_k, dirty_v, dirty_bias, mask, out, lse, scale)
    for name, a, b in zip(names[1:], from_dirty, from_clean):
        assert torch.isfinite(a).all(), name
        (close_sum if name == "dq" else close)(a, b, f"{name} given the same out and lse")

    # The whole dirty run against the float64 reference of the clean inputs.
    grad_outs = [grad_out.double()]
    fn = lambda *t: reference(*t, mask, scale)  # noqa: E731
    exact = forward_backward(fn, leaves((q, k, v, bias), torch.float64), grad_outs)
    base = forward_backward(fn, leaves((q, k, v, bias), dtype), grad_outs)
    for i, name in enumerate(names):
        e = exact.outputs[0] if i == 0 else exact.grads[i - 1]
        b = base.outputs[0] if i == 0 else base.grads[i - 1]
        assert_within_baseline(name, dirty[i], e, b, dtype=dtype)


@pytest.mark.gpu
def test_gpu_tf32():
    """fp32 with TF32 allowed (torch.set_float32_matmul_precision('high')): within the
    error of PyTorch's own TF32 matmuls (reference run under the same setting)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        _check_case(1, 32, 200, 2, 32, torch.float32, "bool", "end")
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.gpu
@pytest.mark.bigmem  # ~50 GB: q, k, v and their gradients at N = 4096
def test_gpu_n4096_no_index_overflow():
    """N = 4096 in the ending node's transposed layout: offsets pass 2^31 elements.

    Rows are independent given the bias, so the last rows are checked against the
    reference run on just those rows.
    """
    batch, rows, n, heads, d = 1, 4096, 4096, 4, 32
    q, k, v = (t.requires_grad_() for t in _make_qkv(batch, rows, n, heads, d, torch.bfloat16, "end"))
    assert q.storage_offset() + (n - 1) * q.stride(2) + (rows - 1) * q.stride(1) > 2**31
    bias = _make_bias(batch, heads, n, torch.bfloat16, "end").requires_grad_()
    mask = torch.rand(batch, rows, n, device=DEVICE) > 0.1
    out = kernel.triangle_attention(q, k, v, bias, mask, d**-0.5)
    grad_out = torch.randn_like(out)
    dq, dk, dv, dbias = torch.autograd.grad(out, [q, k, v, bias], grad_out)
    assert torch.isfinite(dbias).all()
    last = slice(rows - 2, rows)
    sub = [t[:, last].detach() for t in (q, k, v)]
    exact_in = [t.double().requires_grad_() for t in sub]
    exact = reference(*exact_in, bias.detach().double(), mask[:, last], d**-0.5)
    exact_grads = torch.autograd.grad(exact, exact_in, grad_out[:, last].double())
    base_in = [t.clone().requires_grad_() for t in sub]
    base = reference(*base_in, bias.detach(), mask[:, last], d**-0.5)
    base_grads = torch.autograd.grad(base, base_in, grad_out[:, last])
    assert_within_baseline("out", out[:, last], exact, base)
    for name, g, e, bg in zip(("dq", "dk", "dv"), (dq, dk, dv), exact_grads, base_grads):
        assert_within_baseline(name, g[:, last], e, bg)


@pytest.mark.gpu
@pytest.mark.parametrize("starting", [True, False], ids=["starting", "ending"])
def test_gpu_triangle_attention_layer_compiles(starting):
    """The layer on the kernel under torch.compile(fullgraph=True) and bf16 autocast:
    output and every gradient (input and parameters) within 2x the error of the same
    layer on PyTorch's own path in bf16, both against a float64 copy of the layer."""
    import copy

    from foldops.nn.triangle_attention import TriangleAttention

    torch.manual_seed(0)
    layer = TriangleAttention(64, 32, 4, starting=starting, backend="triton", device=DEVICE)
    for p in layer.parameters():  # Boltz zero-inits the output and gate: make it non-trivial
        torch.nn.init.normal_(p, std=0.1)
    baseline = copy.deepcopy(layer)
    baseline.backend = "torch"
    exact = copy.deepcopy(baseline).double()
    x = torch.randn(2, 96, 96, 64, device=DEVICE)
    mask = torch.rand(2, 96, 96, device=DEVICE) > 0.1
    grad = torch.randn(2, 96, 96, 64, device=DEVICE)

    def run(module, inputs, autocast):
        inputs = inputs.detach().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = module(inputs, mask)
        grads = torch.autograd.grad(out, [inputs, *module.parameters()], grad.to(out.dtype))
        return [out, *grads]

    names = ["out", "x"] + [f"grad {n}" for n, _ in layer.named_parameters()]
    fast = run(torch.compile(layer, fullgraph=True), x, True)
    base = run(baseline, x, True)
    ref = run(exact, x.double(), False)
    for name, f, b_, e in zip(names, fast, base, ref):
        assert_within_baseline(name, f, e, b_, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_pairformer_layer_compiles():
    """A whole PairformerLayer with triangle attention on the kernel compiles with
    fullgraph=True and trains (forward + backward) like eager."""
    from foldops.nn.pairformer import PairformerLayer

    torch.manual_seed(0)
    layer = PairformerLayer(64, 32, num_heads=4, dropout=0.0, backend="auto", device=DEVICE)
    s = torch.randn(1, 80, 64, device=DEVICE, requires_grad=True)
    z = torch.randn(1, 80, 80, 32, device=DEVICE, requires_grad=True)
    mask = torch.ones(1, 80, device=DEVICE)
    mask[:, -7:] = 0
    pair_mask = mask[:, :, None] * mask[:, None, :]
    compiled = torch.compile(layer, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        s_e, z_e = layer(s, z, mask, pair_mask)
        s_c, z_c = compiled(s, z, mask, pair_mask)
    loss_e = s_e.float().square().mean() + z_e.float().square().mean()
    loss_c = s_c.float().square().mean() + z_c.float().square().mean()
    g_e = torch.autograd.grad(loss_e, [s, z])
    g_c = torch.autograd.grad(loss_c, [s, z])
    torch.testing.assert_close(z_c, z_e, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(s_c, s_e, rtol=3e-2, atol=3e-2)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)
