"""Backward kernels of the triangle multiplication.

- ``_out_bwd_kernel``: from dout through the output gate, p_out and LayerNorm_out to dt
  (channel-major, for the per-channel products da = dt b / db = dt^T a), writing the
  operands of the output weights' gradients (dy, u, dgate) and LayerNorm_out's per-block
  partial sums;
- ``_in_bwd_kernel``: from d[a, b] through the mask, the gating, p_in / g_in, g_out and
  LayerNorm_in to dx, writing the operands of the input weights' gradients (h, dp, dg)
  and LayerNorm_in's per-block partial sums.

Weight gradients are GEMMs over positions done by the launcher (deterministic, no
atomics). Every program holds BLOCK_P positions with all of their channels: the H
hidden channels (padded to HP) in the output-side kernel, the C pair channels (padded
to CP) in the input-side one.
"""

import triton
import triton.language as tl

from foldops.kernels.triangle_multiplication.common import _row_stats, _sigmoid


@triton.jit
def _out_bwd_kernel(
    T,  # [B, H, P] fp32 triangular product, channel-major (position stride 1)
    LN_W, LN_B,  # [H] LayerNorm_out weight and bias
    W_PO,  # [C, H] p_out weight, in the dot dtype
    GO,  # [B, P, C] output gate sigmoid(h g_out^T) (channel stride 1)
    DOUT,  # [B, P, C] gradient of the output, any strides
    DT,  # [B, H, P] out: gradient of t, channel-major (position stride 1); with SPLIT_DT
    #      its 16-bit hi part, the lo part (dt - hi) stride_dt_lo elements further
    DY,  # [B, P, C] out: dout * gate (dot dtype, channel stride 1)
    U,  # [B, P, H] out: LayerNorm_out(t) (dot dtype, channel stride 1)
    DGO,  # [B, P, C] out: gradient of h g_out^T, before the sigmoid (dot dtype, channel stride 1)
    PART,  # [B, >= n_blocks, 2, HP] out: per-block sums of du * t_hat and of du (fp32)
    P, C, H, eps,
    stride_t_b, stride_t_c,
    stride_go_b, stride_go_p,
    stride_do_b, stride_do_p, stride_do_c,
    stride_dt_b, stride_dt_c, stride_dt_lo,
    stride_dy_b, stride_dy_p,
    stride_u_b, stride_u_p,
    stride_dgo_b, stride_dgo_p,
    stride_part_b,  # PART's batch stride: a chunk may run fewer blocks than PART holds
    SPLIT_DY: tl.constexpr,  # 16-bit dot dtype: add the product of dy's rounding residue
    SPLIT_DT: tl.constexpr,  # store dt as 16-bit hi + lo parts (the product's split A operand)
    PRECISION: tl.constexpr,
    HP: tl.constexpr,  # H padded to a power of two >= 16
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Inductor passes Python floats as fp64 scalars; the arithmetic stays fp32.
    eps = tl.cast(eps, tl.float32)
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_h = tl.arange(0, HP)
    valid_p = offs_p < P
    valid_h = offs_h < H
    ok_ph = valid_p[:, None] & valid_h[None, :]
    t = tl.load(T + b * stride_t_b + offs_h[None, :].to(tl.int64) * stride_t_c + offs_p[:, None],
                mask=ok_ph, other=0.0).to(tl.float32)
    mean, rstd = _row_stats(t, valid_h[None, :], H, eps)
    lw = tl.load(LN_W + offs_h, mask=valid_h, other=0.0).to(tl.float32)
    lb = tl.load(LN_B + offs_h, mask=valid_h, other=0.0).to(tl.float32)
    that = tl.where(ok_ph, (t - mean[:, None]) * rstd[:, None], 0.0)
    u = (that * lw[None, :] + lb[None, :]).to(W_PO.dtype.element_ty)
    tl.store(U + b * stride_u_b + offs_p[:, None] * stride_u_p + offs_h[None, :], u, mask=ok_ph)
    dy_off = b * stride_dy_b + offs_p[:, None] * stride_dy_p

    # C >= 1: no path skipping the loop, whose zeroed du made ptxas serialise the wgmma
    # of 16-bit tiles at HP <= 128 (C7515; as in ``_product_kernel``).
    tl.assume(C > 0)
    du = tl.zeros((BLOCK_P, HP), dtype=tl.float32)
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid_n = offs_n < C
        ok = valid_p[:, None] & valid_n[None, :]
        w = tl.load(W_PO + offs_n[:, None].to(tl.int64) * H + offs_h[None, :],
                    mask=valid_n[:, None] & valid_h[None, :], other=0.0)  # [BLOCK_N, HP]
        y = tl.dot(u, tl.trans(w), input_precision=PRECISION)
        go = tl.load(GO + b * stride_go_b + offs_p[:, None] * stride_go_p + offs_n[None, :],
                     mask=ok, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + b * stride_do_b + offs_p[:, None] * stride_do_p + offs_n[None, :] * stride_do_c,
                       mask=ok, other=0.0).to(tl.float32)
        dy32 = dout * go
        dy = dy32.to(W_PO.dtype.element_ty)
        dgo = dout * y * go * (1.0 - go)
        tl.store(DY + dy_off + offs_n[None, :], dy, mask=ok)
        tl.store(DGO + b * stride_dgo_b + offs_p[:, None] * stride_dgo_p + offs_n[None, :],
                 dgo.to(DGO.dtype.element_ty), mask=ok)
        du = tl.dot(dy, w, du, input_precision=PRECISION)
        if SPLIT_DY:  # the rounding residue of dy as a second 16-bit product: du to ~fp32
            du = tl.dot((dy32 - dy.to(tl.float32)).to(W_PO.dtype.element_ty), w, du)

    part = PART + b * stride_part_b + pid_p * 2 * HP
    tl.store(part + offs_h, tl.sum(du * that, axis=0))
    tl.store(part + HP + offs_h, tl.sum(du, axis=0))
    g = du * lw[None, :]
    mg = tl.sum(g, axis=1) / H
    mgt = tl.sum(g * that, axis=1) / H
    dt = rstd[:, None] * (g - mg[:, None] - that * mgt[:, None])
    dt_ptrs = DT + b * stride_dt_b + offs_h[None, :].to(tl.int64) * stride_dt_c + offs_p[:, None]
    hi = dt.to(DT.dtype.element_ty)
    tl.store(dt_ptrs, hi, mask=ok_ph)
    if SPLIT_DT:
        # Past fp16's range hi is +-inf and dt - hi would be -+inf: the two products'
        # sum inf - inf = NaN where hi alone gives the overflow's inf. lo = 0 there.
        hi32 = hi.to(tl.float32)
        lo = tl.where(tl.abs(hi32) < float("inf"), dt - hi32, 0.0)
        tl.store(dt_ptrs + stride_dt_lo, lo.to(DT.dtype.element_ty), mask=ok_ph)


@triton.jit
def _in_bwd_kernel(
    X,  # [B, P, C] input, any strides
    LN_W, LN_B,  # [C] LayerNorm_in weight and bias
    W_P, W_G,  # [2H, C] p_in, g_in weights (dot dtype)
    W_GO,  # [C, C] g_out weight (dot dtype)
    MASK,  # [B, P] uint8 keep-mask (read only if HAS_MASK)
    DAB,  # [B, 2H, P] gradient of [a, b], channel-major (position stride 1)
    DGO,  # [B, P, C] gradient of h g_out^T (channel stride 1)
    DX,  # [B, P, C] out: gradient of x, any strides
    HN,  # [B, P, C] out: LayerNorm_in(x) (dot dtype, channel stride 1)
    DPG,  # [B, P, 4H] out: [dp | dg], gradients of h p_in^T and h g_in^T (channel stride 1)
    PART,  # [B, >= n_blocks, 2, CP] out: per-block sums of dh * x_hat and of dh (fp32)
    P, C, H, eps,
    stride_x_b, stride_x_p, stride_x_c,
    stride_m_b,
    stride_dab_b, stride_dab_c,
    stride_dgo_b, stride_dgo_p,
    stride_dx_b, stride_dx_p, stride_dx_c,
    stride_h_b, stride_h_p,
    stride_dpg_b, stride_dpg_p,
    stride_part_b,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    CP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Inductor passes Python floats as fp64 scalars; the arithmetic stays fp32.
    eps = tl.cast(eps, tl.float32)
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, CP)
    valid_p = offs_p < P
    valid_c = offs_c < C
    ok_pc = valid_p[:, None] & valid_c[None, :]
    x = tl.load(X + b * stride_x_b + offs_p[:, None] * stride_x_p + offs_c[None, :] * stride_x_c,
                mask=ok_pc, other=0.0).to(tl.float32)
    mean, rstd = _row_stats(x, valid_c[None, :], C, eps)
    lw = tl.load(LN_W + offs_c, mask=valid_c, other=0.0).to(tl.float32)
    lb = tl.load(LN_B + offs_c, mask=valid_c, other=0.0).to(tl.float32)
    xhat = tl.where(ok_pc, (x - mean[:, None]) * rstd[:, None], 0.0)
    h = (xhat * lw[None, :] + lb[None, :]).to(W_P.dtype.element_ty)
    tl.store(HN + b * stride_h_b + offs_p[:, None] * stride_h_p + offs_c[None, :], h, mask=ok_pc)
    if HAS_MASK:
        keep = tl.load(MASK + b * stride_m_b + offs_p, mask=valid_p, other=0) != 0

    dpg = DPG + b * stride_dpg_b + offs_p[:, None] * stride_dpg_p
    dh = tl.zeros((BLOCK_P, CP), dtype=tl.float32)
    for n0 in range(0, 2 * H, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid_n = offs_n < 2 * H
        ok = valid_p[:, None] & valid_n[None, :]
        w_off = offs_n[:, None].to(tl.int64) * C + offs_c[None, :]
        w_ok = valid_n[:, None] & valid_c[None, :]
        wp = tl.load(W_P + w_off, mask=w_ok, other=0.0)  # [BLOCK_N, CP]
        wg = tl.load(W_G + w_off, mask=w_ok, other=0.0)
        p = tl.dot(h, tl.trans(wp), input_precision=PRECISION)
        s = _sigmoid(tl.dot(h, tl.trans(wg), input_precision=PRECISION))
        dab = tl.load(DAB + b * stride_dab_b + offs_n[None, :].to(tl.int64) * stride_dab_c + offs_p[:, None],
                      mask=ok, other=0.0).to(tl.float32)
        if HAS_MASK:
            dab = tl.where(keep[:, None], dab, 0.0)
        dp = (dab * s).to(W_P.dtype.element_ty)
        dg = (dab * p * s * (1.0 - s)).to(W_P.dtype.element_ty)
        tl.store(dpg + offs_n[None, :], dp, mask=ok)
        tl.store(dpg + 2 * H + offs_n[None, :], dg, mask=ok)
        dh = tl.dot(dp, wp, dh, input_precision=PRECISION)
        dh = tl.dot(dg, wg, dh, input_precision=PRECISION)
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid_n = offs_n < C
        dgo = tl.load(DGO + b * stride_dgo_b + offs_p[:, None] * stride_dgo_p + offs_n[None, :],
                      mask=valid_p[:, None] & valid_n[None, :], other=0.0)
        w = tl.load(W_GO + offs_n[:, None].to(tl.int64) * C + offs_c[None, :],
                    mask=valid_n[:, None] & valid_c[None, :], other=0.0)
        dh = tl.dot(dgo.to(W_GO.dtype.element_ty), w, dh, input_precision=PRECISION)

    part = PART + b * stride_part_b + pid_p * 2 * CP
    tl.store(part + offs_c, tl.sum(dh * xhat, axis=0))
    tl.store(part + CP + offs_c, tl.sum(dh, axis=0))
    g = dh * lw[None, :]
    mg = tl.sum(g, axis=1) / C
    mgt = tl.sum(g * xhat, axis=1) / C
    dx = rstd[:, None] * (g - mg[:, None] - xhat * mgt[:, None])
    tl.store(DX + b * stride_dx_b + offs_p[:, None] * stride_dx_p + offs_c[None, :] * stride_dx_c,
             dx.to(DX.dtype.element_ty), mask=ok_pc)
