"""foldops.ops.invariant_point_attention: the ``reference`` and ``torch`` backends against float64.

The ``triton`` backend has its own tests next to the kernel (tests/kernels); here it
appears in the selection and error tests only.
"""

import pytest
import torch

from foldops import backends
from foldops.device import kernel_support
from foldops.ops import invariant_point_attention as ipa
from foldops.reference.invariant_point_attention import invariant_point_attention as reference
from foldops.testing import assert_within_baseline

NAMES = ("q", "k", "v", "q_pts", "k_pts", "v_pts", "bias", "point_weights", "z")

# (B, N, H, C, Pq, Pv, Cz): 1, primes, B = 2, odd channel counts.
SHAPES = [
    (1, 1, 1, 4, 1, 1, 3),
    (2, 13, 3, 5, 4, 6, 7),
    (1, 33, 2, 16, 3, 8, 5),
]


def make_inputs(batch, n, heads, c, pq, pv, cz, *, masked=True, offset=10.0):
    """fp64 inputs; points spread ~3 around a centre ``offset`` away from the origin;
    the mask pads ~30% of residues (never the first) and, for B > 1, all of item 1
    but one residue."""
    q, k, v = (torch.randn(batch, n, heads, c, dtype=torch.float64) for _ in range(3))
    q_pts, k_pts = (3 * torch.randn(batch, n, heads, pq, 3, dtype=torch.float64) + offset for _ in range(2))
    v_pts = 3 * torch.randn(batch, n, heads, pv, 3, dtype=torch.float64) + offset
    bias = torch.randn(batch, heads, n, n, dtype=torch.float64)
    weights = torch.rand(heads, dtype=torch.float64) * 0.2 + 0.05
    z = torch.randn(batch, n, n, cz, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(batch, n) > 0.3
        mask[:, 0] = True
        if batch > 1:
            mask[1] = False
            mask[1, n // 2] = True
    return [q, k, v, q_pts, k_pts, v_pts, bias, weights, z], mask


def _cast(inputs, dtype, point_dtype):
    out = []
    for name, t in zip(NAMES, inputs):
        target = point_dtype if name.endswith("_pts") or name == "point_weights" else dtype
        out.append(t.to(target).detach().requires_grad_())
    return out


def _run(fn, inputs, mask, grads_out, **kw):
    outs = fn(*inputs, mask, **kw)
    loss = sum((o.double() * g).sum() for o, g in zip(outs, grads_out))
    gs = torch.autograd.grad(loss, inputs, allow_unused=True)
    return outs, gs


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "backend,dtype,point_dtype",
    [("torch", torch.float32, torch.float32), ("torch", torch.bfloat16, torch.float32),
     ("torch", torch.float16, torch.float16), ("torch", torch.float64, torch.float64),
     ("reference", torch.bfloat16, torch.float32)],
    ids=["torch-fp32", "torch-bf16-fp32pts", "torch-fp16", "torch-fp64", "reference-bf16-fp32pts"],
)
def test_backend_against_float64(shape, backend, dtype, point_dtype):
    inputs, mask = make_inputs(*shape)
    exact_in = _cast(inputs, torch.float64, torch.float64)
    exact_out = reference(*exact_in, mask, scale=0.3)
    grads_out = [torch.randn_like(o) for o in exact_out]
    exact, exact_g = _run(lambda *a, **k: reference(*a, scale=0.3), exact_in, mask, grads_out)
    low_in = _cast(inputs, dtype, point_dtype)
    base, base_g = _run(lambda *a, **k: reference(*a, scale=0.3), low_in, mask, grads_out)
    fast_in = _cast(inputs, dtype, point_dtype)
    fast, fast_g = _run(lambda *a, **k: ipa(*a, scale=0.3, backend=backend), fast_in, mask, grads_out)
    for name, f, e, b in zip(("out", "out_pts", "out_pair"), fast, exact, base):
        assert f.dtype == b.dtype and f.shape == e.shape
        assert_within_baseline(name, f, e, b, dtype=dtype)
    for name, f, e, b in zip(NAMES, fast_g, exact_g, base_g):
        assert_within_baseline(f"d{name}", f, e, b, dtype=dtype)


def protein_like_inputs(batch, n, heads, c, pq, pv, cz, *, offset, spread, seed=0):
    """fp64 inputs shaped like a protein far from the origin: residues spread ``spread``
    around a centre ``offset`` away, each residue's points within ~1.5 of it (so
    attention goes to nearby points, whose squared distances are far smaller than
    the cloud's squared radius), ~20% padding."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g)

    q, k, v = (rand(batch, n, heads, c) for _ in range(3))
    centre = offset * torch.nn.functional.normalize(rand(batch, 1, 1, 1, 3), dim=-1)
    residues = spread * rand(batch, n, 1, 1, 3) + centre
    q_pts, k_pts = (1.5 * rand(batch, n, heads, pq, 3) + residues for _ in range(2))
    v_pts = 1.5 * rand(batch, n, heads, pv, 3) + residues
    bias = rand(batch, heads, n, n)
    weights = torch.rand(heads, dtype=torch.float64, generator=g) * 0.2 + 0.05
    z = rand(batch, n, n, cz)
    mask = torch.rand(batch, n, generator=g) > 0.2
    mask[:, 0] = True
    return [q, k, v, q_pts, k_pts, v_pts, bias, weights, z], mask


GEOMETRIES = [(50.0, 4.0), (100.0, 4.0), (0.0, 8.0)]  # (offset, spread)
TRITON_SPREAD_GAP = pytest.mark.xfail(strict=True, reason=(
    "known gap of the Triton kernel (interpreter): on a wide cloud near the origin its fp32 outputs and "
    "gradients are 2-15x the reference's error over seeds (its logits use coordinate differences; the "
    "gap is elsewhere, not found)"))
OFFSET_CASES = [("torch", geo) for geo in GEOMETRIES] + [("reference", geo) for geo in GEOMETRIES]
if kernel_support("cpu") is None:  # the Triton interpreter on CPU
    OFFSET_CASES += [pytest.param("triton", geo, marks=[TRITON_SPREAD_GAP] if geo[0] == 0.0 else [])
                     for geo in GEOMETRIES]


@pytest.mark.parametrize("backend,geometry", OFFSET_CASES, ids=lambda x: x if isinstance(x, str) else
                         "offset%g-spread%g" % x)
def test_protein_like_points_fp32(backend, geometry):
    """Every backend's fp32 outputs and gradients of all inputs on protein-like point
    clouds (points 50-100 from the origin, as real coordinates are; a wider cloud
    near the origin), within 2x the fp32 reference's error. Attention goes to nearby
    points, whose squared distances are far below the cloud's squared radius: the
    torch backend's expanded point term cancels terms of that radius (without its
    exact grid part, 6-37x the reference's error on the wide cloud)."""
    offset, spread = geometry
    inputs, mask = protein_like_inputs(2, 13, 3, 5, 4, 6, 7, offset=offset, spread=spread)
    exact_in = _cast(inputs, torch.float64, torch.float64)
    g = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(o.shape, dtype=torch.float64, generator=g) for o in reference(*exact_in, mask)]
    exact, exact_g = _run(lambda *a, **k: reference(*a, scale=0.3), exact_in, mask, grads_out)
    base, base_g = _run(lambda *a, **k: reference(*a, scale=0.3), _cast(inputs, torch.float32, torch.float32),
                        mask, grads_out)
    fast, fast_g = _run(lambda *a, **k: ipa(*a, scale=0.3, backend=backend),
                        _cast(inputs, torch.float32, torch.float32), mask, grads_out)
    for name, f, e, b in zip(("out", "out_pts", "out_pair"), fast, exact, base):
        assert_within_baseline(name, f, e, b, dtype=torch.float32)
    for name, f, e, b in zip(NAMES, fast_g, exact_g, base_g):
        assert_within_baseline(f"d{name}", f, e, b, dtype=torch.float32)


