"""The weight-gradient kernel of MSA pair-weighted averaging: ``_dw_kernel``.

    dW[b, h, i, j] = sum_{s, c} dO'[b, s, i, h, c] * v[b, s, j, h, c]   (fp32)

a product reducing over the S * C columns, one program per (i, j) tile, (b, h) and
split of the columns (``COLS_PER_SPLIT`` each: few tiles, as at small N, would leave
SMs idle); each split writes its own fp32 partial sum, which the launcher adds in a
fixed order. No atomics: deterministic. The values are masked as in the forward. The bias
gradient ``W * (dW - rowsum(W * dW))`` and the value / gate gradients (``_wx_kernel``
in modes 1 and 2) are formed by the launcher.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dw_kernel(
    DOP,  # [B, S, N, H, C] dO' = dO * sigmoid(g) (rows i)
    X,  # [B, S, N, H, C] values v (keys j)
    KEEP,  # [B, S, N] uint8 value keep-mask, if HAS_KEEP
    DW,  # [SPLITS, B, H, N, N] fp32 partial sums of dW (one per column split)
    stride_dop_b, stride_dop_s, stride_dop_n, stride_dop_h, stride_dop_c,
    stride_x_b, stride_x_s, stride_x_n, stride_x_h, stride_x_c,
    stride_keep_b, stride_keep_s, stride_keep_n,
    stride_dw_split, stride_dw_b, stride_dw_h, stride_dw_i, stride_dw_j,
    S,  # MSA rows
    N,  # tokens
    H,  # heads
    BH,  # B * H (program axis 2 is split * BH + b * H + h)
    COLS_PER_SPLIT,  # (s, c) columns per split, a multiple of BLOCK_K
    HAS_KEEP: tl.constexpr,  # KEEP is given
    KEEP_PER_ROW: tl.constexpr,  # KEEP varies with the MSA row s (else [B, 1, N], loaded once)
    C: tl.constexpr,  # head dim
    BLOCK_I: tl.constexpr,  # rows i per program (M)
    BLOCK_J: tl.constexpr,  # keys j per program (N)
    BLOCK_K: tl.constexpr,  # (s, c) columns per step (K)
    PRECISION: tl.constexpr,  # tl.dot input precision
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_z = tl.program_id(2)
    split = pid_z // BH
    pid_bh = pid_z % BH
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = offs_i < N
    j_ok = offs_j < N
    dop_base = DOP + b * stride_dop_b + h * stride_dop_h + offs_i.to(tl.int64)[:, None] * stride_dop_n
    x_base = X + b * stride_x_b + h * stride_x_h + offs_j.to(tl.int64)[None, :] * stride_x_n
    keep_base = KEEP + b * stride_keep_b + offs_j[None, :] * stride_keep_n

    keep_j = j_ok
    if HAS_KEEP and not KEEP_PER_ROW:
        keep_j = j_ok & (tl.load(KEEP + b * stride_keep_b + offs_j * stride_keep_n, mask=j_ok, other=0) != 0)

    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    col_start = split * COLS_PER_SPLIT
    col_end = tl.minimum(col_start + COLS_PER_SPLIT, S * C)
    if PRECISION != "ieee" or DOP.dtype.element_ty != tl.float32:
        # Every split has columns (the launcher's split count), so the loop runs at least
        # once. Told so, the compiler drops the path that skips the loop, whose zeroed
        # accumulator reached the final wgmma wait and made ptxas serialise every wgmma
        # (warning C7515). Tensor-core products only: on the fp32 FMA path (no wgmma) it
        # only moved registers (16 B of spills at C = 8 with an MSA mask, sm_90).
        tl.assume(col_start < col_end)
    for k0 in range(col_start, col_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        s = (cols // C).to(tl.int64)
        c = cols % C
        col_ok = s < S
        a = tl.load(dop_base + (s * stride_dop_s + c * stride_dop_c)[None, :],
                    mask=i_ok[:, None] & col_ok[None, :], other=0.0)
        x_mask = col_ok[:, None] & keep_j[None, :]
        if HAS_KEEP and KEEP_PER_ROW:
            keep = tl.load(keep_base + s[:, None] * stride_keep_s, mask=x_mask, other=0)
            x_mask = x_mask & (keep != 0)
        x = tl.load(x_base + (s * stride_x_s + c * stride_x_c)[:, None], mask=x_mask, other=0.0)
        acc = tl.dot(a, x.to(a.dtype), acc, input_precision=PRECISION)

    dw_ptr = (DW + split.to(tl.int64) * stride_dw_split + b * stride_dw_b + h * stride_dw_h + offs_i.to(tl.int64)[:, None] * stride_dw_i
              + offs_j[None, :] * stride_dw_j)
    tl.store(dw_ptr, acc, mask=i_ok[:, None] & j_ok[None, :])
