"""foldops.nn.AttentionPairBias vs Boltz-2's attentionv2.AttentionPairBias."""

import pytest
import torch

import foldops.nn.attention_pair_bias as apb_module
from foldops import budget as chunk_budget
from foldops.nn import AttentionPairBias

CS, CZ, H = 24, 8, 3


def boltz_cls(nnh):
    return nnh.import_boltz("boltz.model.layers.attentionv2").AttentionPairBias


@pytest.mark.parametrize("multiplicity", (1, 3))
@pytest.mark.parametrize("separate_keys", (False, True), ids=("k_in=s", "k_in"))
def test_parity_with_boltz(nnh, multiplicity, separate_keys):
    boltz = nnh.randomize_(boltz_cls(nnh)(CS, CZ, H))
    n, batch = 13, 2
    mask, _ = nnh.padding_masks([9, 13], n)
    mask = mask.repeat_interleave(multiplicity, 0)  # Boltz repeats the token mask per sample
    s = torch.randn(batch * multiplicity, n, CS)
    z = torch.randn(batch, n, n, CZ)
    k_in = torch.randn(batch * multiplicity, n, CS)
    valid_s = mask[..., None]
    if separate_keys:
        call = lambda m, s, z, mask, k: m(s, z, mask, k, multiplicity=multiplicity)  # noqa: E731
        inputs, in_valid = [s, z, mask, k_in], [torch.ones(()), mask[::multiplicity, None, :, None], None, valid_s]
    else:
        call = lambda m, s, z, mask: m(s, z, mask, s, multiplicity=multiplicity)  # noqa: E731
        inputs, in_valid = [s, z, mask], [valid_s, mask[::multiplicity, None, :, None], None]
    nnh.check_parity(
        boltz, lambda **kw: AttentionPairBias(CS, CZ, H, **kw), call, inputs, out_valid=[torch.ones(())], in_valid=in_valid
    )


def test_parity_windowed_without_pair_projection(nnh):
    """Boltz's atom transformer: compute_pair_bias=False, 5 queries against 9 keys."""
    boltz = nnh.randomize_(boltz_cls(nnh)(CS, None, H, compute_pair_bias=False))
    s, k_in = torch.randn(4, 5, CS), torch.randn(4, 9, CS)
    bias = torch.randn(4, 5, 9, H)
    mask = (torch.rand(4, 9) > 0.3).float()
    mask[:, 0] = 1
    nnh.check_parity(
        boltz,
        lambda **kw: AttentionPairBias(CS, None, H, compute_pair_bias=False, **kw),
        lambda m, s, b, mask, k: m(s, b, mask, k),
        [s, bias, mask, k_in],
        out_valid=[torch.ones(())],
        in_valid=[torch.ones(()), mask[:, None, :, None], None, mask[..., None]],
    )


def test_state_dict_keys_match_boltz(nnh):
    cls = boltz_cls(nnh)
    assert list(AttentionPairBias(CS, CZ, H).state_dict()) == list(cls(CS, CZ, H).state_dict())
    assert list(AttentionPairBias(CS, None, H, compute_pair_bias=False).state_dict()) == list(
        cls(CS, None, H, compute_pair_bias=False).state_dict()
    )


def make(**kwargs):
    layer = AttentionPairBias(CS, CZ, H, **kwargs)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return layer