def test_padding_never_leaks():
    inputs, mask = make_inputs(2, 11, 3, 4, 2, 3, 5)
    out = ipa(*inputs, mask, backend="torch")
    changed = [t.clone() for t in inputs]
    pad = ~mask
    for i in (0, 1, 2, 3, 4, 5):  # per-residue inputs
        changed[i][pad] = 1e3 * torch.randn_like(changed[i][pad])
    changed[6] = changed[6] + 1e3 * (pad[:, None, None, :] | pad[:, None, :, None])
    changed[8] = changed[8] + 1e3 * (pad[:, None, :, None] | pad[:, :, None, None])
    for backend in ("torch", "reference"):
        again = ipa(*changed, mask, backend=backend)
        for a, b in zip(out, again):
            keep = mask.reshape(mask.shape + (1,) * (a.dim() - 2))
            torch.testing.assert_close(a * keep, b * keep, rtol=1e-10, atol=1e-10)
            assert (b[~mask] == 0).all()  # padded rows are zero


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_fully_padded_item_gives_zeros_not_nan(backend):
    inputs, _ = make_inputs(2, 5, 2, 4, 2, 2, 3, masked=False)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    inputs = [t.float().requires_grad_() for t in inputs]
    outs = ipa(*inputs, mask, backend=backend)
    sum(o.sum() for o in outs).backward()
    for o in outs:
        assert torch.isfinite(o).all() and (o[1] == 0).all()
    for t in inputs:
        assert torch.isfinite(t.grad).all()


