"""Reference triangle multiplicative update (AF3 / Boltz-2): slow, obviously right, fp64-capable.

Shapes (D = pair channels, H = hidden (product) channels, H = D in Boltz-2 and
AF3, any H in AF2 / OpenFold; weights in ``nn.Linear`` layout ``[out, in]``):

    x: [B, N, N, D]   mask: [B, N, N] (True = keep) or None   out: [B, N, N, D]
    norm_in_weight, norm_in_bias: [D]   norm_out_weight, norm_out_bias: [H]
    p_in_weight, g_in_weight: [2H, D]   p_out_weight: [D, H]   g_out_weight: [D, D]

    h      = LayerNorm_in(x)
    [a, b] = (h p_in^T) * sigmoid(h g_in^T) * mask          a, b: [B, N, N, H]
    t      = outgoing: t[i,j] = sum_k a[i,k] * b[j,k]
             incoming: t[i,j] = sum_k a[k,i] * b[k,j]        (in fp32, fp64 for fp64 x)
    out    = (LayerNorm_out(t) p_out^T) * sigmoid(h g_out^T)

Masked pairs only zero ``a`` and ``b``: the output at a masked pair is not zeroed
(as in Boltz-2 and cuEquivariance).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from foldops.device import fp32_region

DIRECTIONS = ("outgoing", "incoming")


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the triangular product: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triangle_multiplication(
    x: torch.Tensor,
    mask: Optional[torch.Tensor],
    *,
    direction: str,
    norm_in_weight: torch.Tensor,
    norm_in_bias: torch.Tensor,
    p_in_weight: torch.Tensor,
    g_in_weight: torch.Tensor,
    norm_out_weight: torch.Tensor,
    norm_out_bias: torch.Tensor,
    p_out_weight: torch.Tensor,
    g_out_weight: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Projections in the input dtype (or autocast's), the product and LayerNorm_out in fp32.

    This is also "plain PyTorch in low precision": the baseline a fast backend's error
    is compared with.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    dim, hidden = x.shape[-1], norm_out_weight.shape[-1]
    h = F.layer_norm(x, (dim,), norm_in_weight, norm_in_bias, eps)
    ab = F.linear(h, p_in_weight) * torch.sigmoid(F.linear(h, g_in_weight))
    if mask is not None:
        # where, not a product: a non-finite value at a masked pair must not leak (0 * nan = nan)
        ab = torch.where(mask[..., None] != 0, ab, ab.new_zeros(()))
    wide = product_dtype(x.dtype)
    with fp32_region(x):
        a, b = ab.to(wide).chunk(2, dim=-1)
        if direction == "outgoing":
            t = torch.einsum("bikd,bjkd->bijd", a, b)
        else:
            t = torch.einsum("bkid,bkjd->bijd", a, b)
        t = F.layer_norm(t, (hidden,), norm_out_weight.to(wide), norm_out_bias.to(wide), eps)
    return F.linear(t.to(x.dtype), p_out_weight) * torch.sigmoid(F.linear(h, g_out_weight))
