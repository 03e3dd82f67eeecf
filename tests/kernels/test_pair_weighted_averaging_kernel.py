"""The pair-weighted averaging Triton kernels (foldops.kernels.pair_weighted_averaging).

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set in
tests/conftest.py) at small sizes; tests marked ``gpu`` run the compiled kernels at
real sizes (Boltz-2: 8 heads of 32, S up to 1024) against float64.
"""

from __future__ import annotations

import pytest
import torch

from foldops.device import kernel_support
from foldops.reference.pair_weighted_averaging import pair_weighted_averaging as reference
from foldops.testing import assert_deterministic, check_against_float64

pytestmark = pytest.mark.skipif(
    kernel_support("cpu" if not torch.cuda.is_available() else "cuda") is not None,
    reason="Triton kernels cannot run here",
)

if pytestmark.args[0]:  # pragma: no cover - no Triton
    kernel = None
else:
    from foldops.kernels import pair_weighted_averaging as kernel
    from foldops.kernels.pair_weighted_averaging import configs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(batch, rows, n, heads, dim, *, layout="contiguous", masks=True, device=DEVICE, seed=0):
    """fp64 v, logits [B, H, N, N] (a view of a Linear's [B, N, N, H] output), gate;
    residue padding (element 0 loses its last third of tokens) as a pair mask, and MSA
    padding (element 0 keeps half of its rows). ``layout="projection"``: v and g are
    views of one [B, S, N, 2, H, C] projection (non-contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "projection":
        proj = torch.randn(batch, rows, n, 2, heads, dim, generator=gen, dtype=torch.float64)
        v, gate = proj[:, :, :, 0], 2 * proj[:, :, :, 1]
    else:
        v = torch.randn(batch, rows, n, heads, dim, generator=gen, dtype=torch.float64)
        gate = 2 * torch.randn(batch, rows, n, heads, dim, generator=gen, dtype=torch.float64)
    logits = (2 * torch.randn(batch, n, n, heads, generator=gen, dtype=torch.float64)).permute(0, 3, 1, 2)
    mask = msa_mask = None
    if masks:
        residues = torch.ones(batch, n, dtype=torch.bool)
        residues[0, n - n // 3:] = False
        mask = residues[:, :, None] & residues[:, None, :]
        mask &= torch.rand(batch, n, n, generator=gen) > 0.1
        msa_mask = residues[:, None, :].expand(batch, rows, n).clone()
        msa_mask[0, (rows + 1) // 2:] = False
        mask, msa_mask = mask.to(device), msa_mask.to(device)
    return [t.to(device) for t in (v, logits, gate)], mask, msa_mask


def check_case(batch, rows, n, heads, dim, dtype, layout="contiguous", masks=True):
    (v, logits, gate), mask, msa_mask = make_case(batch, rows, n, heads, dim, layout=layout, masks=masks)
    result = check_against_float64(
        lambda v, l, g: kernel.pair_weighted_averaging(v, l, g, mask, msa_mask),
        lambda v, l, g: reference(v, l, mask, g, msa_mask),
        (v, logits, gate), dtype, names=("v", "logits", "gate"), compare_dtype=dtype,
    )
    for t in (*result.outputs, *result.grads):
        assert torch.isfinite(t).all()


# Interpreter: small sizes that still cross the 16-wide interpreter tiles ---------------

@pytest.mark.parametrize("dtype", configs.DTYPES if kernel else (), ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 17, 1, 8), (2, 3, 5, 2, 24)], ids=("n17-c8", "s3-c24"))
def test_matches_reference(shape, dtype):
    check_case(*shape, dtype, layout="projection")


def test_without_masks():
    check_case(1, 3, 19, 2, 8, torch.bfloat16, masks=False)


def test_gate_none_is_the_plain_average():
    (v, logits, _), mask, _ = make_case(1, 3, 11, 2, 8)
    check_against_float64(
        lambda v, l: kernel.pair_weighted_averaging(v, l, None, mask, None),
        lambda v, l: reference(v, l, mask), (v, logits), torch.float32, names=("v", "logits"),
    )


def test_deterministic():
    (v, logits, gate), mask, msa_mask = make_case(1, 3, 18, 2, 8)
    inputs = [t.float().requires_grad_() for t in (v, logits, gate)]
    assert_deterministic(lambda v, l, g: kernel.pair_weighted_averaging(v, l, g, mask, msa_mask), inputs,
                         names=("v", "logits", "gate"))


def test_dw_column_splits_agree(monkeypatch):
    """dW summed over column splits (what small N on a GPU takes) equals one split."""
    from foldops.kernels.pair_weighted_averaging import launch

    (v, logits, gate), mask, msa_mask = make_case(1, 5, 9, 1, 8)
    inputs = [t.float() for t in (v, logits, gate)]
    out, w = launch.pair_weighted_averaging_forward(*inputs, mask, msa_mask)
    grad = torch.randn_like(out)
    results = {}
    for splits in (1, 3):
        monkeypatch.setattr(launch, "dw_splits", lambda *a, splits=splits: splits)
        results[splits] = launch.pair_weighted_averaging_backward(grad, *inputs, mask, msa_mask, w)
    for a, b in zip(results[1], results[3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_dw_column_splits_with_batch_and_heads(monkeypatch, dtype):
    """Batch 2, 2 heads through the dW partial sums [splits, B, H, N, N]: 5 x 8 = 40
    (s, c) columns in 3 splits of 16, 16, 8 (the last has fewer blocks), against fp64."""
    from foldops.kernels.pair_weighted_averaging import launch

    calls = []
    monkeypatch.setattr(launch, "dw_splits", lambda *a: calls.append(a) or 3)
    check_case(2, 5, 9, 2, 8, dtype)
    assert calls and all(a[1] == 40 for a in calls)


@pytest.mark.parametrize("masks", [True, False], ids=("masks", "no-masks"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_eager_path_equals_registered_ops(monkeypatch, masks, dtype):
    """Eager calls (autograd.Function over the launchers, or the forward launcher alone
    without autograd) give bit-identical outputs and gradients to the custom ops."""
    from foldops.kernels.pair_weighted_averaging import op

    (v, logits, gate), mask, msa_mask = make_case(1, 3, 7, 2, 8, masks=masks)
    inputs = [t.to(dtype) for t in (v, logits, gate)]
    grad = torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    results = {}
    for registered in (False, True):
        monkeypatch.setattr(op, "_use_registered_ops", lambda _t, registered=registered: registered)
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = kernel.pair_weighted_averaging(leaves[0], leaves[1], leaves[2], mask, msa_mask)
        with torch.no_grad():
            inference = kernel.pair_weighted_averaging(*inputs, mask, msa_mask)
        results[registered] = (out.detach(), inference, *torch.autograd.grad(out, leaves, grad))
    for a, b in zip(results[False], results[True]):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_head_dim_limit():
    v = torch.randn(1, 1, 3, 1, configs.MAX_HEAD_DIM + 1, device=DEVICE)
    logits = torch.randn(1, 1, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        kernel.pair_weighted_averaging_forward(v, logits, v, None, None)


def test_opcheck():
    (v, logits, gate), mask, msa_mask = make_case(1, 2, 5, 1, 8)
    args = [t.float().requires_grad_() for t in (v, logits, gate)]
    torch.library.opcheck(torch.ops.foldops.pair_weighted_averaging_fwd.default, (*args, mask, msa_mask, False))
    torch.library.opcheck(torch.ops.foldops.pair_weighted_averaging_fwd.default, (args[0], args[1], None, None, None, False))
    out, w = torch.ops.foldops.pair_weighted_averaging_fwd(*args, mask, msa_mask, False)
    torch.library.opcheck(
        torch.ops.foldops.pair_weighted_averaging_bwd.default,
        (torch.randn_like(out), *(a.detach() for a in args), mask, msa_mask, w, False),
    )


# GPU: compiled kernels at real sizes ----------------------------------------------------

GPU_CASES = [
    pytest.param(1, 64, 128, 8, 32, torch.bfloat16, "projection", id="s64-n128-bf16"),
    pytest.param(1, 33, 257, 8, 32, torch.bfloat16, "contiguous", id="s33-n257-bf16"),
    pytest.param(2, 17, 200, 2, 8, torch.float16, "projection", id="s17-n200-fp16-c8"),
    pytest.param(1, 9, 191, 3, 24, torch.bfloat16, "contiguous", id="s9-n191-bf16-c24"),
    pytest.param(1, 16, 160, 2, 64, torch.float16, "projection", id="s16-n160-fp16-c64"),
    pytest.param(1, 13, 161, 2, 32, torch.float32, "projection", id="s13-n161-fp32"),
    pytest.param(1, 1, 300, 4, 16, torch.float32, "contiguous", id="s1-n300-fp32-c16"),
    pytest.param(1, 256, 384, 8, 32, torch.bfloat16, "projection", id="s256-n384-bf16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("batch, rows, n, heads, dim, dtype, layout", GPU_CASES)
def test_gpu_matches_reference(batch, rows, n, heads, dim, dtype, layout):
    check_case(batch, rows, n, heads, dim, dtype, layout)


@pytest.mark.gpu
def test_gpu_deterministic_at_boltz_sizes():
    (v, logits, gate), mask, msa_mask = make_case(1, 128, 256, 8, 32)
    inputs = [t.bfloat16().requires_grad_() for t in (v, logits, gate)]
    assert_deterministic(lambda v, l, g: kernel.pair_weighted_averaging(v, l, g, mask, msa_mask), inputs,
                         names=("v", "logits", "gate"))


@pytest.mark.gpu
def test_gpu_public_op_picks_the_kernel():
    from foldops import backends

    assert backends.select("pair_weighted_averaging", "auto", device=torch.device("cuda"),
                           dtype=torch.bfloat16, head_dim=32).name == "triton"
