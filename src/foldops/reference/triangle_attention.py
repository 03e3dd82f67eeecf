"""Reference triangle attention: the slow, obviously-right version (any device, fp64).

Shapes (I = the row batched over, J = queries, K = keys, J == K == N):

    q, k, v: [B, I, N, H, D]   bias: [B, H, N, N]   mask: [B, I, N] (True = keep)
    out:     [B, I, N, H, D]

    out[b,i,j,h] = sum_k softmax_k(scale * q[b,i,j,h].k[b,i,k,h] + bias[b,h,j,k]
                                   | mask[b,i,k]) * v[b,i,k,h]

Masked keys contribute nothing whatever their values (NaN/inf in k, v or the bias);
rows whose keys are all masked, or whose logits are all -inf, give zeros.

Starting-node triangle attention is this with I = the first pair index; ending node
is this on transposed views; attention with pair bias is I = 1 (or I = samples
sharing one bias).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from foldops.reference._softmax import masked_softmax


def triangle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Products in the input dtype, softmax in fp32 (fp64 for fp64 inputs).

    This is also "plain PyTorch in low precision": the baseline a fast backend's error
    is compared with.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = torch.einsum("bijhd,bikhd->bihjk", q * scale, k).to(softmax_dtype)
    logits = logits + bias.to(softmax_dtype)[:, None]
    keep = None if mask is None else mask.bool()[:, :, None, None, :]
    weights = masked_softmax(logits, keep, dim=-1)
    if mask is not None:  # a masked key contributes nothing, whatever v holds there
        v = v.masked_fill(~mask.bool()[..., None, None], 0)
    return torch.einsum("bihjk,bikhd->bijhd", weights.to(v.dtype), v)
