"""Backward kernels of varlen attention (deterministic: no atomics).

    delta[h, i] = sum_d dO[i, h, d] * O[i, h, d]          (_bwd_delta_kernel)
    p = exp(scale * q.k - lse), ds = p * (dO.v - delta)
    dK[j, hk] = scale * sum_{h in group(hk), i} ds q,  dV[j, hk] = sum p dO   (_bwd_dkdv_kernel)
    dQ[i, h]  = scale * sum_j ds k                                           (_bwd_dq_kernel)

dK/dV: a program per (key block, kv head, sequence) owns its rows of dK and dV and
loops over the query heads of its group and the query blocks that see its keys; dQ: a
program per (query block, head, sequence) loops over the visible key blocks. Rows that
see no key carry lse = -inf from the forward; here it reads as +inf, so every
recomputed probability of such a row is 0 (zero gradients, no NaN).

Dropout redraws the forward's Philox mask Z (kept weights scaled by 1/(1-p)):
dV = (P*Z)^T dO, dP = Z * (dO V^T), and delta = rowsum(dO * O) = rowsum(P * dP) as
without dropout.
"""

import triton
import triton.language as tl

from foldops.kernels.varlen_attention.forward import _key_range

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _bwd_delta_kernel(
    OUT,  # [total_q, H, D], last stride 1
    DO,  # [total_q, H, D], last stride 1
    DELTA,  # fp32 [H, total_q] (written)
    stride_o_n, stride_o_h,
    stride_do_n, stride_do_h,
    stride_delta_h,
    total_q,  # packed query count
    D,  # head dim
    BLOCK_M: tl.constexpr,  # tokens per program
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)
    mask = (offs_m[:, None] < total_q) & (offs_d[None, :] < D)
    o = tl.load(OUT + rows[:, None] * stride_o_n + h * stride_o_h + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_do_n + h * stride_do_h + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h * stride_delta_h + rows, delta, mask=offs_m < total_q)


