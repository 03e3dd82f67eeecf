"""foldops.nn.PairWeightedAveraging vs Boltz-2's, the Ligo key map, and its own contracts."""

import pytest
import torch

from foldops import budget as chunk_budget
from foldops.device import autocast
from foldops.nn import PairWeightedAveraging
from foldops.nn.pair_weighted_averaging import LIGO_KEY_MAP, convert_ligo_state_dict
from foldops.testing import assert_within_baseline

C_M, C_Z, C_H, HEADS = 16, 12, 8, 3


def boltz_class(nnh):
    return nnh.import_boltz("boltz.model.layers.pair_averaging").PairWeightedAveraging


def ours(**kwargs):
    return PairWeightedAveraging(C_M, C_Z, C_H, HEADS, **kwargs)


def inputs(nnh, lengths=(7, 11), rows=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = max(lengths)
    token_mask, pair_mask = nnh.padding_masks(list(lengths), n)
    m = torch.randn(len(lengths), rows, n, C_M, generator=gen)
    z = torch.randn(len(lengths), n, n, C_Z, generator=gen)
    return m, z, token_mask, pair_mask


@pytest.mark.parametrize("train", (False, True), ids=("eval", "train"))
@pytest.mark.parametrize("rows, lengths", [(5, (7, 11)), (1, (13,)), (3, (1, 2))], ids=("padded", "s1-n13", "n1-n2"))
def test_parity_with_boltz(nnh, train, rows, lengths):
    boltz = nnh.randomize_(boltz_class(nnh)(C_M, C_Z, C_H, HEADS))
    m, z, token_mask, pair_mask = inputs(nnh, lengths, rows)
    nnh.check_parity(
        boltz,
        ours,
        lambda layer, m, z, mask: layer(m, z, mask),
        [m, z, pair_mask],
        # Boltz averages padded rows over masked keys; foldops gives zeros there.
        out_valid=[token_mask[:, None, :, None]],
        in_valid=[torch.ones(()), torch.ones(()), None],
        train=train,
    )


@pytest.mark.parametrize("chunk_heads", (False, True))
def test_inference_chunks_match_boltz(nnh, monkeypatch, chunk_heads):
    boltz = nnh.randomize_(boltz_class(nnh)(C_M, C_Z, C_H, HEADS)).eval()
    layer = ours().eval()
    layer.load_state_dict(boltz.state_dict(), strict=True)
    exact = ours(dtype=torch.float64, backend="reference").eval()
    exact.load_state_dict(boltz.state_dict(), strict=True)
    m, z, token_mask, pair_mask = inputs(nnh, rows=7)
    valid = token_mask[:, None, :, None]
    with torch.no_grad():
        base = boltz(m, z, pair_mask, chunk_heads) * valid
        ref = exact(m.double(), z.double(), pair_mask) * valid
        one_shot = layer(m, z, pair_mask, chunk_heads)
        # Two MSA rows per step (one with chunk_heads: the budget shrinks H-fold).
        monkeypatch.setattr(chunk_budget, "CPU_BUDGET_BYTES", 4 * 2 * 2 * 11 * (2 * C_M + 4 * C_H * HEADS))
        chunked = layer(m, z, pair_mask, chunk_heads)
    for name, out in (("one shot", one_shot), ("chunked", chunked)):
        assert torch.isfinite(out).all()
        assert_within_baseline(name, out * valid, ref, base, dtype=torch.float32)
    torch.testing.assert_close(chunked, one_shot, rtol=1e-6, atol=1e-6)
    # The reference backend takes the op-per-chunk path; same answer.
    by_reference = ours(backend="reference").eval()
    by_reference.load_state_dict(boltz.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(by_reference(m, z, pair_mask, chunk_heads), chunked, rtol=1e-6, atol=1e-6)


def test_padded_rows_are_zero_and_padding_does_not_leak(nnh):
    layer = nnh.randomize_(ours()).eval()
    m, z, token_mask, pair_mask = inputs(nnh)
    dirty_m = torch.where(token_mask[:, None, :, None].bool(), m, 1e4 * torch.randn_like(m))
    dirty_z = torch.where(pair_mask[..., None].bool(), z, 1e4 * torch.randn_like(z))
    with torch.no_grad():
        clean, dirty = layer(m, z, pair_mask), layer(dirty_m, dirty_z, pair_mask)
    valid = token_mask[:, None, :, None].bool()
    assert torch.isfinite(dirty).all()
    assert torch.equal(clean * valid, dirty * valid)
    assert not clean.masked_select(~valid).any()  # padded rows: zeros, not an average


def test_state_dict_and_init_match_boltz(nnh):
    cls = boltz_class(nnh)
    theirs, mine = cls(C_M, C_Z, C_H, HEADS), ours()
    assert list(mine.state_dict()) == list(theirs.state_dict())
    for (name, p), q in zip(mine.state_dict().items(), theirs.state_dict().values()):
        assert p.shape == q.shape, name
    mine.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours().state_dict(), strict=True)
    fresh = ours()
    assert fresh.inf == 1e6 and fresh.num_heads == HEADS and fresh.c_h == C_H
    assert not fresh.proj_o.weight.any()
    for norm in (fresh.norm_m, fresh.norm_z):
        assert (norm.weight == 1).all() and not norm.bias.any()
    for proj, fan_in in ((fresh.proj_m, C_M), (fresh.proj_g, C_M), (fresh.proj_z, C_Z)):
        assert proj.bias is None and proj.weight.abs().max() <= fan_in**-0.5 and proj.weight.std() > 0


def test_factory_kwargs_and_backend(nnh):
    layer = nnh.randomize_(ours(dtype=torch.float64))
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert all(p.device.type == "meta" for p in ours(device="meta").parameters())
    ref = ours(dtype=torch.float64, backend="reference")
    ref.load_state_dict(layer.state_dict())
    m, z, _, pair_mask = inputs(nnh)
    m, z = m.double(), z.double()
    torch.testing.assert_close(layer(m, z, pair_mask), ref(m, z, pair_mask), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="backend: unknown backend 'nonsense'"):  # when built
        ours(backend="nonsense")


@pytest.mark.parametrize("chunked", (False, True), ids=("one-shot", "row-chunks"))
def test_autocast_bf16_matches_boltz_accuracy(nnh, monkeypatch, chunked):
    if chunked:
        monkeypatch.setattr(chunk_budget, "CPU_BUDGET_BYTES", 4 * 2 * 2 * 11 * (2 * C_M + 4 * C_H * HEADS))
    boltz = nnh.randomize_(boltz_class(nnh)(C_M, C_Z, C_H, HEADS)).eval()
    layer, exact = ours().eval(), ours(dtype=torch.float64, backend="reference").eval()
    layer.load_state_dict(boltz.state_dict())
    exact.load_state_dict(boltz.state_dict())
    m, z, token_mask, pair_mask = inputs(nnh)
    valid = token_mask[:, None, :, None]
    with torch.no_grad():
        with autocast(m, dtype=torch.bfloat16):
            fast, base = layer(m, z, pair_mask), boltz(m, z, pair_mask)
        ref = exact(m.double(), z.double(), pair_mask)
    assert fast.dtype == base.dtype
    assert_within_baseline("out under bf16 autocast", fast * valid, ref * valid, base * valid, dtype=torch.bfloat16)


def test_bad_inputs_name_the_argument(nnh):
    layer = ours()
    m, z, _, pair_mask = inputs(nnh)
    with pytest.raises(ValueError, match=r"m: expected shape \('\*', '\*', '\*', 16\), got \(2, 5, 11, 15\)"):
        layer(m[..., :15], z, pair_mask)
    with pytest.raises(ValueError, match=r"z: expected shape \(2, 11, 11, 12\), got \(2, 11, 10, 12\)"):
        layer(m, z[:, :, :10], pair_mask)
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 11, 11\), got \(2, 11\)"):
        layer(m, z, pair_mask[:, 0])
    with pytest.raises(ValueError, match=r"msa_mask: expected shape \(2, 5, 11\), got \(2, 11\)"):
        layer(m, z, pair_mask, msa_mask=pair_mask[:, 0])
    with pytest.raises(ValueError, match=r"z: expected a tensor on cpu, got one on meta"):
        layer(m, z.to("meta"), pair_mask)


