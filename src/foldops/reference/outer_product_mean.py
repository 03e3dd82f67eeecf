"""Reference outer product mean: the slow, obviously-right version (any device, fp64).

Shapes:

    a: [B, S, N, C]   b: [B, S, N, D]   mask: [B, S, N] (True = keep) or None
    out_weight: [O, C * D]   out_bias: [O] or None
    out: [B, N, N, O]

    out[b,i,j] = out_weight @ vec(sum_s m[s,i] m[s,j] a[b,s,i] (x) b[b,s,j])
                 / max(1, sum_s m[s,i] m[s,j]) + out_bias

with vec flattening (c, d) c-major, as Boltz's ``proj_o`` reads it. Masked MSA
positions contribute nothing (a and b are masked here too, so inputs that are
already masked give the same result).
"""

from __future__ import annotations

from typing import Optional

import torch


def outer_product_mean(
    a: torch.Tensor,
    b: torch.Tensor,
    mask: Optional[torch.Tensor],
    out_weight: torch.Tensor,
    out_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Outer product summed in fp32 (fp64 for fp64 inputs), projection in a's dtype.

    This is also "plain PyTorch in low precision" as Boltz does it: the baseline a fast
    backend's error is compared with.
    """
    batch, rows, n, c = a.shape
    d = b.shape[-1]
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    a_acc, b_acc = a.to(acc), b.to(acc)
    if mask is None:
        count = torch.full((batch, n, n), float(max(1, rows)), dtype=acc, device=a.device)
    else:
        keep = mask.to(acc)
        # where, not a product: a masked position contributes nothing, NaN/inf included
        a_acc = a_acc.masked_fill(keep[..., None] == 0, 0)
        b_acc = b_acc.masked_fill(keep[..., None] == 0, 0)
        count = torch.einsum("bsi,bsj->bij", keep, keep).clamp(min=1)
    z = torch.einsum("bsic,bsjd->bijcd", a_acc, b_acc).reshape(batch, n, n, c * d)
    z = z / count[..., None]
    bias = None if out_bias is None else out_bias.to(a.dtype)
    return torch.nn.functional.linear(z.to(a.dtype), out_weight.to(a.dtype), bias)
