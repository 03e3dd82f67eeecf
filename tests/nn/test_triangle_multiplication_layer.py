"""foldops.nn.TriangleMultiplication{Outgoing,Incoming} vs Boltz-2's, and their own contracts."""

import math

import pytest
import torch

from foldops.backends import BackendUnavailableError
from foldops.device import autocast
from foldops.nn import TriangleMultiplicationIncoming, TriangleMultiplicationOutgoing
from foldops.testing import assert_within_baseline

D = 16
OURS = {"outgoing": TriangleMultiplicationOutgoing, "incoming": TriangleMultiplicationIncoming}


def boltz_classes(nnh):
    mod = nnh.import_boltz("boltz.model.layers.triangular_mult")
    return {"outgoing": mod.TriangleMultiplicationOutgoing, "incoming": mod.TriangleMultiplicationIncoming}


def make(direction, seed=0, dim=D, **kwargs):
    layer = OURS[direction](dim, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            noise = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.copy_(noise / p.shape[-1] ** 0.5 if p.dim() == 2 else (1 + 0.2 * noise if "weight" in name else 0.2 * noise))
    return layer


@pytest.mark.parametrize("train", (False, True), ids=("eval", "train"))
@pytest.mark.parametrize("direction", ("outgoing", "incoming"))
def test_parity_with_boltz_padded(nnh, direction, train):
    """Same state dict, fp32: outputs and every gradient as accurate as Boltz's (vs fp64)."""
    boltz = nnh.randomize_(boltz_classes(nnh)[direction](D))
    _, pair_mask = nnh.padding_masks([9, 13], 13)  # 4 padded tokens in item 0
    x = torch.randn(2, 13, 13, D)
    nnh.check_parity(
        boltz,
        lambda **kw: OURS[direction](D, **kw),
        lambda m, x, mask: m(x, mask),
        [x, pair_mask],
        out_valid=[pair_mask[..., None]],
        in_valid=[pair_mask[..., None], None],
        train=train,
    )


@pytest.mark.parametrize("direction", ("outgoing", "incoming"))
def test_inference_matches_boltz_to_rounding(nnh, direction):
    """no_grad (the chunked path) vs Boltz's eval forward, everywhere incl. padded pairs."""
    boltz = nnh.randomize_(boltz_classes(nnh)[direction](D), seed=5).eval()
    ours = nnh.load_into(OURS[direction](D, chunk_size=5), boltz).eval()
    exact = nnh.load_into(OURS[direction](D, dtype=torch.float64, backend="reference"), boltz)
    _, pair_mask = nnh.padding_masks([7, 11], 11)
    x = torch.randn(2, 11, 11, D)
    with torch.no_grad():
        b, o, e = boltz(x, pair_mask), ours(x, pair_mask), exact(x.double(), pair_mask.double())
    assert o.dtype == b.dtype == torch.float32
    assert_within_baseline("out (foldops fp32 vs fp64)", o, e, b)
    assert_within_baseline("out (boltz fp32 vs fp64)", b, e, o)
    torch.testing.assert_close(o, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("grad", (True, False), ids=("autograd", "inference"))
@pytest.mark.parametrize("direction", ("outgoing", "incoming"))
def test_bf16_autocast_at_least_as_accurate_as_boltz(nnh, direction, grad):
    """Boltz under autocast multiplies a, b in bf16; foldops keeps the product in fp32."""
    boltz = nnh.randomize_(boltz_classes(nnh)[direction](D), seed=2).eval()
    ours = nnh.load_into(OURS[direction](D), boltz).eval()
    exact = nnh.load_into(OURS[direction](D, dtype=torch.float64, backend="reference"), boltz)
    _, pair_mask = nnh.padding_masks([12, 9], 12)
    x = torch.randn(2, 12, 12, D)
    valid = pair_mask[..., None].double()
    with torch.no_grad():
        e = exact(x.double(), pair_mask.double()) * valid
    with torch.set_grad_enabled(grad), autocast(x, torch.bfloat16):
        b = boltz(x, pair_mask)
        o = ours(x, pair_mask)
    assert o.dtype == b.dtype == torch.bfloat16
    assert_within_baseline("out", o.double() * valid, e, b.double() * valid, dtype=torch.bfloat16)


def test_state_dict_keys_match_boltz(nnh):
    for direction, cls in boltz_classes(nnh).items():
        theirs = cls(D).state_dict()
        mine = OURS[direction](D).state_dict()
        assert list(mine) == list(theirs)
        assert all(mine[k].shape == theirs[k].shape for k in theirs)


def test_boltz_loads_our_state_dict(nnh):
    for direction, cls in boltz_classes(nnh).items():
        ours = make(direction)
        boltz = cls(D)
        boltz.load_state_dict(ours.state_dict(), strict=True)
        x, mask = torch.randn(1, 6, 6, D), torch.ones(1, 6, 6)
        with torch.no_grad():
            torch.testing.assert_close(ours(x, mask), boltz(x, mask))


@pytest.mark.parametrize("grad", (True, False), ids=("autograd", "inference"))
@pytest.mark.parametrize("direction", ("outgoing", "incoming"))
def test_padded_tokens_never_leak(nnh, direction, grad):
    """Perturbing x at pairs that involve a padded token leaves every valid pair unchanged."""
    layer = make(direction)
    token_mask, pair_mask = nnh.padding_masks([6, 10], 10)
    x = torch.randn(2, 10, 10, D)
    noisy = torch.where(pair_mask[..., None] > 0, x, 100 * torch.randn_like(x))
    with torch.set_grad_enabled(grad):
        a, b = layer(x, pair_mask), layer(noisy, pair_mask)
    valid = pair_mask > 0
    assert torch.equal(a[valid], b[valid])
    assert torch.isfinite(b).all()


def test_use_kernels_selects_nothing():
    layer = make("outgoing")
    x, mask = torch.randn(2, 5, 5, D), torch.rand(2, 5, 5) > 0.2
    with torch.no_grad():
        assert torch.equal(layer(x, mask, use_kernels=True), layer(x, mask))
        assert torch.equal(layer(x, mask, True), layer(x, mask, False))


def test_backend_and_chunk_size_are_passed_down():
    x, mask = torch.randn(1, 9, 9, D), torch.rand(1, 9, 9) > 0.2
    whole = make("incoming", backend="reference")
    with torch.no_grad():
        expected = whole(x, mask)
        for chunk_size in (1, 3, None):
            got = make("incoming", chunk_size=chunk_size)(x, mask)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(BackendUnavailableError, match="cuequivariance"):
        make("incoming", backend="cuequivariance")(x, mask)


def test_leading_dims_and_missing_mask():
    layer = make("outgoing")
    x = torch.randn(2, 3, 5, 5, D)
    mask = torch.rand(2, 3, 5, 5) > 0.3
    with torch.no_grad():
        out = layer(x, mask)
        flat = layer(x.reshape(6, 5, 5, D), mask.reshape(6, 5, 5))
        assert torch.equal(out, flat.reshape(2, 3, 5, 5, D))
        unbatched = layer(x[0, 0], mask[0, 0])
        torch.testing.assert_close(unbatched, out[0, 0])
        torch.testing.assert_close(layer(x[0]), layer(x[0], torch.ones(3, 5, 5)))


def test_boltz_init_scheme():
    layer = TriangleMultiplicationOutgoing(128)
    assert torch.equal(layer.norm_in.weight, torch.ones(128)) and not layer.norm_in.bias.any()
    assert torch.equal(layer.norm_out.weight, torch.ones(128)) and not layer.norm_out.bias.any()
    for zero in (layer.g_in, layer.p_out, layer.g_out):
        assert not zero.weight.any()
    # LeCun normal: truncated at +-2 sigma of the underlying normal, variance 1/fan_in.
    w = layer.p_in.weight
    assert abs(w.std().item() - 1 / math.sqrt(128)) < 0.03 / math.sqrt(128)
    assert w.abs().max().item() <= 2 / math.sqrt(128) / 0.8796 + 1e-6
    assert layer.norm_in.eps == layer.norm_out.eps == 1e-5
    # A fresh layer's update is exactly zero (p_out = 0), as Boltz's.
    with torch.no_grad():
        assert not layer(torch.randn(1, 4, 4, 128), torch.ones(1, 4, 4)).any()


def test_factory_kwargs():
    layer = TriangleMultiplicationIncoming(8, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    meta = TriangleMultiplicationIncoming(8, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    bf16 = make("outgoing", dtype=torch.bfloat16)
    with torch.no_grad():
        assert bf16(torch.randn(1, 4, 4, D, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "x, mask, error, pattern",
    [
        (torch.randn(1, 5, 5, 8), None, ValueError, r"x: expected shape \(\*, N, N, 16\), got \(1, 5, 5, 8\)"),
        (torch.randn(1, 5, 4, D), None, ValueError, r"x: expected shape \(\*, N, N, 16\), got \(1, 5, 4, 16\)"),
        (torch.randn(5, D), None, ValueError, r"x: expected shape \(\*, N, N, 16\)"),
        ("x", None, TypeError, "x: expected a torch.Tensor, got str"),
        (torch.randn(1, 5, 5, D, dtype=torch.float64), None, TypeError,
         r"x: expected dtype torch.float32 \(the layer's parameters\), got torch.float64"),
        (torch.randn(1, 5, 5, D), torch.ones(1, 5), ValueError, r"mask: expected shape \(1, 5, 5\), got \(1, 5\)"),
        (torch.randn(1, 5, 5, D), [[1.0]], TypeError, "mask: expected a torch.Tensor, got list"),
    ],
)
def test_bad_inputs(x, mask, error, pattern):
    with pytest.raises(error, match=pattern):
        make("outgoing")(x, mask)


@pytest.mark.parametrize("kwargs, pattern", [(dict(dim=0), "dim: expected a positive int"),
                                             (dict(dim=8, hidden_dim=0), "hidden_dim: expected a positive int"),
                                             (dict(dim=8, chunk_size=0), "chunk_size: expected a positive int")])
def test_bad_constructor_args(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        TriangleMultiplicationOutgoing(**kwargs)


@pytest.mark.parametrize("grad", (True, False), ids=("autograd", "inference"))
@pytest.mark.parametrize("direction", ("outgoing", "incoming"))
def test_hidden_dim(direction, grad):
    """hidden_dim H != dim: AF2 / OpenFold's shapes under Boltz's key names (p_in, g_in
    dim -> 2H, norm_out over H, p_out H -> dim, g_out dim -> dim); fp32 forward and every
    gradient as accurate as the fp32 reference layer (vs fp64)."""
    layer = make(direction, hidden_dim=24, seed=3)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"norm_in.weight": (D,), "norm_in.bias": (D,), "p_in.weight": (48, D), "g_in.weight": (48, D),
                      "norm_out.weight": (24,), "norm_out.bias": (24,), "p_out.weight": (D, 24),
                      "g_out.weight": (D, D)}
    assert layer.hidden_dim == 24 and "hidden_dim=24" in repr(layer)
    reference = OURS[direction](D, hidden_dim=24, backend="reference")
    exact = OURS[direction](D, hidden_dim=24, backend="reference", dtype=torch.float64)
    reference.load_state_dict(layer.state_dict())
    exact.load_state_dict(layer.state_dict())
    x, mask = torch.randn(2, 7, 7, D), torch.rand(2, 7, 7) > 0.2
    outs, grads = [], []
    for m, t in ((layer, x), (reference, x), (exact, x.double())):
        t = t.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = m(t, mask)
        outs.append(out)
        if grad:
            grads.append(torch.autograd.grad(out.sum(), [t, *m.parameters()]))
    assert_within_baseline("out", outs[0], outs[2], outs[1])
    for i, (g, b, e) in enumerate(zip(*grads)):
        assert_within_baseline(f"grad {i}", g, e, b)


def test_default_hidden_dim_is_dim():
    layer = TriangleMultiplicationOutgoing(D)
    assert layer.hidden_dim == D and "hidden_dim" not in repr(layer)
    same = TriangleMultiplicationOutgoing(D, hidden_dim=D)
    assert {k: v.shape for k, v in same.state_dict().items()} == {k: v.shape for k, v in layer.state_dict().items()}
