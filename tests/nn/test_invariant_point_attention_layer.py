"""foldops.nn.InvariantPointAttention (OpenFold) and MultiflowInvariantPointAttention.

Each layer is compared with a literal float64 transcription of the published forward
(AlphaFold 2 Algorithm 22 as OpenFold and Multiflow implement it), written here from
the algorithm: the [N, N, H, P, 3] displacements, OpenFold's additive ``inf`` mask,
x|y|z point blocks, the output concatenation order. Outputs are compared at real
residues (OpenFold lets padded rows attend over all keys; foldops zeroes them).
"""

import math
import types

import pytest
import torch

from foldops.device import kernel_support
from foldops.nn import InvariantPointAttention, MultiflowInvariantPointAttention, Rigid
from foldops.testing import assert_within_baseline

C_S, C_Z, C_HIDDEN, HEADS, PQ, PV = 12, 8, 5, 3, 4, 6

OPENFOLD_KEYS = {
    "linear_q.weight": (HEADS * C_HIDDEN, C_S), "linear_q.bias": (HEADS * C_HIDDEN,),
    "linear_kv.weight": (2 * HEADS * C_HIDDEN, C_S), "linear_kv.bias": (2 * HEADS * C_HIDDEN,),
    "linear_q_points.weight": (HEADS * PQ * 3, C_S), "linear_q_points.bias": (HEADS * PQ * 3,),
    "linear_kv_points.weight": (HEADS * (PQ + PV) * 3, C_S), "linear_kv_points.bias": (HEADS * (PQ + PV) * 3,),
    "linear_b.weight": (HEADS, C_Z), "linear_b.bias": (HEADS,),
    "head_weights": (HEADS,),
    "linear_out.weight": (C_S, HEADS * (C_Z + C_HIDDEN + PV * 4)), "linear_out.bias": (C_S,),
}
MULTIFLOW_KEYS = dict(OPENFOLD_KEYS)
MULTIFLOW_KEYS.update({
    "down_z.weight": (C_Z // 4, C_Z), "down_z.bias": (C_Z // 4,),
    "linear_out.weight": (C_S, HEADS * (C_Z // 4 + C_HIDDEN + PV * 4)),
})


def conf(dropout=0.0):
    return types.SimpleNamespace(c_s=C_S, c_z=C_Z, c_hidden=C_HIDDEN, no_heads=HEADS, no_qk_points=PQ,
                                 no_v_points=PV, dropout=dropout)


def random_state(keys, dtype=torch.float64):
    return {name: torch.randn(shape, dtype=dtype) / math.sqrt(shape[-1]) for name, shape in keys.items()}


def random_rotations(*shape, dtype=torch.float64):
    q, r = torch.linalg.qr(torch.randn(*shape, 3, 3, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]
    det = torch.linalg.det(q)
    return q * torch.where(det < 0, -1.0, 1.0).to(dtype)[..., None, None]


def einsum(equation, *operands):
    """``torch.einsum`` with the operands promoted to one dtype, as OpenFold's mixed
    operations promote: a 16-bit layer's points meet fp32 frames and become fp32, and so
    does everything the attention weights touch after them."""
    dtype = operands[0].dtype
    for t in operands[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.einsum(equation, *(t.to(dtype) for t in operands))


def literal_ipa(p, s, z, rots, trans, mask, multiflow=False, attention_mask=None, inf=1e5, eps=1e-8):
    """OpenFold / Multiflow IPA forward, transcribed term by term. ``p`` holds the flat
    point projections (``linear_q_points.weight``: OpenFold before ``PointProjection``,
    Multiflow) or current OpenFold's ``linear_q_points.linear.weight``, each read its way."""
    batch, n, _ = s.shape

    def lin(name, x):
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    if "linear_q_points.linear.weight" in p:
        return literal_point_projection_ipa(p, s, z, rots, trans, mask, inf, eps)

    def points(name, count):
        raw = lin(name, s)
        m = HEADS * count
        local = torch.stack([raw[..., :m], raw[..., m:2 * m], raw[..., 2 * m:]], dim=-1)  # x|y|z blocks
        glob = einsum("bnij,bnpj->bnpi", rots, local) + trans[:, :, None]
        return glob.view(batch, n, HEADS, count, 3)

    return _literal_from_points(p, s, z, rots, trans, mask, points("linear_q_points", PQ),
                                points("linear_kv_points", PQ + PV), multiflow, attention_mask, inf, eps)


def _literal_from_points(p, s, z, rots, trans, mask, q_pts, kv_pts, multiflow, attention_mask, inf, eps):
    batch, n, _ = s.shape

    def lin(name, x):
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    q = lin("linear_q", s).view(batch, n, HEADS, C_HIDDEN)
    kv = lin("linear_kv", s).view(batch, n, HEADS, 2 * C_HIDDEN)
    k, v = kv[..., :C_HIDDEN], kv[..., C_HIDDEN:]
    k_pts, v_pts = kv_pts[..., :PQ, :], kv_pts[..., PQ:, :]
    b = lin("linear_b", z)
    a = einsum("bihc,bjhc->bhij", q, k) * math.sqrt(1.0 / (3 * C_HIDDEN))
    a = a + math.sqrt(1.0 / 3) * b.permute(0, 3, 1, 2)
    disp = q_pts[:, :, None] - k_pts[:, None]  # [B, N, N, H, P, 3]
    pt = (disp**2).sum(-1)
    hw = torch.nn.functional.softplus(p["head_weights"]) * math.sqrt(1.0 / (3 * (PQ * 9.0 / 2)))
    pt = (pt * hw[:, None]).sum(-1) * (-0.5)
    square = mask[:, :, None] * mask[:, None, :]
    a = a + pt.permute(0, 3, 1, 2) + (inf * (square - 1))[:, None]
    if attention_mask is not None:
        a = a - (1 - attention_mask[:, None]) * 1e7
    a = torch.softmax(a, dim=-1)
    o = einsum("bhij,bjhc->bihc", a, v).reshape(batch, n, -1)
    o_pt = einsum("bhij,bjhpx->bihpx", a, v_pts)
    local = einsum("bnji,bnhpj->bnhpi", rots, o_pt - trans[:, :, None, None])
    norm = torch.sqrt((local**2).sum(-1) + eps).reshape(batch, n, -1)
    local = local.reshape(batch, n, HEADS * PV, 3)
    pair = lin("down_z", z) if multiflow else z
    o_pair = einsum("bhij,bijc->bihc", a, pair).reshape(batch, n, -1)
    feats = torch.cat([o, local[..., 0], local[..., 1], local[..., 2], norm, o_pair], dim=-1)
    return lin("linear_out", feats.to(p["linear_out.weight"].dtype))  # OpenFold: .to(z's dtype)


def literal_point_projection_ipa(p, s, z, rots, trans, mask, inf, eps):
    """Current OpenFold's monomer forward (``PointProjection``, ``is_multimer=False``):
    the Linear's output split in three along the last dim, stacked as the coordinate,
    viewed as ``[H, P, 3]``, then ``r[..., None, None].apply``; the rest as the flat form."""
    batch, n, _ = s.shape

    def lin(name, x):
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    def point_projection(name, count):
        local = lin(f"{name}.linear", s)  # [B, N, H * 3 * count]
        local = torch.stack(torch.split(local, local.shape[-1] // 3, dim=-1), dim=-1)
        local = local.view(batch, n, HEADS, count, 3)
        return einsum("bnij,bnhpj->bnhpi", rots, local) + trans[:, :, None, None]

    flat = {k: v for k, v in p.items() if ".linear." not in k}
    q_pts = point_projection("linear_q_points", PQ)
    kv_pts = point_projection("linear_kv_points", PQ + PV)
    return _literal_from_points(flat, s, z, rots, trans, mask, q_pts, kv_pts, False, None, inf, eps)


def make_inputs(batch=2, n=11, dtype=torch.float64):
    s = torch.randn(batch, n, C_S, dtype=dtype)
    z = torch.randn(batch, n, n, C_Z, dtype=dtype)
    rots = random_rotations(batch, n, dtype=dtype)
    trans = 5 * torch.randn(batch, n, 3, dtype=dtype) + 20
    mask = (torch.rand(batch, n) > 0.25).to(dtype)
    mask[:, 0] = 1
    return s, z, rots, trans, mask


def build(variant, state, dtype, backend):
    layer = (InvariantPointAttention(C_S, C_Z, C_HIDDEN, HEADS, PQ, PV, backend=backend, dtype=dtype)
             if variant == "openfold" else MultiflowInvariantPointAttention(conf(), backend=backend, dtype=dtype))
    layer.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return layer


@pytest.mark.parametrize("variant", ["openfold", "multiflow"])
def test_state_dict_keys(variant):
    layer = build(variant, random_state(OPENFOLD_KEYS if variant == "openfold" else MULTIFLOW_KEYS),
                  torch.float32, "torch")
    want = OPENFOLD_KEYS if variant == "openfold" else MULTIFLOW_KEYS
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == want


LITERAL_CASES = [("openfold", "torch"), ("multiflow", "torch"), ("openfold", "reference"), ("multiflow", "reference")]
if kernel_support("cpu") is None:
    LITERAL_CASES.append(("multiflow", "triton"))  # the Triton interpreter on CPU: one case (slow)


def literal_comparison(variant, backend):
    """The layer and the literal forward on the same random case: outputs and the
    gradients of s, z and every parameter, each as (fp32 layer, fp64 literal, fp32
    literal), keyed ``out``, ``ds``, ``dz``, ``d <parameter>``; with ``fp64`` the
    layer's own float64 results too (not for the Triton backend)."""
    state = random_state(OPENFOLD_KEYS if variant == "openfold" else MULTIFLOW_KEYS)
    s, z, rots, trans, mask = make_inputs()
    attention_mask = None
    if variant == "multiflow":
        attention_mask = (torch.rand(2, 11, 11) > 0.2).double()
        attention_mask[:, torch.arange(11), torch.arange(11)] = 1
    keep = mask.bool()[..., None].double()
    grad = torch.randn(2, 11, C_S, dtype=torch.float64) * keep
    names = sorted(state)

    def run(make, dtype):
        fn, params = make(dtype)
        ins = [t.to(dtype).requires_grad_() for t in (s, z)] + [params[k] for k in names]
        out = fn(*ins[:2], rots.to(dtype), trans.to(dtype), mask.to(dtype))
        return [(out * keep).detach(), *torch.autograd.grad((out * grad.to(dtype)).sum(), ins)]

    def literal(dtype):
        p = {k: v.to(dtype).requires_grad_() for k, v in state.items()}
        am = None if attention_mask is None else attention_mask.to(dtype)
        return (lambda s_, z_, r_, t_, m_: literal_ipa(p, s_, z_, r_, t_, m_, variant == "multiflow", am)), p

    def ours(dtype):
        layer = build(variant, state, dtype, backend)
        am = None if attention_mask is None else attention_mask.to(dtype)
        params = dict(layer.named_parameters())
        if variant == "multiflow":
            return (lambda s_, z_, r_, t_, m_: layer(s_, z_, (r_, t_), m_, attention_mask=am)), params
        return (lambda s_, z_, r_, t_, m_: layer(s_, z_, (r_, t_), m_)), params

    keys = ["out", "ds", "dz"] + [f"d {k}" for k in names]
    exact, base, got = run(literal, torch.float64), run(literal, torch.float32), run(ours, torch.float32)
    ours64 = run(ours, torch.float64) if backend != "triton" else [None] * len(keys)  # kernels: 16/32-bit
    return {k: (g, e, b, g64) for k, g, e, b, g64 in zip(keys, got, exact, base, ours64)}


@pytest.mark.parametrize("variant,backend", LITERAL_CASES)
def test_matches_literal_forward_and_gradients(variant, backend):
    """Output and the gradients of s, z and every parameter but ``head_weights`` (see
    the next test) within 2x the fp32 literal forward's error; float64 to 1e-9."""
    for name, (got, exact, base, got64) in literal_comparison(variant, backend).items():
        if name == "d head_weights":
            continue
        assert_within_baseline(name, got, exact, base, dtype=torch.float32)
        if got64 is not None:
            torch.testing.assert_close(got64, exact, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("variant,backend", LITERAL_CASES)
def test_head_weight_gradient_matches_literal(variant, backend):
    """The head weights' gradient sums squared distances against the logits' gradient,
    whose rows sum to zero only in exact arithmetic: the fp32 result is sensitive to how
    the point term and the point output are formed (see the ``torch`` backend's
    ``point_operands`` and value-point centring)."""
    got, exact, base, got64 = literal_comparison(variant, backend)["d head_weights"]
    if got64 is not None:
        torch.testing.assert_close(got64, exact, rtol=1e-9, atol=1e-9)
    assert_within_baseline("d head_weights", got, exact, base, dtype=torch.float32)


INVARIANCE_CASES = [("openfold", "torch"), ("multiflow", "torch")]
if kernel_support("cpu") is None:  # the Triton interpreter on CPU, small N
    INVARIANCE_CASES += [("openfold", "triton"), ("multiflow", "triton")]


@pytest.mark.parametrize("variant,backend", INVARIANCE_CASES)
def test_invariant_to_global_rigid_motion(variant, backend):
    """One rotation and translation applied to every frame leaves the output unchanged
    to rounding: in fp64 (torch) to 1e-9; the fp32 Triton kernels' output on the moved
    frames is within 2x the fp32 literal forward's distance (also on the moved frames)
    from the fp64 output on the original ones."""
    multiflow = variant == "multiflow"
    state = random_state(MULTIFLOW_KEYS if multiflow else OPENFOLD_KEYS)
    n = 7 if backend == "triton" else 11
    s, z, rots, trans, mask = make_inputs(2, n)
    attention_mask = None
    if multiflow:
        attention_mask = (torch.rand(2, n, n) > 0.2).double()
        attention_mask[:, torch.arange(n), torch.arange(n)] = 1
    g_rot = random_rotations(dtype=torch.float64)
    g_trans = 30 * torch.randn(3, dtype=torch.float64)
    moved_rots = g_rot @ rots
    moved_trans = trans @ g_rot.T + g_trans
    keep = mask.bool()  # padded rows are not attended to and carry no meaning
    extra = {"attention_mask": attention_mask} if multiflow else {}

    def run(layer, dtype, r, t):
        cast = {k: v.to(dtype) for k, v in extra.items()}
        return layer(s.to(dtype), z.to(dtype), (r.to(dtype), t.to(dtype)), mask.to(dtype), **cast)[keep]

    if backend == "torch":
        layer = build(variant, state, torch.float64, backend)
        torch.testing.assert_close(run(layer, torch.float64, moved_rots, moved_trans),
                                   run(layer, torch.float64, rots, trans), rtol=1e-9, atol=1e-9)
        return
    p64 = {k: v.double() for k, v in state.items()}
    p32 = {k: v.float() for k, v in state.items()}
    exact = literal_ipa(p64, s, z, rots, trans, mask, multiflow, attention_mask)[keep]
    am32 = None if attention_mask is None else attention_mask.float()
    base = literal_ipa(p32, s.float(), z.float(), moved_rots.float(), moved_trans.float(), mask.float(),
                       multiflow, am32)[keep]
    layer = build(variant, state, torch.float32, backend)
    assert_within_baseline("out (moved frames)", run(layer, torch.float32, moved_rots, moved_trans), exact, base,
                           dtype=torch.float32)


def test_frame_forms_agree():
    """(rots, trans), foldops Rigid and a duck-typed OpenFold-like Rigid give one answer."""
    state = random_state(OPENFOLD_KEYS)
    layer = build("openfold", state, torch.float64, "torch")
    s, z, rots, trans, mask = make_inputs()

    class Duck:  # the part of OpenFold's Rigid the layer uses
        def __init__(self, r, t):
            self.r, self.t = r, t

        def __getitem__(self, idx):
            return Duck(self.r[idx + (slice(None), slice(None))], self.t[idx + (slice(None),)])

        def apply(self, p):
            return (self.r @ p[..., None])[..., 0] + self.t

        def invert_apply(self, p):
            return (self.r.transpose(-1, -2) @ (p - self.t)[..., None])[..., 0]

    a = layer(s, z, (rots, trans), mask)
    b = layer(s, z, Rigid(rots, trans), mask)
    c = layer(s, z, Duck(rots, trans), mask)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_bad_frames_and_masks():
    layer = build("openfold", random_state(OPENFOLD_KEYS), torch.float64, "torch")
    s, z, rots, trans, mask = make_inputs(1, 5)
    with pytest.raises(ValueError, match="rotations"):
        layer(s, z, (rots * 1.5, trans), mask)  # not orthonormal
    reflect = rots.clone()
    reflect[..., 0] = -reflect[..., 0]
    with pytest.raises(ValueError, match="det"):
        layer(s, z, (reflect, trans), mask)
    with pytest.raises(ValueError, match=r"expected shape \[\*, 3, 3\]"):
        layer(s, z, (rots[..., :2], trans), mask)
    with pytest.raises(ValueError, match=r"r rotations: expected shape \(1, 5, 3, 3\)"):
        layer(s, z, (rots[:, :4], trans[:, :4]), mask)
    with pytest.raises(ValueError, match="translations: expected shape"):
        layer(s, z, (rots, trans[..., :2]), mask)
    with pytest.raises(ValueError, match=r"mask: expected shape \(1, 5\)"):
        layer(s, z, (rots, trans), mask[:, :4])
    with pytest.raises(ValueError, match="z: expected shape"):
        layer(s, z[..., :-1], (rots, trans), mask)
    with pytest.raises(TypeError, match="r: expected"):
        layer(s, z, rots, mask)


def test_point_count_mismatch_fails_on_load():
    layer = InvariantPointAttention(C_S, C_Z, C_HIDDEN, HEADS, PQ + 1, PV)
    with pytest.raises(RuntimeError, match="linear_q_points"):
        layer.load_state_dict({k: v.float() for k, v in random_state(OPENFOLD_KEYS).items()}, strict=True)


def test_multiflow_dropout_in_training_raises_clearly():
    layer = MultiflowInvariantPointAttention(conf(dropout=0.1))
    s, z, rots, trans, mask = make_inputs(1, 4, torch.float32)
    with pytest.raises(NotImplementedError, match="dropout"):
        layer(s, z, (rots, trans), mask)
    layer.eval()
    assert layer(s, z, (rots, trans), mask).shape == (1, 4, C_S)


def test_autocast_cpu_bf16_runs():
    layer = build("openfold", random_state(OPENFOLD_KEYS), torch.float32, "torch")
    s, z, rots, trans, mask = make_inputs(1, 7, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(s, z, (rots, trans), mask)
    ref = layer(s, z, (rots, trans), mask)
    keep = mask.bool()
    assert torch.isfinite(out).all()
    assert (out.float() - ref)[keep].abs().max() < 0.1 * ref[keep].abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["openfold", "multiflow"])
def test_triton_layer_under_autocast_gpu(variant):
    """On the GPU, bf16 autocast at N = 300: the Triton layer's output and input
    gradients against the fp64 literal forward, within 2x the literal forward's own
    error under the same autocast."""
    dev = "cuda"
    state = {k: v.to(dev) for k, v in random_state(OPENFOLD_KEYS if variant == "openfold" else MULTIFLOW_KEYS).items()}
    s, z, rots, trans, mask = (t.to(dev) for t in make_inputs(1, 300))
    keep = mask.bool()[..., None].double()
    grad = torch.randn(1, 300, C_S, dtype=torch.float64, device=dev) * keep
    multiflow = variant == "multiflow"

    def run(fn, dtype, autocast):
        ins = [t.to(dtype).requires_grad_() for t in (s, z)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = fn(*ins, rots.to(dtype), trans.to(dtype), mask.to(dtype))
        out = out.double() * keep
        return out.detach(), torch.autograd.grad((out * grad).sum(), ins)

    p64 = {k: v.double() for k, v in state.items()}
    p32 = {k: v.float() for k, v in state.items()}
    exact, exact_g = run(lambda *a: literal_ipa(p64, *a, multiflow=multiflow), torch.float64, False)
    base, base_g = run(lambda *a: literal_ipa(p32, *a, multiflow=multiflow), torch.float32, True)
    layer = build(variant, {k: v.cpu() for k, v in state.items()}, torch.float32, "triton").to(dev)
    got, got_g = run(lambda s_, z_, r_, t_, m_: layer(s_, z_, (r_, t_), m_), torch.float32, True)
    assert_within_baseline("out", got, exact, base, dtype=torch.bfloat16)
    for name, g, e, b in zip(("ds", "dz"), got_g, exact_g, base_g):
        assert_within_baseline(name, g, e, b, dtype=torch.bfloat16)


@pytest.mark.parametrize("projected", [False, True], ids=["z-itself", "down_z"])
def test_pair_projections_first_and_second_order(projected):
    """The layer's joint z projections (the bias term's gradient added to the pair
    values' gradient in one buffer) against numerical derivatives, first and second order."""
    from foldops.nn.invariant_point_attention import _PairProjections

    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()

    z, w_b, b_b = rand(2, 3, 3, 4), rand(2, 4), rand(2)
    weights = (rand(3, 4), rand(3)) if projected else ()
    c_bias, c_values = rand(2, 3, 3, 2), rand(2, 3, 3, 3 if projected else 4)

    def f(z, w_b, b_b, *wv):
        bias, values = _PairProjections.apply(z, w_b, b_b, *(wv or (None, None)), 0.7, torch.float64)
        return bias * c_bias, values * c_values

    inputs = (z, w_b, b_b, *weights)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("variant", ["openfold", "multiflow"])
def test_torch_layer_under_cpu_autocast(variant):
    """bf16 autocast on CPU: output and the gradients of s and z against the fp64
    literal forward, within 2x the literal forward's own error under the same autocast."""
    state = random_state(OPENFOLD_KEYS if variant == "openfold" else MULTIFLOW_KEYS)
    s, z, rots, trans, mask = make_inputs()
    keep = mask.bool()[..., None].double()
    grad = torch.randn(2, 11, C_S, dtype=torch.float64) * keep
    multiflow = variant == "multiflow"

    def run(fn, dtype, autocast):
        ins = [t.to(dtype).requires_grad_() for t in (s, z)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(*ins, rots.to(dtype), trans.to(dtype), mask.to(dtype))
        out = out.double() * keep
        return [out.detach(), *torch.autograd.grad((out * grad).sum(), ins)]

    p64 = {k: v.double() for k, v in state.items()}
    p32 = {k: v.float() for k, v in state.items()}
    exact = run(lambda *a: literal_ipa(p64, *a, multiflow=multiflow), torch.float64, False)
    base = run(lambda *a: literal_ipa(p32, *a, multiflow=multiflow), torch.float32, True)
    layer = build(variant, state, torch.float32, "torch")
    got = run(lambda s_, z_, r_, t_, m_: layer(s_, z_, (r_, t_), m_), torch.float32, True)
    for name, g, e, b in zip(("out", "ds", "dz"), got, exact, base):
        assert_within_baseline(name, g, e, b, dtype=torch.bfloat16)


@pytest.mark.parametrize("variant", ["openfold", "multiflow"])
def test_compile_fullgraph_matches_eager(variant):
    """torch.compile(fullgraph=True) of the layer (torch backend) in train mode: output
    and the gradients of s, z and every parameter as in eager."""
    state = random_state(OPENFOLD_KEYS if variant == "openfold" else MULTIFLOW_KEYS)
    layer = build(variant, state, torch.float32, "torch").train()
    s, z, rots, trans, mask = make_inputs(2, 7, torch.float32)
    grad = torch.randn(2, 7, C_S)

    def run(fn):
        ins = [s.clone().requires_grad_(), z.clone().requires_grad_()]
        out = fn(ins[0], ins[1], (rots, trans), mask)
        return [out, *torch.autograd.grad((out * grad).sum(), ins + list(layer.parameters()))]

    eager = run(layer)
    got = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    names = ["out", "ds", "dz"] + [f"d {k}" for k, _ in layer.named_parameters()]
    for name, a, b in zip(names, got, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("projected", [False, True], ids=["z-itself", "down_z"])
def test_pair_projections_with_shared_incoming_gradient(projected):
    """The pair values have a second consumer: ``values + other`` hands one gradient
    tensor to both (AddBackward), and ``other``'s consumer runs after the projections'
    backward. Every gradient as with plain ``linear`` calls."""
    from foldops.nn.invariant_point_attention import _PairProjections

    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()

    z, w_b, b_b, src = rand(2, 3, 3, 4), rand(2, 4), rand(2), rand(2, 3, 3, 3 if projected else 4)
    weights = (rand(3, 4), rand(3)) if projected else ()
    c_bias, c_values, c_other = rand(2, 3, 3, 2), rand(2, 3, 3, 3 if projected else 4), rand(1)
    leaves = (z, w_b, b_b, src, *weights)

    def grads(projections):
        other = src * c_other  # recorded first: its backward runs after the projections'
        bias, values = projections(z, w_b, b_b, *weights)
        shared = values + other
        loss = (bias * c_bias).sum() + (shared * c_values).sum()
        return torch.autograd.grad(loss, leaves)

    def plain(z, w_b, b_b, *wv):
        bias = torch.nn.functional.linear(z, w_b, b_b) * 0.7
        return bias, (torch.nn.functional.linear(z, *wv) if wv else z)

    got = grads(lambda *a: _PairProjections.apply(*a[:3], *(a[3:] or (None, None)), 0.7, torch.float64))
    for name, a, b in zip(("z", "w_b", "b_b", "src", "w_v", "b_v"), got, grads(plain)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_pair_projections_exclusive_gradient_is_written_in_place():
    """The layer's promise (``exclusive_grad``: the pair values feed one op whose backward
    allocates their gradient) lets the bias term be added into that gradient: the same
    gradients as the out-of-place path, and the returned dz is the incoming buffer."""
    from foldops.nn.invariant_point_attention import _PairProjections

    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=g).requires_grad_()
    w_b = torch.randn(2, 4, dtype=torch.float64, generator=g).requires_grad_()
    b_b = torch.randn(2, dtype=torch.float64, generator=g).requires_grad_()
    c_bias = torch.randn(2, 3, 3, 2, dtype=torch.float64, generator=g)
    c_values = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=g)
    seen = {}

    def run(exclusive):
        bias, values = _PairProjections.apply(z, w_b, b_b, None, None, 0.7, torch.float64, exclusive)
        values.register_hook(lambda grad: seen.__setitem__(exclusive, grad.data_ptr()))
        # the values' one consumer, whose backward (MulBackward) allocates their gradient
        loss = (bias * c_bias).sum() + (values * c_values).sum()
        return torch.autograd.grad(loss, (z, w_b, b_b))

    out_of_place, in_place = run(False), run(True)
    for a, b in zip(in_place, out_of_place):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert in_place[0].data_ptr() == seen[True] and out_of_place[0].data_ptr() != seen[False]


def point_projection_state(flat):
    """Current OpenFold's key layout of a flat state dict: the point projections'
    parameters under ``linear_q_points.linear`` / ``linear_kv_points.linear``."""
    out = {}
    for k, v in flat.items():
        name, param = k.rsplit(".", 1) if "." in k else (k, None)
        if name in ("linear_q_points", "linear_kv_points"):
            k = f"{name}.linear.{param}"
        out[k] = v
    return out


@pytest.mark.parametrize("variant", ["openfold", "multiflow"])
def test_loads_point_projection_keys_strictly(variant):
    """A checkpoint of current OpenFold (``linear_q_points.linear.weight``, from
    ``PointProjection``) and one of the flat layout both load with ``strict=True``, also
    under a parent module's prefix; the layer loaded from the PointProjection keys
    matches a literal transcription of current OpenFold's forward (PointProjection's
    split / stack / view of the points)."""
    flat = random_state(OPENFOLD_KEYS if variant == "openfold" else MULTIFLOW_KEYS)
    nested = point_projection_state(flat)
    assert "linear_q_points.linear.weight" in nested and "linear_q_points.weight" not in nested
    from_flat = build(variant, flat, torch.float64, "torch")
    from_nested = build(variant, nested, torch.float64, "torch")
    assert set(from_nested.state_dict()) == set(flat)  # it saves the flat keys
    for k, v in from_flat.state_dict().items():
        assert torch.equal(from_nested.state_dict()[k], v), k
    parent = torch.nn.Module()
    parent.ipa = build(variant, flat, torch.float64, "torch")
    parent.load_state_dict({f"ipa.{k}": v.neg() for k, v in nested.items()}, strict=True)
    assert torch.equal(parent.ipa.linear_kv_points.weight, -flat["linear_kv_points.weight"])
    if variant == "openfold":
        s, z, rots, trans, mask = make_inputs()
        keep = mask.bool()
        want = literal_ipa(nested, s, z, rots, trans, mask)
        torch.testing.assert_close(from_nested(s, z, (rots, trans), mask)[keep], want[keep], rtol=1e-9, atol=1e-9)


def test_both_point_key_layouts_at_once_fail_strict_load():
    flat = random_state(OPENFOLD_KEYS)
    both = {**flat, "linear_q_points.linear.weight": flat["linear_q_points.weight"]}
    layer = InvariantPointAttention(C_S, C_Z, C_HIDDEN, HEADS, PQ, PV, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="linear_q_points.linear.weight"):
        layer.load_state_dict(both, strict=True)


def test_openfold_constructor_and_forward_keywords():
    """OpenFold's StructureModule builds the layer with ``is_multimer=False`` and calls it
    with ``inplace_safe``, ``_offload_inference`` and ``_z_reference_list`` (z None and
    ``[z]`` in the list when offloading at inference)."""
    state = random_state(OPENFOLD_KEYS)
    layer = InvariantPointAttention(C_S, C_Z, C_HIDDEN, HEADS, PQ, PV, inf=1e5, eps=1e-8, is_multimer=False,
                                    backend="torch", dtype=torch.float64)
    layer.load_state_dict(state, strict=True)
    s, z, rots, trans, mask = make_inputs()
    r = (rots, trans)
    want = layer(s, z, r, mask)
    refs = [z]
    for kwargs in ({"inplace_safe": True}, {"inplace_safe": False, "_offload_inference": False},
                   {"inplace_safe": True, "_offload_inference": True, "_z_reference_list": refs}):
        z_arg = None if kwargs.get("_offload_inference") else z
        torch.testing.assert_close(layer(s, z_arg, r, mask, **kwargs), want, rtol=0, atol=0)
    assert refs[0] is z  # the list is left as given
    torch.testing.assert_close(layer(s, z, r, mask, True, True, [z]), want, rtol=0, atol=0)  # positional
    # OpenFold reads the list only with both flags set.
    other = [torch.zeros_like(z)]
    torch.testing.assert_close(layer(s, z, r, mask, False, True, other), want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="z: expected a tensor"):
        layer(s, None, r, mask, _offload_inference=True, _z_reference_list=[z])
    with pytest.raises(ValueError, match="_z_reference_list"):
        layer(s, None, r, mask, inplace_safe=True, _offload_inference=True)
    with pytest.raises(ValueError, match="is_multimer"):
        InvariantPointAttention(C_S, C_Z, C_HIDDEN, HEADS, PQ, PV, is_multimer=True)


def test_multiflow_forward_keywords():
    """Multiflow's forward: ``(s, z, r, mask, attention_mask, _offload_inference,
    _z_reference_list)``; with ``_offload_inference``, z is ``_z_reference_list[0]``."""
    layer = build("multiflow", random_state(MULTIFLOW_KEYS), torch.float64, "torch")
    s, z, rots, trans, mask = make_inputs()
    attention_mask = (torch.rand(2, 11, 11) > 0.2).double()
    r = (rots, trans)
    want = layer(s, z, r, mask, attention_mask)
    torch.testing.assert_close(layer(s, None, r, mask, attention_mask, True, [z]), want, rtol=0, atol=0)
    torch.testing.assert_close(layer(s, None, r, mask, attention_mask=attention_mask, _offload_inference=True,
                                     _z_reference_list=[z]), want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="z: expected a tensor"):
        layer(s, None, r, mask)


@pytest.mark.parametrize("variant", ["openfold", "multiflow"])
def test_empty_protein(variant):
    """N = 0: an empty update, empty gradients of s and z, zero gradients of the weights."""
    layer = build(variant, random_state(OPENFOLD_KEYS if variant == "openfold" else MULTIFLOW_KEYS),
                  torch.float32, "torch")
    s, z, mask = torch.randn(2, 0, C_S, requires_grad=True), torch.randn(2, 0, 0, C_Z, requires_grad=True), torch.ones(2, 0)
    rots, trans = torch.empty(2, 0, 3, 3), torch.empty(2, 0, 3)
    out = layer(s, z, (rots, trans), mask)
    assert out.shape == (2, 0, C_S)
    grads = torch.autograd.grad(out.sum(), [s, z] + list(layer.parameters()), allow_unused=True)
    assert grads[0].shape == s.shape and grads[1].shape == z.shape
    for g in grads[2:]:
        assert g is None or (g == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["openfold", "multiflow"])
def test_layer_cast_to_16_bit_with_fp32_frames(variant, dtype):
    """A layer cast with ``.to(dtype)`` (no autocast) and fp32 frames, as OpenFold and
    Multiflow keep them: the output is in the layer's dtype; it and the gradients of s and
    z are within 2x the error of the literal forward run the same way (16-bit parameters
    and inputs, fp32 frames, mixed operations promoted as OpenFold's are, the linear_out
    input cast to the layer's dtype). The exact answer is the fp64 literal forward of the
    values the 16-bit layer and inputs hold (their rounding is common to both, not the
    computation's error). The parameters' gradients, in the layer's dtype, are checked
    finite: each is a sum over every residue pair of rounded terms, so at this size one
    draw's error ratio is noise (as the autocast test, only s and z are compared)."""
    multiflow = variant == "multiflow"
    state = random_state(MULTIFLOW_KEYS if multiflow else OPENFOLD_KEYS)
    state = {k: v.to(dtype).double() for k, v in state.items()}  # what the 16-bit layer holds
    s, z, rots, trans, mask = (t.to(dtype).double() if i < 2 else t for i, t in enumerate(make_inputs()))
    keep = mask.bool()[..., None].double()
    grad = torch.randn(2, 11, C_S, dtype=torch.float64) * keep

    def run(fn, dtype):
        frames = torch.float64 if dtype == torch.float64 else torch.float32
        ins = [s.to(dtype).clone().requires_grad_(), z.to(dtype).clone().requires_grad_()]
        out = fn(ins[0], ins[1], rots.to(frames), trans.to(frames), mask.to(frames))
        assert out.dtype == dtype
        (out.double() * grad).sum().backward()
        return [(out.double() * keep).detach(), ins[0].grad, ins[1].grad]

    def literal(dtype):
        p = {k: v.to(dtype) for k, v in state.items()}
        return lambda *a: literal_ipa(p, *a, multiflow=multiflow)

    exact, base = run(literal(torch.float64), torch.float64), run(literal(dtype), dtype)
    layer = build(variant, state, torch.float32, "torch").to(dtype)
    assert layer.linear_out.weight.dtype == dtype
    got = run(lambda s_, z_, r_, t_, m_: layer(s_, z_, (r_, t_), m_), dtype)
    for name, g, e, b in zip(("out", "ds", "dz"), got, exact, base):
        assert_within_baseline(name, g, e, b, dtype=dtype)
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all(), name


def test_fp32_layer_with_fp64_frames():
    """fp64 frames beside an fp32 layer: the output is fp32 and matches the layer run with
    the frames rounded to fp32 to fp32 rounding (the frames are exact in both)."""
    layer = build("openfold", random_state(OPENFOLD_KEYS), torch.float32, "torch")
    s, z, rots, trans, mask = make_inputs(dtype=torch.float32)
    rots64 = random_rotations(2, 11)
    trans64 = (5 * torch.randn(2, 11, 3) + 20).double()
    out = layer(s, z, (rots64, trans64), mask)
    assert out.dtype == torch.float32
    want = build("openfold", {k: v.double() for k, v in layer.state_dict().items()}, torch.float64, "torch")(
        s.double(), z.double(), (rots64, trans64), mask.double())
    keep = mask.bool()
    assert_within_baseline("out", out[keep], want[keep], layer(s, z, (rots64.float(), trans64.float()), mask)[keep],
                           dtype=torch.float32)


@pytest.mark.parametrize("variant", ["openfold", "multiflow"])
def test_padded_rows_are_zero_and_pass_no_gradient(variant):
    """Padded residues' rows of the layer's output are exactly zero (not linear_out of
    the empty attention, whose point features R^T (0 - t) depend on the pose), for float
    and bool masks, and a gradient arriving on them changes no gradient (s, z, every
    parameter, the frames): bitwise the same as with that gradient zeroed."""
    layer = build(variant, random_state(MULTIFLOW_KEYS if variant == "multiflow" else OPENFOLD_KEYS),
                  torch.float64, "torch")
    s, z, rots, trans, mask = make_inputs()
    pad = ~mask.bool()
    assert pad.any() and (layer.linear_out.bias != 0).all()
    grad = torch.randn(2, 11, C_S, dtype=torch.float64)

    def run(m, g):
        ins = [t.clone().requires_grad_() for t in (s, z, rots, trans)]
        out = layer(ins[0], ins[1], (ins[2], ins[3]), m)
        return [out.detach(), *torch.autograd.grad((out * g).sum(), ins + list(layer.parameters()))]

    want = run(mask, grad * ~pad[..., None])
    for m in (mask, mask.bool()):
        got = run(m, grad)
        assert (got[0][pad] == 0).all() and (got[0][~pad] != 0).all()
        for g, w in zip(got, want):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("placeholder", ["zeros", "nan"])
@pytest.mark.parametrize("variant", ["openfold", "multiflow"])
def test_padded_residues_may_hold_placeholder_frames(variant, placeholder):
    """Padded residues' frames as a zero-padding collate leaves them (zero rotations and
    translations) or NaN: accepted (only real residues' rotations are checked), and the
    outputs and the gradients of s, z, every parameter and the frames are those with
    identity frames there, bitwise, with no NaN anywhere; the frames' gradient is zero at
    padded residues. Float and bool masks alike."""
    layer = build(variant, random_state(MULTIFLOW_KEYS if variant == "multiflow" else OPENFOLD_KEYS),
                  torch.float64, "torch")
    s, z, rots, trans, mask = make_inputs()
    pad = ~mask.bool()
    assert pad.any()
    identity = rots.clone(), trans.clone()
    identity[0][pad], identity[1][pad] = torch.eye(3, dtype=torch.float64), 0.0
    fill = 0.0 if placeholder == "zeros" else float("nan")
    held = rots.clone(), trans.clone()
    held[0][pad], held[1][pad] = fill, fill
    grad = torch.randn(2, 11, C_S, dtype=torch.float64)

    def run(frames, m):
        ins = [s.clone().requires_grad_(), z.clone().requires_grad_(),
               frames[0].clone().requires_grad_(), frames[1].clone().requires_grad_()]
        out = layer(ins[0], ins[1], (ins[2], ins[3]), m)
        grads = torch.autograd.grad((out * grad).sum(), ins + list(layer.parameters()))
        return [out.detach(), *grads]

    want = run(identity, mask)
    for m in (mask, mask.bool()):
        got = run(held, m)
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.isfinite(g).all(), i
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        assert (got[3][pad] == 0).all() and (got[4][pad] == 0).all()
    with pytest.raises(ValueError, match="r rotations: expected rotation matrices"):
        layer(s, z, held, torch.ones_like(mask))  # every residue real: the placeholders are checked
