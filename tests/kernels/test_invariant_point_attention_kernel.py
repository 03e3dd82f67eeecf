"""Triton invariant point attention against the float64 reference.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set in
conftest) at small sizes (a 17-residue case crosses the interpreter's 16-key tile);
tests marked ``gpu`` run the compiled kernels at real sizes. Every case checks the
three outputs and the gradients of all nine inputs with
``foldops.testing.assert_within_baseline``: error against fp64 at most 2x the error of
plain PyTorch (the reference) in the same dtype, plus the dtype's floor.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from foldops.device import kernel_support
from foldops.ops import invariant_point_attention as ipa
from foldops.reference.invariant_point_attention import invariant_point_attention as reference
from foldops.testing import DEFAULT_REL_FLOOR, assert_within_baseline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from test_invariant_point_attention import check_non_finite_padding_is_inert  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(kernel_support(DEVICE) is not None, reason="Triton kernels cannot run here")

NAMES = ("q", "k", "v", "q_pts", "k_pts", "v_pts", "bias", "point_weights", "z")


def make_inputs(batch, n, heads, c, pq, pv, cz, *, masked=True, device=DEVICE):
    """fp64 inputs shaped as the layers make them: q/k/v and the points are views of
    one projection each (non-contiguous), the bias a permuted Linear output. Points
    spread ~3 Å around a centre 20 Å from the origin. The mask pads ~30% of residues,
    never the first; for B > 1 the second item keeps a single residue."""
    g = torch.Generator().manual_seed(1234 + n)
    f64 = dict(dtype=torch.float64)
    qkv = torch.randn(batch, n, heads, 3, c, generator=g, **f64).unbind(3)
    pts = (3 * torch.randn(batch, n, heads, 2 * pq + pv, 3, generator=g, **f64) + 20)
    q_pts, k_pts, v_pts = pts.split([pq, pq, pv], dim=3)
    bias = torch.randn(batch, n, n, heads, generator=g, **f64).permute(0, 3, 1, 2)
    weights = torch.rand(heads, generator=g, **f64) * 0.2 + 0.05
    z = torch.randn(batch, n, n, cz, generator=g, **f64)
    mask = None
    if masked:
        mask = torch.rand(batch, n, generator=g) > 0.3
        mask[:, 0] = True
        if batch > 1:
            mask[1] = False
            mask[1, n // 2] = True
        mask = mask.to(device)
    inputs = [t.to(device) for t in (*qkv, q_pts, k_pts, v_pts, bias, weights, z)]
    return inputs, mask


def _leaves(inputs, dtype, point_dtype, z_dtype=None):
    out = []
    for name, t in zip(NAMES, inputs):
        target = point_dtype if name in ("q_pts", "k_pts", "v_pts", "point_weights") else dtype
        if name == "z" and z_dtype is not None and dtype != torch.float64:
            target = z_dtype
        leaf = torch.empty_strided(t.shape, t.stride(), dtype=target, device=t.device).copy_(t)
        out.append(leaf.requires_grad_())
    return out


def _run(fn, inputs, mask, grads_out):
    outs = fn(*inputs, mask)
    loss = sum((o.double() * g).sum() for o, g in zip(outs, grads_out))
    return outs, torch.autograd.grad(loss, inputs)


def check_case(shape, dtype, point_dtype=torch.float32, masked=True, scale=0.3, z_dtype=None):
    inputs, mask = make_inputs(*shape, masked=masked)
    exact_in = _leaves(inputs, torch.float64, torch.float64)
    grads_out = [torch.randn_like(o) for o in reference(*exact_in, mask, scale)]
    exact, exact_g = _run(lambda *a: reference(*a, scale), exact_in, mask, grads_out)
    base, base_g = _run(lambda *a: reference(*a, scale), _leaves(inputs, dtype, point_dtype, z_dtype), mask,
                        grads_out)
    fast_in = _leaves(inputs, dtype, point_dtype, z_dtype)
    fast, fast_g = _run(lambda *a: ipa(*a, scale=scale, backend="triton"), fast_in, mask, grads_out)
    for name, f, e, b in zip(("out", "out_pts", "out_pair"), fast, exact, base):
        assert f.dtype == b.dtype and f.shape == e.shape, name
        assert_within_baseline(name, f, e, b, dtype=dtype)
    # A gradient that is exactly zero in exact arithmetic (one residue: the softmax of a
    # single key does not depend on q, k, the points or the bias) has no scale of its own:
    # plain PyTorch gets 0 there by the structure of its softmax backward, the kernels
    # get dS = P (dP - delta) at rounding level, delta = rowsum(dO * O) being summed
    # apart from dP. Its floor: the largest gradient times the largest factor dS is
    # multiplied by (1, or the squared point distance for the point weights).
    largest = max(e.abs().max().item() for e in exact_g)
    dist2_pairs = (exact_in[3][:, :, None] - exact_in[4][:, None]).square().sum((-1, -2))  # [B, N, N, H]
    dist2 = dist2_pairs.max().item()
    # The point weights' gradient is one sum per head over every (i, j) pair,
    # -1/2 sum dS dist2, of terms that cancel: its rounding error scales with the sum of
    # the terms' magnitudes (dS is the bias gradient), not with the result, and the 2x
    # rule against one fp32 baseline is luck there (the baseline's error varies 10x over
    # seeds). Its floor: one fp32 ulp of that magnitude sum (the points and this sum are
    # fp32 whatever q's dtype), the error of rounding each term once.
    d_bias = exact_g[NAMES.index("bias")]  # [B, H, N, N]
    term_sum = 0.5 * (d_bias.abs() * dist2_pairs.permute(0, 3, 1, 2)).sum((0, 2, 3)).max().item()
    for name, f, e, b, x in zip(NAMES, fast_g, exact_g, base_g, fast_in):
        assert f.dtype == x.dtype, name
        if e.abs().max().item() == 0:
            assert f.abs().max().item() <= DEFAULT_REL_FLOOR[dtype] * largest * max(1.0, dist2), name
            continue
        rel_floor = None
        if name == "point_weights":
            scale_e = e.abs().max().item()
            rel_floor = max(DEFAULT_REL_FLOOR[dtype], torch.finfo(torch.float32).eps * term_sum / scale_e)
        assert_within_baseline(f"d{name}", f, e, b, dtype=dtype, rel_floor=rel_floor)
    if mask is not None:  # padded rows: zero outputs
        for f in fast:
            assert (f[~mask] == 0).all()


# (B, N, H, C, Pq, Pv, Cz): one residue; odd sizes in one tile; 17 keys cross the 16-key tile.
INTERPRETER_CASES = [
    pytest.param((1, 1, 1, 4, 1, 1, 3), torch.float32, id="n1-fp32"),
    pytest.param((2, 5, 3, 5, 4, 6, 7), torch.float32, id="n5-b2-fp32"),
    pytest.param((1, 17, 2, 16, 3, 8, 5), torch.float32, id="n17-fp32"),
    # Batch 2, 2 heads, 17 residues: two key / column blocks per (b, h), the last partial.
    pytest.param((2, 17, 2, 4, 1, 1, 2), torch.float32, id="n17-b2-fp32"),
    pytest.param((1, 7, 2, 8, 2, 3, 4), torch.bfloat16, id="n7-bf16"),
    pytest.param((1, 7, 2, 8, 2, 3, 4), torch.float16, id="n7-fp16"),
]


@pytest.mark.parametrize("shape,dtype", INTERPRETER_CASES)
def test_kernel_against_float64(shape, dtype):
    check_case(shape, dtype)


def test_kernel_unmasked_and_16bit_points():
    check_case((1, 6, 2, 4, 2, 2, 3), torch.bfloat16, point_dtype=torch.bfloat16, masked=False)


def test_kernel_fp32_pair_values_beside_bf16():
    """A layer under autocast: bf16 q, k, v and bias, fp32 points and z."""
    check_case((1, 6, 2, 4, 2, 2, 3), torch.bfloat16, z_dtype=torch.float32)


def test_kernel_padded_rows_pass_no_gradient():
    """Padded query rows: zero outputs, and a gradient arriving on them changes no input's
    gradient (bitwise the same as with it zeroed), as the torch backend (tests/ops)."""
    inputs, mask = make_inputs(2, 5, 2, 4, 2, 3, 3)
    pad = ~mask
    assert pad.any()

    def run(zero_padded_grads):
        ins = [t.float().detach().requires_grad_() for t in inputs]
        outs = ipa(*ins, mask, backend="triton")
        g = torch.Generator().manual_seed(3)
        loss = 0
        for o in outs:
            w = torch.randn(o.shape, generator=g).to(device=o.device, dtype=o.dtype)
            if zero_padded_grads:
                w[pad] = 0
            loss = loss + (o * w).sum()
        return outs, torch.autograd.grad(loss, ins)

    outs, grads = run(False)
    _, want = run(True)
    for o in outs:
        assert (o[pad] == 0).all()
    for name, g, w in zip(NAMES, grads, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", [n for n in NAMES if n != "point_weights"])
def test_kernel_non_finite_values_at_padded_residues_do_not_leak(name, value):
    """NaN or inf at padded residues in any input: the kernels do not read them (masked
    loads), so no output or gradient changes (0 * NaN would be NaN)."""
    inputs, mask = make_inputs(2, 6, 2, 3, 2, 2, 3)
    check_non_finite_padding_is_inert("triton", [t.float() for t in inputs], mask, name, value)


def test_kernel_non_finite_padding_across_key_tiles():
    """All inputs NaN at padded residues, 17 residues: more than one key tile of the
    interpreter (16) and query tile of the column kernel."""
    inputs, mask = make_inputs(2, 17, 2, 3, 2, 2, 3)
    mask[0, 16] = False  # a padded residue in the second tile
    check_non_finite_padding_is_inert("triton", [t.float() for t in inputs], mask,
                                      [n for n in NAMES if n != "point_weights"], float("nan"))


def test_opcheck():
    importlib.import_module("foldops.kernels.invariant_point_attention")  # registers the ops

    inputs, mask = make_inputs(1, 3, 1, 4, 1, 1, 3)
    q, k, v, q_pts, k_pts, v_pts, bias, w, z = (t.float().contiguous() for t in inputs)
    points = [t.flatten(-2) for t in (q_pts, k_pts, v_pts)]
    args = [t.requires_grad_() for t in (q, k, v, *points, w, bias, z)]
    torch.library.opcheck(torch.ops.foldops.ipa_fwd.default, (*args, mask, 0.3))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [256, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_kernel_gpu_real_sizes(n, dtype):
    """The benchmark's shape: 12 heads of 16 channels, 4 / 8 points, 128 pair channels."""
    check_case((1, n, 12, 16, 4, 8, 128), dtype)


@pytest.mark.gpu
def test_kernel_gpu_batch_and_multiflow_widths():
    """FrameFlow/Multiflow-like widths: 8 qk points (D = 25), 12 value points (E = 36), Cz // 4 = 32."""
    check_case((2, 193, 8, 32, 8, 12, 32), torch.bfloat16)
