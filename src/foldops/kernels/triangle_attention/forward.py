"""Forward kernel of triangle attention: ``_fwd_kernel`` (output and base-2 lse for a
block of queries) with its key-block step and loop.

    out[b,i,j,h] = sum_k softmax_k(scale * q[b,i,j,h].k[b,i,k,h] + bias[b,h,j,k]
                                   | mask[b,i,k]) v[b,i,k,h]

The key mask is added as one more tensor-core product (``_add_key_mask``), so every
row runs the same loop. That sum is exact for finite values only: a masked key whose k,
v or bias holds NaN/inf makes NaN (NaN + -inf, +inf - inf, 0 * NaN in p.v). A program
whose (l, acc) come out with a NaN therefore runs again as ``_fwd_exact``, which sets
masked logits to -inf (a select) and loads their v as 0, so that a masked key
contributes nothing whatever it holds (``common._has_nan``).
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
    _log2,
    _mask_rows_ptrs,
    _retire_mma,
)


@triton.jit
def _fwd_step(q, kt, v, bias, mask_rows, key_bias, m_i, l_i, acc, scale, HAS_MASK: tl.constexpr,
              USE_KEY_BIAS: tl.constexpr, PRECISION: tl.constexpr, PRECISE: tl.constexpr,
              MASK_PRECISION: tl.constexpr, SELECT: tl.constexpr):
    """One key block of the online softmax: the updated (m2, l, acc). ``mask_rows``
    [16, BLOCK_K] (HAS_MASK) as in ``_add_key_mask``; ``key_bias`` [BLOCK_K] is the -inf
    for keys past N of a last partial block (USE_KEY_BIAS), or with SELECT the keys that
    count (bool), whose others get the logit -inf whatever q.k and the bias hold."""
    qk = tl.dot(q, kt, input_precision=PRECISION)
    if HAS_MASK:
        qk = _add_key_mask(qk, mask_rows, MASK_PRECISION)
    s = qk * scale + bias.to(tl.float32)
    if USE_KEY_BIAS:
        s += key_bias[None, :]
    if SELECT:
        s = tl.where(key_bias[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * LOG2E_C)
    # A row with no kept key so far has m_new = -inf: subtract 0 instead (exp2(-inf) = 0).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = _exp2(m_i - m_use, PRECISE)
    p = _exp2(s * LOG2E_C - m_use[:, None], PRECISE)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fwd_loop(
    q, kt_ptrs, v_ptrs, b_ptrs, mask_rows_ptrs, stride_k_n, stride_v_n, stride_bias_k, N, scale,
    HAS_MASK: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    D: tl.constexpr, PRECISION: tl.constexpr, PRECISE: tl.constexpr, MMA_WAIT: tl.constexpr,
    MASK_PRECISION: tl.constexpr,
):
    """Online softmax over all key blocks of one [BLOCK_J] query block: (m2, l, acc).

    Full key blocks load without masks (query rows past N read clamped, valid rows that
    are never stored): masked loads cannot go through the shared-memory pipeline. A last
    partial block, if any, runs once after the loop with masked loads and a -inf bias
    for keys past N (the key-mask bias rows are padded with the masked value and load
    unmasked).
    """
    offs_k = tl.arange(0, BLOCK_K)
    m_i = tl.full([BLOCK_J], float("-inf"), dtype=tl.float32)  # running max of s * log2(e)
    l_i = tl.zeros([BLOCK_J], dtype=tl.float32)
    acc = tl.zeros([BLOCK_J, D], dtype=tl.float32)
    no_key_bias = tl.zeros([BLOCK_K], dtype=tl.float32)
    mask_rows = tl.zeros([16, BLOCK_K], dtype=q.dtype)  # replaced by the loads below if HAS_MASK
    n_full = N - N % BLOCK_K
    for start_k in range(0, n_full, BLOCK_K):
        if HAS_MASK:
            mask_rows = tl.load(mask_rows_ptrs)
            mask_rows_ptrs += BLOCK_K
        m_i, l_i, acc = _fwd_step(q, tl.load(kt_ptrs), tl.load(v_ptrs), tl.load(b_ptrs), mask_rows, no_key_bias,
                                  m_i, l_i, acc, scale, HAS_MASK, False, PRECISION, PRECISE, MASK_PRECISION, False)
        kt_ptrs += BLOCK_K * stride_k_n
        v_ptrs += BLOCK_K * stride_v_n
        b_ptrs += BLOCK_K * stride_bias_k
        _retire_mma(start_k, MMA_WAIT)
    if not EVEN_N:
        if n_full < N:
            valid_k = n_full + offs_k < N
            if HAS_MASK:
                mask_rows = tl.load(mask_rows_ptrs)  # masked past N by the padding
            key_bias = tl.where(valid_k, 0.0, float("-inf"))  # without a mask
            kt = tl.load(kt_ptrs, mask=valid_k[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=valid_k[:, None], other=0.0)
            bias = tl.load(b_ptrs, mask=valid_k[None, :], other=0.0)
            m_i, l_i, acc = _fwd_step(q, kt, v, bias, mask_rows, key_bias, m_i, l_i, acc, scale, HAS_MASK,
                                      not HAS_MASK, PRECISION, PRECISE, MASK_PRECISION, False)
    return m_i, l_i, acc


@triton.jit
def _fwd_store(m_i, l_i, acc, OUT, LSE, o_ptrs, lse_ptrs, valid_j, PRECISE: tl.constexpr, STORE_LSE: tl.constexpr):
    """Store out = acc / l and (STORE_LSE) lse = m2 + log2(l); +inf for rows with no kept key."""
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=valid_j[:, None])
    if STORE_LSE:
        log2_l = _log2(tl.where(has_keys, l_i, 1.0), PRECISE)
        if LSE.dtype.element_ty == tl.float64:  # m_i + log2_l exactly (fp32 inputs)
            lse = tl.where(has_keys, m_i.to(tl.float64) + log2_l.to(tl.float64), float("inf"))
        else:
            lse = tl.where(has_keys, m_i + log2_l, float("inf"))
        tl.store(lse_ptrs, lse, mask=valid_j)


@triton.jit
def _fwd_exact(q, k_row, v_row, b_rows, mask_row, pid_j, stride_k_n, stride_k_d, stride_v_n, stride_v_d,
               stride_bias_j, stride_bias_k, N, scale, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr,
               PRECISION: tl.constexpr, PRECISE: tl.constexpr, MMA_WAIT: tl.constexpr):
    """(m2, l, acc) of ``_fwd_loop`` with masked keys selected out: their logits set to
    -inf and their v loaded as 0, so that NaN/inf in their k, v or bias cannot reach the
    result. ``k_row``, ``v_row``: k and v at (b, i, key 0, h); ``b_rows``: the bias at
    (b, h); ``mask_row``: the row's key-mask bias (0 = kept; padded past N).

    The rare path (a program whose fast loop met NaN), built to leave the fast loop's
    registers alone. Its index vectors come from ranges of their own (``_fresh_range``)
    and its tile pointers from a scalar base per step: index tensors shared with the
    kernel's would stay live in registers through the fast loop (112 -> 136 registers on
    sm_90, bf16, D = 32: one program less per SM).
    """
    rk = _fresh_range(BLOCK_K)
    rd = _fresh_range(D)
    jc = tl.minimum(pid_j * BLOCK_J + _fresh_range(BLOCK_J), N - 1).to(tl.int64)
    kt_offs = rd[:, None] * stride_k_d + rk[None, :] * stride_k_n
    v_offs = rk[:, None] * stride_v_n + rd[None, :] * stride_v_d
    b_offs = jc[:, None] * stride_bias_j + rk[None, :] * stride_bias_k
    m_i = tl.full([BLOCK_J], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_J], dtype=tl.float32)
    acc = tl.zeros([BLOCK_J, D], dtype=tl.float32)
    for start_k in tl.range(0, N, BLOCK_K, num_stages=2):
        start = tl.cast(start_k, tl.int64)
        keys = start_k + rk
        keep = tl.load(mask_row + start + rk) == 0  # padded: False past N
        valid = keys < N
        kt = tl.load(k_row + start * stride_k_n + kt_offs, mask=valid[None, :], other=0.0)
        v = tl.load(v_row + start * stride_v_n + v_offs, mask=keep[:, None], other=0.0)
        bias = tl.load(b_rows + start * stride_bias_k + b_offs, mask=valid[None, :], other=0.0)
        m_i, l_i, acc = _fwd_step(q, kt, v, bias, kt, keep, m_i, l_i, acc, scale, False, False, PRECISION,
                                  PRECISE, "ieee", True)
        _retire_mma(start_k, MMA_WAIT)
    return m_i, l_i, acc


@triton.jit
def _fwd_kernel(
    Q,  # [B, I, N, H, D] queries, fp16 / bf16 / fp32
    K,  # [B, I, N, H, D] keys, q's dtype
    V,  # [B, I, N, H, D] values, q's dtype
    BIAS,  # [B, H, N, N] pair bias (query j, key k), q's dtype or fp32; unit stride over k
    MASK,  # [B, I, N_pad] key-mask bias in q's dtype (_key_mask_bias), or any pointer without a mask
    OUT,  # [B, I, N, H, D] output, q's dtype
    LSE,  # [B, I, H, N] contiguous base-2 log-sum-exp, fp32 (fp64 for fp32 inputs); unused without STORE_LSE
    stride_q_b, stride_q_i, stride_q_n, stride_q_h, stride_q_d,  # Q's strides, in elements
    stride_k_b, stride_k_i, stride_k_n, stride_k_h, stride_k_d,  # K's strides
    stride_v_b, stride_v_i, stride_v_n, stride_v_h, stride_v_d,  # V's strides
    stride_bias_b, stride_bias_h, stride_bias_j, stride_bias_k,  # BIAS's strides
    stride_mask_b, stride_mask_i, stride_mask_k,  # MASK's strides (0, 0, 0 without a mask)
    stride_out_b, stride_out_i, stride_out_n, stride_out_h, stride_out_d,  # OUT's strides
    I,  # rows i (the second axis of q)
    N,  # sequence length: queries j and keys k per row
    H,  # heads
    scale,  # logit scale (a float; nonzero with a mask)
    HAS_MASK: tl.constexpr,  # whether MASK holds a key mask
    EVEN_N: tl.constexpr,  # N % BLOCK_J == 0 and N % BLOCK_K == 0: no partial block
    D: tl.constexpr,  # head dim, one of 16, 32, 64, 128
    BLOCK_J: tl.constexpr,  # queries per program
    BLOCK_K: tl.constexpr,  # keys per loop step
    PRECISION: tl.constexpr,  # tl.dot input precision of q.k and p.v: "ieee" or "tf32x3"
    PRECISE: tl.constexpr,  # libdevice exp2/log2 (fp32 inputs) instead of the approximate ones
    MMA_WAIT: tl.constexpr,  # end each loop step with a wgmma wait (_retire_mma; sm_90 only)
    MASK_PRECISION: tl.constexpr,  # tl.dot precision of the key-mask product (_add_key_mask)
    STORE_LSE: tl.constexpr,  # write LSE (a backward will follow)
):
    """Output and (STORE_LSE) base-2 lse for a [BLOCK_J] block of queries of one (b, i, h).

    MASK: the key mask as a 0/infinity bias in q's dtype, rows padded with the infinity
    (``_key_mask_bias``), or unused without a mask."""
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

    q = tl.load(Q + b * stride_q_b + i * stride_q_i + h * stride_q_h
                + jc64[:, None] * stride_q_n + offs_d[None, :] * stride_q_d)
    kt_ptrs = (K + b * stride_k_b + i * stride_k_i + h * stride_k_h
               + k64[None, :] * stride_k_n + offs_d[:, None] * stride_k_d)
    v_ptrs = (V + b * stride_v_b + i * stride_v_i + h * stride_v_h
              + k64[:, None] * stride_v_n + offs_d[None, :] * stride_v_d)
    b_ptrs = BIAS + b * stride_bias_b + h * stride_bias_h + jc64[:, None] * stride_bias_j + k64[None, :] * stride_bias_k
    mask_rows_ptrs = _mask_rows_ptrs(MASK + b * stride_mask_b + i * stride_mask_i, k64)  # contiguous over keys

    m_i, l_i, acc = _fwd_loop(q, kt_ptrs, v_ptrs, b_ptrs, mask_rows_ptrs, stride_k_n, stride_v_n, stride_bias_k,
                              N, scale, HAS_MASK, EVEN_N, BLOCK_J, BLOCK_K, D, PRECISION, PRECISE, MMA_WAIT,
                              MASK_PRECISION)
    o_ptrs = (OUT + b * stride_out_b + i * stride_out_i + h * stride_out_h
              + j64[:, None] * stride_out_n + offs_d[None, :] * stride_out_d)
    lse_ptrs = LSE + ((b * I + i) * H + h) * N + j64
    if HAS_MASK:
        if _has_nan(acc):  # NaN/inf at a masked key, or in the data itself
            m_i, l_i, acc = _fwd_exact(q, K + b * stride_k_b + i * stride_k_i + h * stride_k_h,
                                       V + b * stride_v_b + i * stride_v_i + h * stride_v_h,
                                       BIAS + b * stride_bias_b + h * stride_bias_h,
                                       MASK + b * stride_mask_b + i * stride_mask_i, pid_j, stride_k_n, stride_k_d,
                                       stride_v_n, stride_v_d, stride_bias_j, stride_bias_k, N, scale, BLOCK_J,
                                       BLOCK_K, D, PRECISION, PRECISE, MMA_WAIT)
    _fwd_store(m_i, l_i, acc, OUT, LSE, o_ptrs, lse_ptrs, valid_j, PRECISE, STORE_LSE)