def test_torch_chunks_match_one_shot_and_float_mask():
    inputs, mask = make_inputs(2, 17, 2, 4, 3, 2, 3)
    with torch.no_grad():
        whole = ipa(*inputs, mask, backend="torch", chunk_size=17)
        chunked = ipa(*inputs, mask.double(), backend="torch", chunk_size=4)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_noncontiguous_inputs():
    inputs, mask = make_inputs(1, 9, 3, 4, 2, 2, 3)
    strided = [torch.empty(t.shape[::-1], dtype=t.dtype).permute(*range(t.dim() - 1, -1, -1)).copy_(t)
               for t in inputs]
    assert not strided[0].is_contiguous()
    exact = reference(*inputs, mask, scale=0.25)
    got = ipa(*strided, mask, scale=0.25, backend="torch")
    for a, b in zip(got, exact):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_default_scale_is_openfold():
    inputs, mask = make_inputs(1, 6, 2, 12, 2, 2, 3)
    got = ipa(*inputs, mask, backend="reference")
    want = reference(*inputs, mask, scale=(1.0 / (3 * 12)) ** 0.5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "index,bad,match",
    [
        (1, lambda t: t[:, :, :, :-1], "k: expected shape"),
        (4, lambda t: t[:, :, :, :-1], "k_pts: expected shape"),
        (5, lambda t: t[..., :2], "v_pts: expected shape"),
        (6, lambda t: t[:, :1], "bias: expected shape"),
        (7, lambda t: t[:-1], "point_weights: expected shape"),
        (8, lambda t: t[:, :-1], "z: expected shape"),
        (3, lambda t: t.to(torch.float16), "k_pts: expected dtype"),
        (2, lambda t: t.float(), "v: expected dtype"),
    ],
)
def test_bad_inputs(index, bad, match):
    inputs, mask = make_inputs(1, 5, 2, 4, 2, 2, 3)
    inputs[index] = bad(inputs[index])
    with pytest.raises((ValueError, TypeError), match=match):
        ipa(*inputs, mask, backend="torch")


def test_bad_mask_and_backend():
    inputs, mask = make_inputs(1, 5, 2, 4, 2, 2, 3)
    with pytest.raises(ValueError, match=r"mask: expected shape \(1, 5\)"):
        ipa(*inputs, mask[:, :4], backend="torch")
    with pytest.raises(backends.BackendUnavailableError):
        ipa(*inputs, mask, backend="nope")
    with pytest.raises(backends.BackendUnavailableError, match="triton"):
        ipa(*inputs, mask, backend="triton")  # fp64: the kernel takes fp16/bf16/fp32


def test_auto_never_builds_displacements(monkeypatch):
    """auto on CPU is the torch backend: memory O(N^2 H), never O(N^2 H P 3)."""
    assert backends.select("invariant_point_attention", "auto", device=torch.device("cpu"),
                           dtype=torch.float32, sizes=(16, 4, 8, 128, 12)).name == "torch"
