"""dQ kernel of triangle attention: ``_bwd_dq_kernel`` with its loop step, its loop and
its exact-mask rerun ``_dq_exact``.

    dQ = scale * dS k,  dS = P * (dP - delta),  dP = dO v^T,  P recomputed from q, k, the
    bias and the saved base-2 lse: p = exp2(s * log2(e) - lse), 0 for rows whose keys
    are all masked (lse = +inf)

One program per block of queries of one (b, i, h), looping over key blocks. A row that
keeps every key runs a loop copy without mask work; the others add the key mask per
logit (constexpr USE_MASK). That add is exact for finite values only: NaN/inf in the k,
v or bias of a masked key makes NaN in dq, and a program whose dq holds a NaN runs again
as ``_dq_exact`` (``common._has_nan``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from foldops.kernels.triangle_attention.common import (
    LOG2E_C,
    _all_kept,
    _exp2,
    _fresh_range,
    _has_nan,
    _key_bias,
    _lse_parts,
    _retire_mma,
    _rowdot_fma,
)


@triton.jit
def _dq_step(q, do, lse_hi, lse_lo, delta, k, vt, bias, key_bias, dq, scale,
             USE_KEY_BIAS: tl.constexpr, LSE_LO: tl.constexpr, PRECISION: tl.constexpr, PRECISE: tl.constexpr,
             SELECT: tl.constexpr):
    """dQ contribution of one key block. ``key_bias`` [BLOCK_K]: 0/-inf added to the
    logits (USE_KEY_BIAS), or with SELECT the keys that count (bool), whose others get
    the logit -inf whatever q.k and the bias hold."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    s = qk * scale + bias.to(tl.float32)
    if USE_KEY_BIAS:
        s += key_bias[None, :]
    if SELECT:
        s = tl.where(key_bias[None, :], s, float("-inf"))
    x = s * LOG2E_C - lse_hi[:, None]
    if LSE_LO:
        x -= lse_lo[:, None]
    p = _exp2(x, PRECISE)
    dp = tl.dot(do, vt, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def _dq_loop(
    q, do, lse, delta, k_ptrs, vt_ptrs, b_ptrs, m_ptrs, stride_k_n, stride_v_n, stride_bias_k, stride_mask_k, N, scale,
    USE_MASK: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    D: tl.constexpr, PRECISION: tl.constexpr, PRECISE: tl.constexpr, MMA_WAIT: tl.constexpr,
):
    """dQ over all key blocks: full blocks unmasked, a partial last one masked (as _fwd_loop)."""
    offs_k = tl.arange(0, BLOCK_K)
    lse_hi, lse_lo = _lse_parts(lse)
    LSE_LO: tl.constexpr = lse.dtype == tl.float64
    dq = tl.zeros([BLOCK_J, D], dtype=tl.float32)
    n_full = N - N % BLOCK_K
    for start_k in range(0, n_full, BLOCK_K):
        key_bias = _key_bias(m_ptrs, start_k + offs_k, N, USE_MASK, True)
        dq = _dq_step(q, do, lse_hi, lse_lo, delta, tl.load(k_ptrs), tl.load(vt_ptrs), tl.load(b_ptrs), key_bias,
                      dq, scale, USE_MASK, LSE_LO, PRECISION, PRECISE, False)
        k_ptrs += BLOCK_K * stride_k_n
        vt_ptrs += BLOCK_K * stride_v_n
        b_ptrs += BLOCK_K * stride_bias_k
        if USE_MASK:
            m_ptrs += BLOCK_K * stride_mask_k
        _retire_mma(start_k, MMA_WAIT)
    if not EVEN_N:
        if n_full < N:
            valid_k = n_full + offs_k < N
            key_bias = _key_bias(m_ptrs, n_full + offs_k, N, USE_MASK, False)
            k = tl.load(k_ptrs, mask=valid_k[:, None], other=0.0)
            vt = tl.load(vt_ptrs, mask=valid_k[None, :], other=0.0)
            bias = tl.load(b_ptrs, mask=valid_k[None, :], other=0.0)
            dq = _dq_step(q, do, lse_hi, lse_lo, delta, k, vt, bias, key_bias, dq, scale, True, LSE_LO,
                          PRECISION, PRECISE, False)
    return dq


@triton.jit
def _dq_rows(Q, DO, OUT, LSE, stride_q_b, stride_q_i, stride_q_n, stride_q_h, stride_q_d,
             stride_out_b, stride_out_i, stride_out_n, stride_out_h, stride_out_d,
             stride_do_b, stride_do_i, stride_do_n, stride_do_h, stride_do_d,
             I, N, H, i, b, h, jc64, offs_d, valid_j, D: tl.constexpr, FMA_CHAIN: tl.constexpr):
    """(q, dO [BLOCK_J, D], delta = rowsum(dO * O), lse [BLOCK_J]) of one dQ program's query rows."""
    q = tl.load(Q + b * stride_q_b + i * stride_q_i + h * stride_q_h + jc64[:, None] * stride_q_n
                + offs_d[None, :] * stride_q_d)
    do = tl.load(DO + b * stride_do_b + i * stride_do_i + h * stride_do_h + jc64[:, None] * stride_do_n
                 + offs_d[None, :] * stride_do_d)
    if FMA_CHAIN:  # fp32 "ieee": round as the dP products (_rowdot_fma)
        delta = _rowdot_fma(DO + b * stride_do_b + i * stride_do_i + h * stride_do_h + jc64 * stride_do_n,
                            OUT + b * stride_out_b + i * stride_out_i + h * stride_out_h + jc64 * stride_out_n,
                            stride_do_d, stride_out_d, valid_j, D)
    else:
        o = tl.load(OUT + b * stride_out_b + i * stride_out_i + h * stride_out_h + jc64[:, None] * stride_out_n
                    + offs_d[None, :] * stride_out_d)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(LSE + ((b * I + i) * H + h) * N + jc64)
    return q, do, delta, lse


@triton.jit
def _dq_exact(q, do, lse, delta, k_row, v_row, b_rows, m_row, pid_j, stride_k_n, stride_k_d, stride_v_n, stride_v_d,
              stride_bias_j, stride_bias_k, stride_mask_k, N, scale, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
              D: tl.constexpr, PRECISION: tl.constexpr, PRECISE: tl.constexpr, MMA_WAIT: tl.constexpr):
    """dQ (unscaled) of ``_dq_loop`` with masked keys selected out: logits set to -inf,
    k and v loaded as 0, so dS = 0 there and dS.k adds nothing, whatever they hold.
    ``k_row``, ``v_row``: k and v at (b, i, key 0, h); ``b_rows``: the bias at (b, h);
    ``m_row``: the row's bool keep-mask.

    The rare path (a program whose dq came out with a NaN), built as
    ``forward._fwd_exact`` to leave the fast loops' registers alone (own index ranges,
    a scalar base per step, two stages).
    """
    rk = _fresh_range(BLOCK_K)
    rd = _fresh_range(D)
    jc = tl.minimum(pid_j * BLOCK_J + _fresh_range(BLOCK_J), N - 1)
    k_offs = rk[:, None] * stride_k_n + rd[None, :] * stride_k_d
    vt_offs = rd[:, None] * stride_v_d + rk[None, :] * stride_v_n
    b_offs = jc[:, None] * stride_bias_j + rk[None, :] * stride_bias_k
    lse_hi, lse_lo = _lse_parts(lse)
    LSE_LO: tl.constexpr = lse.dtype == tl.float64
    dq = tl.zeros([BLOCK_J, D], dtype=tl.float32)
    for start_k in tl.range(0, N, BLOCK_K, num_stages=2):
        start = tl.cast(start_k, tl.int64)
        keys = start + rk
        keep = tl.load(m_row + keys * stride_mask_k, mask=keys < N, other=0) != 0
        k = tl.load(k_row + start * stride_k_n + k_offs, mask=keep[:, None], other=0.0)
        vt = tl.load(v_row + start * stride_v_n + vt_offs, mask=keep[None, :], other=0.0)
        bias = tl.load(b_rows + start * stride_bias_k + b_offs, mask=keep[None, :], other=0.0)
        dq = _dq_step(q, do, lse_hi, lse_lo, delta, k, vt, bias, keep, dq, scale, False, LSE_LO, PRECISION, PRECISE,
                      True)
        _retire_mma(start_k, MMA_WAIT)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q,  # [B, I, N, H, D] queries, fp16 / bf16 / fp32
    K,  # [B, I, N, H, D] keys, q's dtype
    V,  # [B, I, N, H, D] values, q's dtype
    BIAS,  # [B, H, N, N] pair bias (query j, key k), q's dtype or fp32; unit stride over k
    MASK,  # [B, I, N] bool keep-mask over keys, or any pointer without a mask
    OUT,  # [B, I, N, H, D] forward output (for delta)
    DO,  # [B, I, N, H, D] output gradient
    LSE,  # [B, I, H, N] contiguous base-2 lse of the forward, fp32 (fp64 for fp32 inputs)
    DQ,  # [B, I, N, H, D] query gradient, written here
    stride_q_b, stride_q_i, stride_q_n, stride_q_h, stride_q_d,  # Q's strides, in elements
    stride_k_b, stride_k_i, stride_k_n, stride_k_h, stride_k_d,  # K's strides
    stride_v_b, stride_v_i, stride_v_n, stride_v_h, stride_v_d,  # V's strides
    stride_bias_b, stride_bias_h, stride_bias_j, stride_bias_k,  # BIAS's strides
    stride_mask_b, stride_mask_i, stride_mask_k,  # MASK's strides (0, 0, 0 without a mask)
    stride_out_b, stride_out_i, stride_out_n, stride_out_h, stride_out_d,  # OUT's strides
    stride_do_b, stride_do_i, stride_do_n, stride_do_h, stride_do_d,  # DO's strides
    stride_dq_b, stride_dq_i, stride_dq_n, stride_dq_h, stride_dq_d,  # DQ's strides
    I,  # rows i (the second axis of q)
    N,  # sequence length: queries j and keys k per row
    H,  # heads
    scale,  # logit scale (a float)
    HAS_MASK: tl.constexpr,  # whether MASK holds a key mask
    EVEN_N: tl.constexpr,  # N % BLOCK_J == 0 and N % BLOCK_K == 0: no partial block
    D: tl.constexpr,  # head dim, one of 16, 32, 64, 128
    BLOCK_J: tl.constexpr,  # queries per program
    BLOCK_K: tl.constexpr,  # keys per loop step
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" or "tf32x3"
    PRECISE: tl.constexpr,  # libdevice exp2 (fp32 inputs) instead of the approximate one
    MMA_WAIT: tl.constexpr,  # end each loop step with a wgmma wait (_retire_mma; sm_90 only)
    FMA_CHAIN: tl.constexpr,  # delta as one FMA chain over d (fp32 "ieee", _rowdot_fma)
):
    """dQ for a [BLOCK_J] block of queries of one (b, i, h); delta = rowsum(dO*O) in registers."""
    scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as fp64
    pid_j = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    valid_j = offs_j < N
    j64 = offs_j.to(tl.int64)
    jc64 = tl.minimum(offs_j, N - 1).to(tl.int64)  # rows past N read row N-1 (never stored)
    k64 = offs_k.to(tl.int64)

    q, do, delta, lse = _dq_rows(Q, DO, OUT, LSE, stride_q_b, stride_q_i, stride_q_n, stride_q_h, stride_q_d,
                                 stride_out_b, stride_out_i, stride_out_n, stride_out_h, stride_out_d,
                                 stride_do_b, stride_do_i, stride_do_n, stride_do_h, stride_do_d,
                                 I, N, H, i, b, h, jc64, offs_d, valid_j, D, FMA_CHAIN)

    k_ptrs = (K + b * stride_k_b + i * stride_k_i + h * stride_k_h + k64[:, None] * stride_k_n
              + offs_d[None, :] * stride_k_d)
    vt_ptrs = (V + b * stride_v_b + i * stride_v_i + h * stride_v_h + k64[None, :] * stride_v_n
               + offs_d[:, None] * stride_v_d)
    b_ptrs = BIAS + b * stride_bias_b + h * stride_bias_h + jc64[:, None] * stride_bias_j + k64[None, :] * stride_bias_k
    m_ptrs = MASK + b * stride_mask_b + i * stride_mask_i + k64 * stride_mask_k
    if HAS_MASK:
        full = _all_kept(MASK + b * stride_mask_b + i * stride_mask_i, stride_mask_k, N, 256)
    else:
        full = True
    if full:
        dq = _dq_loop(q, do, lse, delta, k_ptrs, vt_ptrs, b_ptrs, m_ptrs, stride_k_n, stride_v_n, stride_bias_k,
                      stride_mask_k, N, scale, False, EVEN_N, BLOCK_J, BLOCK_K, D, PRECISION, PRECISE, MMA_WAIT)
    else:
        dq = _dq_loop(q, do, lse, delta, k_ptrs, vt_ptrs, b_ptrs, m_ptrs, stride_k_n, stride_v_n, stride_bias_k,
                      stride_mask_k, N, scale, True, EVEN_N, BLOCK_J, BLOCK_K, D, PRECISION, PRECISE, MMA_WAIT)
    if HAS_MASK:
        if _has_nan(dq):  # NaN/inf at a masked key (or in the data itself)
            dq = _dq_exact(q, do, lse, delta, K + b * stride_k_b + i * stride_k_i + h * stride_k_h,
                           V + b * stride_v_b + i * stride_v_i + h * stride_v_h,
                           BIAS + b * stride_bias_b + h * stride_bias_h, MASK + b * stride_mask_b + i * stride_mask_i,
                           pid_j, stride_k_n, stride_k_d, stride_v_n, stride_v_d, stride_bias_j, stride_bias_k,
                           stride_mask_k, N, scale, BLOCK_J, BLOCK_K, D, PRECISION, PRECISE, MMA_WAIT)
    dq_ptrs = (DQ + b * stride_dq_b + i * stride_dq_i + h * stride_dq_h + j64[:, None] * stride_dq_n
               + offs_d[None, :] * stride_dq_d)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=valid_j[:, None])
