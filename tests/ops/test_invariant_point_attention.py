"""foldops.ops.invariant_point_attention: the ``reference`` and ``torch`` backends against float64.

The ``triton`` backend has its own tests next to the kernel (tests/kernels); here it
appears in the selection and error tests only.
"""

import importlib

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
OFFSET_CASES = [("torch", geo) for geo in GEOMETRIES] + [("reference", geo) for geo in GEOMETRIES]
if kernel_support("cpu") is None:  # the Triton interpreter on CPU
    OFFSET_CASES += [("triton", geo) for geo in GEOMETRIES]


@pytest.mark.parametrize("backend,geometry", OFFSET_CASES, ids=lambda x: x if isinstance(x, str) else
                         "offset%g-spread%g" % x)
def test_protein_like_points_fp32(backend, geometry):
    """Every backend's fp32 outputs and gradients of all inputs on protein-like point
    clouds (points 50-100 from the origin, as real coordinates are; a wider cloud
    near the origin), within 2x the fp32 reference's error. Attention goes to nearby
    points, whose squared distances are far below the cloud's squared radius: the
    torch backend's expanded point term cancels terms of that radius (without its
    exact grid part, 6-37x the reference's error on the wide cloud). The Triton
    kernels weight value points relative to each query row's own, vp_j - vp_i: in
    global coordinates the backward's dP and delta = rowsum(dO * O), summed apart,
    each rounded terms of the radius that dS = P (dP - delta) then failed to cancel
    (2-15x the reference's error in the gradients on the wide cloud)."""
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
def test_padded_rows_are_zero_and_pass_no_gradient(backend):
    """Padded query rows of all three outputs are exactly zero, and a gradient arriving on
    them changes no input's gradient (bitwise the same as with it zeroed); fp64."""
    inputs, mask = make_inputs(2, 9, 3, 4, 2, 3, 5)
    pad = ~mask
    assert pad.any()

    def run(zero_padded_grads):
        ins = [t.clone().requires_grad_() for t in inputs]
        outs = ipa(*ins, mask, backend=backend)
        g = torch.Generator().manual_seed(3)
        loss = 0
        for o in outs:
            w = torch.randn(o.shape, dtype=o.dtype, generator=g)
            if zero_padded_grads:
                w[pad] = 0
            loss = loss + (o * w).sum()
        return [o.detach() for o in outs], torch.autograd.grad(loss, ins)

    outs, grads = run(False)
    _, want = run(True)
    for o in outs:
        assert (o[pad] == 0).all()
    for name, g, w in zip(NAMES, grads, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)


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


