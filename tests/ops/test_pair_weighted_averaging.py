"""foldops.ops.pair_weighted_averaging: the ``torch`` and ``reference`` backends against float64.

The torch backend runs in one shot with autograd and in head groups / MSA-row chunks
at inference; both paths are checked.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from foldops import budget as chunk_budget
from foldops.backends import BackendUnavailableError
from foldops.device import autocast
from foldops.ops import pair_weighted_averaging
from foldops.reference.pair_weighted_averaging import pair_weighted_averaging as reference
from foldops.testing import assert_within_baseline, check_against_float64, forward_backward, leaves


LOW = (torch.float32, torch.bfloat16, torch.float16)

# (B, S, N, H, D): N in 1, 2, 7, 13; S in 1, 3, 5; H 1/3; B = 2.
SHAPES = [
    (1, 1, 1, 1, 4),
    (2, 3, 2, 3, 8),
    (1, 5, 7, 1, 8),
    (2, 3, 13, 3, 4),
    (1, 1, 13, 3, 8),
    (2, 5, 7, 3, 16),
]


def shape_id(shape):
    return "x".join(map(str, shape))


def make_inputs(batch, rows, n, heads, dim, *, masked=True):
    """fp64 v and logits (a permuted view of [B, N, N, H], as layers pass it); the pair
    mask keeps ~70% of (i, j), always j = N-1, and fully masks row i = 0 (N > 1)."""
    v = torch.randn(batch, rows, n, heads, dim, dtype=torch.float64)
    logits = (2 * torch.randn(batch, n, n, heads, dtype=torch.float64)).permute(0, 3, 1, 2)
    mask = None
    if masked:
        mask = torch.rand(batch, n, n) > 0.3
        mask[..., -1] = True
        if n > 1:
            mask[:, 0] = False
    return v, logits, mask


def check_against_fp64(fn, inputs, dtype, logits_dtype=None):
    v, logits, mask = inputs
    fast = check_against_float64(
        fn, lambda v, l: reference(v, l, mask), (v, logits), (dtype, logits_dtype or dtype),
        names=("v", "logits"), compare_dtype=dtype,
    )
    return fast.outputs[0], fast.grads


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", LOW + (torch.float64,), ids=str)
@pytest.mark.parametrize("backend", ("torch", "reference"))
def test_forward_and_grads_vs_float64(backend, dtype, shape):
    inputs = make_inputs(*shape)
    mask = inputs[2]
    check_against_fp64(lambda v, l: pair_weighted_averaging(v, l, mask, backend=backend), inputs, dtype)


@pytest.mark.parametrize("backend", ("torch", "reference"))
def test_without_mask_and_fp32_logits(backend):
    inputs = make_inputs(2, 3, 7, 3, 8, masked=False)
    check_against_fp64(lambda v, l: pair_weighted_averaging(v, l, None, backend=backend), inputs, torch.float32)
    inputs = make_inputs(2, 3, 7, 3, 8)
    mask = inputs[2].float()  # Boltz passes float masks
    check_against_fp64(
        lambda v, l: pair_weighted_averaging(v, l, mask, backend=backend),
        inputs,
        torch.bfloat16,
        logits_dtype=torch.float32,
    )


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("chunk", (1, 2, None), ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("budget", (1, 10**9), ids=("one-head-groups", "all-heads"))
def test_inference_chunking(monkeypatch, budget, chunk, dtype):
    monkeypatch.setattr(chunk_budget, "CPU_BUDGET_BYTES", 4 * budget)  # fp32 elements
    v, logits, mask = make_inputs(2, 5, 7, 3, 8)
    low = (v.to(dtype), logits.to(dtype))
    with torch.no_grad():
        fast = pair_weighted_averaging(*low, mask, chunk_size=chunk, backend="torch")
    assert fast.dtype == dtype
    assert_within_baseline("out", fast, reference(v, logits, mask), reference(*low, mask), dtype=dtype)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fully_masked_rows_give_zeros_and_zero_grads(dtype):
    v, logits, mask = make_inputs(2, 3, 7, 3, 8)
    mask[1] = False  # a whole batch element padded
    low = (v.to(dtype), logits.to(dtype))
    grad_out = torch.randn(v.shape, dtype=torch.float64)
    (out,), (dv, dlogits), _ = forward_backward(
        lambda v, l: pair_weighted_averaging(v, l, mask, backend="torch"), leaves(low), [grad_out]
    )
    with torch.no_grad():
        out_infer = pair_weighted_averaging(*low, mask, backend="torch", chunk_size=1)
    for t in (out, dv, dlogits, out_infer):
        assert torch.isfinite(t).all()
    dead = ~mask.any(-1)  # [B, N] rows i with no kept key
    assert dead.sum() == 1 + 7  # row i = 0 of element 0, every row of element 1
    assert (out.transpose(1, 2)[dead] == 0).all()
    assert (out_infer.transpose(1, 2)[dead] == 0).all()
    # Masked (i, j) get no logit gradient; a key j masked for every i gets no value gradient.
    assert (dlogits.permute(0, 2, 3, 1)[~mask] == 0).all()
    never_used = ~mask.any(1)  # [B, N_j]
    assert (dv.transpose(1, 2)[never_used] == 0).all()


def test_masked_keys_do_not_leak():
    v, logits, mask = make_inputs(2, 3, 7, 3, 8)
    keep_j = mask.any(1)  # keys some row i keeps
    dirty_v = torch.where(keep_j[:, None, :, None, None], v, 1e4 * torch.randn_like(v))
    dirty_logits = torch.where(mask[:, None], logits, 1e4 * torch.randn_like(logits))
    for backend in ("torch", "reference"):
        clean = pair_weighted_averaging(v, logits, mask, backend=backend)
        dirty = pair_weighted_averaging(dirty_v, dirty_logits, mask, backend=backend)
        assert torch.equal(clean, dirty), backend


def test_non_contiguous_inputs():
    v, logits, mask = make_inputs(2, 5, 7, 3, 8)
    # v as the first half of a [.., 2 * H * D] projection (what the layer passes).
    vg = torch.cat([v.flatten(-2), torch.randn_like(v.flatten(-2))], dim=-1)
    v_view = vg[..., : 3 * 8].unflatten(-1, (3, 8))
    assert not v_view.is_contiguous() and not logits.is_contiguous()
    check_against_fp64(
        lambda v, l: pair_weighted_averaging(v, l, mask, backend="torch"), (v_view, logits, mask), torch.float32
    )
    with torch.no_grad():
        out = pair_weighted_averaging(v_view.float(), logits.float(), mask, chunk_size=2)
    assert_within_baseline(
        "out (inference)", out, reference(v, logits, mask), reference(v.float(), logits.float(), mask)
    )


def test_softmax_runs_in_fp32_under_autocast():
    v, logits, mask = make_inputs(1, 3, 13, 3, 8)
    with autocast(v, dtype=torch.bfloat16):
        out = pair_weighted_averaging(v.bfloat16(), logits.bfloat16(), mask)
    assert out.dtype == torch.bfloat16
    exact = reference(v, logits, mask)
    assert_within_baseline("out", out, exact, reference(v.bfloat16(), logits.bfloat16(), mask))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns (the output excluded by size)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append(t.numel())
        return out


def test_inference_temporaries_are_bounded(monkeypatch):
    monkeypatch.setattr(chunk_budget, "CPU_BUDGET_BYTES", 4 * 64 * 64)  # 64 * 64 fp32 elements
    batch, rows, n, heads, dim = 1, 16, 64, 4, 8
    v = torch.randn(batch, rows, n, heads, dim)
    logits = torch.randn(batch, heads, n, n)
    mask = torch.rand(batch, n, n) > 0.2
    probe = _LargestTensor()
    with torch.no_grad(), probe:
        out = pair_weighted_averaging(v, logits, mask, chunk_size=2)
    temporaries = [s for s in probe.sizes if s != out.numel()]
    # One head of weights at a time (N^2) and 2 MSA rows of one head of v (2 N D).
    assert max(temporaries) <= max(n * n, 2 * n * dim), max(temporaries)


def test_bad_inputs_name_the_argument():
    v, logits, mask = make_inputs(1, 3, 5, 2, 4)
    with pytest.raises(ValueError, match=r"v: expected shape"):
        pair_weighted_averaging(v[0], logits, mask)
    with pytest.raises(ValueError, match=r"logits: expected shape \(1, 2, 5, 5\), got \(1, 2, 5, 4\)"):
        pair_weighted_averaging(v, logits[..., :4], mask)
    with pytest.raises(TypeError, match=r"logits: expected dtype torch.float64 or torch.float32, got torch.float16"):
        pair_weighted_averaging(v, logits.half(), mask)
    with pytest.raises(TypeError, match=r"v: expected dtype in"):
        pair_weighted_averaging(v.int(), logits, mask)
    with pytest.raises(ValueError, match=r"mask: expected shape \(1, 5, 5\), got \(1, 5\)"):
        pair_weighted_averaging(v, logits, mask[:, 0])
    with pytest.raises(ValueError, match=r"logits: expected a tensor on cpu, got one on meta"):
        pair_weighted_averaging(v, logits.to("meta"), mask)
    with pytest.raises(ValueError, match=r"mask: expected a tensor on cpu, got one on meta"):
        pair_weighted_averaging(v, logits, mask.to("meta"))
    with pytest.raises(TypeError, match=r"mask: expected a torch.Tensor or None, got list"):
        pair_weighted_averaging(v, logits, [[True]])
    with pytest.raises(ValueError, match=r"chunk_size: expected a positive int"):
        pair_weighted_averaging(v, logits, mask, chunk_size=-1)
    with pytest.raises(BackendUnavailableError, match=r"has no backend 'triton'"):
        pair_weighted_averaging(v, logits, mask, backend="triton")
