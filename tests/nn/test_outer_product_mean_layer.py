"""foldops.nn.OuterProductMean vs Boltz-2's, and its own contracts."""

import pytest
import torch

from foldops.device import autocast
from foldops.nn import OuterProductMean
from foldops.testing import assert_within_baseline

C_IN, C_HIDDEN, C_OUT = 16, 6, 12


def boltz_class(nnh):
    return nnh.import_boltz("boltz.model.layers.outer_product_mean").OuterProductMean


def msa_mask(lengths, rows, n, dead_rows=()):
    """[B, S, N] float mask: tokens beyond each length padded, MSA rows ``dead_rows`` empty."""
    mask = torch.zeros(len(lengths), rows, n)
    for b, length in enumerate(lengths):
        mask[b, :, :length] = 1.0
    mask[:, list(dead_rows)] = 0.0
    mask[0, 1, 2] = 0.0  # a gap inside the alignment
    return mask


@pytest.mark.parametrize("boltz_chunk", (None, 4), ids=("boltz-one-shot", "boltz-chunked"))
@pytest.mark.parametrize("chunk", (None, 3), ids=("auto", "chunk3"))
@pytest.mark.parametrize("train", (False, True), ids=("eval", "train"))
def test_parity_with_boltz(nnh, train, chunk, boltz_chunk):
    boltz = nnh.randomize_(boltz_class(nnh)(C_IN, C_HIDDEN, C_OUT))
    mask = msa_mask([7, 11], rows=5, n=11, dead_rows=[3])
    m = torch.randn(2, 5, 11, C_IN)
    nnh.check_parity(
        boltz,
        lambda **kw: OuterProductMean(C_IN, C_HIDDEN, C_OUT, chunk_size=chunk, **kw),
        lambda layer, m, mask: layer(m, mask),
        [m, mask],
        out_valid=[torch.ones(())],
        in_valid=[torch.ones(()), None],
        train=train,
        boltz_call=lambda layer, m, mask: layer(m, mask, boltz_chunk),
    )


@pytest.mark.parametrize("rows, n", [(1, 13), (3, 2), (1, 1)], ids=("single-seq", "n2", "n1"))
def test_parity_with_boltz_awkward_sizes(nnh, rows, n):
    boltz = nnh.randomize_(boltz_class(nnh)(C_IN, C_HIDDEN, C_OUT), seed=5)
    mask = torch.ones(1, rows, n)
    nnh.check_parity(
        boltz,
        lambda **kw: OuterProductMean(C_IN, C_HIDDEN, C_OUT, **kw),
        lambda layer, m, mask: layer(m, mask),
        [torch.randn(1, rows, n, C_IN), mask],
        out_valid=[torch.ones(())],
        in_valid=[torch.ones(()), None],
    )


def test_state_dict_and_init_match_boltz(nnh):
    cls = boltz_class(nnh)
    theirs, ours = cls(C_IN, C_HIDDEN, C_OUT), OuterProductMean(C_IN, C_HIDDEN, C_OUT)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, p), q in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert p.shape == q.shape, name
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(OuterProductMean(C_IN, C_HIDDEN, C_OUT).state_dict(), strict=True)
    # Same init scheme: zero output projection (the update starts at zero), LayerNorm
    # ones/zeros, PyTorch's default Linear init (|w| <= 1/sqrt(fan_in)) for proj_a/b.
    fresh = OuterProductMean(C_IN, 32, C_OUT)
    assert not fresh.proj_o.weight.any() and not fresh.proj_o.bias.any()
    assert (fresh.norm.weight == 1).all() and not fresh.norm.bias.any()
    for proj in (fresh.proj_a, fresh.proj_b):
        assert proj.bias is None
        assert proj.weight.abs().max() <= C_IN**-0.5
        assert proj.weight.std() > 0.5 * C_IN**-0.5 / 3**0.5
    out = fresh(torch.randn(1, 3, 5, C_IN), torch.ones(1, 3, 5))
    assert out.shape == (1, 5, 5, C_OUT) and not out.any()


def test_factory_kwargs_and_backend():
    layer = OuterProductMean(C_IN, C_HIDDEN, C_OUT, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    meta = OuterProductMean(C_IN, C_HIDDEN, C_OUT, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    torch.nn.init.normal_(layer.proj_o.weight)
    m, mask = torch.randn(2, 3, 7, C_IN, dtype=torch.float64), msa_mask([5, 7], 3, 7)
    ref = OuterProductMean(C_IN, C_HIDDEN, C_OUT, dtype=torch.float64, backend="reference")
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(m, mask), ref(m, mask), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(m, mask, chunk_size=1), ref(m, mask), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="backend: unknown backend 'nonsense'"):  # when built
        OuterProductMean(C_IN, C_HIDDEN, C_OUT, backend="nonsense")


def test_padded_positions_do_not_leak(nnh):
    layer = nnh.randomize_(OuterProductMean(C_IN, C_HIDDEN, C_OUT)).eval()
    mask = msa_mask([7, 11], rows=5, n=11, dead_rows=[3])
    m = torch.randn(2, 5, 11, C_IN)
    dirty = torch.where(mask[..., None].bool(), m, 1e4 * torch.randn_like(m))
    for chunk in (None, 2):
        with torch.no_grad():
            assert torch.equal(layer(m, mask, chunk), layer(dirty, mask, chunk))
    # Masked MSA positions get no gradient at all.
    m = m.requires_grad_(True)
    layer(m, mask).square().sum().backward()
    assert torch.isfinite(m.grad).all() and (m.grad[mask == 0] == 0).all()


def test_autocast_bf16_matches_boltz_accuracy(nnh):
    boltz = nnh.randomize_(boltz_class(nnh)(C_IN, C_HIDDEN, C_OUT)).eval()
    ours = OuterProductMean(C_IN, C_HIDDEN, C_OUT).eval()
    ours.load_state_dict(boltz.state_dict())
    exact = OuterProductMean(C_IN, C_HIDDEN, C_OUT, dtype=torch.float64, backend="reference").eval()
    exact.load_state_dict(boltz.state_dict())
    mask = msa_mask([7, 11], rows=5, n=11)
    m = torch.randn(2, 5, 11, C_IN)
    with torch.no_grad():
        with autocast(m, dtype=torch.bfloat16):
            fast, base = ours(m, mask), boltz(m, mask)
        ref = exact(m.double(), mask)
    assert fast.dtype == base.dtype
    assert_within_baseline("out under bf16 autocast", fast, ref, base, dtype=torch.bfloat16)


def test_bad_inputs_name_the_argument():
    layer = OuterProductMean(C_IN, C_HIDDEN, C_OUT)
    m, mask = torch.randn(1, 3, 5, C_IN), torch.ones(1, 3, 5)
    with pytest.raises(ValueError, match=r"m: expected shape \('\*', '\*', '\*', 16\), got \(1, 3, 5, 15\)"):
        layer(m[..., :15], mask)
    with pytest.raises(ValueError, match=r"mask: expected shape \(1, 3, 5\), got \(1, 5\)"):
        layer(m, mask[:, 0])
    with pytest.raises(ValueError, match=r"chunk_size: expected a positive int"):
        layer(m, mask, chunk_size=0)
    with pytest.raises(ValueError, match=r"chunk_size: expected a positive int"):
        OuterProductMean(C_IN, C_HIDDEN, C_OUT, chunk_size=1.5)
