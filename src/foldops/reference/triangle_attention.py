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

from typing import Optional

import torch

from foldops.reference.attention_pair_bias import attention_pair_bias


def triangle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention with a pair bias over M = I rows (``attention_pair_bias`` with Nq = Nk =
    N): products in the input dtype, softmax in fp32 (fp64 for fp64 inputs). Also the
    "plain PyTorch in low precision" baseline of the accuracy tests."""
    return attention_pair_bias(q, k, v, bias, mask, scale)
