"""Reference variable-length attention: the slow, obviously-right version (any device, fp64).

Packed layout (flash_attn's):

    q: [total_q, H, D]   k, v: [total_k, H_kv, D]   (H % H_kv == 0; query head h reads
                                                      key/value head h // (H // H_kv))
    cu_seqlens_q, cu_seqlens_k: int32 [B+1], 0 = cu[0] <= cu[1] <= ... <= cu[B] = total
    out: [total_q, H, D]   lse: fp32 (fp64 for fp64 inputs) [H, total_q]

Sequence b holds queries cu_seqlens_q[b]:cu_seqlens_q[b+1] (Lq of them) and keys
cu_seqlens_k[b]:cu_seqlens_k[b+1] (Lk). Within it

    out[i, h] = sum_j softmax_j(scale * q[i, h] . k[j, h // g]) v[j, h // g]

over the keys j the row may see: all of them, or with ``causal`` those with
j <= i + Lk - Lq (aligned bottom-right, as flash_attn >= 2.1). A row that sees no key
(Lk = 0, or causal with Lq > Lk) gives zeros and lse = -inf.

Dropout (``dropout_p > 0``) zeroes attention weights with probability p after the
softmax and scales the kept ones by 1 / (1 - p); lse is that of the softmax before
dropout. The reference loops over the sequences on the host: it is the reference.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``; products in the input dtype, softmax in fp32 (fp64 for fp64 inputs).

    This is also "plain PyTorch in low precision": the baseline a fast backend's error
    is compared with. Differentiable in q, k, v (lse too).
    """
    heads, head_dim = q.shape[1], q.shape[2]
    group = heads // k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    starts_q = cu_seqlens_q.tolist()
    starts_k = cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        lq, lk = q1 - q0, k1 - k0
        qs = q[q0:q1]  # [Lq, H, D]
        ks = k[k0:k1].repeat_interleave(group, dim=1)  # [Lk, H, D]
        vs = v[k0:k1].repeat_interleave(group, dim=1)
        logits = torch.einsum("ihd,jhd->hij", qs * scale, ks).to(softmax_dtype)  # [H, Lq, Lk]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if causal:
            i = torch.arange(lq, device=q.device)[:, None]
            j = torch.arange(lk, device=q.device)[None, :]
            keep = j <= i + (lk - lq)
        logits = logits.masked_fill(~keep, -math.inf)
        row_any = keep.any(-1)  # [Lq]
        # Rows without keys: a finite max, then weights 0 and lse -inf, never NaN.
        # (A -inf column keeps amax defined at Lk = 0 without branching on the length,
        # which torch.compile could not trace.)
        row_max = torch.cat([logits, logits.new_full((heads, lq, 1), -math.inf)], -1).amax(-1)
        row_max = torch.where(row_any, row_max, 0.0)
        row_max = row_max.detach().to(softmax_dtype)
        weights = torch.exp(logits - row_max[..., None]).masked_fill(~keep, 0.0)
        total = weights.sum(-1)  # [H, Lq]
        safe_total = torch.where(row_any, total, torch.ones_like(total))
        weights = weights / safe_total[..., None]
        lse = torch.where(row_any, row_max + torch.log(safe_total), -math.inf)
        if dropout_p > 0.0:
            drop = torch.rand(weights.shape, generator=generator, device=q.device) < dropout_p
            weights = weights.masked_fill(drop, 0.0) / (1.0 - dropout_p)
        outs.append(torch.einsum("hij,jhd->ihd", weights.to(v.dtype), vs))
        lses.append(lse)
    if not outs:  # B = 0: empty results that still depend on q, k, v (sums of empty slices)
        anchor = q[:0].sum() + k[:0].sum() + v[:0].sum()
        return q.new_zeros(q.shape) + anchor, q.new_zeros(heads, 0, dtype=softmax_dtype) + anchor
    return torch.cat(outs, 0), torch.cat(lses, 1)
