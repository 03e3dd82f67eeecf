"""The invariant point attention backward kernels.

With P the attention weights, dP = dO.v + dOp.(vp_j - vp_i) + dOz.z[i, j] and
dS = P (dP - delta), delta = rowsum(dO*O + dOp*Op_rel + dOz*Oz) (computed by the
launcher; Op_rel = sum_j P (vp_j - vp_i), the forward's). The point terms are taken
relative to the row's own value points, a row constant dS cancels, so that their
roundings have the size of the row's neighbourhood, not the cloud's (forward.py):

- ``ipa_bwd_row_kernel``: one query row, all heads (as the forward): recomputes P from
  the saved log-sum-exp, forms dS, writes it to the ``[B, H, N, N]`` dS buffer (which is
  the pair bias's gradient), writes ``dz[b, i, tile] = P^T @ dOz`` (a tensor-core
  product in q's dtype, as the forward's pair product; z's gradient is only ever this),
  and accumulates dq, the query points' gradient ``-w sum_j dS (q_pts - k_pts)`` (from
  the differences) and the row's share of the point weights' gradient
  ``-1/2 sum_j dS dist2``.
- ``ipa_bwd_column_kernel``: a block of keys of one head, over query tiles: recomputes
  P^T (scalar logits as a tensor-core product, squared distances from the coordinate
  differences), reads dS^T from the buffer, and accumulates dk, dv, the value points'
  gradient and the key points' ``w sum_i dS (q_pts - k_pts)``. No atomics.
"""

import triton
import triton.language as tl

from foldops.kernels.invariant_point_attention.common import load_heads_tile, load_row, logits_tile


