"""Reference invariant point attention (AlphaFold 2, Algorithm 22): slow, literal, fp64-capable.

Shapes (B batch, N residues, H heads, C scalar channels, Pq query/key points, Pv value
points, Cz pair channels):

    q, k, v: [B, N, H, C]     q_pts, k_pts: [B, N, H, Pq, 3]   v_pts: [B, N, H, Pv, 3]
    bias: [B, H, N, N]        point_weights: [H]               z: [B, N, N, Cz]
    mask: [B, N] (True = a real residue)

    logits[b,h,i,j] = scale * q[b,i,h] . k[b,j,h] + bias[b,h,i,j]
                      - point_weights[h] / 2 * sum_p |q_pts[b,i,h,p] - k_pts[b,j,h,p]|^2
    a = softmax_j(logits) over the kept keys j; rows of masked residues are zero
    out[b,i,h]       = sum_j a[b,h,i,j] v[b,j,h]
    out_pts[b,i,h,p] = sum_j a[b,h,i,j] v_pts[b,j,h,p]          (global frame)
    out_pair[b,i,h]  = sum_j a[b,h,i,j] z[b,i,j]

The displacements ``q_pts - k_pts`` are built whole ([B, N, N, H, Pq, 3]): this is
the algorithm as written, for tests and as the baseline "plain PyTorch". Value points
are weighted relative to their mean (added back after; exact in real arithmetic), as
the fast backends do: uncentred, the logits' gradient cancels terms of the points'
distance from the origin.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from foldops.reference._softmax import masked_softmax


def invariant_point_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pts: torch.Tensor,
    k_pts: torch.Tensor,
    v_pts: torch.Tensor,
    bias: torch.Tensor,
    point_weights: torch.Tensor,
    z: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    scale: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three IPA outputs ``(out [B,N,H,C], out_pts [B,N,H,Pv,3], out_pair [B,N,H,Cz])``.

    Products in the inputs' dtypes (scalar terms in q's, point terms in the points'),
    softmax in fp32 (fp64 for fp64 inputs); the attention weights are cast to the
    operands' dtypes for the weighted sums (q's dtype for the pair output, z rounded to
    it too), as OpenFold under autocast. With fp64
    inputs this is the exact reference; with 16-bit inputs it is the baseline a fast
    backend's error is compared with.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if mask is not None:
        # Padded residues' entries are selected away (not multiplied by 0: they may be
        # NaN or inf), so that they reach no real residue's outputs or gradients.
        keep = mask.bool()
        pair = keep[:, :, None] & keep[:, None, :]  # [B, N, N]
        q, k, v, q_pts, k_pts, v_pts = (torch.where(keep.view(keep.shape + (1,) * (t.dim() - 2)), t, 0.0)
                                        for t in (q, k, v, q_pts, k_pts, v_pts))
        z = torch.where(pair[..., None], z, 0.0)
    logits = torch.einsum("bihc,bjhc->bhij", q * scale, k).to(acc)
    logits = logits + bias.to(acc)
    disp = q_pts[:, :, None] - k_pts[:, None, :]  # [B, N, N, H, Pq, 3]
    sq = (disp * disp).sum(dim=(-1, -2))  # [B, N, N, H]
    weights = point_weights.to(sq.dtype)
    logits = logits - (0.5 * weights * sq).permute(0, 3, 1, 2).to(acc)
    if mask is None:
        a = torch.softmax(logits, dim=-1)
    else:
        a = masked_softmax(logits, pair[:, None], dim=-1)  # padded residues' rows are zero
    out = torch.einsum("bhij,bjhc->bihc", a.to(v.dtype), v)
    # Value points relative to their mean over the real residues (the weights of a kept
    # row sum to 1, so the translation is added back as is): the gradient of the logits,
    # a * (dA - rowsum(a dA)), then cancels terms of the protein's size, not of its
    # distance from the origin.
    with torch.no_grad():
        kept = torch.ones(v_pts.shape[:2], dtype=v_pts.dtype, device=v_pts.device) if mask is None \
            else mask.to(v_pts.dtype)
        kept = kept[:, :, None, None, None]  # [B, N, 1, 1, 1]
        count = kept.sum(dim=1, keepdim=True).clamp_min(1.0) * v_pts.shape[3]
        centre = (v_pts * kept).sum(dim=(1, 3), keepdim=True) / count  # [B, 1, H, 1, 3]
    out_pts = torch.einsum("bhij,bjhpx->bihpx", a.to(v_pts.dtype), v_pts - centre) + centre * kept
    # The pair product in q's dtype: an fp32 z beside 16-bit q (a layer under autocast)
    # is rounded as autocast's matmul rounds it.
    out_pair = torch.einsum("bhij,bijc->bihc", a.to(q.dtype), z.to(q.dtype)).to(z.dtype)
    return out.to(q.dtype), out_pts, out_pair