# Ligo AlphaFold3 naming --------------------------------------------------------------


def ligo_state_dict(seed=0):
    """A state dict under Ligo's MSAPairWeightedAveraging key names (random values)."""
    gen = torch.Generator().manual_seed(seed)
    width = C_H * HEADS
    shapes = {
        "msa_ln.weight": (C_M,),
        "msa_ln.bias": (C_M,),
        "msa_proj.0.weight": (width, C_M),
        "to_gamma.0.weight": (width, C_M),
        "proj_pair_bias.0.weight": (C_Z,),
        "proj_pair_bias.0.bias": (C_Z,),
        "proj_pair_bias.1.weight": (HEADS, C_Z),
        "output_proj.weight": (C_M, width),
    }
    return {k: torch.randn(s, generator=gen, dtype=torch.float64) / (s[-1] ** 0.5 if len(s) > 1 else 5) for k, s in shapes.items()}


def ligo_forward(sd, m, z, msa_mask, z_mask, inf=1e8):
    """Ligo's math, written out: LN -> values and sigmoid gate per head; pair bias from
    LN(z) plus inf * (mask - 1); softmax over j; values masked by the MSA mask."""
    ln = torch.nn.functional.layer_norm
    m_ln = ln(m, (C_M,), sd["msa_ln.weight"], sd["msa_ln.bias"])
    v = (m_ln @ sd["msa_proj.0.weight"].T).unflatten(-1, (HEADS, C_H)) * msa_mask[..., None, None]
    g = torch.sigmoid(m_ln @ sd["to_gamma.0.weight"].T).unflatten(-1, (HEADS, C_H))
    bias = ln(z, (C_Z,), sd["proj_pair_bias.0.weight"], sd["proj_pair_bias.0.bias"]) @ sd["proj_pair_bias.1.weight"].T
    weights = torch.softmax(bias + inf * (z_mask[..., None] - 1), dim=-2)  # [B, i, j, H]
    o = g * torch.einsum("bijh,bsjhc->bsihc", weights, v)
    return o.flatten(-2) @ sd["output_proj.weight"].T


