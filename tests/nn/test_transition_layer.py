"""foldops.nn.Transition vs Boltz-2's, and its own contracts."""

import math

import pytest
import torch

from foldops.device import autocast
from foldops.nn import Transition
from foldops.testing import assert_within_baseline


def boltz_transition(nnh):
    return nnh.import_boltz("boltz.model.layers.transition").Transition


def make(dim=8, hidden=24, out_dim=None, seed=0, **kwargs):
    layer = Transition(dim, hidden, out_dim, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            noise = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.copy_(noise / p.shape[-1] ** 0.5 if p.dim() == 2 else (1 + 0.2 * noise if "weight" in name else 0.2 * noise))
    return layer


@pytest.mark.parametrize("train", (False, True), ids=("eval", "train"))
@pytest.mark.parametrize("dims", [(16, 64, None), (8, 20, 5)], ids=("dim16", "out_dim5"))
def test_parity_with_boltz(nnh, dims, train):
    boltz = nnh.randomize_(boltz_transition(nnh)(*dims))
    x = torch.randn(2, 7, 7, dims[0])
    nnh.check_parity(
        boltz,
        lambda **kw: Transition(*dims, **kw),
        lambda m, x: m(x),
        [x],
        out_valid=[torch.ones(())],
        in_valid=[torch.ones(())],
        train=train,
    )


def test_parity_with_boltz_chunked_inference(nnh):
    """Boltz's eval forward with its hidden-channel chunk_size, ours with chunked positions."""
    boltz = nnh.randomize_(boltz_transition(nnh)(16, 64), seed=4).eval()
    ours = nnh.load_into(Transition(16, 64, chunk_size=7), boltz).eval()
    exact = nnh.load_into(Transition(16, 64, dtype=torch.float64, backend="reference"), boltz)
    x = torch.randn(3, 11, 16)
    with torch.no_grad():
        b, o, e = boltz(x, 24), ours(x, 24), exact(x.double())
    assert o.dtype == b.dtype == torch.float32 and o.shape == b.shape
    assert_within_baseline("out (foldops fp32 vs fp64)", o, e, b)
    assert_within_baseline("out (boltz fp32 vs fp64)", b, e, o)
    torch.testing.assert_close(o, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("grad", (True, False), ids=("autograd", "inference"))
def test_bf16_autocast_vs_boltz(nnh, grad):
    boltz = nnh.randomize_(boltz_transition(nnh)(16, 64), seed=1).eval()
    ours = nnh.load_into(Transition(16, 64), boltz).eval()
    exact = nnh.load_into(Transition(16, 64, dtype=torch.float64, backend="reference"), boltz)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        e = exact(x.double())
    with torch.set_grad_enabled(grad), autocast(x, torch.bfloat16):
        b, o = boltz(x), ours(x)
    assert o.dtype == b.dtype == torch.bfloat16
    assert_within_baseline("out", o, e, b, dtype=torch.bfloat16)


def test_state_dict_keys_match_boltz(nnh):
    cls = boltz_transition(nnh)
    for args in ((128, 512), (8, 20, 5)):
        theirs, mine = cls(*args).state_dict(), Transition(*args).state_dict()
        assert list(mine) == list(theirs)
        assert all(mine[k].shape == theirs[k].shape for k in theirs)


def test_boltz_loads_our_state_dict(nnh):
    ours = make(8, 20, 5)
    boltz = boltz_transition(nnh)(8, 20, 5)
    boltz.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), boltz(x))


def test_forward_chunk_size_is_accepted_and_ignored():
    layer = make().eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert torch.equal(layer(x, 4), layer(x))
        assert torch.equal(layer(x, chunk_size=64), layer(x))
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        layer(x, 0)


def test_constructor_chunk_size_and_backend_are_passed_down():
    x = torch.randn(2, 13, 8)
    with torch.no_grad():
        expected = make(backend="reference")(x)
        for chunk_size in (1, 5, 26, None):
            torch.testing.assert_close(make(chunk_size=chunk_size)(x), expected, rtol=1e-5, atol=1e-6)


def test_boltz_init_scheme():
    layer = Transition(128, 512)
    assert layer.out_dim == 128 and layer.fc3.weight.shape == (128, 512)
    assert torch.equal(layer.norm.weight, torch.ones(128)) and not layer.norm.bias.any()
    assert layer.norm.eps == 1e-5
    assert not layer.fc3.weight.any()
    for w in (layer.fc1.weight, layer.fc2.weight):
        assert abs(w.std().item() - 1 / math.sqrt(128)) < 0.03 / math.sqrt(128)
        assert w.abs().max().item() <= 2 / math.sqrt(128) / 0.8796 + 1e-6
    assert all(lin.bias is None for lin in (layer.fc1, layer.fc2, layer.fc3))
    with torch.no_grad():
        assert not layer(torch.randn(3, 128)).any()


def test_factory_kwargs():
    layer = Transition(8, 16, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert all(p.device.type == "meta" for p in Transition(8, 16, device="meta").parameters())
    with torch.no_grad():
        assert make(dtype=torch.bfloat16)(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "x, error, pattern",
    [
        (torch.randn(3, 7), ValueError, r"x: expected shape \(..., 8\), got \(3, 7\)"),
        (torch.tensor(1.0), ValueError, r"x: expected shape \(..., 8\), got \(\)"),
        ([1.0], TypeError, "x: expected a torch.Tensor, got list"),
        (torch.randn(3, 8, dtype=torch.float16), TypeError,
         r"x: expected dtype torch.float32 \(the layer's parameters\) outside autocast, got torch.float16"),
    ],
)
def test_bad_inputs(x, error, pattern):
    with pytest.raises(error, match=pattern):
        make()(x)


@pytest.mark.parametrize("kwargs, pattern", [(dict(dim=0), "dim: expected a positive int"),
                                             (dict(hidden=-1), "hidden: expected a positive int"),
                                             (dict(out_dim=2.5), "out_dim: expected a positive int"),
                                             (dict(chunk_size=0), "chunk_size: expected a positive int")])
def test_bad_constructor_args(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        Transition(**kwargs)