def test_compile_fullgraph_torch_backend_matches_eager():
    """torch.compile(fullgraph=True) of the op (torch backend) in training: outputs and
    the gradients of all nine inputs as in eager."""
    inputs, mask = make_inputs(2, 9, 2, 4, 3, 2, 5)
    grads_out = [torch.randn_like(o) for o in reference(*inputs, mask)]
    compiled = torch.compile(lambda *a: ipa(*a, backend="torch"), fullgraph=True, backend="aot_eager")
    eager, eager_g = _run(lambda *a: ipa(*a, backend="torch"), _cast(inputs, torch.float32, torch.float32), mask,
                          grads_out)
    got, got_g = _run(compiled, _cast(inputs, torch.float32, torch.float32), mask, grads_out)
    for name, a, b in zip(("out", "out_pts", "out_pair") + NAMES, (*got, *got_g), (*eager, *eager_g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


BACKENDS_ON_CPU = ["torch", "reference"] + (["triton"] if kernel_support("cpu") is None else [])


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("batch,n", [(2, 0), (0, 3)], ids=["n0", "b0"])
def test_empty_inputs_give_empty_outputs_and_gradients(backend, batch, n):
    inputs, mask = make_inputs(max(batch, 1), max(n, 1), 2, 4, 2, 3, 5)
    inputs = [t[:batch, :n] if i < 6 else t[:batch, :, :n, :n] if i == 6 else t if i == 7 else t[:batch, :n, :n]
              for i, t in enumerate(inputs)]
    inputs = [t.float().requires_grad_() for t in inputs]
    outs = ipa(*inputs, mask[:batch, :n], backend=backend)
    assert [tuple(o.shape) for o in outs] == [(batch, n, 2, 4), (batch, n, 2, 3, 3), (batch, n, 2, 5)]
    assert [o.dtype for o in outs] == [torch.float32] * 3
    grads = torch.autograd.grad(sum(o.sum() for o in outs), inputs)
    for t, g in zip(inputs, grads):
        assert g.shape == t.shape and (g == 0).all()


@pytest.mark.parametrize("backend", [b for b in BACKENDS_ON_CPU if b != "reference"])
@pytest.mark.parametrize("shape", [(1, 5, 2, 0, 2, 2, 3), (1, 5, 2, 4, 0, 2, 3), (1, 5, 2, 4, 2, 0, 3),
                                   (1, 5, 2, 4, 2, 2, 0)], ids=["c0", "pq0", "pv0", "cz0"])
def test_zero_width_operands(backend, shape):
    """No scalar channels, no query/key points, no value points or no pair channels:
    the other outputs and the gradients as the fp64 reference's (within 2x fp32's error).
    The point weights' gradient, H sums over all pairs whose rows cancel, is the noisy
    quantity of docs/ipa.md (0.1-10x plain PyTorch's error over seeds at this size, for
    either backend, zero widths or not); its accuracy is tested on protein-like clouds
    above and in the layer tests, here it is finite, and zero without query points."""
    inputs, mask = make_inputs(*shape)
    exact_in = _cast(inputs, torch.float64, torch.float64)
    grads_out = [torch.randn_like(o) for o in reference(*exact_in, mask, scale=0.3)]
    exact, exact_g = _run(lambda *a, **k: reference(*a, scale=0.3), exact_in, mask, grads_out)
    base, base_g = _run(lambda *a, **k: reference(*a, scale=0.3), _cast(inputs, torch.float32, torch.float32), mask,
                        grads_out)
    fast, fast_g = _run(lambda *a, **k: ipa(*a, scale=0.3, backend=backend), _cast(inputs, torch.float32, torch.float32),
                        mask, grads_out)
    for name, f, e, b in zip(("out", "out_pts", "out_pair") + NAMES, (*fast, *fast_g), (*exact, *exact_g),
                             (*base, *base_g)):
        if name == "point_weights":
            assert torch.isfinite(f).all() and (shape[4] > 0 or (f == 0).all())
            continue
        assert_within_baseline(name, f, e, b, dtype=torch.float32)


def _tf32(x):
    """``x`` (fp32) rounded to TF32's 10 mantissa bits, nearest even: what a TF32 matmul reads."""
    bits = x.contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


def _tf32_matmul(a, b):
    return torch.ops.aten.matmul(_tf32(a), _tf32(b)) if a.dtype == torch.float32 else torch.ops.aten.matmul(a, b)


def test_exact_term_survives_tf32(monkeypatch):
    """With TF32 matmuls (``allow_tf32`` / ``set_float32_matmul_precision("high")``, inputs
    rounded to 10 mantissa bits; emulated here on the CPU), the point term's exact part
    is still exact: only the integers ``qi`` and ``-2 ki`` (at most 11 significant bits)
    enter a matmul, the squared norms (here well above 2^11) are added after."""
    from foldops.ops.invariant_point_attention import _exact_product, point_operands

    inputs, mask = protein_like_inputs(2, 13, 3, 5, 4, 6, 7, offset=0.0, spread=8.0)
    q_pts, k_pts, weights = (inputs[i].float() for i in (3, 4, 7))
    qa, ka, qe, ke, qn, kn, factor = point_operands(q_pts, k_pts, weights, mask, torch.float32)
    assert torch.equal(_tf32(qe), qe) and torch.equal(_tf32(ke), ke)
    assert qn.max() >= 2**18 and not torch.equal(_tf32(qn), qn)  # the norms would be rounded
    qe, ke = qe.transpose(1, 2), ke.permute(0, 2, 3, 1)
    qn, kn = qn.transpose(1, 2)[..., None], kn.transpose(1, 2)[:, :, None]
    monkeypatch.setattr(torch, "matmul", _tf32_matmul)
    got = _exact_product(qe, ke, qn, kn)
    monkeypatch.undo()
    qi, ki = qe.double(), -0.5 * ke.double().transpose(-1, -2)
    want = (qi[:, :, :, None] - ki[:, :, None]).square().sum(-1)  # |qi - ki|^2 in fp64
    assert torch.equal(got.double(), want)


@pytest.mark.gpu
def test_exact_term_exact_under_tf32_gpu():
    """On the GPU with TF32 matmuls on (``set_float32_matmul_precision("high")``): the
    point term's exact part equals its fp64 value."""
    from foldops.ops.invariant_point_attention import _exact_product, point_operands

    inputs, mask = protein_like_inputs(2, 130, 3, 5, 4, 6, 7, offset=50.0, spread=4.0)
    q_pts, k_pts, weights = (inputs[i].float().to("cuda") for i in (3, 4, 7))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        _, _, qe, ke, qn, kn, _ = point_operands(q_pts, k_pts, weights, mask.to("cuda"), torch.float32)
        qe, ke = qe.transpose(1, 2), ke.permute(0, 2, 3, 1)
        got = _exact_product(qe, ke, qn.transpose(1, 2)[..., None], kn.transpose(1, 2)[:, :, None])
    finally:
        torch.set_float32_matmul_precision(previous)
    qi, ki = qe.double(), -0.5 * ke.double().transpose(-1, -2)
    assert torch.equal(got.double(), (qi[:, :, :, None] - ki[:, :, None]).square().sum(-1))


def test_selection_gets_size_and_mode(monkeypatch):
    """The op hands ``backends.select`` the problem size and the mode, so that size rules
    (``foldops.backend_rules``) can apply."""
    seen = []
    select = backends.select

    def spy(op, requested=None, **ctx):
        seen.append(ctx)
        return select(op, requested, **ctx)

    monkeypatch.setattr(backends, "select", spy)
    inputs, mask = make_inputs(1, 6, 2, 4, 2, 2, 3)
    with torch.no_grad():
        ipa(*inputs, mask, backend="torch")
    ipa(*[t.requires_grad_() for t in inputs], mask, backend="torch")
    assert [(c["n"], c["training"]) for c in seen] == [(6, False), (6, True)]


def spoil(inputs, mask, names, value):
    """A copy of ``inputs`` with ``value`` (NaN or inf) in the inputs ``names`` (one name
    or several) at every padded residue: its rows for the per-residue inputs, every pair
    with a padded row or key for ``bias`` and ``z`` (``point_weights`` has no residues).
    Also used by the kernel tests (tests/kernels)."""
    out = [t.detach().clone() for t in inputs]
    pad = ~mask
    for name in (names,) if isinstance(names, str) else names:
        t = out[NAMES.index(name)]
        if name == "bias":  # [B, H, N, N]
            t.masked_fill_((pad[:, None, :, None] | pad[:, None, None, :]), value)
        elif name == "z":  # [B, N, N, Cz]
            t.masked_fill_((pad[:, :, None] | pad[:, None, :])[..., None], value)
        else:
            t[pad] = value
    return out


def check_non_finite_padding_is_inert(backend, inputs, mask, names, value, **kw):
    """Outputs and the gradients of all nine inputs bitwise those of the clean run
    (whose padded values are finite); padded rows exactly zero; nothing non-finite."""
    assert (~mask).any()
    g = torch.Generator().manual_seed(5)

    def run(ins):
        ins = [t.detach().clone().requires_grad_() for t in ins]
        outs = ipa(*ins, mask, backend=backend, **kw)
        weights = [torch.randn(o.shape, dtype=torch.float64, generator=g).to(o.device, o.dtype) for o in outs]
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        return [o.detach() for o in outs], torch.autograd.grad(loss, ins)

    clean_outs, clean_grads = run(inputs)
    g.manual_seed(5)
    outs, grads = run(spoil(inputs, mask, names, value))
    for o, want in zip(outs, clean_outs):
        assert torch.isfinite(o).all()
        assert (o[~mask] == 0).all()
        torch.testing.assert_close(o, want, rtol=0, atol=0)
    for n, gr, want in zip(NAMES, grads, clean_grads):
        assert torch.isfinite(gr).all(), n
        torch.testing.assert_close(gr, want, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", [n for n in NAMES if n != "point_weights"])
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.float64),
                                           ("reference", torch.float64)], ids=["torch-fp32", "torch-fp64", "reference"])
