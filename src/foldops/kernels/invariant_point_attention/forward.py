"""The invariant point attention forward kernel: one query row, every head, one pass over keys.

A program owns query row i of batch item b for all H heads. For each tile of BLOCK_N
keys it forms the logits (scalar, point and pair-bias terms, ``common.row_logits``),
updates an online softmax per head, and accumulates all three outputs: the scalar
values and value points (per head, fp32 products) and the pair output, a tensor-core
product ``p[HP, BLOCK_N] @ z[b, i, tile, :]`` with z in q's dtype (an fp32 z is
rounded on load, as a matmul under autocast rounds it) and, for 16-bit q, the weights
as two 16-bit parts (hi + lo), so the output is the exact weighted sum of the rounded z:
the backward's delta = rowsum(dO * O) must equal sum_j P dP, which the backward forms
with fp32 weights; one rounded part made the point weights' gradient 4x less accurate
than plain PyTorch. z is read once for all heads. It stores
the outputs and the per-head log-sum-exp (natural base, fp32, as row max and log-sum;
+inf for a dropped row).

Value points are weighted relative to the row's own: ``op_rel = sum_j P (vp_j - vp_i)``
(stored, OP_REL, for the backward's delta) and the point output ``op_rel + vp_i``. Its
terms then have the size of the neighbourhood the row attends to, not the cloud's, and
so do the roundings of delta's point term dOp . op_rel and of the row kernel's dP (which
takes dOp . (vp_j - vp_i)): computed apart, in global coordinates they did not cancel in
dS = P (dP - delta) (2-15x plain PyTorch's error in fp32 gradients on a wide cloud).
Cost per key tile: one subtraction per element of the value-point tile.
"""

import triton
import triton.language as tl

from foldops.kernels.invariant_point_attention.common import load_heads_tile, load_row, logits_tile


