"""foldops.nn.TriangleAttention{StartingNode,EndingNode} vs Boltz-2's, and its own contracts."""

import pytest
import torch

import foldops.nn.triangle_attention as tri_module
from foldops import budget as chunk_budget
from foldops.nn import TriangleAttention, TriangleAttentionEndingNode, TriangleAttentionStartingNode
from foldops.testing import assert_within_baseline

C, D, H = 16, 8, 3
ROW_BYTES = 2 * 11 * (6 * D * H + 2 * C) * 4  # one row of one inference step, B = 2, N = 11, fp32


def boltz_classes(nnh):
    mod = nnh.import_boltz("boltz.model.layers.triangular_attention.attention")
    return {True: mod.TriangleAttentionStartingNode, False: mod.TriangleAttentionEndingNode}


def ours(starting, d=D, h=H, **kwargs):
    cls = TriangleAttentionStartingNode if starting else TriangleAttentionEndingNode
    return cls(C, d, h, **kwargs)


@pytest.mark.parametrize("train", (False, True), ids=("eval", "train"))
@pytest.mark.parametrize("starting", (True, False), ids=("start", "end"))
def test_parity_with_boltz_padded(nnh, starting, train):
    boltz = nnh.randomize_(boltz_classes(nnh)[starting](C, D, H))
    _, pair_mask = nnh.padding_masks([9, 13], 13)  # 4 padded tokens in item 0
    x = torch.randn(2, 13, 13, C)
    nnh.check_parity(
        boltz,
        lambda **kw: ours(starting, **kw),
        lambda m, x, mask: m(x, mask=mask),
        [x, pair_mask],
        out_valid=[pair_mask[..., None]],
        in_valid=[pair_mask[..., None], None],
        train=train,
    )


@pytest.mark.parametrize("starting", (True, False), ids=("start", "end"))
def test_parity_with_boltz_no_mask_no_batch_dim(nnh, starting):
    boltz = nnh.randomize_(boltz_classes(nnh)[starting](C, D, H), seed=3)
    x = torch.randn(7, 7, C)
    nnh.check_parity(
        boltz,
        lambda **kw: ours(starting, **kw),
        lambda m, x: m(x),
        [x],
        out_valid=[torch.ones(())],
        in_valid=[torch.ones(())],
    )


def test_state_dict_keys_match_boltz(nnh):
    for starting, cls in boltz_classes(nnh).items():
        assert list(ours(starting).state_dict()) == list(cls(C, D, H).state_dict())


def make(starting, seed=0, **kwargs):
    layer = ours(starting, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return layer


@pytest.mark.parametrize("starting", (True, False), ids=("start", "end"))
@pytest.mark.parametrize("chunk_size", (None, 1, 4, 100))
def test_inference_chunks_equal_one_shot(starting, chunk_size):
    layer = make(starting)
    x = torch.randn(2, 11, 11, C)
    pair_mask = torch.rand(2, 11, 11) > 0.2
    one_shot = layer(x, pair_mask)  # grad enabled: never chunked
    with torch.no_grad():
        chunked = layer(x, pair_mask, chunk_size=chunk_size)
        exact = make(starting, dtype=torch.float64, backend="reference")(x.double(), pair_mask)
    assert_within_baseline("chunked", chunked, exact, one_shot)


def test_chunk_size_caps_the_memory_bounded_step(monkeypatch):
    monkeypatch.setattr(chunk_budget, "CPU_BUDGET_BYTES", ROW_BYTES * 3)  # bound: 3 rows
    calls = []
    real = tri_module.triangle_attention
    monkeypatch.setattr(tri_module, "triangle_attention", lambda q, *a, **kw: calls.append(q.shape[1]) or real(q, *a, **kw))
    layer = make(True)
    x = torch.randn(2, 11, 11, C)
    with torch.no_grad():
        layer(x, chunk_size=2)
        layer(x, chunk_size=512)  # Boltz's small-N size: the bound still applies
    assert calls == [2] * 5 + [1] + [3, 3, 3, 2]


def test_default_inference_chunking_kicks_in(monkeypatch):
    monkeypatch.setattr(chunk_budget, "CPU_BUDGET_BYTES", ROW_BYTES * 3)  # 3 rows per step
    calls = []
    real = tri_module.triangle_attention

    def spy(q, *args, **kwargs):
        calls.append(q.shape[1])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(tri_module, "triangle_attention", spy)
    layer = make(False)
    x = torch.randn(2, 11, 11, C)
    with torch.no_grad():
        layer(x)
    assert calls == [3, 3, 3, 2]


@pytest.mark.parametrize("starting", (True, False), ids=("start", "end"))
def test_fully_masked_rows_zero_and_finite_grads(starting):
    layer = make(starting)
    mask = torch.ones(1, 9, 9)
    mask[:, 6:] = 0  # padded rows (start) ...
    mask[:, :, 6:] = 0  # ... and columns (end)
    x = torch.randn(1, 9, 9, C, requires_grad=True)
    out = layer(x, mask)
    out.backward(torch.randn_like(out))
    dead = (mask[0] == 0).all(1) if starting else (mask[0] == 0).all(0)
    assert dead.sum() == 3
    assert (out[0][dead] == 0).all() if starting else (out[0][:, dead] == 0).all()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("starting", (True, False), ids=("start", "end"))
def test_padding_never_leaks(starting):
    layer = make(starting)
    mask, pair_mask = (torch.tensor([[1.0] * 8 + [0.0] * 3]),) * 2
    pair_mask = mask[:, :, None] * mask[:, None, :]
    x = torch.randn(1, 11, 11, C)
    noisy = torch.where(pair_mask[..., None].bool(), x, 100 * torch.randn_like(x))
    with torch.no_grad():
        a, b = layer(x, pair_mask), layer(noisy, pair_mask)
    valid = pair_mask.bool()
    assert torch.equal(a[valid], b[valid])


def test_ending_node_passes_views_not_copies(monkeypatch):
    seen = {}
    real = tri_module.triangle_attention

    def spy(q, k, v, bias, mask, **kwargs):
        seen.update(q=q, k=k, v=v, bias=bias, mask=mask)
        return real(q, k, v, bias, mask, **kwargs)

    monkeypatch.setattr(tri_module, "triangle_attention", spy)
    layer = make(False)
    x = torch.randn(2, 10, 10, C)
    mask = torch.ones(2, 10, 10, dtype=torch.bool)
    mask[1, 7:] = False
    layer(x, mask)
    for name in ("q", "k", "v", "bias", "mask"):
        t = seen[name]
        assert t._base is not None, f"{name} is not a view"
        assert not t.is_contiguous(), f"{name} was copied into the transposed layout"
    # q is [B, I, N, H, D] over columns I of z: stepping I moves by one pair entry.
    assert seen["q"].stride(1) < seen["q"].stride(2)


def test_backend_is_passed_down(monkeypatch):
    seen = []
    real = tri_module.triangle_attention
    monkeypatch.setattr(tri_module, "triangle_attention", lambda *a, **kw: seen.append(kw["backend"]) or real(*a, **kw))
    make(True, backend="reference")(torch.randn(1, 4, 4, C))
    assert seen == ["reference"]


def test_factory_kwargs():
    layer = TriangleAttention(C, D, H, device="meta", dtype=torch.float64)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in layer.parameters())
    layer = TriangleAttention(C, D, H, starting=False, dtype=torch.float64)
    assert not layer.starting
    assert layer(torch.randn(1, 3, 3, C, dtype=torch.float64)).dtype == torch.float64


