"""The invariant point attention backward kernels.

With P the attention weights, dP = dO.v + dOp.vp + dOz.z[i, j] and
dS = P (dP - delta), delta = rowsum(dO*O + dOp*Op + dOz*Oz) (computed by the launcher):

- ``ipa_bwd_row_kernel``: one query row, all heads (as the forward): recomputes P from
  the saved log-sum-exp, forms dS, writes it to the ``[B, H, N, N]`` dS buffer (which is
  the pair bias's gradient), writes ``dz[b, i, tile] = P^T @ dOz`` (a tensor-core
  product; z's gradient is only ever this), and accumulates dq and the augmented query
  points' gradient.
- ``ipa_bwd_column_kernel``: a block of keys of one head, over query tiles: recomputes
  P^T with tensor-core products, reads dS^T from the buffer, and accumulates dk, dv, the
  augmented key points' and the value points' gradients. No atomics.
"""

import triton
import triton.language as tl

from foldops.kernels.invariant_point_attention.common import load_heads_tile, load_row, row_logits


@triton.jit
def ipa_bwd_row_kernel(
    Q, K, V, QA, KA, VP, BIAS, Z, MASK,  # the forward's inputs, as there
    DO, DOP, DOZ,  # output gradients [B, N, H, C], [B, N, H, E] fp32, [B, N, H, CZ] (z's dtype)
    LSE, DELTA,  # [B, N, H] fp32: saved log-sum-exp, rowsum of dO*O over all three outputs
    DQ, DQA,  # [B, N, H, C] fp32, [B, N, H, D] fp32 gradients (written)
    DS,  # [B, H, N, N] fp32 dS (written; the bias gradient)
    DZ,  # [B, N, N, CZ] z's gradient (written, z's dtype)
    stride_q_b, stride_q_n, stride_q_h, stride_q_c,
    stride_k_b, stride_k_n, stride_k_h, stride_k_c,
    stride_v_b, stride_v_n, stride_v_h, stride_v_c,
    stride_qa_b, stride_qa_n, stride_qa_h, stride_qa_d,
    stride_ka_b, stride_ka_n, stride_ka_h, stride_ka_d,
    stride_vp_b, stride_vp_n, stride_vp_h, stride_vp_e,
    stride_bias_b, stride_bias_h, stride_bias_i, stride_bias_j,
    stride_z_b, stride_z_i, stride_z_j, stride_z_c,
    stride_mask_b, stride_mask_n,
    stride_do_b, stride_do_n, stride_do_h, stride_do_c,
    stride_dop_b, stride_dop_n, stride_dop_h, stride_dop_e,
    stride_doz_b, stride_doz_n, stride_doz_h, stride_doz_c,
    stride_lse_b, stride_lse_n, stride_lse_h,  # LSE and DELTA share a layout
    stride_dq_b, stride_dq_n, stride_dq_h, stride_dq_c,
    stride_dqa_b, stride_dqa_n, stride_dqa_h, stride_dqa_d,
    stride_ds_b, stride_ds_h, stride_ds_i, stride_ds_j,
    stride_dz_b, stride_dz_i, stride_dz_j, stride_dz_c,
    N, H, C, D, E, CZ,
    scale,
    HAS_MASK: tl.constexpr,
    HP: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr, CZP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs_h = tl.arange(0, HP)
    offs_c = tl.arange(0, CP)
    offs_d = tl.arange(0, DP)
    offs_e = tl.arange(0, EP)
    offs_z = tl.arange(0, CZP)
    h_ok = offs_h < H
    c_ok, d_ok, e_ok, z_ok = offs_c < C, offs_d < D, offs_e < E, offs_z < CZ

    q_row = load_row(Q + b * stride_q_b + i * stride_q_n, offs_h, offs_c, stride_q_h, stride_q_c, h_ok, c_ok) * scale
    qa_row = load_row(QA + b * stride_qa_b + i * stride_qa_n, offs_h, offs_d, stride_qa_h, stride_qa_d, h_ok, d_ok)
    do_row = load_row(DO + b * stride_do_b + i * stride_do_n, offs_h, offs_c, stride_do_h, stride_do_c, h_ok, c_ok)
    dop_row = load_row(DOP + b * stride_dop_b + i * stride_dop_n, offs_h, offs_e, stride_dop_h, stride_dop_e,
                       h_ok, e_ok)
    doz_ptrs = DOZ + b * stride_doz_b + i * stride_doz_n + offs_h[:, None] * stride_doz_h + offs_z[None, :] * stride_doz_c
    doz = tl.load(doz_ptrs, mask=h_ok[:, None] & z_ok[None, :], other=0.0)  # [HP, CZP], z's dtype
    lse_ptrs = b * stride_lse_b + i * stride_lse_n + offs_h * stride_lse_h
    lse = tl.load(LSE + lse_ptrs, mask=h_ok, other=float("inf"))
    delta = tl.load(DELTA + lse_ptrs, mask=h_ok, other=0.0)
    row_kept = True
    if HAS_MASK:
        row_kept = tl.load(MASK + b * stride_mask_b + i * stride_mask_n).to(tl.int1)

    dq = tl.zeros([HP, CP], tl.float32)
    dqa = tl.zeros([HP, DP], tl.float32)
    k_b, ka_b = K + b * stride_k_b, KA + b * stride_ka_b
    v_b, vp_b = V + b * stride_v_b, VP + b * stride_vp_b
    bias_row = BIAS + b * stride_bias_b + i * stride_bias_i
    z_row = Z + b * stride_z_b + i * stride_z_i
    ds_row = DS + b * stride_ds_b + i * stride_ds_i
    dz_row = DZ + b * stride_dz_b + i * stride_dz_i
    for start in range(0, N, BLOCK_N):
        offs_j = start + tl.arange(0, BLOCK_N)
        j_ok = offs_j < N
        j_keep = j_ok & row_kept
        if HAS_MASK:
            j_keep = j_keep & tl.load(MASK + b * stride_mask_b + offs_j * stride_mask_n, mask=j_ok, other=0).to(tl.int1)
        s = row_logits(q_row, qa_row, k_b, ka_b, bias_row, offs_h, offs_j, offs_c, offs_d,
                       stride_k_n, stride_k_h, stride_k_c, stride_ka_n, stride_ka_h, stride_ka_d,
                       stride_bias_h, stride_bias_j, h_ok, j_keep, c_ok, d_ok, j_ok)
        p = tl.exp(s - lse[:, None])  # [HP, BLOCK_N]; 0 at dropped keys and rows (lse = +inf)
        v = load_heads_tile(v_b, offs_h, offs_j, offs_c, stride_v_n, stride_v_h, stride_v_c, h_ok, j_ok, c_ok)
        dp = tl.sum(do_row[:, None, :] * v, axis=2)
        vp = load_heads_tile(vp_b, offs_h, offs_j, offs_e, stride_vp_n, stride_vp_h, stride_vp_e, h_ok, j_ok, e_ok)
        dp += tl.sum(dop_row[:, None, :] * vp, axis=2)
        z = tl.load(z_row + offs_j[:, None] * stride_z_j + offs_z[None, :] * stride_z_c,
                    mask=j_ok[:, None] & z_ok[None, :], other=0.0)  # [BLOCK_N, CZP]
        dp += tl.dot(doz, tl.trans(z), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        tl.store(ds_row + offs_h[:, None] * stride_ds_h + offs_j[None, :] * stride_ds_j, ds,
                 mask=h_ok[:, None] & j_ok[None, :])
        dz = tl.dot(tl.trans(p.to(doz.dtype)), doz, input_precision=PRECISION)  # [BLOCK_N, CZP]
        tl.store(dz_row + offs_j[:, None] * stride_dz_j + offs_z[None, :] * stride_dz_c,
                 dz.to(DZ.dtype.element_ty), mask=j_ok[:, None] & z_ok[None, :])
        k = load_heads_tile(k_b, offs_h, offs_j, offs_c, stride_k_n, stride_k_h, stride_k_c, h_ok, j_ok, c_ok)
        dq += tl.sum(ds[:, :, None] * k, axis=1)
        ka = load_heads_tile(ka_b, offs_h, offs_j, offs_d, stride_ka_n, stride_ka_h, stride_ka_d, h_ok, j_ok, d_ok)
        dqa += tl.sum(ds[:, :, None] * ka, axis=1)

    dq_row = DQ + b * stride_dq_b + i * stride_dq_n
    tl.store(dq_row + offs_h[:, None] * stride_dq_h + offs_c[None, :] * stride_dq_c, dq * scale,
             mask=h_ok[:, None] & c_ok[None, :])
    dqa_row = DQA + b * stride_dqa_b + i * stride_dqa_n
    tl.store(dqa_row + offs_h[:, None] * stride_dqa_h + offs_d[None, :] * stride_dqa_d, dqa,
             mask=h_ok[:, None] & d_ok[None, :])


@triton.jit
def ipa_bwd_column_kernel(
    Q, K, V, QA, KA, VP, BIAS, MASK,  # the forward's inputs, as there
    DO, DOP,  # output gradients [B, N, H, C], [B, N, H, E] fp32
    LSE,  # [B, N, H] fp32 saved log-sum-exp
    DS,  # [B, H, N, N] fp32 dS from the row kernel
    DK, DV, DKA, DVP,  # gradients [B, N, H, C] x2, [B, N, H, D], [B, N, H, E], fp32 (written)
    stride_q_b, stride_q_n, stride_q_h, stride_q_c,
    stride_k_b, stride_k_n, stride_k_h, stride_k_c,
    stride_v_b, stride_v_n, stride_v_h, stride_v_c,
    stride_qa_b, stride_qa_n, stride_qa_h, stride_qa_d,
    stride_ka_b, stride_ka_n, stride_ka_h, stride_ka_d,
    stride_vp_b, stride_vp_n, stride_vp_h, stride_vp_e,
    stride_bias_b, stride_bias_h, stride_bias_i, stride_bias_j,
    stride_mask_b, stride_mask_n,
    stride_do_b, stride_do_n, stride_do_h, stride_do_c,
    stride_dop_b, stride_dop_n, stride_dop_h, stride_dop_e,
    stride_lse_b, stride_lse_n, stride_lse_h,
    stride_ds_b, stride_ds_h, stride_ds_i, stride_ds_j,
    stride_dk_b, stride_dk_n, stride_dk_h, stride_dk_c,  # DK and DV share a layout
    stride_dka_b, stride_dka_n, stride_dka_h, stride_dka_d,
    stride_dvp_b, stride_dvp_n, stride_dvp_h, stride_dvp_e,
    N, C, D, E,
    scale,
    HAS_MASK: tl.constexpr,
    CP: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr,
    PRECISION: tl.constexpr,  # for the q-dtype products (fp32 inputs); point products are "ieee"
):
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

    k_base = K + b * stride_k_b + h * stride_k_h
    k = tl.load(k_base + offs_j[:, None] * stride_k_n + offs_c[None, :] * stride_k_c,
                mask=j_ok[:, None] & c_ok[None, :], other=0.0)  # [BLOCK_J, CP], q's dtype
    ka_base = KA + b * stride_ka_b + h * stride_ka_h
    ka = tl.load(ka_base + offs_j[:, None] * stride_ka_n + offs_d[None, :] * stride_ka_d,
                 mask=j_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_J, DP] fp32

    dk = tl.zeros([BLOCK_J, CP], tl.float32)
    dv = tl.zeros([BLOCK_J, CP], tl.float32)
    dka = tl.zeros([BLOCK_J, DP], tl.float32)
    dvp = tl.zeros([BLOCK_J, EP], tl.float32)
    q_base = Q + b * stride_q_b + h * stride_q_h
    qa_base = QA + b * stride_qa_b + h * stride_qa_h
    do_base = DO + b * stride_do_b + h * stride_do_h
    dop_base = DOP + b * stride_dop_b + h * stride_dop_h
    bias_base = BIAS + b * stride_bias_b + h * stride_bias_h
    ds_base = DS + b * stride_ds_b + h * stride_ds_h
    lse_base = LSE + b * stride_lse_b + h * stride_lse_h
    for start in range(0, N, BLOCK_I):
        offs_i = start + tl.arange(0, BLOCK_I)
        i_ok = offs_i < N
        q = tl.load(q_base + offs_i[:, None] * stride_q_n + offs_c[None, :] * stride_q_c,
                    mask=i_ok[:, None] & c_ok[None, :], other=0.0)  # [BLOCK_I, CP]
        qa = tl.load(qa_base + offs_i[:, None] * stride_qa_n + offs_d[None, :] * stride_qa_d,
                     mask=i_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_I, DP] fp32
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale  # [BLOCK_J, BLOCK_I]
        st += tl.dot(ka, tl.trans(qa), input_precision="ieee")
        tile = offs_j[:, None] * stride_bias_j + offs_i[None, :] * stride_bias_i
        st += tl.load(bias_base + tile, mask=j_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
        lse = tl.load(lse_base + offs_i * stride_lse_n, mask=i_ok, other=float("inf"))
        pt = tl.where(j_keep[:, None], tl.exp(st - lse[None, :]), 0.0)  # P^T; 0 at dropped rows (lse = inf)
        dst = tl.load(ds_base + offs_j[:, None] * stride_ds_j + offs_i[None, :] * stride_ds_i,
                      mask=j_ok[:, None] & i_ok[None, :], other=0.0)  # dS^T, fp32
        do = tl.load(do_base + offs_i[:, None] * stride_do_n + offs_c[None, :] * stride_do_c,
                     mask=i_ok[:, None] & c_ok[None, :], other=0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dop = tl.load(dop_base + offs_i[:, None] * stride_dop_n + offs_e[None, :] * stride_dop_e,
                      mask=i_ok[:, None] & e_ok[None, :], other=0.0)  # fp32
        dvp += tl.dot(pt, dop, input_precision="ieee")
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
        dka += tl.dot(dst, qa, input_precision="ieee")

    out = b * stride_dk_b + h * stride_dk_h + offs_j[:, None] * stride_dk_n + offs_c[None, :] * stride_dk_c
    tl.store(DK + out, dk * scale, mask=j_ok[:, None] & c_ok[None, :])
    tl.store(DV + out, dv, mask=j_ok[:, None] & c_ok[None, :])
    tl.store(DKA + b * stride_dka_b + h * stride_dka_h + offs_j[:, None] * stride_dka_n + offs_d[None, :] * stride_dka_d,
             dka, mask=j_ok[:, None] & d_ok[None, :])
    tl.store(DVP + b * stride_dvp_b + h * stride_dvp_h + offs_j[:, None] * stride_dvp_n + offs_e[None, :] * stride_dvp_e,
             dvp, mask=j_ok[:, None] & e_ok[None, :])
