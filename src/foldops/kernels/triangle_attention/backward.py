"""Backward kernels of triangle attention, except dQ (``backward_dq.py``) and the bias
gradient (``backward_dbias.py``): ``_bwd_delta_kernel`` (delta = rowsum(dO * O)) and
``_bwd_dkdv_kernel`` (dK, dV), with its loop step.

Probabilities are recomputed from the saved base-2 lse: p = exp2(s * log2(e) - lse),
0 for rows whose keys are all masked (lse = +inf). dK/dV, whose key rows are fixed per
program, adds the mask per key block only where a key is masked; it loads the k and v
of masked keys as 0, and their bias rows as 0 in such blocks, so that NaN/inf there
cannot reach dK, dV (0 there).
"""

from __future__ import annotations

import triton
import triton.language as tl

from foldops.kernels.triangle_attention.common import (
    LOG2E_C,
    _exp2,
    _key_bias,
    _lse_parts,
    _retire_mma,
    _rowdot_fma,
)


@triton.jit
def _bwd_delta_kernel(
    OUT,  # [B, I, N, H, D] forward output
    DO,  # [B, I, N, H, D] output gradient, OUT's dtype
    DELTA,  # [B, I, H, N] contiguous fp32: rowsum(dO * O), written here
    stride_out_b, stride_out_i, stride_out_n, stride_out_h, stride_out_d,  # OUT's strides, in elements
    stride_do_b, stride_do_i, stride_do_n, stride_do_h, stride_do_d,  # DO's strides
    I,  # rows i
    N,  # queries j per row
    H,  # heads
    D: tl.constexpr,  # head dim
    BLOCK_J: tl.constexpr,  # queries per program
    BLOCK_H: tl.constexpr,  # heads per program (a power of two; heads past H masked)
    FMA_CHAIN: tl.constexpr,  # one FMA chain over d (fp32 "ieee", _rowdot_fma) instead of a tree sum
):
    """delta[b, i, h, j] = sum_d dO * O (fp32), for a [BLOCK_J] block of one (b, i) and
    BLOCK_H heads: with several heads the [BLOCK_J, BLOCK_H, D] tiles are whole rows of
    the usual layouts, read as contiguous bytes (one head per program read 64-byte
    pieces of 256-byte rows at D = 32, H = 4)."""
    pid_j = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    head_groups = tl.cdiv(H, BLOCK_H)
    b = (tl.program_id(2) // head_groups).to(tl.int64)
    offs_h = (tl.program_id(2) % head_groups) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, D)
    j64 = offs_j.to(tl.int64)[:, None, None]
    h64 = offs_h.to(tl.int64)[None, :, None]
    valid = (offs_j[:, None, None] < N) & (offs_h[None, :, None] < H)
    row_ok = (offs_j[:, None] < N) & (offs_h[None, :] < H)  # [BLOCK_J, BLOCK_H]
    if FMA_CHAIN:  # fp32 "ieee": round as the kernels' dP products (_rowdot_fma)
        j2 = offs_j.to(tl.int64)[:, None]
        h2 = offs_h.to(tl.int64)[None, :]
        delta = _rowdot_fma(DO + b * stride_do_b + i * stride_do_i + j2 * stride_do_n + h2 * stride_do_h,
                            OUT + b * stride_out_b + i * stride_out_i + j2 * stride_out_n + h2 * stride_out_h,
                            stride_do_d, stride_out_d, row_ok, D)
    else:
        do = tl.load(DO + b * stride_do_b + i * stride_do_i + j64 * stride_do_n + h64 * stride_do_h
                     + offs_d[None, None, :] * stride_do_d,
                     mask=valid, other=0.0)
        o = tl.load(OUT + b * stride_out_b + i * stride_out_i + j64 * stride_out_n + h64 * stride_out_h
                    + offs_d[None, None, :] * stride_out_d,
                    mask=valid, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 2)  # [BLOCK_J, BLOCK_H]
    rows = (b * I + i) * H + offs_h[None, :].to(tl.int64)
    tl.store(DELTA + rows * N + offs_j[:, None], delta, mask=row_ok)


@triton.jit
def _dkdv_step(k, v, key_bias, q, do, lse, delta, bias_t, dk, dv, scale,
               USE_KEY_BIAS: tl.constexpr, PRECISION: tl.constexpr, PRECISE: tl.constexpr):
    """dK, dV contributions of one query block (transposed [K, J] tiles)."""
    lse_hi, lse_lo = _lse_parts(lse)
    kq = tl.dot(k, tl.trans(q), input_precision=PRECISION)
    st = kq * scale + bias_t.to(tl.float32)
    if USE_KEY_BIAS:
        st += key_bias[:, None]
    xt = st * LOG2E_C - lse_hi[None, :]
    if lse.dtype == tl.float64:
        xt -= lse_lo[None, :]
    pt = _exp2(xt, PRECISE)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bias_rows(bt_ptrs, keep, MASKED: tl.constexpr):
    """The [BLOCK_K, BLOCK_J] bias tile, with the rows of masked keys as 0 (MASKED)."""
    if MASKED:
        return tl.load(bt_ptrs, mask=keep, other=0.0)
    else:
        return tl.load(bt_ptrs)


