"""Reference attention with a pair bias: the slow, obviously-right version (any device, fp64).

Shapes (M samples share one pair bias; Nq queries, Nk keys, Nq == Nk or windowed):

    q: [B, M, Nq, H, D]   k, v: [B, M, Nk, H, D]   bias: [B, H, Nq, Nk]
    mask: [B, M, Nk] or [B, Nk] or None (True = keep, over keys)
    out: [B, M, Nq, H, D]

    out[b,m,i,h] = sum_j softmax_j(scale * q[b,m,i,h].k[b,m,j,h] + bias[b,h,i,j]
                                   | mask[b,(m,)j]) * v[b,m,j,h]

Masked keys contribute nothing whatever their values; rows whose keys are all
masked, or whose logits are all -inf, give zeros.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from foldops.reference._softmax import masked_softmax


def attention_pair_bias(
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
    keep = None
    if mask is not None:
        keep = mask.bool()
        if keep.dim() == 2:  # [B, Nk]: shared by the samples
            keep = keep[:, None]
        keep = keep[:, :, None, None, :]
        # A masked key contributes nothing, whatever k and v hold there: zeroed, also
        # for the backward (dq = dS.k would meet 0 * NaN at a NaN k otherwise).
        dead = ~keep[:, :, 0, 0, :, None, None]  # [B, M, Nk, 1, 1]
        k, v = k.masked_fill(dead, 0), v.masked_fill(dead, 0)
    logits = torch.einsum("bmqhd,bmkhd->bmhqk", q * scale, k).to(softmax_dtype)
    logits = logits + bias.to(softmax_dtype)[:, None]
    weights = masked_softmax(logits, keep, dim=-1)
    return torch.einsum("bmhqk,bmkhd->bmqhd", weights.to(v.dtype), v)