@triton.jit
def ipa_fwd_kernel(
    Q, K, V,  # [B, N, H, C] scalar queries, keys, values (q's dtype)
    QP, KP,  # [B, N, H, D] fp32 query / key points, global frame, coordinates flattened (D = 3 Pq)
    VP,  # [B, N, H, E] fp32 value points, flattened (E = 3 Pv)
    W,  # [H] fp32 point weights (the op multiplies by -1/2)
    BIAS,  # [B, H, N, N] pair bias (q's dtype or fp32)
    Z,  # [B, N, N, CZ] pair values (q's dtype or fp32)
    MASK,  # [B, N] bool residue mask (unused unless HAS_MASK)
    O, OP, OZ,  # outputs, fp32: [B, N, H, C], [B, N, H, E], [B, N, H, CZ]
    OP_REL,  # [B, N, H, E] fp32: the point output relative to the row's own value points (for the backward)
    LSE,  # [B, N, H, 2] fp32 log-sum-exp in two parts (row max, log of the sum); (+inf, 0) for dropped rows
    stride_q_b, stride_q_n, stride_q_h, stride_q_c,
    stride_k_b, stride_k_n, stride_k_h, stride_k_c,
    stride_v_b, stride_v_n, stride_v_h, stride_v_c,
    stride_qp_b, stride_qp_n, stride_qp_h, stride_qp_d,
    stride_kp_b, stride_kp_n, stride_kp_h, stride_kp_d,
    stride_vp_b, stride_vp_n, stride_vp_h, stride_vp_e,
    stride_bias_b, stride_bias_h, stride_bias_i, stride_bias_j,
    stride_z_b, stride_z_i, stride_z_j, stride_z_c,
    stride_mask_b, stride_mask_n,
    stride_o_b, stride_o_n, stride_o_h, stride_o_c,
    stride_op_b, stride_op_n, stride_op_h, stride_op_e,  # OP and OP_REL share a layout
    stride_oz_b, stride_oz_n, stride_oz_h, stride_oz_c,
    stride_lse_b, stride_lse_n, stride_lse_h,  # the two parts are adjacent
    N, H,  # residues, heads
    C: tl.constexpr, D: tl.constexpr,  # scalar channels, 3 Pq (unrolled in the logits)
    E, CZ,  # 3 Pv, pair channels
    scale,  # scalar-term factor
    HAS_MASK: tl.constexpr,
    HP: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr, CZP: tl.constexpr,  # padded sizes
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 inputs ("ieee" or "tf32x3")
    SPLIT_P: tl.constexpr,  # 16-bit q: the pair product takes the weights as two 16-bit parts
):
    # Inductor passes Python floats as fp64 scalars; the arithmetic stays fp32.
    scale = tl.cast(scale, tl.float32)
    i = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs_h = tl.arange(0, HP)
    offs_c = tl.arange(0, CP)
    offs_e = tl.arange(0, EP)
    offs_z = tl.arange(0, CZP)
    h_ok = offs_h < H
    c_ok, e_ok, z_ok = offs_c < C, offs_e < E, offs_z < CZ

    q_ptrs = Q + b * stride_q_b + i * stride_q_n + offs_h[:, None] * stride_q_h  # [HP, 1]
    qp_ptrs = QP + b * stride_qp_b + i * stride_qp_n + offs_h[:, None] * stride_qp_h
    w = tl.load(W + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        row_kept = tl.load(MASK + b * stride_mask_b + i * stride_mask_n).to(tl.int1)
    # The row's own value points: the weighted sum runs over vp_j - vp_i (see the module
    # doc); a dropped row's are taken as 0, so its outputs stay 0 whatever they hold.
    vp_row = load_row(VP + b * stride_vp_b + i * stride_vp_n, offs_h, offs_e, stride_vp_h, stride_vp_e, h_ok, e_ok)
    if HAS_MASK:
        vp_row = tl.where(row_kept, vp_row, 0.0)

    m_i = tl.full([HP], -1e30, tl.float32)  # finite: a tile of dropped keys gives p = 0, not NaN
    l_i = tl.zeros([HP], tl.float32)
    acc_o = tl.zeros([HP, CP], tl.float32)
    acc_p = tl.zeros([HP, EP], tl.float32)
    acc_z = tl.zeros([HP, CZP], tl.float32)
    k_b, kp_b = K + b * stride_k_b, KP + b * stride_kp_b
    v_b, vp_b = V + b * stride_v_b, VP + b * stride_vp_b
    bias_row = BIAS + b * stride_bias_b + i * stride_bias_i
    z_row = Z + b * stride_z_b + i * stride_z_i
    for start in range(0, N, BLOCK_N):
        offs_j = start + tl.arange(0, BLOCK_N)
        j_ok = offs_j < N
        j_keep = j_ok
        if HAS_MASK:
            key_kept = tl.load(MASK + b * stride_mask_b + offs_j * stride_mask_n, mask=j_ok, other=0).to(tl.int1)
            j_keep = (j_keep & key_kept & row_kept) != 0  # bool (the interpreter makes & with a scalar an int)
        hj_ok = h_ok[:, None] & j_ok[None, :]
        bias = tl.load(bias_row + offs_h[:, None] * stride_bias_h + offs_j[None, :] * stride_bias_j,
                       mask=hj_ok, other=0.0).to(tl.float32)
        s, _ = logits_tile(q_ptrs, k_b + offs_h[:, None] * stride_k_h + offs_j[None, :] * stride_k_n,
                           h_ok[:, None], hj_ok, stride_q_c, stride_k_c,
                           qp_ptrs, kp_b + offs_h[:, None] * stride_kp_h + offs_j[None, :] * stride_kp_n,
                           stride_qp_d, stride_kp_d, bias, w[:, None], scale, C, D)
        s = tl.where(j_keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # [HP, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # Dropped keys' (and a dropped row's) values, points and pair values are not
        # loaded (0): p = 0 there, but 0 * NaN would be NaN.
        v = load_heads_tile(v_b, offs_h, offs_j, offs_c, stride_v_n, stride_v_h, stride_v_c, h_ok, j_keep, c_ok)
        acc_o = acc_o * alpha[:, None] + tl.sum(p[:, :, None] * v, axis=1)
        vp = load_heads_tile(vp_b, offs_h, offs_j, offs_e, stride_vp_n, stride_vp_h, stride_vp_e, h_ok, j_keep, e_ok)
        acc_p = acc_p * alpha[:, None] + tl.sum(p[:, :, None] * (vp - vp_row[:, None, :]), axis=1)
        z = tl.load(z_row + offs_j[:, None] * stride_z_j + offs_z[None, :] * stride_z_c,
                    mask=j_keep[:, None] & z_ok[None, :], other=0.0).to(Q.dtype.element_ty)  # [BLOCK_N, CZP]
        acc_z = acc_z * alpha[:, None]
        if SPLIT_P:  # p = hi + lo in q's 16-bit dtype: the pair output as exact as fp32 weights make it
            p_hi = p.to(Q.dtype.element_ty)
            acc_z += tl.dot(p_hi, z)
            acc_z += tl.dot((p - p_hi.to(tl.float32)).to(Q.dtype.element_ty), z)
        else:
            acc_z += tl.dot(p, z, input_precision=PRECISION)
        m_i = m_new

    kept = l_i > 0  # a dropped row (no kept key) is zero, its lse +inf
    l_safe = tl.where(kept, l_i, 1.0)
    inv = tl.where(kept, 1.0 / l_safe, 0.0)
    # lse = m + log(l) kept as its two parts: one fp32 would round it by eps |lse|, and
    # the backward's exp(s - lse) would carry that relative error into every P.
    lse_ptrs = LSE + b * stride_lse_b + i * stride_lse_n + offs_h * stride_lse_h
    tl.store(lse_ptrs, tl.where(kept, m_i, float("inf")), mask=h_ok)
    tl.store(lse_ptrs + 1, tl.log(l_safe), mask=h_ok)
    o_row = O + b * stride_o_b + i * stride_o_n
    tl.store(o_row + offs_h[:, None] * stride_o_h + offs_c[None, :] * stride_o_c,
             (acc_o * inv[:, None]).to(O.dtype.element_ty), mask=h_ok[:, None] & c_ok[None, :])
    op_rel = acc_p * inv[:, None]
    op_tile = b * stride_op_b + i * stride_op_n + offs_h[:, None] * stride_op_h + offs_e[None, :] * stride_op_e
    he_ok = h_ok[:, None] & e_ok[None, :]
    tl.store(OP + op_tile, tl.where(kept[:, None], op_rel + vp_row, 0.0).to(OP.dtype.element_ty), mask=he_ok)
    tl.store(OP_REL + op_tile, op_rel.to(OP_REL.dtype.element_ty), mask=he_ok)
    oz_row = OZ + b * stride_oz_b + i * stride_oz_n
    tl.store(oz_row + offs_h[:, None] * stride_oz_h + offs_z[None, :] * stride_oz_c,
             (acc_z * inv[:, None]).to(OZ.dtype.element_ty), mask=h_ok[:, None] & z_ok[None, :])