@triton.jit
def _load_rows(base, rows, stride_n, offs_d, row_ok, D, EVEN_D: tl.constexpr):
    """[len(rows), BLOCK_D] tile of rows ``rows`` (int64) at ``base``; zeros where masked."""
    mask = row_ok[:, None] if EVEN_D else row_ok[:, None] & (offs_d[None, :] < D)
    return tl.load(base + rows[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_q_n, stride_do_n,
                offs_n, offs_d, start, end, seqlen_q, shift, qk_scale2, D, seed, rng_base, max_k, dropout_p,
                keep_scale, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
                DROPOUT: tl.constexpr):
    """Accumulate query blocks [start, end) of one query head into this key block's dk, dv."""
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seqlen_q
        rows = offs_m.to(tl.int64)
        q = _load_rows(q_base, rows, stride_q_n, offs_d, row_ok, D, EVEN_D)
        do = _load_rows(do_base, rows, stride_do_n, offs_d, row_ok, D, EVEN_D)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E  # no key: p = 0
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale2  # [BLOCK_N, BLOCK_M]
        p_t = tl.exp2(s_t - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        if DROPOUT:  # the forward's stream: (h * total_q + query row) * max_k + key
            keep_t = tl.rand(seed, rng_base + rows[None, :] * max_k + offs_n[:, None]) >= dropout_p
            dv = tl.dot(tl.where(keep_t, p_t * keep_scale, 0.0).to(do.dtype), do, dv, input_precision=PRECISION)
            dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V,  # [total_q, H, D], [total_k, H_kv, D] x2; last strides 1
    DO,  # [total_q, H, D]: gradient of the output
    LSE,  # fp32 [H, total_q] from the forward (natural log)
    DELTA,  # fp32 [H, total_q]: rowsum(dO * O)
    DK, DV,  # [total_k, H_kv, D] (written)
    CU_Q, CU_K,  # int32 [B+1]
    stride_q_n, stride_q_h,
    stride_k_n, stride_k_h,
    stride_v_n, stride_v_h,
    stride_do_n, stride_do_h,
    stride_dk_n, stride_dk_h,
    stride_dv_n, stride_dv_h,
    stride_lse_h,  # lse and delta stride over heads (token stride 1)
    qk_scale2,  # softmax scale * log2(e)
    scale,  # softmax scale
    D,  # head dim
    SEED,  # int64 [1]: the forward's dropout seed (read only with DROPOUT)
    dropout_p,  # dropout probability
    total_q,  # packed query count (the dropout stream's index, as in the forward)
    max_k,  # max_seqlen_k
    GROUP: tl.constexpr,  # query heads per kv head
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per step
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    # Inductor passes Python floats as fp64 scalars; the arithmetic stays fp32.
    qk_scale2 = tl.cast(qk_scale2, tl.float32)
    scale = tl.cast(scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    k_start = tl.load(CU_K + b)
    seqlen_k = tl.load(CU_K + b + 1) - k_start
    if pid_n * BLOCK_N >= seqlen_k:
        return
    q_start = tl.load(CU_Q + b)
    seqlen_q = tl.load(CU_Q + b + 1) - q_start
    shift = seqlen_k - seqlen_q

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < seqlen_k
    k_rows = (k_start + offs_n).to(tl.int64)
    k = _load_rows(K + hk * stride_k_h, k_rows, stride_k_n, offs_d, key_ok, D, EVEN_D)
    v = _load_rows(V + hk * stride_v_h, k_rows, stride_v_n, offs_d, key_ok, D, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    m_hi = tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # Rows i >= first see some key of the block; rows i >= whole see all of it.
        first = tl.maximum(pid_n * BLOCK_N - shift, 0)
        whole = tl.maximum((pid_n + 1) * BLOCK_N - 1 - shift, 0)
        m_lo = tl.minimum((first // BLOCK_M) * BLOCK_M, m_hi)
        m_mid = tl.minimum(tl.maximum(tl.cdiv(whole, BLOCK_M) * BLOCK_M, m_lo), m_hi)
    else:
        m_lo = 0
        m_mid = 0
    q_off = q_start.to(tl.int64)
    seed, keep_scale = 0, 1.0
    if DROPOUT:
        seed = tl.load(SEED)
        keep_scale = 1.0 / (1.0 - dropout_p)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + q_off * stride_q_n + h * stride_q_h
        do_base = DO + q_off * stride_do_n + h * stride_do_h
        lse_base = LSE + h * stride_lse_h + q_off
        delta_base = DELTA + h * stride_lse_h + q_off
        rng_base = (h.to(tl.int64) * total_q + q_off) * max_k
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_q_n, stride_do_n,
                             offs_n, offs_d, m_lo, m_mid, seqlen_q, shift, qk_scale2, D, seed, rng_base, max_k,
                             dropout_p, keep_scale, BLOCK_M, True, EVEN_D, PRECISION, DROPOUT)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_q_n, stride_do_n,
                             offs_n, offs_d, m_mid, m_hi, seqlen_q, shift, qk_scale2, D, seed, rng_base, max_k,
                             dropout_p, keep_scale, BLOCK_M, False, EVEN_D, PRECISION, DROPOUT)
    out_mask = key_ok[:, None] if EVEN_D else key_ok[:, None] & (offs_d[None, :] < D)
    tl.store(DK + k_rows[:, None] * stride_dk_n + hk * stride_dk_h + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + k_rows[:, None] * stride_dv_n + hk * stride_dv_h + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_k_n, stride_v_n, offs_m, offs_d, start, end,
              seqlen_k, shift, qk_scale2, D, seed, rng_rows, dropout_p, keep_scale,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
              PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    """Accumulate key blocks [start, end) into this query block's dq."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rows = offs_n.to(tl.int64)
        key_ok = offs_n < seqlen_k
        k = _load_rows(k_base, rows, stride_k_n, offs_d, key_ok, D, EVEN_D)
        v = _load_rows(v_base, rows, stride_v_n, offs_d, key_ok, D, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2  # [BLOCK_M, BLOCK_N]
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            allowed = key_ok[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + shift)
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = tl.rand(seed, rng_rows[:, None] + offs_n[None, :]) >= dropout_p
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V,  # [total_q, H, D], [total_k, H_kv, D] x2; last strides 1
    DO,  # [total_q, H, D]
    LSE, DELTA,  # fp32 [H, total_q]
    DQ,  # [total_q, H, D] (written)
    CU_Q, CU_K,  # int32 [B+1]
    stride_q_n, stride_q_h,
    stride_k_n, stride_k_h,
    stride_v_n, stride_v_h,
    stride_do_n, stride_do_h,
    stride_dq_n, stride_dq_h,
    stride_lse_h,
    qk_scale2,  # softmax scale * log2(e)
    scale,  # softmax scale
    D,  # head dim
    SEED,  # int64 [1]: the forward's dropout seed (read only with DROPOUT)
    dropout_p,  # dropout probability
    total_q,  # packed query count
    max_k,  # max_seqlen_k
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    # Inductor passes Python floats as fp64 scalars; the arithmetic stays fp32.
    qk_scale2 = tl.cast(qk_scale2, tl.float32)
    scale = tl.cast(scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    seqlen_q = tl.load(CU_Q + b + 1) - q_start
    if pid_m * BLOCK_M >= seqlen_q:
        return
    k_start = tl.load(CU_K + b)
    seqlen_k = tl.load(CU_K + b + 1) - k_start
    shift = seqlen_k - seqlen_q
    hk = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    q_rows = (q_start + offs_m).to(tl.int64)
    q = _load_rows(Q + h * stride_q_h, q_rows, stride_q_n, offs_d, row_ok, D, EVEN_D)
    do = _load_rows(DO + h * stride_do_h, q_rows, stride_do_n, offs_d, row_ok, D, EVEN_D)
    lse = tl.load(LSE + h * stride_lse_h + q_rows, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + h * stride_lse_h + q_rows, mask=row_ok, other=0.0)
    k_base = K + k_start.to(tl.int64) * stride_k_n + hk * stride_k_h
    v_base = V + k_start.to(tl.int64) * stride_v_n + hk * stride_v_h

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    seed, keep_scale, rng_rows = 0, 1.0, q_rows
    if DROPOUT:
        seed = tl.load(SEED)
        keep_scale = 1.0 / (1.0 - dropout_p)
        rng_rows = (h.to(tl.int64) * total_q + q_rows) * max_k
    full, end = _key_range(pid_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_k_n, stride_v_n, offs_m, offs_d,
                   0, full * BLOCK_N, seqlen_k, shift, qk_scale2, D, seed, rng_rows, dropout_p, keep_scale,
                   BLOCK_N, False, CAUSAL, EVEN_D, PRECISION, DROPOUT)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_k_n, stride_v_n, offs_m, offs_d,
                   full * BLOCK_N, end, seqlen_k, shift, qk_scale2, D, seed, rng_rows, dropout_p, keep_scale,
                   BLOCK_N, True, CAUSAL, EVEN_D, PRECISION, DROPOUT)
    io_mask = row_ok[:, None] if EVEN_D else row_ok[:, None] & (offs_d[None, :] < D)
    tl.store(DQ + q_rows[:, None] * stride_dq_n + h * stride_dq_h + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=io_mask)
