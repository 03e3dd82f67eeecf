"""Bias-gradient kernels of triangle attention: ``_bwd_dbias_kernel`` (dBias tiles
summed over rows i in registers) and ``_sum_splits_kernel`` (the fixed-order sum of
row-split partial tiles).

The bias gradient is deterministic: a program owns a (j, k) tile of one (b, h) and sums
dS over its rows i; when the rows are split over several programs (the split count is
chosen by the launcher), their partial tiles are summed afterwards in a fixed order. No
atomics. The key mask rides on the tensor cores as in the forward, exact for finite
values; a tile that comes out with a NaN (NaN/inf in the k, v or bias of a masked key)
is summed again by ``_dbias_exact`` with masked keys selected out.
"""

from __future__ import annotations

import triton
import triton.language as tl

from foldops.kernels.triangle_attention.common import (
    LOG2E_C,
    _add_key_mask,
    _exp2,
    _fresh_range,
    _has_nan,
    _lse_parts,
    _mask_rows_ptrs,
)


@triton.jit
def _dbias_row_vectors(LSE, DELTA, row_offs, offs_j, N, EVEN_N: tl.constexpr):
    """(lse [BLOCK_J], delta [BLOCK_J]) of one row i for the dBias pass.

    Masked rather than clamped past N: clamped offsets would hide their contiguity from
    the compiler, which then loads element by element.
    """
    if EVEN_N:
        lse = tl.load(LSE + row_offs)
        delta = tl.load(DELTA + row_offs)
    else:
        lse = tl.load(LSE + row_offs, mask=offs_j < N, other=float("inf"))
        delta = tl.load(DELTA + row_offs, mask=offs_j < N, other=0.0)
    return lse, delta


@triton.jit
def _dbias_exact(bias, q_row, do_row, k_row, v_row, mask_row, stride_q_i, stride_q_n, stride_q_d, stride_k_i,
                 stride_k_n, stride_k_d, stride_v_i, stride_v_n, stride_v_d, stride_do_i, stride_do_n, stride_do_d,
                 stride_mask_i, LSE, DELTA, row_offs, offs_j, pid_j, pid_k, n_rows, N, H, scale,
                 EVEN_N: tl.constexpr, D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, PRECISE: tl.constexpr):
    """The dBias tile (fp32 [BLOCK_J, BLOCK_K]) summed over the split's ``n_rows`` rows i
    with masked keys selected out: logits set to -inf, k and v loaded as 0, so dS = 0
    there whatever they hold. ``*_row``: q, dO, k, v at (b, first row i, position 0, h)
    and the first row's key-mask bias (0 = kept; padded past N); ``row_offs`` [BLOCK_J]:
    the first row's lse/delta offsets.

    The rare path (a program whose tile came out with a NaN), built as
    ``forward._fwd_exact`` to leave the fast loop's registers alone (own index ranges,
    a scalar base per row, two stages).
    """
    rd = _fresh_range(D)
    rk = pid_k * BLOCK_K + _fresh_range(BLOCK_K)
    jc = tl.minimum(pid_j * BLOCK_J + _fresh_range(BLOCK_J), N - 1)
    kc = tl.minimum(rk, N - 1)
    q_offs = jc[:, None] * stride_q_n + rd[None, :] * stride_q_d
    do_offs = jc[:, None] * stride_do_n + rd[None, :] * stride_do_d
    kt_offs = rd[:, None] * stride_k_d + kc[None, :] * stride_k_n
    vt_offs = rd[:, None] * stride_v_d + kc[None, :] * stride_v_n
    acc = tl.zeros([BLOCK_J, BLOCK_K], dtype=tl.float32)
    for it in tl.range(0, n_rows, num_stages=2):
        row = tl.cast(it, tl.int64)
        keep = tl.load(mask_row + row * stride_mask_i + rk) == 0
        lse, delta = _dbias_row_vectors(LSE, DELTA, row_offs + row * (H * N), offs_j, N, EVEN_N)
        kt = tl.load(k_row + row * stride_k_i + kt_offs, mask=keep[None, :], other=0.0)
        vt = tl.load(v_row + row * stride_v_i + vt_offs, mask=keep[None, :], other=0.0)
        qk = tl.dot(tl.load(q_row + row * stride_q_i + q_offs), kt, input_precision=PRECISION)
        s = tl.where(keep[None, :], qk * scale + bias, float("-inf"))
        lse_hi, lse_lo = _lse_parts(lse)
        x = s * LOG2E_C - lse_hi[:, None]
        if lse.dtype == tl.float64:
            x -= lse_lo[:, None]
        p = _exp2(x, PRECISE)
        dp = tl.dot(tl.load(do_row + row * stride_do_i + do_offs), vt, input_precision=PRECISION)
        acc += p * (dp - delta[:, None])
    return acc


