"""Forward kernel of varlen attention: one program per (query block, head, sequence).

    q: [total_q, H, D]   k, v: [total_k, H_kv, D]   out: [total_q, H, D]
    lse: fp32 [H, total_q] (natural log; -inf for rows that see no key)

The program reads its sequence's bounds from cu_seqlens (no padding, no host read) and
exits at once when its query block lies past the sequence's end: the grid is sized by
max_seqlen_q. Softmax online and in base 2: logits ``s2 = scale * log2(e) * q.k``.
Dropout (DROPOUT) draws a Philox number per (head, query row, key) from one seed: the
backward redraws the same mask.
Key blocks fully visible to every row of the query block run without masks; the rest
(the key tail, the causal diagonal) with them.
"""

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_k_n, stride_v_n, offs_m, offs_d, start, end,
               seqlen_k, shift, qk_scale2, D, seed, rng_rows, dropout_p, keep_scale,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
               PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    """Accumulate key blocks [start, end) of one sequence into (acc, m_i, l_i)."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rows = offs_n.to(tl.int64)
        k_ptrs = k_base + rows[:, None] * stride_k_n + offs_d[None, :]
        v_ptrs = v_base + rows[:, None] * stride_v_n + offs_d[None, :]
        if MASKED:
            load_mask = offs_n[:, None] < seqlen_k
            if not EVEN_D:
                load_mask = load_mask & (offs_d[None, :] < D)
            k = tl.load(k_ptrs, mask=load_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < D, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2  # [BLOCK_M, BLOCK_N]
        if MASKED:
            allowed = offs_n[None, :] < seqlen_k
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + shift)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=load_mask, other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < D, other=0.0)
        if DROPOUT:  # l_i sums the weights before dropout; the kept ones scale by 1 / (1 - p)
            keep = tl.rand(seed, rng_rows[:, None] + offs_n[None, :]) >= dropout_p
            p = tl.where(keep, p * keep_scale, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _key_range(pid_m, seqlen_q, seqlen_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full, end): key blocks [0, full) are visible to every row of query block pid_m;
    keys [full * BLOCK_N, end) need masks; keys past end are invisible to the block."""
    shift = seqlen_k - seqlen_q  # causal: query i sees keys j <= i + shift (bottom-right)
    if CAUSAL:
        last_row = tl.minimum((pid_m + 1) * BLOCK_M, seqlen_q) - 1
        end = tl.minimum(seqlen_k, tl.maximum(0, last_row + shift + 1))
        first = pid_m * BLOCK_M + shift + 1  # keys every row of the block sees
        full = tl.minimum(tl.where(first > 0, first, 0) // BLOCK_N, seqlen_k // BLOCK_N)
    else:
        end = seqlen_k
        full = seqlen_k // BLOCK_N
    return full, end


@triton.jit
def _fwd_kernel(
    Q,  # [total_q, H, D], last stride 1
    K,  # [total_k, H_kv, D], last stride 1
    V,  # [total_k, H_kv, D], last stride 1
    OUT,  # [total_q, H, D], last stride 1 (written)
    LSE,  # fp32 [H, total_q] (written)
    CU_Q,  # int32 [B+1]: query offsets of the sequences
    CU_K,  # int32 [B+1]: key offsets
    stride_q_n, stride_q_h,  # q strides over tokens and heads
    stride_k_n, stride_k_h,
    stride_v_n, stride_v_h,
    stride_o_n, stride_o_h,
    stride_lse_h,  # lse stride over heads (its token stride is 1)
    qk_scale2,  # softmax scale * log2(e)
    D,  # head dim (<= BLOCK_D)
    SEED,  # int64 [1]: Philox seed of the dropout mask (read only with DROPOUT)
    dropout_p,  # dropout probability
    total_q,  # packed query count and max_seqlen_k: the mask's random stream is indexed by
    max_k,  # (h * total_q + query row) * max_k + key index within the sequence
    GROUP: tl.constexpr,  # H // H_kv: query head h reads kv head h // GROUP
    CAUSAL: tl.constexpr,  # bottom-right causal mask
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,  # head-dim tile, power of two >= 16
    EVEN_D: tl.constexpr,  # D == BLOCK_D
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for fp32 inputs)
    DROPOUT: tl.constexpr,  # apply dropout to the attention weights
):
    # Inductor passes Python floats as fp64 scalars; the arithmetic stays fp32.
    qk_scale2 = tl.cast(qk_scale2, tl.float32)
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
    hk = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    q_rows = (q_start + offs_m).to(tl.int64)
    io_mask = row_ok[:, None] if EVEN_D else row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + q_rows[:, None] * stride_q_n + h * stride_q_h + offs_d[None, :], mask=io_mask, other=0.0)
    k_base = K + k_start.to(tl.int64) * stride_k_n + hk * stride_k_h
    v_base = V + k_start.to(tl.int64) * stride_v_n + hk * stride_v_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full, end = _key_range(pid_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    shift = seqlen_k - seqlen_q
    seed, keep_scale, rng_rows = 0, 1.0, q_rows
    if DROPOUT:
        seed = tl.load(SEED)
        keep_scale = 1.0 / (1.0 - dropout_p)
        rng_rows = (h.to(tl.int64) * total_q + q_rows) * max_k
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_k_n, stride_v_n, offs_m, offs_d,
                               0, full * BLOCK_N, seqlen_k, shift, qk_scale2, D, seed, rng_rows, dropout_p,
                               keep_scale, BLOCK_N, False, CAUSAL, EVEN_D, PRECISION, DROPOUT)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_k_n, stride_v_n, offs_m, offs_d,
                               full * BLOCK_N, end, seqlen_k, shift, qk_scale2, D, seed, rng_rows, dropout_p,
                               keep_scale, BLOCK_N, True, CAUSAL, EVEN_D, PRECISION, DROPOUT)

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows without keys: acc = 0, out = 0
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    tl.store(OUT + q_rows[:, None] * stride_o_n + h * stride_o_h + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=io_mask)
    tl.store(LSE + h * stride_lse_h + q_rows, lse, mask=row_ok)