@triton.jit
def ipa_bwd_row_kernel(
    Q, K, V, QP, KP, VP, W, BIAS, Z, MASK,  # the forward's inputs, as there
    DO, DOP, DOZ,  # output gradients [B, N, H, C] (q's dtype), [B, N, H, E] fp32, [B, N, H, CZ] (q's dtype)
    LSE,  # [B, N, H, 2] fp32 saved log-sum-exp parts (row max, log of the sum)
    DELTA,  # [B, N, H] fp32 rowsum of dO*O over all three outputs
    DQ, DQP,  # [B, N, H, C], [B, N, H, D] fp32 gradients (written)
    DW_ROWS,  # [B, N, H] fp32: each row's share of the point weights' gradient (written)
    DS,  # [B, H, N, N] fp32 dS (written; the bias gradient)
    DZ,  # [B, N, N, CZ] z's gradient (written, z's dtype)
    stride_q_b, stride_q_n, stride_q_h, stride_q_c,
    stride_k_b, stride_k_n, stride_k_h, stride_k_c,
    stride_v_b, stride_v_n, stride_v_h, stride_v_c,
    stride_qp_b, stride_qp_n, stride_qp_h, stride_qp_d,
    stride_kp_b, stride_kp_n, stride_kp_h, stride_kp_d,
    stride_vp_b, stride_vp_n, stride_vp_h, stride_vp_e,
    stride_bias_b, stride_bias_h, stride_bias_i, stride_bias_j,
    stride_z_b, stride_z_i, stride_z_j, stride_z_c,
    stride_mask_b, stride_mask_n,
    stride_do_b, stride_do_n, stride_do_h, stride_do_c,
    stride_dop_b, stride_dop_n, stride_dop_h, stride_dop_e,
    stride_doz_b, stride_doz_n, stride_doz_h, stride_doz_c,
    stride_lse_b, stride_lse_n, stride_lse_h,
    stride_delta_b, stride_delta_n, stride_delta_h,  # DELTA and DW_ROWS share a layout
    stride_dq_b, stride_dq_n, stride_dq_h, stride_dq_c,
    stride_dqp_b, stride_dqp_n, stride_dqp_h, stride_dqp_d,
    stride_ds_b, stride_ds_h, stride_ds_i, stride_ds_j,
    stride_dz_b, stride_dz_i, stride_dz_j, stride_dz_c,
    N, H,  # residues, heads
    C: tl.constexpr, D: tl.constexpr,  # scalar channels, 3 Pq (unrolled in the logits)
    E, CZ,  # 3 Pv, pair channels
    scale,
    HAS_MASK: tl.constexpr,
    HP: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr, CZP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Inductor passes Python floats as fp64 scalars; the arithmetic stays fp32.
    scale = tl.cast(scale, tl.float32)
    i = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs_h = tl.arange(0, HP)
    offs_c = tl.arange(0, CP)
    offs_d = tl.arange(0, DP)
    offs_e = tl.arange(0, EP)
    offs_z = tl.arange(0, CZP)
    h_ok = offs_h < H
    c_ok, d_ok, e_ok, z_ok = offs_c < C, offs_d < D, offs_e < E, offs_z < CZ

    q_ptrs = Q + b * stride_q_b + i * stride_q_n + offs_h[:, None] * stride_q_h  # [HP, 1]
    qp_ptrs = QP + b * stride_qp_b + i * stride_qp_n + offs_h[:, None] * stride_qp_h
    qp_row = load_row(QP + b * stride_qp_b + i * stride_qp_n, offs_h, offs_d, stride_qp_h, stride_qp_d, h_ok, d_ok)
    w = tl.load(W + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    do_row = load_row(DO + b * stride_do_b + i * stride_do_n, offs_h, offs_c, stride_do_h, stride_do_c, h_ok, c_ok)
    dop_row = load_row(DOP + b * stride_dop_b + i * stride_dop_n, offs_h, offs_e, stride_dop_h, stride_dop_e,
                       h_ok, e_ok)
    doz_ptrs = DOZ + b * stride_doz_b + i * stride_doz_n + offs_h[:, None] * stride_doz_h + offs_z[None, :] * stride_doz_c
    doz = tl.load(doz_ptrs, mask=h_ok[:, None] & z_ok[None, :], other=0.0).to(Q.dtype.element_ty)  # [HP, CZP]
    lse_ptrs = LSE + b * stride_lse_b + i * stride_lse_n + offs_h * stride_lse_h
    lse_max = tl.load(lse_ptrs, mask=h_ok, other=float("inf"))
    lse_log = tl.load(lse_ptrs + 1, mask=h_ok, other=0.0)
    row_ptrs = b * stride_delta_b + i * stride_delta_n + offs_h * stride_delta_h
    delta = tl.load(DELTA + row_ptrs, mask=h_ok, other=0.0)
    if HAS_MASK:
        row_kept = tl.load(MASK + b * stride_mask_b + i * stride_mask_n).to(tl.int1)
    # dP's point term from vp_j - vp_i, as the forward's relative point output (module doc)
    vp_row = load_row(VP + b * stride_vp_b + i * stride_vp_n, offs_h, offs_e, stride_vp_h, stride_vp_e, h_ok, e_ok)
    q_ok = h_ok[:, None]
    if HAS_MASK:  # a dropped row's own operands are not read (0): they may be NaN or inf
        vp_row = tl.where(row_kept, vp_row, 0.0)
        qp_row = tl.where(row_kept, qp_row, 0.0)
        q_ok = (q_ok & row_kept) != 0

    dq = tl.zeros([HP, CP], tl.float32)
    dqp = tl.zeros([HP, DP], tl.float32)
    dw = tl.zeros([HP], tl.float32)
    k_b, kp_b = K + b * stride_k_b, KP + b * stride_kp_b
    v_b, vp_b = V + b * stride_v_b, VP + b * stride_vp_b
    bias_row = BIAS + b * stride_bias_b + i * stride_bias_i
    z_row = Z + b * stride_z_b + i * stride_z_i
    ds_row = DS + b * stride_ds_b + i * stride_ds_i
    dz_row = DZ + b * stride_dz_b + i * stride_dz_i
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
        # Dropped keys' operands are not read (0): dS = 0 there, but 0 * NaN would be NaN.
        hj_keep = h_ok[:, None] & j_keep[None, :]
        s, dist2 = logits_tile(q_ptrs, k_b + offs_h[:, None] * stride_k_h + offs_j[None, :] * stride_k_n,
                               q_ok, hj_keep, stride_q_c, stride_k_c,
                               qp_ptrs, kp_b + offs_h[:, None] * stride_kp_h + offs_j[None, :] * stride_kp_n,
                               stride_qp_d, stride_kp_d, bias, w[:, None], scale, C, D)
        s = tl.where(j_keep[None, :], s, float("-inf"))
        p = tl.exp((s - lse_max[:, None]) - lse_log[:, None])  # [HP, BLOCK_N]; 0 at dropped keys, rows
        v = load_heads_tile(v_b, offs_h, offs_j, offs_c, stride_v_n, stride_v_h, stride_v_c, h_ok, j_keep, c_ok)
        dp = tl.sum(do_row[:, None, :] * v, axis=2)
        vp = load_heads_tile(vp_b, offs_h, offs_j, offs_e, stride_vp_n, stride_vp_h, stride_vp_e, h_ok, j_keep, e_ok)
        dp += tl.sum(dop_row[:, None, :] * (vp - vp_row[:, None, :]), axis=2)
        z = tl.load(z_row + offs_j[:, None] * stride_z_j + offs_z[None, :] * stride_z_c,
                    mask=j_keep[:, None] & z_ok[None, :], other=0.0).to(Q.dtype.element_ty)  # [BLOCK_N, CZP]
        dp += tl.dot(doz, tl.trans(z), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        tl.store(ds_row + offs_h[:, None] * stride_ds_h + offs_j[None, :] * stride_ds_j, ds,
                 mask=h_ok[:, None] & j_ok[None, :])
        dz = tl.dot(tl.trans(p.to(doz.dtype)), doz, input_precision=PRECISION)  # [BLOCK_N, CZP]
        tl.store(dz_row + offs_j[:, None] * stride_dz_j + offs_z[None, :] * stride_dz_c,
                 dz.to(DZ.dtype.element_ty), mask=j_ok[:, None] & z_ok[None, :])
        k = load_heads_tile(k_b, offs_h, offs_j, offs_c, stride_k_n, stride_k_h, stride_k_c, h_ok, j_keep, c_ok)
        dq += tl.sum(ds[:, :, None] * k, axis=1)
        kp = load_heads_tile(kp_b, offs_h, offs_j, offs_d, stride_kp_n, stride_kp_h, stride_kp_d, h_ok, j_keep, d_ok)
        dqp += tl.sum(ds[:, :, None] * (qp_row[:, None, :] - kp), axis=1)
        dw += tl.sum(ds * dist2, axis=1)

    dq_row = DQ + b * stride_dq_b + i * stride_dq_n
    tl.store(dq_row + offs_h[:, None] * stride_dq_h + offs_c[None, :] * stride_dq_c, dq * scale,
             mask=h_ok[:, None] & c_ok[None, :])
    dqp_row = DQP + b * stride_dqp_b + i * stride_dqp_n
    tl.store(dqp_row + offs_h[:, None] * stride_dqp_h + offs_d[None, :] * stride_dqp_d, -w[:, None] * dqp,
             mask=h_ok[:, None] & d_ok[None, :])
    tl.store(DW_ROWS + row_ptrs, -0.5 * dw, mask=h_ok)


@triton.jit
def ipa_bwd_column_kernel(
    Q, K, V, QP, KP, VP, W, BIAS, MASK,  # the forward's inputs, as there
    DO, DOP,  # output gradients [B, N, H, C] (q's dtype), [B, N, H, E] fp32
    LSE,  # [B, N, H, 2] fp32 saved log-sum-exp parts (row max, log of the sum)
    DS,  # [B, H, N, N] fp32 dS from the row kernel
    DK, DV, DKP, DVP,  # gradients [B, N, H, C] x2, [B, N, H, D], [B, N, H, E], fp32 (written)
    stride_q_b, stride_q_n, stride_q_h, stride_q_c,
    stride_k_b, stride_k_n, stride_k_h, stride_k_c,
    stride_v_b, stride_v_n, stride_v_h, stride_v_c,
    stride_qp_b, stride_qp_n, stride_qp_h, stride_qp_d,
    stride_kp_b, stride_kp_n, stride_kp_h, stride_kp_d,
    stride_vp_b, stride_vp_n, stride_vp_h, stride_vp_e,
    stride_bias_b, stride_bias_h, stride_bias_i, stride_bias_j,
    stride_mask_b, stride_mask_n,
    stride_do_b, stride_do_n, stride_do_h, stride_do_c,
    stride_dop_b, stride_dop_n, stride_dop_h, stride_dop_e,
    stride_lse_b, stride_lse_n, stride_lse_h,
    stride_ds_b, stride_ds_h, stride_ds_i, stride_ds_j,
    stride_dk_b, stride_dk_n, stride_dk_h, stride_dk_c,  # DK and DV share a layout
    stride_dkp_b, stride_dkp_n, stride_dkp_h, stride_dkp_d,
    stride_dvp_b, stride_dvp_n, stride_dvp_h, stride_dvp_e,
    N,
    C: tl.constexpr, D: tl.constexpr,  # scalar channels, 3 Pq (unrolled in the logits)
    E,
    scale,
    HAS_MASK: tl.constexpr,
    CP: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr,
    PRECISION: tl.constexpr,  # for the q-dtype products (fp32 inputs); point products are "ieee"
):
    # Inductor passes Python floats as fp64 scalars; the arithmetic stays fp32.
    scale = tl.cast(scale, tl.float32)
    pid_j = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_c = tl.arange(0, CP)
    offs_d = tl.arange(0, DP)
    offs_e = tl.arange(0, EP)
    j_ok = offs_j < N
    c_ok, d_ok, e_ok = offs_c < C, offs_d < D, offs_e < E
    j_keep = j_ok
    if HAS_MASK:
        j_keep = j_keep & tl.load(MASK + b * stride_mask_b + offs_j * stride_mask_n, mask=j_ok, other=0).to(tl.int1)
    w = tl.load(W + h).to(tl.float32)

    k_ptrs = K + b * stride_k_b + h * stride_k_h + offs_j[:, None] * stride_k_n  # [BLOCK_J, 1]
    kp_base = KP + b * stride_kp_b + h * stride_kp_h

    dk = tl.zeros([BLOCK_J, CP], tl.float32)
    dv = tl.zeros([BLOCK_J, CP], tl.float32)
    dkp = tl.zeros([BLOCK_J, DP], tl.float32)  # sum_i dS (q_pts - k_pts)
    dvp = tl.zeros([BLOCK_J, EP], tl.float32)
    q_base = Q + b * stride_q_b + h * stride_q_h
    qp_base = QP + b * stride_qp_b + h * stride_qp_h
    do_base = DO + b * stride_do_b + h * stride_do_h
    dop_base = DOP + b * stride_dop_b + h * stride_dop_h
    bias_base = BIAS + b * stride_bias_b + h * stride_bias_h
    ds_base = DS + b * stride_ds_b + h * stride_ds_h
    lse_base = LSE + b * stride_lse_b + h * stride_lse_h
    for start in range(0, N, BLOCK_I):
        offs_i = start + tl.arange(0, BLOCK_I)
        i_ok = offs_i < N
        i_keep = i_ok  # dropped rows' and keys' operands are not read (0): they may be NaN or inf
        if HAS_MASK:
            i_keep = i_keep & tl.load(MASK + b * stride_mask_b + offs_i * stride_mask_n, mask=i_ok, other=0).to(tl.int1)
        q = tl.load(q_base + offs_i[:, None] * stride_q_n + offs_c[None, :] * stride_q_c,
                    mask=i_keep[:, None] & c_ok[None, :], other=0.0)  # [BLOCK_I, CP]
        tile = offs_j[:, None] * stride_bias_j + offs_i[None, :] * stride_bias_i
        bias_t = tl.load(bias_base + tile, mask=j_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
        st, _ = logits_tile(q_base + offs_i[None, :] * stride_q_n, k_ptrs, i_keep[None, :], j_keep[:, None],
                            stride_q_c, stride_k_c,
                            qp_base + offs_i[None, :] * stride_qp_n, kp_base + offs_j[:, None] * stride_kp_n,
                            stride_qp_d, stride_kp_d, bias_t, w, scale, C, D)  # [BLOCK_J, BLOCK_I]
        lse_max = tl.load(lse_base + offs_i * stride_lse_n, mask=i_ok, other=float("inf"))
        lse_log = tl.load(lse_base + offs_i * stride_lse_n + 1, mask=i_ok, other=0.0)
        pt = tl.exp((st - lse_max[None, :]) - lse_log[None, :])
        pt = tl.where(j_keep[:, None] & i_keep[None, :], pt, 0.0)  # P^T; 0 at dropped keys and rows
        dst = tl.load(ds_base + offs_j[:, None] * stride_ds_j + offs_i[None, :] * stride_ds_i,
                      mask=j_ok[:, None] & i_ok[None, :], other=0.0)  # dS^T, fp32
        do = tl.load(do_base + offs_i[:, None] * stride_do_n + offs_c[None, :] * stride_do_c,
                     mask=i_ok[:, None] & c_ok[None, :], other=0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dop = tl.load(dop_base + offs_i[:, None] * stride_dop_n + offs_e[None, :] * stride_dop_e,
                      mask=i_ok[:, None] & e_ok[None, :], other=0.0)  # fp32
        dvp += tl.dot(pt, dop, input_precision="ieee")
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
        for d in tl.static_range(D):  # from the differences again: no cancellation
            kd = tl.load(kp_base + offs_j * stride_kp_n + d * stride_kp_d, mask=j_keep, other=0.0)
            qd = tl.load(qp_base + offs_i * stride_qp_n + d * stride_qp_d, mask=i_keep, other=0.0)
            column = tl.sum(dst * (qd[None, :] - kd[:, None]), axis=1)  # [BLOCK_J]
            dkp += tl.where(offs_d[None, :] == d, column[:, None], 0.0)

    out = b * stride_dk_b + h * stride_dk_h + offs_j[:, None] * stride_dk_n + offs_c[None, :] * stride_dk_c
    tl.store(DK + out, dk * scale, mask=j_ok[:, None] & c_ok[None, :])
    tl.store(DV + out, dv, mask=j_ok[:, None] & c_ok[None, :])
    dkp = w * dkp  # d/dk_pts of -w/2 |q - k|^2, summed with dS
    tl.store(DKP + b * stride_dkp_b + h * stride_dkp_h + offs_j[:, None] * stride_dkp_n + offs_d[None, :] * stride_dkp_d,
             dkp, mask=j_ok[:, None] & d_ok[None, :])
    tl.store(DVP + b * stride_dvp_b + h * stride_dvp_h + offs_j[:, None] * stride_dvp_n + offs_e[None, :] * stride_dvp_e,
             dvp, mask=j_ok[:, None] & e_ok[None, :])
