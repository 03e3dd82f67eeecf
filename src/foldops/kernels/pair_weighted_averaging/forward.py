"""The weighted-sum kernel of MSA pair-weighted averaging: ``_wx_kernel``.

One tensor-core product per head, ``acc[i, (s, c)] = sum_j W[i, j] X[s, j, c]``, with
the MSA rows folded into the product's N dimension (X viewed as ``[N_j, S * C]``), and
an epilogue chosen by ``MODE``:

- ``MODE = 0`` (forward): ``out = sigmoid(g) * acc`` (or ``acc`` without a gate);
- ``MODE = 1`` (backward, gate part): ``dg = dO * acc * sigmoid'(g)`` and
  ``dO' = dO * sigmoid(g)``, the gradient reaching the weighted sum;
- ``MODE = 2`` (backward, values): W transposed (the launcher swaps its strides),
  X = dO', ``dv = acc`` zeroed where the value keep-mask is 0.

W is the softmax over j, computed once per (b, h) by the launcher and shared by every
MSA row; nothing of size [S, N, N] exists. Offsets that scale with S * N * H * C are
int64.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _wx_kernel(
    W,  # [B, H, N, N] softmax weights, v's dtype (rows i, keys j; strides swapped for W^T)
    X,  # [B, S, N, H, C] values v (modes 0, 1) or dO' (mode 2)
    G,  # [B, S, N, H, C] gate before the sigmoid (modes 0, 1 with HAS_GATE)
    DO,  # [B, S, N, H, C] output gradient (mode 1)
    KEEP,  # [B, S, N] uint8 value keep-mask (0 = the value counts as 0), if HAS_KEEP
    OUT,  # [B, S, N, H, C] out (mode 0), dg (mode 1) or dv (mode 2)
    OUT2,  # [B, S, N, H, C] dO' (mode 1)
    stride_w_b, stride_w_h, stride_w_i, stride_w_j,
    stride_x_b, stride_x_s, stride_x_n, stride_x_h, stride_x_c,
    stride_g_b, stride_g_s, stride_g_n, stride_g_h, stride_g_c,
    stride_do_b, stride_do_s, stride_do_n, stride_do_h, stride_do_c,
    stride_keep_b, stride_keep_s, stride_keep_n,
    stride_out_b, stride_out_s, stride_out_n, stride_out_h, stride_out_c,
    stride_out2_b, stride_out2_s, stride_out2_n, stride_out2_h, stride_out2_c,
    S,  # MSA rows
    N,  # tokens (rows i and keys j)
    H,  # heads
    MODE: tl.constexpr,  # 0 forward, 1 gate gradient + dO', 2 dv (see the module doc)
    HAS_GATE: tl.constexpr,  # modes 0, 1: a gate G is applied
    HAS_KEEP: tl.constexpr,  # KEEP is given: masks X's loads (modes 0, 1) or dv (mode 2)
    KEEP_PER_ROW: tl.constexpr,  # KEEP varies with the MSA row s (else [B, 1, N]: one vector per key block)
    C: tl.constexpr,  # head dim
    BLOCK_I: tl.constexpr,  # rows i per program (the product's M)
    BLOCK_J: tl.constexpr,  # keys j per step (K)
    BLOCK_SC: tl.constexpr,  # (s, c) columns per program (N)
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee", "tf32x3", ...)
):
    pid_i = tl.program_id(0)
    pid_sc = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    cols = pid_sc * BLOCK_SC + tl.arange(0, BLOCK_SC)
    s = (cols // C).to(tl.int64)
    c = cols % C
    i_ok = offs_i < N
    col_ok = s < S
    rows64 = offs_i.to(tl.int64)

    w_base = W + b * stride_w_b + h * stride_w_h
    x_base = X + b * stride_x_b + h * stride_x_h
    x_cols = s * stride_x_s + c * stride_x_c
    keep_base = KEEP + b * stride_keep_b

    acc = tl.zeros((BLOCK_I, BLOCK_SC), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < N
        w = tl.load(w_base + rows64[:, None] * stride_w_i + offs_j[None, :] * stride_w_j,
                    mask=i_ok[:, None] & j_ok[None, :], other=0.0)
        x_mask = j_ok[:, None] & col_ok[None, :]
        if HAS_KEEP and MODE != 2:
            if KEEP_PER_ROW:
                keep = tl.load(keep_base + s[None, :] * stride_keep_s + offs_j[:, None] * stride_keep_n,
                               mask=x_mask, other=0)
                x_mask = x_mask & (keep != 0)
            else:
                keep_j = tl.load(keep_base + offs_j * stride_keep_n, mask=j_ok, other=0)
                x_mask = x_mask & (keep_j != 0)[:, None]
        x = tl.load(x_base + offs_j[:, None].to(tl.int64) * stride_x_n + x_cols[None, :], mask=x_mask, other=0.0)
        acc = tl.dot(w, x.to(w.dtype), acc, input_precision=PRECISION)

    tile = i_ok[:, None] & col_ok[None, :]
    out_ptr = (OUT + b * stride_out_b + h * stride_out_h + rows64[:, None] * stride_out_n
               + (s * stride_out_s + c * stride_out_c)[None, :])
    if MODE == 0:
        if HAS_GATE:
            g_ptr = (G + b * stride_g_b + h * stride_g_h + rows64[:, None] * stride_g_n
                     + (s * stride_g_s + c * stride_g_c)[None, :])
            g = tl.load(g_ptr, mask=tile, other=0.0).to(tl.float32)
            acc = acc * tl.sigmoid(g)
        tl.store(out_ptr, acc.to(OUT.dtype.element_ty), mask=tile)
    elif MODE == 1:
        g_ptr = (G + b * stride_g_b + h * stride_g_h + rows64[:, None] * stride_g_n
                 + (s * stride_g_s + c * stride_g_c)[None, :])
        do_ptr = (DO + b * stride_do_b + h * stride_do_h + rows64[:, None] * stride_do_n
                  + (s * stride_do_s + c * stride_do_c)[None, :])
        g = tl.load(g_ptr, mask=tile, other=0.0).to(tl.float32)
        do = tl.load(do_ptr, mask=tile, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        tl.store(out_ptr, (do * acc * sig * (1.0 - sig)).to(OUT.dtype.element_ty), mask=tile)
        out2_ptr = (OUT2 + b * stride_out2_b + h * stride_out2_h + rows64[:, None] * stride_out2_n
                    + (s * stride_out2_s + c * stride_out2_c)[None, :])
        tl.store(out2_ptr, (do * sig).to(OUT2.dtype.element_ty), mask=tile)
    else:
        if HAS_KEEP:
            keep = tl.load(keep_base + s[None, :] * stride_keep_s + rows64[:, None] * stride_keep_n,
                           mask=tile, other=0)
            acc = tl.where(keep != 0, acc, 0.0)
        tl.store(out_ptr, acc.to(OUT.dtype.element_ty), mask=tile)
