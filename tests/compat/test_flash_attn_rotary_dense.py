"""foldops.compat.flash_attn: rotary and FusedDense/FusedMLP against flash_attn's documented semantics."""

import math

import pytest
import torch
import torch.nn.functional as F

from foldops.compat.flash_attn import (
    FusedDense,
    FusedMLP,
    RotaryEmbedding,
    apply_rotary_emb,
    apply_rotary_emb_kv_,
    apply_rotary_emb_qkv_,
)
from foldops.testing import assert_within_baseline


def _angles(seqlen_ro, rotary_dim, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    return torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * inv[None]  # [S_ro, rd/2]


def _rotary64(x, theta_pos, rotary_dim, interleaved):
    """float64 rotary as complex multiplication of channel pairs; theta_pos [..., S, rd/2]."""
    x = x.to(torch.float64)
    head, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        pairs = torch.complex(head[..., 0::2], head[..., 1::2])
    else:
        pairs = torch.complex(head[..., : rotary_dim // 2], head[..., rotary_dim // 2:])
    rot = pairs * torch.polar(torch.ones_like(theta_pos), theta_pos)[..., None, :]
    if interleaved:
        out = torch.stack((rot.real, rot.imag), dim=-1).flatten(-2)
    else:
        out = torch.cat((rot.real, rot.imag), dim=-1)
    return torch.cat((out, rest), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [16, 10])  # full head and a partial one
def test_apply_rotary_emb_matches_float64(interleaved, dtype, rotary_dim):
    B, S, H, D = 2, 7, 3, 16
    x64 = torch.randn(B, S, H, D, dtype=torch.float64)
    theta = _angles(S + 4, rotary_dim)
    cos, sin = theta.cos().float(), theta.sin().float()
    x = x64.to(dtype)
    out = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=3)
    assert out.shape == x.shape and out.dtype == dtype
    exact = _rotary64(x, theta[3:3 + S], rotary_dim, interleaved)
    baseline = _rotary64(x, theta[3:3 + S], rotary_dim, interleaved).to(dtype)  # rounding of the result alone
    assert_within_baseline("rotary", out, exact, baseline)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])


def test_apply_rotary_emb_varlen_positions_restart_and_tensor_offsets():
    H, D = 2, 8
    lengths = [3, 1, 5]
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    x = torch.randn(9, H, D, dtype=torch.float64)
    theta = _angles(12, D)
    offsets = torch.tensor([0, 2, 7])
    out = apply_rotary_emb(x, theta.cos(), theta.sin(), cu_seqlens=cu, max_seqlen=5, seqlen_offsets=offsets)
    for b, L in enumerate(lengths):
        s = slice(int(cu[b]), int(cu[b + 1]))
        pos = torch.arange(L) + offsets[b]
        # positions beyond the table are left unrotated, as flash_attn's kernel does
        th = torch.where((pos < 12)[:, None], theta[pos.clamp_max(11)], torch.zeros(()))
        torch.testing.assert_close(out[s], _rotary64(x[s], th, D, False))


def test_inplace_qkv_rotates_q_k_only_and_backward_is_inverse_rotation():
    B, S, H, D = 2, 5, 2, 8
    theta = _angles(S, D)
    cos, sin = theta.cos(), theta.sin()
    base = torch.randn(B, S, 3, H, D, dtype=torch.float64, requires_grad=True)
    qkv = base * 1.0
    out = apply_rotary_emb_qkv_(qkv, cos, sin)
    assert out is qkv
    expected = torch.stack([_rotary64(base[:, :, 0], theta, D, False), _rotary64(base[:, :, 1], theta, D, False),
                            base[:, :, 2]], dim=2)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, base, g)
    (grad_ref,) = torch.autograd.grad(expected, base, g)
    torch.testing.assert_close(grad, grad_ref)