@triton.jit
def _dkdv_loop(
    k, v, key_bias, q_ptrs, do_ptrs, bt_ptrs, row_ptrs, LSE, DELTA, stride_q_n, stride_do_n, stride_bias_j, N, scale,
    USE_KEY_BIAS: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    D: tl.constexpr, PRECISION: tl.constexpr, PRECISE: tl.constexpr, MMA_WAIT: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """dK, dV over all query blocks: full blocks unmasked (key rows past N read clamped,
    never stored), a partial last one masked with lse = +inf past N (as _fwd_loop).

    With a key mask and masked keys in the block (HAS_MASK, USE_KEY_BIAS), their bias
    rows load as 0 (a loop-invariant predicate on the copy, not a select per logit): k
    is 0 there too, so their logits are exactly the -inf of ``key_bias`` whatever the
    bias holds (+inf or NaN would make +inf - inf)."""
    bias_keep = (key_bias == 0.0)[:, None]
    offs_j = tl.arange(0, BLOCK_J)
    dk = tl.zeros([BLOCK_K, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, D], dtype=tl.float32)
    n_full = N - N % BLOCK_J
    for start_j in range(0, n_full, BLOCK_J):
        dk, dv = _dkdv_step(k, v, key_bias, tl.load(q_ptrs), tl.load(do_ptrs), tl.load(LSE + row_ptrs),
                            tl.load(DELTA + row_ptrs), _bias_rows(bt_ptrs, bias_keep, USE_KEY_BIAS and HAS_MASK), dk,
                            dv, scale, USE_KEY_BIAS, PRECISION, PRECISE)
        q_ptrs += BLOCK_J * stride_q_n
        do_ptrs += BLOCK_J * stride_do_n
        bt_ptrs += BLOCK_J * stride_bias_j
        row_ptrs += BLOCK_J
        _retire_mma(start_j, MMA_WAIT)
    if not EVEN_N:
        if n_full < N:
            valid_j = n_full + offs_j < N
            q = tl.load(q_ptrs, mask=valid_j[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=valid_j[:, None], other=0.0)
            lse = tl.load(LSE + row_ptrs, mask=valid_j, other=float("inf"))
            delta = tl.load(DELTA + row_ptrs, mask=valid_j, other=0.0)
            if HAS_MASK:
                bias_t = tl.load(bt_ptrs, mask=valid_j[None, :] & bias_keep, other=0.0)
            else:
                bias_t = tl.load(bt_ptrs, mask=valid_j[None, :], other=0.0)
            dk, dv = _dkdv_step(k, v, key_bias, q, do, lse, delta, bias_t, dk, dv, scale,
                                USE_KEY_BIAS, PRECISION, PRECISE)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q,  # [B, I, N, H, D] queries, fp16 / bf16 / fp32
    K,  # [B, I, N, H, D] keys, q's dtype
    V,  # [B, I, N, H, D] values, q's dtype
    BIAS,  # [B, H, N, N] pair bias (query j, key k): a transposed view, unit stride over j
    MASK,  # [B, I, N] bool keep-mask over keys, or any pointer without a mask
    DO,  # [B, I, N, H, D] output gradient
    LSE,  # [B, I, H, N] contiguous base-2 lse of the forward, fp32 (fp64 for fp32 inputs)
    DELTA,  # [B, I, H, N] contiguous fp32 rowsum(dO * O) (_bwd_delta_kernel)
    DK,  # [B, I, N, H, D] key gradient, written here
    DV,  # [B, I, N, H, D] value gradient, written here
    stride_q_b, stride_q_i, stride_q_n, stride_q_h, stride_q_d,  # Q's strides, in elements
    stride_k_b, stride_k_i, stride_k_n, stride_k_h, stride_k_d,  # K's strides
    stride_v_b, stride_v_i, stride_v_n, stride_v_h, stride_v_d,  # V's strides
    stride_bias_b, stride_bias_h, stride_bias_j, stride_bias_k,  # BIAS's strides
    stride_mask_b, stride_mask_i, stride_mask_k,  # MASK's strides (0, 0, 0 without a mask)
    stride_do_b, stride_do_i, stride_do_n, stride_do_h, stride_do_d,  # DO's strides
    stride_dk_b, stride_dk_i, stride_dk_n, stride_dk_h, stride_dk_d,  # DK's strides
    stride_dv_b, stride_dv_i, stride_dv_n, stride_dv_h, stride_dv_d,  # DV's strides
    I,  # rows i (the second axis of q)
    N,  # sequence length: queries j and keys k per row
    H,  # heads
    scale,  # logit scale (a float)
    HAS_MASK: tl.constexpr,  # whether MASK holds a key mask
    EVEN_N: tl.constexpr,  # N % BLOCK_J == 0 and N % BLOCK_K == 0: no partial block
    D: tl.constexpr,  # head dim, one of 16, 32, 64, 128
    BLOCK_J: tl.constexpr,  # queries per loop step
    BLOCK_K: tl.constexpr,  # keys per program
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" or "tf32x3"
    PRECISE: tl.constexpr,  # libdevice exp2 (fp32 inputs) instead of the approximate one
    MMA_WAIT: tl.constexpr,  # end each loop step with a wgmma wait (_retire_mma; sm_90 only)
):
    """dK, dV for a [BLOCK_K] block of keys of one (b, i, h): transposed tiles [K, J]."""
    scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as fp64
    pid_k = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, D)
    valid_k = offs_k < N
    j64 = offs_j.to(tl.int64)
    k64 = offs_k.to(tl.int64)
    kc64 = tl.minimum(offs_k, N - 1).to(tl.int64)  # keys past N read key N-1 (never stored)

    if HAS_MASK:  # masked keys: k and v as 0 whatever they hold (dK, dV there are 0; no NaN from 0 * NaN)
        key_bias = _key_bias(MASK + b * stride_mask_b + i * stride_mask_i + k64 * stride_mask_k, offs_k, N, HAS_MASK,
                             EVEN_N)
        kept = (key_bias == 0.0)[:, None]
        k = tl.load(K + b * stride_k_b + i * stride_k_i + h * stride_k_h + kc64[:, None] * stride_k_n
                    + offs_d[None, :] * stride_k_d, mask=kept, other=0.0)
        v = tl.load(V + b * stride_v_b + i * stride_v_i + h * stride_v_h + kc64[:, None] * stride_v_n
                    + offs_d[None, :] * stride_v_d, mask=kept, other=0.0)
    else:
        k = tl.load(K + b * stride_k_b + i * stride_k_i + h * stride_k_h + kc64[:, None] * stride_k_n
                    + offs_d[None, :] * stride_k_d)
        v = tl.load(V + b * stride_v_b + i * stride_v_i + h * stride_v_h + kc64[:, None] * stride_v_n
                    + offs_d[None, :] * stride_v_d)
        key_bias = _key_bias(MASK + b * stride_mask_b + i * stride_mask_i + k64 * stride_mask_k, offs_k, N, HAS_MASK,
                             EVEN_N)

    q_ptrs = (Q + b * stride_q_b + i * stride_q_i + h * stride_q_h + j64[:, None] * stride_q_n
              + offs_d[None, :] * stride_q_d)
    do_ptrs = (DO + b * stride_do_b + i * stride_do_i + h * stride_do_h + j64[:, None] * stride_do_n
               + offs_d[None, :] * stride_do_d)
    bt_ptrs = (BIAS + b * stride_bias_b + h * stride_bias_h + j64[None, :] * stride_bias_j
               + kc64[:, None] * stride_bias_k)
    row_ptrs = ((b * I + i) * H + h) * N + j64
    # Key blocks with every key kept (the common case) skip the per-logit mask add.
    if HAS_MASK or not EVEN_N:
        full = tl.min(key_bias, 0) == 0.0
    else:
        full = True
    if full:
        dk, dv = _dkdv_loop(k, v, key_bias, q_ptrs, do_ptrs, bt_ptrs, row_ptrs, LSE, DELTA, stride_q_n, stride_do_n,
                            stride_bias_j, N, scale, False, EVEN_N, BLOCK_J, BLOCK_K, D, PRECISION, PRECISE, MMA_WAIT,
                            HAS_MASK)
    else:
        dk, dv = _dkdv_loop(k, v, key_bias, q_ptrs, do_ptrs, bt_ptrs, row_ptrs, LSE, DELTA, stride_q_n, stride_do_n,
                            stride_bias_j, N, scale, True, EVEN_N, BLOCK_J, BLOCK_K, D, PRECISION, PRECISE, MMA_WAIT,
                            HAS_MASK)

    dk_ptrs = (DK + b * stride_dk_b + i * stride_dk_i + h * stride_dk_h + k64[:, None] * stride_dk_n
               + offs_d[None, :] * stride_dk_d)
    dv_ptrs = (DV + b * stride_dv_b + i * stride_dv_i + h * stride_dv_h + k64[:, None] * stride_dv_n
               + offs_d[None, :] * stride_dv_d)
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=valid_k[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=valid_k[:, None])