@triton.jit
def _bwd_dbias_kernel(
    Q,  # [B, I, N, H, D] queries, fp16 / bf16 / fp32
    K,  # [B, I, N, H, D] keys, q's dtype
    V,  # [B, I, N, H, D] values, q's dtype
    BIAS,  # [B, H, N, N] pair bias (query j, key k), q's dtype or fp32; unit stride over k
    MASK,  # [B, I, N_pad] key-mask bias in q's dtype (_key_mask_bias), or any pointer without a mask
    DO,  # [B, I, N, H, D] output gradient
    LSE,  # [B, I, H, N] contiguous base-2 lse of the forward, fp32 (fp64 for fp32 inputs)
    DELTA,  # [B, I, H, N] contiguous fp32 rowsum(dO * O) (_bwd_delta_kernel)
    DB,  # [SPLITS, B, H, N, N] fp32 partial bias gradients, or [B, H, N, N] dbias itself with one split
    stride_q_b, stride_q_i, stride_q_n, stride_q_h, stride_q_d,  # Q's strides, in elements
    stride_k_b, stride_k_i, stride_k_n, stride_k_h, stride_k_d,  # K's strides
    stride_v_b, stride_v_i, stride_v_n, stride_v_h, stride_v_d,  # V's strides
    stride_bias_b, stride_bias_h, stride_bias_j, stride_bias_k,  # BIAS's strides
    stride_mask_b, stride_mask_i, stride_mask_k,  # MASK's strides (0, 0, 0 without a mask)
    stride_do_b, stride_do_i, stride_do_n, stride_do_h, stride_do_d,  # DO's strides
    stride_db_split, stride_db_b, stride_db_h, stride_db_j, stride_db_k,  # DB's strides (split stride 0: one split)
    I,  # rows i, summed over
    N,  # sequence length: queries j and keys k per row
    H,  # heads
    BH,  # B * H: programs along axis 2 per split
    scale,  # logit scale (a float; nonzero with a mask)
    ROWS_PER_SPLIT,  # rows i summed by one program (the last split may have fewer)
    HAS_MASK: tl.constexpr,  # whether MASK holds a key mask
    EVEN_N: tl.constexpr,  # N % BLOCK_J == 0 and N % BLOCK_K == 0: no partial tile
    D: tl.constexpr,  # head dim, one of 16, 32, 64, 128
    BLOCK_J: tl.constexpr,  # queries per tile
    BLOCK_K: tl.constexpr,  # keys per tile
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" or "tf32x3"
    PRECISE: tl.constexpr,  # libdevice exp2 (fp32 inputs) instead of the approximate one
    MASK_PRECISION: tl.constexpr,  # tl.dot precision of the key-mask product (_add_key_mask)
):
    """dBias[b, h, j-tile, k-tile] = sum over rows i (of this split) of dS, in registers.

    MASK: the key mask as a 0/infinity bias in q's dtype, rows padded with the infinity
    (``_key_mask_bias``), or unused without a mask.

    The q/dO/K/V tiles read query and key rows past N clamped to row N-1, unmasked: the
    loop has no masked (unpipelined) tile loads at any N, and the extra rows and columns
    of the tile are never stored.
    """
    scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as fp64
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_z = tl.program_id(2)  # (split, b, h) flattened, (b, h) fastest
    bh = pid_z % BH
    split = pid_z // BH
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    j64 = offs_j.to(tl.int64)
    k64 = offs_k.to(tl.int64)
    jc64 = tl.minimum(offs_j, N - 1).to(tl.int64)
    kc64 = tl.minimum(offs_k, N - 1).to(tl.int64)
    valid_j = offs_j < N
    valid_k = offs_k < N

    bias = tl.load(BIAS + b * stride_bias_b + h * stride_bias_h + j64[:, None] * stride_bias_j
                   + k64[None, :] * stride_bias_k,
                   mask=valid_j[:, None] & valid_k[None, :], other=0.0).to(tl.float32)

    i_start = split * ROWS_PER_SPLIT
    n_rows = tl.minimum(ROWS_PER_SPLIT, I - i_start)
    i0 = i_start.to(tl.int64)
    # Pointers advance by one row i per step (64-bit pointer arithmetic, no overflow).
    q_ptrs = (Q + b * stride_q_b + i0 * stride_q_i + h * stride_q_h + jc64[:, None] * stride_q_n
              + offs_d[None, :] * stride_q_d)
    do_ptrs = (DO + b * stride_do_b + i0 * stride_do_i + h * stride_do_h + jc64[:, None] * stride_do_n
               + offs_d[None, :] * stride_do_d)
    kt_ptrs = (K + b * stride_k_b + i0 * stride_k_i + h * stride_k_h + kc64[None, :] * stride_k_n
               + offs_d[:, None] * stride_k_d)
    vt_ptrs = (V + b * stride_v_b + i0 * stride_v_i + h * stride_v_h + kc64[None, :] * stride_v_n
               + offs_d[:, None] * stride_v_d)
    row_offs = ((b * I + i0) * H + h) * N + j64
    # Loaded unmasked: k64 < the padded row length. Columns of keys past N are never
    # stored (they read the clamped key N-1), so they need no -inf without a mask.
    mask_rows_ptrs = _mask_rows_ptrs(MASK + b * stride_mask_b + i0 * stride_mask_i, k64)  # contiguous over keys
    # The per-row vectors (lse, delta) are loaded one row ahead into registers: Triton
    # pipelines only the tiles that feed tl.dot through shared memory, and a load used in
    # its own iteration would expose its full latency every row.
    lse, delta = _dbias_row_vectors(LSE, DELTA, row_offs, offs_j, N, EVEN_N)
    acc = tl.zeros([BLOCK_J, BLOCK_K], dtype=tl.float32)
    for it in range(0, n_rows):
        ahead = tl.minimum(it + 1, n_rows - 1).to(tl.int64)  # the last row reloads itself
        lse_next, delta_next = _dbias_row_vectors(LSE, DELTA, row_offs + ahead * (H * N), offs_j, N, EVEN_N)
        qk = tl.dot(tl.load(q_ptrs), tl.load(kt_ptrs), input_precision=PRECISION)
        if HAS_MASK:
            qk = _add_key_mask(qk, tl.load(mask_rows_ptrs), MASK_PRECISION)
            mask_rows_ptrs += stride_mask_i
        s = qk * scale + bias
        lse_hi, lse_lo = _lse_parts(lse)
        x = s * LOG2E_C - lse_hi[:, None]
        if lse.dtype == tl.float64:
            x -= lse_lo[:, None]
        p = _exp2(x, PRECISE)
        dp = tl.dot(tl.load(do_ptrs), tl.load(vt_ptrs), input_precision=PRECISION)
        acc += p * (dp - delta[:, None])
        lse, delta = lse_next, delta_next
        q_ptrs += stride_q_i
        do_ptrs += stride_do_i
        kt_ptrs += stride_k_i
        vt_ptrs += stride_v_i

    db_ptrs = (DB + split.to(tl.int64) * stride_db_split + b * stride_db_b + h * stride_db_h
               + j64[:, None] * stride_db_j + k64[None, :] * stride_db_k)
    tl.store(db_ptrs, acc.to(DB.dtype.element_ty), mask=valid_j[:, None] & valid_k[None, :])
    if HAS_MASK:
        # NaN/inf at a masked key (or in the data itself): the split's rows again with
        # masked keys selected out, stored over the tile.
        if _has_nan(acc):
            exact = _dbias_exact(bias, Q + b * stride_q_b + i0 * stride_q_i + h * stride_q_h,
                                 DO + b * stride_do_b + i0 * stride_do_i + h * stride_do_h,
                                 K + b * stride_k_b + i0 * stride_k_i + h * stride_k_h,
                                 V + b * stride_v_b + i0 * stride_v_i + h * stride_v_h,
                                 MASK + b * stride_mask_b + i0 * stride_mask_i, stride_q_i, stride_q_n, stride_q_d,
                                 stride_k_i, stride_k_n, stride_k_d, stride_v_i, stride_v_n, stride_v_d,
                                 stride_do_i, stride_do_n, stride_do_d, stride_mask_i, LSE, DELTA, row_offs, offs_j,
                                 pid_j, pid_k, n_rows, N, H, scale, EVEN_N, D, BLOCK_J, BLOCK_K, PRECISION, PRECISE)
            tl.store(db_ptrs, exact.to(DB.dtype.element_ty), mask=valid_j[:, None] & valid_k[None, :])


@triton.jit
def _sum_splits_kernel(
    PARTIAL,  # [SPLITS, NUMEL] contiguous fp32 partial sums
    OUT,  # [NUMEL] contiguous result (dbias, in the bias's dtype)
    SPLITS,  # number of partial sums
    NUMEL,  # elements per partial sum
    BLOCK: tl.constexpr,  # elements per program
):
    """OUT[x] = sum over s of PARTIAL[s, x], in a fixed order (deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < NUMEL
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(PARTIAL + s * NUMEL + offs, mask=valid, other=0.0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=valid)