def test_non_finite_values_at_padded_residues_do_not_leak(backend, dtype, name, value):
    """NaN or inf in any input at padded residues (mask False) changes no output or
    gradient: the module doc's "padding never changes a real residue's outputs" holds
    for any values there, not only finite ones."""
    inputs, mask = make_inputs(2, 9, 2, 3, 2, 2, 3)
    inputs = [t.to(dtype) for t in inputs]
    check_non_finite_padding_is_inert(backend, inputs, mask, name, value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_padding_torch_blocks_and_chunks(monkeypatch, value):
    """The torch backend's pair product masks z a block of rows at a time (forward and
    backward) and chunks query rows at inference: several blocks, several chunks."""
    module = importlib.import_module("foldops.ops.invariant_point_attention")  # the module, not the function
    monkeypatch.setattr(module, "EXACT_ROWS", 3)
    inputs, mask = make_inputs(2, 10, 2, 3, 2, 2, 3)
    for name in ("z", "bias", "k_pts"):
        check_non_finite_padding_is_inert("torch", inputs, mask, name, value)
        with torch.no_grad():
            clean = ipa(*inputs, mask, backend="torch", chunk_size=4)
            dirty = ipa(*spoil(inputs, mask, name, value), mask, backend="torch", chunk_size=4)
        for o, want in zip(dirty, clean):
            assert (o[~mask] == 0).all()
            torch.testing.assert_close(o, want, rtol=0, atol=0)
