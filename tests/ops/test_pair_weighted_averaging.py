"""foldops.ops.pair_weighted_averaging: every backend against float64.

The torch backend runs in one shot with autograd and in head groups / MSA-row chunks
at inference; both paths are checked. The triton backend runs under the interpreter
here (small sizes); tests/kernels/test_pair_weighted_averaging_kernel.py has the
GPU-sized ones.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from foldops import budget as chunk_budget
from foldops.backends import BackendUnavailableError
from foldops.device import autocast
from foldops.device import kernel_support
from foldops.ops import pair_weighted_averaging, pair_weighted_averaging_core
from foldops.reference.pair_weighted_averaging import pair_weighted_averaging as reference
from foldops.testing import assert_within_baseline, check_against_float64, forward_backward, leaves


LOW = (torch.float32, torch.bfloat16, torch.float16)
TRITON = kernel_support("cpu") is None and kernel_support("cpu", explicit=True) is None
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton interpreter unavailable")

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
    with pytest.raises(BackendUnavailableError, match=r"'triton' cannot run .*dtype torch.float64"):
        pair_weighted_averaging(v, logits, mask, backend="triton")
    with pytest.raises(ValueError, match=r"gate: expected shape"):
        pair_weighted_averaging(v, logits, mask, gate=v[:, :1])
    with pytest.raises(TypeError, match=r"gate: expected dtype torch.float64"):
        pair_weighted_averaging(v, logits, mask, gate=v.float())
    with pytest.raises(ValueError, match=r"msa_mask: expected shape \(1, 3, 5\)"):
        pair_weighted_averaging(v, logits, mask, msa_mask=mask)
    with pytest.raises(ValueError, match=r"b: expected shape \(1, 5, 5, 2\)"):
        pair_weighted_averaging_core(v, logits, v, mask)


# ---- gate and padded MSA rows (all backends; triton under the interpreter) ----

# (B, S, N, H, D): awkward S, N (primes, 1), H 1/3, D 4/8/12.
# N = 1 with enough outputs (96) that the max error is not one lucky rounding.
GATED_SHAPES = [
    (1, 3, 1, 2, 16),
    (2, 3, 13, 3, 8),
    (1, 5, 18, 1, 12),
    (2, 7, 5, 2, 8),
]


def make_gated(batch, rows, n, heads, dim):
    """fp64 v, logits [B, H, N, N] view, gate; pair mask as make_inputs; msa_mask pads
    the last MSA row (S > 1) and ~20% of the other entries."""
    v, logits, mask = make_inputs(batch, rows, n, heads, dim)
    gate = 2 * torch.randn(batch, rows, n, heads, dim, dtype=torch.float64)
    msa_mask = torch.rand(batch, rows, n) > 0.2
    if rows > 1:
        msa_mask[:, -1] = False
    return v, logits, gate, mask, msa_mask


def check_gated(backend, dtype, inputs):
    v, logits, gate, mask, msa_mask = inputs
    return check_against_float64(
        lambda v, l, g: pair_weighted_averaging(v, l, mask, gate=g, msa_mask=msa_mask, backend=backend),
        lambda v, l, g: reference(v, l, mask, g, msa_mask),
        (v, logits, gate), dtype, names=("v", "logits", "gate"), compare_dtype=dtype,
    )


@pytest.mark.parametrize("shape", GATED_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", LOW + (torch.float64,), ids=str)
@pytest.mark.parametrize("backend", ("torch", "reference", pytest.param("triton", marks=needs_triton)))
def test_gated_forward_and_grads_vs_float64(backend, dtype, shape):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the kernel takes fp16/bf16/fp32")
    result = check_gated(backend, dtype, make_gated(*shape))
    for t in (*result.outputs, *result.grads):
        assert torch.isfinite(t).all()


@needs_triton
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_triton_without_gate_or_masks(dtype):
    inputs = make_inputs(2, 3, 13, 3, 8)
    mask = inputs[2]
    check_against_fp64(lambda v, l: pair_weighted_averaging(v, l, mask, backend="triton"), inputs, dtype)
    inputs = make_inputs(1, 4, 7, 2, 8, masked=False)
    check_against_fp64(lambda v, l: pair_weighted_averaging(v, l, None, backend="triton"), inputs, dtype,
                       logits_dtype=torch.float32)


@needs_triton
@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_padding_gives_zeros_never_nan(backend):
    """Padded residues (rows and keys) and padded MSA rows: finite outputs and
    gradients, zeros where a row has no kept key, no gradient reaching padding, even
    with NaN in the padded values."""
    batch, rows, n, heads, dim = 2, 4, 11, 2, 8
    v, logits, gate, _, _ = make_gated(batch, rows, n, heads, dim)
    residues = torch.ones(batch, n, dtype=torch.bool)
    residues[0, 7:] = False  # element 0 has 7 residues
    residues[1] = False  # element 1 is all padding
    pair = residues[:, :, None] & residues[:, None, :]
    msa_mask = residues[:, None, :].expand(batch, rows, n).clone()
    msa_mask[0, 2:] = False  # element 0 has 2 MSA rows
    v = v.masked_fill(~residues[:, None, :, None, None], float("nan"))  # padding holds garbage
    low = leaves((v, logits, gate), torch.bfloat16)
    out = pair_weighted_averaging(*low[:2], pair, gate=low[2], msa_mask=msa_mask, backend=backend)
    grad = torch.randn_like(out)
    out.backward(grad)
    for t in (out, *(x.grad for x in low)):
        assert torch.isfinite(t).all()
    assert (out.transpose(1, 2)[~residues] == 0).all()
    assert (low[0].grad.transpose(1, 2)[~residues] == 0).all()
    assert (low[0].grad[0, 2:] == 0).all()  # padded MSA rows' values get no gradient
    assert (low[1].grad.permute(0, 2, 3, 1)[~pair] == 0).all()


@needs_triton
def test_core_api_matches_the_functional():
    v, logits, gate, _, msa_mask = make_gated(2, 3, 9, 2, 8)
    bias = logits.permute(0, 2, 3, 1)  # [B, N, N, H]
    residues = torch.rand(2, 9) > 0.3
    pair = residues[:, :, None] & residues[:, None, :]
    expected = reference(v, logits, pair, gate, msa_mask)
    for backend in ("reference", "torch", "triton"):
        dtype = torch.float32 if backend == "triton" else torch.float64
        out = pair_weighted_averaging_core(v.to(dtype), bias.to(dtype), gate.to(dtype), residues.float(),
                                           msa_mask=msa_mask, backend=backend)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    out = pair_weighted_averaging_core(v, bias, gate, pair, msa_mask=msa_mask, backend="torch")
    torch.testing.assert_close(out, expected)


def test_core_api_docstring_example():
    import doctest

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(pair_weighted_averaging_core, "pair_weighted_averaging_core"):
        runner.run(test)
    assert runner.failures == 0


def test_size_rules_get_tokens_and_mode(monkeypatch):
    """auto hands the size rules n = N (tokens) and whether autograd records the call."""
    from foldops import backend_rules

    seen = []
    original = backend_rules.preferred
    monkeypatch.setattr(backend_rules, "preferred",
                        lambda op, **ctx: seen.append((op, ctx["n"], ctx["training"])) or original(op, **ctx))
    v, logits, mask = make_inputs(1, 3, 7, 2, 4)
    gate = torch.randn_like(v, requires_grad=True)
    pair_weighted_averaging(v, logits, mask, gate=gate)
    pair_weighted_averaging(v, logits, mask)
    with torch.no_grad():
        pair_weighted_averaging(v, logits, mask, gate=gate)
    op = "pair_weighted_averaging"
    assert seen == [(op, 7, True), (op, 7, False), (op, 7, False)]