def test_use_kernels_is_accepted():
    layer = make(True)
    x = torch.randn(1, 5, 5, C)
    torch.testing.assert_close(layer(x, use_kernels=True), layer(x))


@pytest.mark.parametrize(
    "x, mask, chunk, error, pattern",
    [
        (torch.randn(1, 5, 5, C + 1), None, None, ValueError, r"x: expected shape \(\*, N, N, 16\)"),
        (torch.randn(1, 5, 6, C), None, None, ValueError, r"x: expected shape \(\*, N, N, 16\), got \(1, 5, 6, 16\)"),
        (torch.randn(5, C), None, None, ValueError, "x: expected shape"),
        ("x", None, None, TypeError, "x: expected a torch.Tensor"),
        (torch.randn(1, 5, 5, C), torch.ones(1, 5), None, ValueError, r"mask: expected shape \(1, 5, 5\), got \(1, 5\)"),
        (torch.randn(1, 5, 5, C), "m", None, TypeError, "mask: expected a torch.Tensor or None"),
        (torch.randn(1, 5, 5, C), None, 0, ValueError, "chunk_size: expected a positive int"),
    ],
)
def test_bad_inputs(x, mask, chunk, error, pattern):
    with pytest.raises(error, match=pattern):
        make(True)(x, mask, chunk_size=chunk)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="no_heads"):
        TriangleAttention(C, D, 0)


def kernel_device():
    """The device the Triton kernel runs on here (CPU under TRITON_INTERPRET=1), or skip."""
    from foldops.device import kernel_support, resolve_device

    device = resolve_device("auto")
    reason = kernel_support(device, explicit=True)
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    return device


@pytest.mark.parametrize("starting", (True, False), ids=("start", "end"))
def test_triton_backend_takes_the_layer_views(starting):
    """The kernel gets the layer's strided (ending node: transposed) views, whole and chunked."""
    device = kernel_device()
    layers = {
        name: make(starting, d=16, h=2, backend=backend, dtype=dtype).to(device)
        for name, backend, dtype in (
            ("fast", "triton", torch.float32),
            ("base", "torch", torch.float32),
            ("exact", "reference", torch.float64),
        )
    }
    x = torch.randn(1, 7, 7, C, device=device)
    mask = torch.rand(1, 7, 7, device=device) > 0.2
    mask[:, 2] = False
    mask[:, :, 3] = False
    grad_out = torch.randn(1, 7, 7, C, device=device)
    outs = {}
    for name, layer in layers.items():
        xi = x.to(next(layer.parameters()).dtype).requires_grad_(True)
        y = layer(xi, mask)
        (dx,) = torch.autograd.grad(y, xi, grad_out.to(y.dtype))
        with torch.no_grad():
            chunked = layer(xi, mask, chunk_size=3)
        outs[name] = (y.detach(), dx, chunked)
    for i, what in enumerate(("out", "dx", "chunked out")):
        assert_within_baseline(what, outs["fast"][i], outs["exact"][i], outs["base"][i], dtype=torch.float32)


def test_all_kept_mask_is_dropped_on_cpu(monkeypatch):
    masks = []
    real = tri_module.triangle_attention
    monkeypatch.setattr(tri_module, "triangle_attention", lambda q, k, v, b, m, **kw: masks.append(m) or real(q, k, v, b, m, **kw))
    layer = make(True)
    x = torch.randn(1, 5, 5, C)
    full, partial = torch.ones(1, 5, 5), torch.ones(1, 5, 5)
    partial[0, 1, 2] = 0
    assert torch.equal(layer(x, full), layer(x))
    layer(x, partial)
    assert masks[0] is None and masks[1] is None and masks[2] is not None
