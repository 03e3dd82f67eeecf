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
def logits_tile(
    q_ptrs, k_ptrs,  # pointers to channel 0 of q[b, i, h] and k[b, j, h], broadcastable to the tile
    q_ok, k_ok,  # their load masks, broadcastable likewise
    stride_q_c, stride_k_c,
    qp_ptrs, kp_ptrs,  # pointers to coordinate 0 of q_pts[b, i, h] and k_pts[b, j, h] (fp32)
    stride_qp_d, stride_kp_d,
    bias,  # the tile's pair bias, fp32
    w,  # point weights, broadcastable to the tile
    scale,
    C: tl.constexpr,  # scalar channels
    D: tl.constexpr,  # point coordinates, 3 Pq
):
    """``(logits, dist2)`` for a tile of (query, key) pairs, fp32.

    logits = ``(sum_c (scale q_c) k_c + bias) - w/2 dist2``, dist2 = ``sum_d (q_d - k_d)^2``,
    each sum formed one channel after another, in that order. Every kernel forms its
    logits here, whatever its tile's orientation, so the backward's recomputed logits
    equal the forward's bit for bit and exp(s - lse) reproduces the forward's
    normalised weights (a recompute off by eps |s| would put that relative error on
    every weight). The squared distances come from coordinate differences: no
    cancellation however far the points are from the origin.
    """
    acc = tl.zeros(bias.shape, tl.float32)
    for c in tl.static_range(C):
        qc = tl.load(q_ptrs + c * stride_q_c, mask=q_ok, other=0.0).to(tl.float32) * scale
        kc = tl.load(k_ptrs + c * stride_k_c, mask=k_ok, other=0.0).to(tl.float32)
        acc += qc * kc
    dist2 = tl.zeros(bias.shape, tl.float32)
    for d in tl.static_range(D):
        qd = tl.load(qp_ptrs + d * stride_qp_d, mask=q_ok, other=0.0)
        kd = tl.load(kp_ptrs + d * stride_kp_d, mask=k_ok, other=0.0)
        diff = qd - kd
        dist2 += diff * diff
    return (acc + bias) - 0.5 * w * dist2, dist2