def test_inplace_gqa_layout_and_kv():
    B, S, Hq, Hk, D = 1, 4, 4, 2, 8
    theta = _angles(S, D)
    qkv = torch.randn(B, S, Hq + 2 * Hk, D, dtype=torch.float64)
    orig = qkv.clone()
    apply_rotary_emb_qkv_(qkv, theta.cos(), theta.sin(), num_heads_q=Hq)
    torch.testing.assert_close(qkv[:, :, :Hq + Hk], _rotary64(orig[:, :, :Hq + Hk], theta, D, False))
    assert torch.equal(qkv[:, :, Hq + Hk:], orig[:, :, Hq + Hk:])
    kv = torch.randn(B, S, 2, Hk, D, dtype=torch.float64)
    orig = kv.clone()
    apply_rotary_emb_kv_(kv, theta.cos(), theta.sin(), interleaved=True)
    torch.testing.assert_close(kv[:, :, 0], _rotary64(orig[:, :, 0], theta, D, True))
    assert torch.equal(kv[:, :, 1], orig[:, :, 1])
    with pytest.raises(ValueError, match="num_heads_q"):
        apply_rotary_emb_qkv_(qkv, theta.cos(), theta.sin())


def test_rotary_embedding_module():
    B, S, H, D = 2, 6, 2, 8
    rope = RotaryEmbedding(D, interleaved=True)
    assert list(rope.state_dict()) == []  # inv_freq is not persistent, as in flash_attn
    qkv = torch.randn(B, S, 3, H, D)
    orig = qkv.clone()
    out = rope(qkv)
    assert out is qkv
    theta = _angles(S, D)
    torch.testing.assert_close(out[:, :, 0], _rotary64(orig[:, :, 0], theta, D, True).float(), rtol=1e-5, atol=1e-5)
    q, kv = torch.randn(B, S, H, D), torch.randn(B, S, 2, H, D)
    q0, kv0 = q.clone(), kv.clone()
    q1, kv1 = rope(q, kv, seqlen_offset=2)
    theta = _angles(S + 2, D)[2:]
    torch.testing.assert_close(q1, _rotary64(q0, theta, D, True).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv1[:, :, 0], _rotary64(kv0[:, :, 0], theta, D, True).float(), rtol=1e-5, atol=1e-5)


def test_rotary_bad_input():
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary_emb(x, torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="seqlen_ro"):
        apply_rotary_emb(x, torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="sin"):
        apply_rotary_emb(x, torch.randn(4, 4), torch.randn(4, 2))
    with pytest.raises(ValueError, match="max_seqlen"):
        apply_rotary_emb(x[0], torch.randn(4, 4), torch.randn(4, 4), cu_seqlens=torch.tensor([0, 4]))


# FusedDense / FusedMLP ---------------------------------------------------------------------

def test_fused_dense_is_linear_with_residual():
    layer = FusedDense(6, 5, return_residual=True, dtype=torch.float64)
    assert list(layer.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 6, dtype=torch.float64)
    out, res = layer(x)
    assert res is x
    torch.testing.assert_close(out, x @ layer.weight.T + layer.bias)
    assert torch.is_tensor(FusedDense(6, 5, bias=False)(x.float())) and FusedDense(6, 5, bias=False).bias is None
    with pytest.raises(ValueError, match="process_group"):
        layer(x, process_group=object())


@pytest.mark.parametrize("activation", ["gelu_approx", "relu", "sqrelu"])
@pytest.mark.parametrize("checkpoint_lvl", [0, 1, 2])
def test_fused_mlp_semantics(activation, checkpoint_lvl):
    mlp = FusedMLP(8, activation=activation, checkpoint_lvl=checkpoint_lvl, dtype=torch.float64)
    assert [k for k in mlp.state_dict()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert mlp.fc1.weight.shape == (32, 8) and mlp.fc2.weight.shape == (8, 32)  # hidden 4x, out = in
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    pre = x @ mlp.fc1.weight.T + mlp.fc1.bias
    act = {"gelu_approx": lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3))),
           "relu": F.relu, "sqrelu": lambda t: F.relu(t) ** 2}[activation](pre)
    expected = act @ mlp.fc2.weight.T + mlp.fc2.bias
    out = mlp(x)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, [x, mlp.fc1.weight], g),
                               torch.autograd.grad(expected, [x, mlp.fc1.weight], g))


def test_fused_mlp_options_and_errors():
    mlp = FusedMLP(4, hidden_features=6, out_features=3, bias1=False, bias2=False, return_residual=True)
    assert list(mlp.state_dict()) == ["fc1.weight", "fc2.weight"]
    x = torch.randn(5, 4)
    out, res = mlp(x)
    assert out.shape == (5, 3) and res is x
    with pytest.raises(ValueError, match="activation"):
        FusedMLP(4, activation="gelu")
    with pytest.raises(ValueError, match="checkpoint_lvl"):
        FusedMLP(4, checkpoint_lvl=3)
