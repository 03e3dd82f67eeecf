"""foldops.nn Pairformer layers and stacks vs Boltz-2's (boltz.model.layers.pairformer)."""

import warnings

import pytest
import torch

import foldops.nn.pairformer as pf_module
import foldops.nn.triangle_attention as tri_module
from foldops.device import autocast
from foldops.nn import PairformerLayer, PairformerModule, PairformerNoSeqLayer, PairformerNoSeqModule, PairformerStack
from foldops.testing import assert_within_baseline

S, Z, HEADS, PW, PH = 32, 16, 4, 8, 2  # token_s, token_z, heads, pairwise head width / heads
N = 13
LENGTHS = [9, 13]  # item 0 has 4 padded tokens


def boltz(nnh):
    return nnh.import_boltz("boltz.model.layers.pairformer")


def inputs(nnh, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask, pair_mask = nnh.padding_masks(LENGTHS, N)
    return torch.randn(2, N, S, generator=gen), torch.randn(2, N, N, Z, generator=gen), mask, pair_mask


def layer_call(m, s, z, mask, pair_mask):
    return m(s, z, mask, pair_mask)


def valid(mask, pair_mask):
    return [mask[..., None], pair_mask[..., None]]


@pytest.mark.parametrize(
    "mode, dropout, post_layer_norm",
    [("eval", 0.25, False), ("train", 0.0, False), ("train", 0.25, False), ("eval", 0.0, True)],
    ids=("eval", "train-p0", "train-dropout-same-seed", "eval-post-norm"),
)
def test_layer_parity(nnh, mode, dropout, post_layer_norm):
    """train-dropout-same-seed: masks are drawn like Boltz's, so a seeded run drops the same rows."""
    theirs = nnh.randomize_(boltz(nnh).PairformerLayer(S, Z, HEADS, dropout, PW, PH, post_layer_norm, v2=True))
    s, z, mask, pair_mask = inputs(nnh)
    nnh.check_parity(
        theirs,
        lambda **kw: PairformerLayer(S, Z, HEADS, dropout, PW, PH, post_layer_norm, **kw),
        layer_call,
        [s, z, mask, pair_mask],
        out_valid=valid(mask, pair_mask),
        in_valid=valid(mask, pair_mask) + [None, None],
        train=mode == "train",
    )


@pytest.mark.parametrize("mode", ("eval", "train"))
def test_stack_parity_three_blocks(nnh, mode):
    theirs = nnh.randomize_(boltz(nnh).PairformerModule(S, Z, 3, HEADS, 0.0, PW, PH, v2=True), seed=5)
    s, z, mask, pair_mask = inputs(nnh, seed=1)
    out = nnh.check_parity(
        theirs,
        lambda **kw: PairformerStack(S, Z, 3, HEADS, 0.0, PW, PH, **kw),
        layer_call,
        [s, z, mask, pair_mask],
        out_valid=valid(mask, pair_mask),
        in_valid=valid(mask, pair_mask) + [None, None],
        train=mode == "train",
    )
    assert out["outputs"][0].dtype == torch.float32


def test_noseq_layer_and_module_parity(nnh):
    mod = boltz(nnh)
    _, z, _, pair_mask = inputs(nnh, seed=2)
    for theirs, make in (
        (mod.PairformerNoSeqLayer(Z, 0.0, PW, PH), lambda **kw: PairformerNoSeqLayer(Z, 0.0, PW, PH, **kw)),
        (mod.PairformerNoSeqModule(Z, 2, 0.0, PW, PH), lambda **kw: PairformerNoSeqModule(Z, 2, 0.0, PW, PH, **kw)),
    ):
        nnh.check_parity(
            nnh.randomize_(theirs, seed=3),
            make,
            lambda m, z, pm: m(z, pm),
            [z, pair_mask],
            out_valid=[pair_mask[..., None]],
            in_valid=[pair_mask[..., None], None],
        )


def test_state_dict_keys_match_boltz(nnh):
    mod = boltz(nnh)
    assert list(PairformerModule(S, Z, 2, HEADS, 0.25, PW, PH).state_dict()) == list(
        mod.PairformerModule(S, Z, 2, HEADS, 0.25, PW, PH, v2=True).state_dict()
    )
    assert list(PairformerLayer(S, Z, HEADS, post_layer_norm=True).state_dict()) == list(
        mod.PairformerLayer(S, Z, HEADS, post_layer_norm=True, v2=True).state_dict()
    )
    assert list(PairformerNoSeqModule(Z, 2).state_dict()) == list(mod.PairformerNoSeqModule(Z, 2).state_dict())
    assert PairformerModule is PairformerStack


def random_stack(**kwargs):
    torch.manual_seed(11)
    stack = PairformerStack(S, Z, 2, HEADS, 0.25, PW, PH, **kwargs)
    with torch.no_grad():
        for p in stack.parameters():
            p.normal_(0, 0.3)
    return stack


def test_padding_never_leaks(nnh):
    stack = random_stack().eval()
    s, z, mask, pair_mask = inputs(nnh)
    s2 = torch.where(mask[..., None].bool(), s, 30 * torch.randn_like(s))
    z2 = torch.where(pair_mask[..., None].bool(), z, 30 * torch.randn_like(z))
    with torch.no_grad():
        a, b = stack(s, z, mask, pair_mask), stack(s2, z2, mask, pair_mask)
    keep_s, keep_z = mask.bool(), pair_mask.bool()
    torch.testing.assert_close(a[0][keep_s], b[0][keep_s], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[1][keep_z], b[1][keep_z], rtol=1e-5, atol=1e-5)
    for t in a + b:
        assert torch.isfinite(t).all()


def test_inference_chunk_size_rule(monkeypatch):
    seen = []
    real = tri_module.TriangleAttention.forward

    def spy(self, x, mask=None, chunk_size=None, use_kernels=False):
        seen.append(chunk_size)
        return real(self, x, mask, chunk_size, use_kernels)

    monkeypatch.setattr(tri_module.TriangleAttention, "forward", spy)
    stack = PairformerStack(S, Z, 1, HEADS, 0.0, PW, PH)
    assert stack.inference_chunk_size(384) is None  # training
    stack.eval()
    assert (stack.inference_chunk_size(384), stack.inference_chunk_size(385)) == (512, 128)
    s, z = torch.randn(1, 5, S), torch.randn(1, 5, 5, Z)
    mask, pair_mask = torch.ones(1, 5), torch.ones(1, 5, 5)
    with torch.no_grad():
        stack(s, z, mask, pair_mask)
    assert seen == [512, 512]
    small = PairformerStack(S, Z, 1, HEADS, 0.0, PW, PH, chunk_size_threshold=4, chunk_size_large=2).eval()
    with torch.no_grad():
        small(s, z, mask, pair_mask)
    assert seen[2:] == [2, 2]
    auto = PairformerStack(S, Z, 1, HEADS, 0.0, PW, PH, chunk_size_small=None).eval()
    assert auto.inference_chunk_size(5) is None
    stack.train()
    stack(s, z, mask, pair_mask)
    assert seen[-2:] == [None, None]


def grads_of(stack, s, z, mask, pair_mask, seed):
    stack.zero_grad()
    s, z = s.clone().requires_grad_(True), z.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out_s, out_z = stack(s, z, mask, pair_mask)
    (out_s.square().sum() + out_z.square().sum()).backward()
    return [out_s.detach(), out_z.detach(), s.grad, z.grad] + [p.grad.clone() for p in stack.parameters()]


def test_activation_checkpointing_gives_identical_gradients(nnh, monkeypatch):
    calls = []
    real = pf_module.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(pf_module, "checkpoint", spy)
    s, z, mask, pair_mask = inputs(nnh)
    plain = random_stack().train()
    ckpt = random_stack(activation_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    expected = grads_of(plain, s, z, mask, pair_mask, seed=3)
    assert calls == []
    got = grads_of(ckpt, s, z, mask, pair_mask, seed=3)  # dropout 0.25: recomputation must redraw the same masks
    assert calls == [False, False]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ckpt.eval()
    with torch.no_grad():
        ckpt(s, z, mask, pair_mask)
    assert len(calls) == 2  # never at inference


def test_bf16_autocast_on_cpu(nnh):
    """The sequence stack stays fp32 under autocast on CPU (Boltz's guard is CUDA-only)."""
    theirs = nnh.randomize_(boltz(nnh).PairformerLayer(S, Z, HEADS, 0.0, PW, PH, v2=True)).eval()
    ours = nnh.load_into(PairformerLayer(S, Z, HEADS, 0.0, PW, PH), theirs).eval()
    exact = nnh.load_into(PairformerLayer(S, Z, HEADS, 0.0, PW, PH, backend="reference", dtype=torch.float64), theirs)
    s, z, mask, pair_mask = inputs(nnh)
    dtypes = {}
    for name in ("attention", "transition_s", "pre_norm_s"):
        getattr(ours, name).register_forward_hook(lambda mod, args, out, name=name: dtypes.__setitem__(name, out.dtype))
    with torch.no_grad():
        with autocast("cpu", dtype=torch.bfloat16):
            ours_s, ours_z = ours(s, z, mask, pair_mask)
            boltz_s, boltz_z = theirs(s, z, mask, pair_mask)
        exact_s, exact_z = exact(s.double(), z.double(), mask.double(), pair_mask.double())
    assert dtypes == {"attention": torch.float32, "transition_s": torch.float32, "pre_norm_s": torch.float32}
    assert ours_s.dtype == torch.float32
    keep_s, keep_z = mask.bool(), pair_mask.bool()
    for name, o, b, e in (("s", ours_s, boltz_s, exact_s), ("z", ours_z, boltz_z, exact_z)):
        keep = keep_s if name == "s" else keep_z
        assert torch.isfinite(o).all()
        assert_within_baseline(name, o[keep], e[keep], b[keep], dtype=torch.bfloat16)
    # Boltz's CPU sequence stack ran in bf16; foldops's s is far closer to fp64.
    err_ours = (ours_s - exact_s)[keep_s].abs().max()
    err_boltz = (boltz_s - exact_s)[keep_s].abs().max()
    assert err_ours < err_boltz


def test_backend_reaches_every_triangle_attention(monkeypatch):
    seen = []
    real = tri_module.triangle_attention
    monkeypatch.setattr(tri_module, "triangle_attention", lambda *a, **kw: seen.append(kw["backend"]) or real(*a, **kw))
    layer = PairformerLayer(S, Z, HEADS, 0.0, PW, PH, backend="reference")
    layer(torch.randn(1, 4, S), torch.randn(1, 4, 4, Z), torch.ones(1, 4), torch.ones(1, 4, 4))
    assert seen == ["reference", "reference"]
    assert {m.backend for m in layer.modules() if hasattr(m, "backend")} == {"reference"}


def test_factory_kwargs():
    stack = PairformerStack(S, Z, 2, HEADS, 0.25, PW, PH, device="meta", dtype=torch.float64)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in stack.parameters())


def test_unknown_kwargs_warn_like_boltz_ignores_them():
    with pytest.warns(UserWarning, match=r"ignoring arguments \['no_update_s'\]"):
        PairformerStack(S, Z, 1, HEADS, no_update_s=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PairformerStack(S, Z, 1, HEADS)
        PairformerStack(S, Z, 1, HEADS, offload_to_cpu=True)  # honoured, see tests/test_patch_boltz.py


@pytest.mark.parametrize(
    "make, error, pattern",
    [
        (lambda: PairformerLayer(S, Z, v2=False), ValueError, "v2: only v2=True"),
        (lambda: PairformerLayer(S, Z, dropout=1.0), ValueError, r"dropout: expected a dropout rate in \[0, 1\), got 1.0"),
        (lambda: PairformerStack(S, Z, 0), ValueError, "num_blocks: expected a positive int"),
        (lambda: PairformerStack(S, Z, 1, chunk_size_small=0), ValueError, "chunk_size_small"),
        (lambda: PairformerNoSeqLayer(Z, dropout=-0.1), ValueError, "dropout"),
    ],
)
def test_bad_constructor_arguments(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


@pytest.mark.parametrize(
    "s, z, error, pattern",
    [
        (torch.randn(1, 5, S), torch.randn(1, 5, 6, Z), ValueError, r"z: expected shape \(B, N, N, 16\)"),
        (torch.randn(1, 5, S), torch.randn(1, 5, 5, Z + 1), ValueError, "z: expected shape"),
        (torch.randn(1, 4, S), torch.randn(1, 5, 5, Z), ValueError, rf"s: expected shape \(1, 5, {S}\)"),
    ],
)
def test_bad_inputs(s, z, error, pattern):
    n = z.shape[1]
    with pytest.raises(error, match=pattern):
        PairformerLayer(S, Z, HEADS, 0.0, PW, PH)(s, z, torch.ones(1, n), torch.ones(1, n, n))