def test_ligo_state_dict_converts_and_matches_ligo_math(nnh):
    sd = ligo_state_dict()
    layer = ours(dtype=torch.float64)
    layer.load_state_dict(convert_ligo_state_dict(sd), strict=True)
    m, z, token_mask, pair_mask = (t.double() for t in inputs(nnh))
    msa_mask = token_mask[:, None, :].expand(2, 5, 11).clone()
    msa_mask[0, 1, 3] = 0.0  # a gap: Ligo zeroes its values
    valid = token_mask[:, None, :, None]
    expected = ligo_forward(sd, m, z, msa_mask, pair_mask) * valid
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            got = layer(m, z, pair_mask, msa_mask=msa_mask) * valid
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_ligo_conversion_with_prefix_keeps_other_keys():
    sd = {"trunk.pwa." + k: v for k, v in ligo_state_dict().items()}
    sd["trunk.other.weight"] = torch.zeros(3)
    converted = convert_ligo_state_dict(sd, prefix="trunk.pwa.")
    assert converted["trunk.other.weight"] is sd["trunk.other.weight"]
    for ligo_key, our_key in LIGO_KEY_MAP.items():
        assert converted["trunk.pwa." + our_key] is sd["trunk.pwa." + ligo_key]
    assert len(converted) == len(sd)
    with pytest.raises(ValueError, match=r"state_dict: no Ligo MSAPairWeightedAveraging keys under prefix 'x.'"):
        convert_ligo_state_dict(sd, prefix="x.")
    with pytest.raises(TypeError, match="prefix"):
        convert_ligo_state_dict(sd, prefix=None)


# ---- the triton backend (interpreter here; GPU-marked sizes in tests/kernels) ----


def _triton_or_skip():
    from foldops.device import kernel_support

    reason = kernel_support("cpu", explicit=True)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("rows, lengths", [(5, (7, 11)), (1, (13,))], ids=("padded", "s1-n13"))
def test_triton_backend_parity_with_boltz(nnh, rows, lengths):
    _triton_or_skip()
    boltz = nnh.randomize_(boltz_class(nnh)(C_M, C_Z, C_H, HEADS))
    m, z, token_mask, pair_mask = inputs(nnh, lengths, rows)
    nnh.check_parity(
        boltz,
        lambda **kw: ours(**{"backend": "triton", **kw}),
        lambda layer, m, z, mask: layer(m, z, mask),
        [m, z, pair_mask],
        out_valid=[token_mask[:, None, :, None]],
        in_valid=[torch.ones(()), torch.ones(()), None],
        train=True,
    )


def test_triton_backend_msa_mask_matches_torch(nnh):
    _triton_or_skip()
    layer = nnh.randomize_(ours())
    m, z, token_mask, pair_mask = inputs(nnh)
    msa_mask = token_mask[:, None, :].expand(2, 5, 11).clone()
    msa_mask[0, 3:] = 0
    results = []
    for backend in ("torch", "triton"):
        layer.backend = backend
        leaves_ = [t.clone().requires_grad_() for t in (m, z)]
        out = layer(*leaves_, pair_mask, msa_mask=msa_mask)
        out.square().sum().backward()
        results.append((out, *(t.grad for t in leaves_)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_msa_layer_compiles_fullgraph_with_the_kernel():
    """A whole MSALayer (pair-weighted averaging on the kernel) compiles with
    fullgraph=True and trains (forward + backward) like eager."""
    from foldops.nn import MSALayer

    device = torch.device("cuda")
    torch.manual_seed(0)
    layer = MSALayer(64, 32, 0.0, 0.0, device=device)
    torch.nn.init.normal_(layer.pair_weighted_averaging.proj_o.weight, std=0.02)
    b, s, n = 1, 17, 45
    z = torch.randn(b, n, n, 32, device=device, requires_grad=True)
    m = torch.randn(b, s, n, 64, device=device, requires_grad=True)
    token = torch.ones(b, n, device=device)
    token[:, 40:] = 0
    pair = token[:, :, None] * token[:, None, :]
    msa_mask = token[:, None, :].expand(b, s, n).contiguous()
    compiled = torch.compile(layer, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        z_e, m_e = layer(z, m, pair, msa_mask)
        z_c, m_c = compiled(z, m, pair, msa_mask)
    loss_e = z_e.float().square().mean() + m_e.float().square().mean()
    loss_c = z_c.float().square().mean() + m_c.float().square().mean()
    g_e = torch.autograd.grad(loss_e, [z, m])
    g_c = torch.autograd.grad(loss_c, [z, m])
    torch.testing.assert_close(m_c, m_e, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(z_c, z_e, rtol=3e-2, atol=3e-2)
    for a, b_ in zip(g_c, g_e):
        torch.testing.assert_close(a, b_, rtol=3e-2, atol=3e-2)