def test_pair_bias_is_shared_not_repeated(monkeypatch):
    seen = {}
    real = apb_module.attention_pair_bias

    def spy(q, k, v, bias, mask, **kw):
        seen.update(q=q.shape, bias=bias.shape, mask=mask.shape)
        return real(q, k, v, bias, mask, **kw)

    monkeypatch.setattr(apb_module, "attention_pair_bias", spy)
    s = torch.randn(2 * 4, 6, CS)
    make()(s, torch.randn(2, 6, 6, CZ), torch.ones(8, 6), s, multiplicity=4)
    assert seen == {"q": (2, 4, 6, H, CS // H), "bias": (2, H, 6, 6), "mask": (2, 4, 6)}


def test_padding_never_leaks():
    layer = make()
    mask = torch.tensor([[1.0] * 7 + [0.0] * 4])
    s, z = torch.randn(1, 11, CS), torch.randn(1, 11, 11, CZ)
    pad = mask[0] == 0
    s2, z2 = s.clone(), z.clone()
    s2[:, pad] = 50 * torch.randn(int(pad.sum()), CS)
    z2[:, :, pad] = 50 * torch.randn(11, int(pad.sum()), CZ)  # bias towards padded keys
    with torch.no_grad():
        a, b = layer(s, z, mask, s), layer(s2, z2, mask, s2)
    assert torch.equal(a[:, ~pad], b[:, ~pad])


def test_all_keys_masked_gives_finite_output_and_grads():
    layer = make()
    s = torch.randn(2, 5, CS, requires_grad=True)
    mask = torch.ones(2, 5)
    mask[1] = 0
    out = layer(s, torch.randn(2, 5, 5, CZ), mask, s)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()
    # No keys: the attention output is zero, so proj_o sees zeros.
    assert (out[1] == 0).all()


def test_factory_kwargs_and_backend():
    layer = AttentionPairBias(CS, CZ, H, device="meta", dtype=torch.float64)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in layer.parameters())
    layer = make(backend="reference", dtype=torch.float64)
    s = torch.randn(1, 4, CS, dtype=torch.float64)
    assert layer(s, torch.randn(1, 4, 4, CZ, dtype=torch.float64), torch.ones(1, 4), s).dtype == torch.float64
    with pytest.raises(ValueError, match="backend: unknown backend 'nope'"):  # when built, not at the first call
        make(backend="nope")


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(s=torch.randn(3, 5, CS)), ValueError, r"s: expected batch 2 x multiplicity 1 = 2 rows \(z has batch 2\), got 3"),
        (dict(s=torch.randn(2, 5, CS + 1)), ValueError, "s: expected shape"),
        (dict(z=torch.randn(2, 5, 4, CZ)), ValueError, "z: expected shape"),
        (dict(mask=torch.ones(2, 4)), ValueError, r"mask: expected shape \(2, 5\), got \(2, 4\)"),
        (dict(k_in=torch.randn(1, 5, CS)), ValueError, "k_in: expected shape"),
        (dict(multiplicity=0), ValueError, "multiplicity: expected a positive int"),
    ],
)
def test_bad_inputs(kwargs, error, pattern):
    args = dict(s=torch.randn(2, 5, CS), z=torch.randn(2, 5, 5, CZ), mask=torch.ones(2, 5), multiplicity=1)
    args.update(kwargs)
    args.setdefault("k_in", args["s"])
    with pytest.raises(error, match=pattern):
        make()(**args)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_heads: expected a divisor of c_s=24, got 5"):
        AttentionPairBias(CS, CZ, 5)
    with pytest.raises(ValueError, match="c_z"):
        AttentionPairBias(CS, None, H)


def test_inference_projects_the_pair_bias_in_row_chunks(monkeypatch):
    monkeypatch.setattr(chunk_budget, "CPU_BUDGET_BYTES", 2 * (2 * 2 * 9 * CZ * 4))  # 2 rows per step
    rows_seen = []
    layer = make()
    layer.proj_z[0].register_forward_hook(lambda mod, args, out: rows_seen.append(args[0].shape[1]))
    s, z, mask = torch.randn(2, 9, CS), torch.randn(2, 9, 9, CZ), torch.ones(2, 9)
    mask[0, 6:] = 0
    one_shot = layer(s, z, mask, s)
    assert rows_seen == [9]
    with torch.no_grad():
        chunked = layer(s, z, mask, s)
    assert rows_seen[1:] == [2, 2, 2, 2, 1]
    torch.testing.assert_close(chunked, one_shot.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("c_s", [32, 48], ids=["d16", "d24-padded"])
def test_triton_backend_with_multiplicity(c_s):
    """The kernel reads the shared bias once per item and the [B, N] mask expanded over
    samples; head dim 24 (Boltz's 384 channels over 16 heads) runs zero-padded to 32."""
    from foldops.device import kernel_support, resolve_device
    from foldops.testing import assert_within_baseline

    device = resolve_device("auto")
    reason = kernel_support(device, explicit=True)
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    layers = {}  # over 2 heads
    for name, backend, dtype in (("fast", "triton", torch.float32), ("base", "torch", torch.float32), ("exact", "reference", torch.float64)):
        layer = AttentionPairBias(c_s, CZ, 2, backend=backend, dtype=dtype)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        layers[name] = layer.to(device)
    s, z = torch.randn(6, 5, c_s, device=device), torch.randn(2, 5, 5, CZ, device=device)
    mask = torch.ones(6, 5, device=device)
    mask[1, 3:] = 0
    outs = {}
    for name, layer in layers.items():
        dtype = next(layer.parameters()).dtype
        si = s.to(dtype).requires_grad_(True)
        y = layer(si, z.to(dtype), mask, si, multiplicity=3)
        (ds,) = torch.autograd.grad(y.sum(), si)
        outs[name] = (y.detach(), ds)
    for i, what in enumerate(("out", "ds")):
        assert_within_baseline(what, outs["fast"][i], outs["exact"][i], outs["base"][i], dtype=torch.float32)
