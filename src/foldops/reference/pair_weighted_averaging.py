"""Reference MSA pair-weighted averaging: slow, obviously right (any device, fp64).

Shapes:

    v, gate: [B, S, N, H, D]   logits: [B, H, N, N]   mask: [B, N, N] (True = keep) or None
    msa_mask: [B, S, N] (True = keep) or None   out: [B, S, N, H, D]

    out[b,s,i,h] = sigmoid(gate[b,s,i,h]) * sum_j softmax_j(logits[b,h,i,j] | mask[b,i,j])
                   * msa_mask[b,s,j] * v[b,s,j,h]

(no sigmoid factor when ``gate`` is None; msa_mask 1 when None).

The weights do not depend on the MSA row s: one softmax is shared by all rows. Rows
i whose keys j are all masked give zeros.
"""

from __future__ import annotations

from typing import Optional

import torch

from foldops.reference._softmax import masked_softmax


def pair_weighted_averaging(
    v: torch.Tensor,
    logits: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    msa_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Softmax in fp32 (fp64 for fp64 inputs), the weighted sum in v's dtype.

    This is also "plain PyTorch in low precision": the baseline a fast backend's error
    is compared with.
    """
    softmax_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    keep = None if mask is None else mask.bool()[:, None]
    weights = masked_softmax(logits.to(softmax_dtype), keep, dim=-1)
    if mask is not None:  # keys masked for every row contribute nothing, even NaN
        v = v.masked_fill(~mask.bool().any(dim=1)[:, None, :, None, None], 0)
    if msa_mask is not None:  # padded MSA rows' values count as zero
        v = v.masked_fill(~msa_mask.bool()[..., None, None], 0)
    out = torch.einsum("bhij,bsjhd->bsihd", weights.to(v.dtype), v)
    return out if gate is None else torch.sigmoid(gate) * out
