"""Row-wise / column-wise dropout (foldops.nn.dropout) with Boltz-2's semantics."""

import pytest
import torch

from foldops.nn import DropoutColumnwise, DropoutRowwise, get_dropout_mask
from foldops.nn.dropout import dropout_residual


@pytest.mark.parametrize("columnwise, shape", [(False, (3, 7, 1, 1)), (True, (3, 1, 5, 1))])
def test_mask_shape_dtype_and_values(columnwise, shape):
    z = torch.randn(3, 7, 5, 4)
    mask = get_dropout_mask(0.25, z, True, columnwise=columnwise)
    assert mask.shape == shape and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, torch.tensor(1.0 / 0.75, dtype=torch.float32).item()}


@pytest.mark.parametrize("columnwise", (False, True))
def test_mask_statistics(columnwise):
    """Keep rate 1-p per draw and mean 1 (unbiased), within 5 binomial sigmas."""
    p, draws = 0.25, 400 * 500
    z = torch.empty(1).expand(400, 500, 500, 1)  # only the shape matters
    mask = get_dropout_mask(p, z, True, columnwise=columnwise)
    assert mask.numel() == draws
    kept = (mask > 0).double().mean().item()
    sigma = (p * (1 - p) / draws) ** 0.5
    assert abs(kept - (1 - p)) < 5 * sigma
    assert abs(mask.double().mean().item() - 1.0) < 5 * sigma / (1 - p)


def test_draws_are_independent_across_rows():
    mask = get_dropout_mask(0.5, torch.empty(200, 200, 1, 1), True)[..., 0, 0].double()
    centred = mask - mask.mean()
    corr = (centred[:, 1:] * centred[:, :-1]).mean() / centred.var()
    assert abs(corr.item()) < 5 / 200  # neighbouring rows: uncorrelated within 5 sigma


def test_eval_and_zero_rate_give_ones_without_drawing():
    z = torch.randn(2, 4, 4, 3)
    state = torch.get_rng_state()
    for mask in (get_dropout_mask(0.25, z, False), get_dropout_mask(0.0, z, True)):
        assert torch.equal(mask, torch.ones(2, 4, 1, 1))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("columnwise", (False, True))
def test_same_masks_as_boltz_for_the_same_seed(nnh, columnwise):
    boltz = nnh.import_boltz("boltz.model.layers.dropout")
    z = torch.randn(2, 9, 9, 4)
    torch.manual_seed(5)
    ours = get_dropout_mask(0.3, z, True, columnwise)
    torch.manual_seed(5)
    theirs = boltz.get_dropout_mask(0.3, z, True, columnwise)
    assert torch.equal(ours, theirs)
    assert torch.equal(get_dropout_mask(0.3, z, False, columnwise), boltz.get_dropout_mask(0.3, z, False, columnwise))


@pytest.mark.parametrize("columnwise", (False, True))
def test_dropout_residual_drops_whole_rows_or_columns(columnwise):
    x, update = torch.randn(2, 6, 6, 3), torch.randn(2, 6, 6, 3)
    out = dropout_residual(x, update, 0.5, True, columnwise)
    scale = (out - x) / update
    ref = scale[:, :1, :, :1] if columnwise else scale[:, :, :1, :1]
    torch.testing.assert_close(scale, ref.expand_as(scale))
    assert set(torch.round(ref, decimals=4).unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(dropout_residual(x, update, 0.5, False, columnwise), x + update)


def test_dropout_residual_keeps_boltz_dtype_promotion():
    x, update = torch.randn(1, 3, 3, 2), torch.randn(1, 3, 3, 2, dtype=torch.bfloat16)
    assert dropout_residual(x, update, 0.25, True).dtype == torch.float32
    assert dropout_residual(x, update, 0.25, False).dtype == torch.float32


@pytest.mark.parametrize("cls, columnwise", [(DropoutRowwise, False), (DropoutColumnwise, True)])
def test_modules(cls, columnwise):
    x = torch.randn(2, 5, 7, 3, dtype=torch.bfloat16)
    layer = cls(0.5)
    assert layer.eval()(x) is x
    out = layer.train()(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    scale = (out.float() / x.float())
    ref = scale[:, :1, :, :1] if columnwise else scale[:, :, :1, :1]
    torch.testing.assert_close(scale, ref.expand_as(scale))
    assert "p=0.5" in repr(layer)


@pytest.mark.parametrize("p", (1.0, -0.1, 1.5, "0.1", True, None))
def test_bad_rates(p):
    with pytest.raises(ValueError, match="dropout: expected a dropout rate in"):
        get_dropout_mask(p, torch.zeros(1, 2, 2, 1), True)
    with pytest.raises(ValueError, match="p: expected a dropout rate in"):
        DropoutRowwise(p)


def test_bad_tensor():
    with pytest.raises(ValueError, match="z: expected shape"):
        get_dropout_mask(0.1, torch.zeros(2, 3, 4), True)
