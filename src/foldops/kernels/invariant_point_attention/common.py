"""Shared @triton.jit helpers of the invariant point attention kernels.

Layout conventions: per-residue tensors are ``t[b, n, h, x]`` (x = channels, or the
flattened point coordinates); a "heads tile" is ``[HP, BLOCK_N, XP]``: every head of
BLOCK_N residues, heads and x padded to powers of two and masked.
"""

import triton
import triton.language as tl


@triton.jit
def load_heads_tile(
    ptr,  # t[b] base: t + b * stride_b (int64 offset already applied)
    offs_h,  # [HP] head indices
    offs_n,  # [BLOCK_N] residue indices
    offs_x,  # [XP] channel indices
    stride_n, stride_h, stride_x,  # t's strides along residues, heads, channels
    h_ok, n_ok, x_ok,  # masks of offs_h < H, offs_n < N, offs_x < X
):
    """``t[b, offs_n, offs_h, offs_x]`` as fp32 ``[HP, BLOCK_N, XP]`` (0 where masked)."""
    ptrs = ptr + offs_n[None, :, None] * stride_n + offs_h[:, None, None] * stride_h + offs_x[None, None, :] * stride_x
    ok = h_ok[:, None, None] & n_ok[None, :, None] & x_ok[None, None, :]
    return tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def load_row(
    ptr,  # t[b, i] base: t + b * stride_b + i * stride_n
    offs_h, offs_x,  # [HP], [XP]
    stride_h, stride_x,
    h_ok, x_ok,
):
    """``t[b, i, offs_h, offs_x]`` as fp32 ``[HP, XP]`` (0 where masked)."""
    ptrs = ptr + offs_h[:, None] * stride_h + offs_x[None, :] * stride_x
    return tl.load(ptrs, mask=h_ok[:, None] & x_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def row_logits(
    q_row,  # [HP, CP] fp32: q[b, i] * scale
    qa_row,  # [HP, DP] fp32: augmented query points [w q_pts | -w/2]
    k_b, ka_b,  # k[b], ka[b] bases
    bias_row,  # bias[b, :, i] base (heads along stride_bias_h, keys along stride_bias_j)
    offs_h, offs_j, offs_c, offs_d,  # [HP], [BLOCK_N], [CP], [DP]
    stride_k_n, stride_k_h, stride_k_c,
    stride_ka_n, stride_ka_h, stride_ka_d,
    stride_bias_h, stride_bias_j,
    h_ok, j_keep, c_ok, d_ok,  # j_keep: key in range, kept by the mask, and the row kept
    j_ok,  # key in range
):
    """Logits ``[HP, BLOCK_N]`` of one query row for every head, fp32; ``-inf`` at dropped keys.

    ``scale q.k + (w q_pts.k_pts - w/2 |k_pts|^2) + bias``: the point term without the
    row constant ``-w/2 |q_pts|^2``, which the softmax cancels. Products are formed
    in fp32 from the operands as stored (exact for 16-bit inputs).
    """
    k = load_heads_tile(k_b, offs_h, offs_j, offs_c, stride_k_n, stride_k_h, stride_k_c, h_ok, j_ok, c_ok)
    s = tl.sum(q_row[:, None, :] * k, axis=2)
    ka = load_heads_tile(ka_b, offs_h, offs_j, offs_d, stride_ka_n, stride_ka_h, stride_ka_d, h_ok, j_ok, d_ok)
    s += tl.sum(qa_row[:, None, :] * ka, axis=2)
    bias = tl.load(bias_row + offs_h[:, None] * stride_bias_h + offs_j[None, :] * stride_bias_j,
                   mask=h_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
    s += bias
    return tl.where(j_keep[None, :], s, float("-inf"))
