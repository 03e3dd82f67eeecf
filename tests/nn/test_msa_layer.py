"""foldops.nn.MSALayer vs Boltz-2's (boltz.model.modules.trunkv2.MSALayer)."""

import pytest
import torch

from foldops.nn import MSALayer

M, Z, PW, PH = 8, 16, 8, 2  # msa_s, token_z, pairwise head width / heads
N, ROWS = 13, 5
LENGTHS = [9, 13]


def boltz_layer(nnh, *args):
    return nnh.import_boltz("boltz.model.modules.trunkv2").MSALayer(*args)


def inputs(nnh, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask, pair_mask = nnh.padding_masks(LENGTHS, N)
    z = torch.randn(2, N, N, Z, generator=gen)
    m = torch.randn(2, ROWS, N, M, generator=gen)
    msa_mask = (torch.rand(2, ROWS, N, generator=gen) > 0.2).float() * mask[:, None, :]
    return z, m, pair_mask, msa_mask, mask


@pytest.mark.parametrize(
    "mode, dropout", [("eval", 0.25), ("train", 0.0), ("train", 0.25)], ids=("eval", "train-p0", "train-dropout-same-seed")
)
def test_parity_with_boltz(nnh, mode, dropout):
    theirs = nnh.randomize_(boltz_layer(nnh, M, Z, dropout, dropout, PW, PH))
    z, m, pair_mask, msa_mask, mask = inputs(nnh)
    z_valid, m_valid = pair_mask[..., None], mask[:, None, :, None]
    nnh.check_parity(
        theirs,
        lambda **kw: MSALayer(M, Z, dropout, dropout, PW, PH, **kw),
        lambda layer, z, m, pm, mm: layer(z, m, pm, mm),
        [z, m, pair_mask, msa_mask],
        out_valid=[z_valid, m_valid],
        in_valid=[z_valid, m_valid, None, None],
        train=mode == "train",
    )


def test_state_dict_keys_match_boltz(nnh):
    assert list(MSALayer(M, Z, 0.15, 0.25, PW, PH).state_dict()) == list(
        boltz_layer(nnh, M, Z, 0.15, 0.25, PW, PH).state_dict()
    )


def random_layer(**kwargs):
    torch.manual_seed(3)
    layer = MSALayer(M, Z, 0.15, 0.25, PW, PH, **kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer.eval()


def test_padding_never_leaks(nnh):
    layer = random_layer()
    z, m, pair_mask, msa_mask, mask = inputs(nnh)
    pad = ~mask.bool()
    z2 = torch.where(pair_mask[..., None].bool(), z, 30 * torch.randn_like(z))
    m2 = torch.where(pad[:, None, :, None], 30 * torch.randn_like(m), m)
    with torch.no_grad():
        (za, ma), (zb, mb) = layer(z, m, pair_mask, msa_mask), layer(z2, m2, pair_mask, msa_mask)
    keep_z = pair_mask.bool()
    keep_m = mask.bool()[:, None, :].expand(-1, ROWS, -1)
    torch.testing.assert_close(za[keep_z], zb[keep_z], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ma[keep_m], mb[keep_m], rtol=1e-5, atol=1e-5)
    for t in (za, ma, zb, mb):
        assert torch.isfinite(t).all()


def test_msa_dropout_drops_whole_msa_rows(nnh, monkeypatch):
    """msa_dropout: one Bernoulli draw per MSA row ([B, S, 1, 1]); the pair-weighted
    averaging update of a dropped row vanishes, a kept one is scaled by 1/(1-p)."""
    layer = random_layer()
    z, m, pair_mask, msa_mask, _ = inputs(nnh)
    update = torch.randn_like(m)
    monkeypatch.setattr(layer.pair_weighted_averaging, "forward", lambda m, z, mask, chunk_heads=False: update)
    monkeypatch.setattr(layer.msa_transition, "forward", lambda m, chunk_size=None: torch.zeros_like(m))
    layer.msa_dropout = 0.5
    layer.train()
    with torch.no_grad():
        _, out = layer(z, m, pair_mask, msa_mask)
    scale = (out - m) / update  # [B, S, N, C]: 0 or 2, constant over each MSA row
    assert torch.allclose(scale, scale[:, :, :1, :1].expand_as(scale))
    values = set(torch.round(scale[:, :, 0, 0], decimals=4).flatten().tolist())
    assert values <= {0.0, 2.0}


def test_backend_and_factory_kwargs():
    layer = MSALayer(M, Z, 0.1, 0.1, PW, PH, backend="reference", device="meta", dtype=torch.float64)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in layer.parameters())
    assert {mod.backend for mod in layer.modules() if hasattr(mod, "backend")} == {"reference"}


@pytest.mark.parametrize(
    "z, m, error, pattern",
    [
        (torch.randn(1, 4, 4, Z), torch.randn(1, 3, 5, M), ValueError, r"m: expected shape \(1, '\*', 4, 8\)"),
        (torch.randn(1, 4, 4, Z + 1), torch.randn(1, 3, 4, M), ValueError, "z: expected shape"),
    ],
)
def test_bad_inputs(z, m, error, pattern):
    n = z.shape[1]
    with pytest.raises(error, match=pattern):
        random_layer()(z, m, torch.ones(1, n, n), torch.ones(1, m.shape[1], n))


def test_bad_dropout():
    with pytest.raises(ValueError, match=r"msa_dropout: expected a dropout rate in \[0, 1\)"):
        MSALayer(M, Z, 1.5, 0.1)
    with pytest.raises(ValueError, match="dropout"):
        MSALayer(M, Z, 0.1, -0.5)
