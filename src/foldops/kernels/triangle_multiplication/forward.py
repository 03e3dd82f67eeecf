"""Forward kernels of the triangle multiplication: the LayerNorm-prologue projection
(``_prologue_kernel``), the per-channel triangular product (``_product_kernel``, also
used by the backward) and the LayerNorm-epilogue output projection (``_epilogue_kernel``).

C is the pair width (x, out, the output gate), H the hidden width of the product (a, b,
t; H = C in Boltz-2). Every row kernel keeps a block of positions with all of the
(padded) channels of its LayerNorm in registers (CP for LayerNorm_in, HP for
LayerNorm_out), so a LayerNorm needs no second pass over memory. Offsets are int64.
"""

import triton
import triton.language as tl

from foldops.kernels.triangle_multiplication.common import _row_stats, _sigmoid


@triton.jit
def _prologue_slab(
    h, pid_n, n_ab, b, offs_p, valid_p, offs_c, valid_c, keep, C, H,
    W_P, W_G, W_GO, AB, GO, stride_ab_b, stride_ab_c, stride_go_b, stride_go_p,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Slab ``pid_n`` of the (2H + C)-wide [a, b | g_out] output for the positions of ``h``."""
    if pid_n < n_ab:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        valid_n = offs_n < 2 * H
        w_off = offs_n[None, :].to(tl.int64) * C + offs_c[:, None]  # [CP, BLOCK_N]: W^T
        w_ok = valid_n[None, :] & valid_c[:, None]
        wp = tl.load(W_P + w_off, mask=w_ok, other=0.0)
        wg = tl.load(W_G + w_off, mask=w_ok, other=0.0)
        p = tl.dot(h, wp, input_precision=PRECISION)
        g = tl.dot(h, wg, input_precision=PRECISION)
        ab = p * _sigmoid(g)
        if HAS_MASK:
            ab = tl.where(keep[:, None] != 0, ab, 0.0)
        ptrs = AB + b * stride_ab_b + offs_n[None, :].to(tl.int64) * stride_ab_c + offs_p[:, None]
        tl.store(ptrs, ab.to(AB.dtype.element_ty), mask=valid_p[:, None] & valid_n[None, :])
    else:
        offs_n = (pid_n - n_ab) * BLOCK_N + tl.arange(0, BLOCK_N)
        valid_n = offs_n < C
        w_off = offs_n[None, :].to(tl.int64) * C + offs_c[:, None]
        w = tl.load(W_GO + w_off, mask=valid_n[None, :] & valid_c[:, None], other=0.0)
        go = _sigmoid(tl.dot(h, w, input_precision=PRECISION))
        ptrs = GO + b * stride_go_b + offs_p[:, None] * stride_go_p + offs_n[None, :]
        tl.store(ptrs, go.to(GO.dtype.element_ty), mask=valid_p[:, None] & valid_n[None, :])


@triton.jit
def _prologue_kernel(
    X,  # [B, P, C] input pairs (P = N*N positions), any strides
    LN_W, LN_B,  # [C] LayerNorm_in weight and bias (any float dtype)
    W_P, W_G,  # [2H, C] p_in and g_in weights, in the dot dtype
    W_GO,  # [C, C] g_out weight, in the dot dtype
    MASK,  # [B, P] uint8 keep-mask (read only if HAS_MASK)
    AB,  # [B, 2H, P] out: a (channels 0..H-1) and b (H..2H-1), channel-major
    GO,  # [B, P, C] out: sigmoid(h g_out^T), position-major
    P, C, H, eps,
    stride_x_b, stride_x_p, stride_x_c,
    stride_m_b,
    stride_ab_b, stride_ab_c,  # AB's position stride is 1
    stride_go_b, stride_go_p,  # GO's channel stride is 1
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" / "tf32x3" / "tf32"; fp32 only)
    CP: tl.constexpr,  # C padded to a power of two >= 16
    BLOCK_P: tl.constexpr,  # positions per program
    BLOCK_N: tl.constexpr,  # output channels per slab
    ALL_SLABS: tl.constexpr,  # one program writes every slab of its positions
):
    """Output slabs (BLOCK_N channels) of the (2H + C)-wide concatenation [a, b | g_out]
    for BLOCK_P positions. With ALL_SLABS, program (p, b) computes h = LayerNorm_in(x) once
    and loops over the slabs; otherwise program (p * n_slabs + n, b) writes slab n and
    recomputes h (its x tile re-read from L2: programs of one position block run back to
    back). Position blocks share grid axis 0 with the channel slabs: they outnumber the
    65535 programs a second axis may have once P / BLOCK_P does (N >= 2048 at C = 128)."""
    # Inductor passes Python floats as fp64 scalars; the arithmetic stays fp32.
    eps = tl.cast(eps, tl.float32)
    n_ab = tl.cdiv(2 * H, BLOCK_N)
    n_slabs = n_ab + tl.cdiv(C, BLOCK_N)
    pid = tl.program_id(0)
    if ALL_SLABS:
        pid_p = pid
    else:
        pid_p = pid // n_slabs
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, CP)
    valid_p = offs_p < P
    valid_c = offs_c < C
    x = tl.load(X + b * stride_x_b + offs_p[:, None] * stride_x_p + offs_c[None, :] * stride_x_c,
                mask=valid_p[:, None] & valid_c[None, :], other=0.0).to(tl.float32)
    mean, rstd = _row_stats(x, valid_c[None, :], C, eps)
    lw = tl.load(LN_W + offs_c, mask=valid_c, other=0.0).to(tl.float32)
    lb = tl.load(LN_B + offs_c, mask=valid_c, other=0.0).to(tl.float32)
    h = ((x - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]).to(W_P.dtype.element_ty)
    keep = tl.zeros((BLOCK_P,), dtype=tl.uint8)
    if HAS_MASK:
        keep = tl.load(MASK + b * stride_m_b + offs_p, mask=valid_p, other=0)
    if ALL_SLABS:
        for pid_n in range(0, n_slabs):
            _prologue_slab(h, pid_n, n_ab, b, offs_p, valid_p, offs_c, valid_c, keep, C, H, W_P, W_G, W_GO, AB,
                           GO, stride_ab_b, stride_ab_c, stride_go_b, stride_go_p, HAS_MASK, PRECISION, BLOCK_N)
    else:
        _prologue_slab(h, pid % n_slabs, n_ab, b, offs_p, valid_p, offs_c, valid_c, keep, C, H, W_P, W_G, W_GO,
                       AB, GO, stride_ab_b, stride_ab_c, stride_go_b, stride_go_p, HAS_MASK, PRECISION, BLOCK_N)


@triton.jit
def _product_kernel(
    A,  # batch z = (b, c) of [M, K] operands, any strides (with SPLIT_A: the hi parts)
    Bm,  # batch z of [K, N] operands, any strides
    OUT,  # batch z of [M, N] results, any strides
    NCH,  # channels per batch item (z = b * NCH + c)
    M, N, K,
    stride_a_b, stride_a_c, stride_a_m, stride_a_k,
    stride_a_lo,  # with SPLIT_A: elements from an A value's hi part to its lo part
    stride_b_b, stride_b_c, stride_b_k, stride_b_n,
    stride_o_b, stride_o_c, stride_o_m, stride_o_n,
    SPLIT_A: tl.constexpr,  # A = hi + lo, both stored 16-bit like B: two 16-bit products
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row tiles per group (L2 reuse of B's column tiles)
):
    """OUT[z] = A[z] @ B[z], fp32 accumulation: t = a b^T (outgoing) or a^T b
    (incoming) per channel, and the backward's da, db; transposes are strides only.

    Both operands of every tl.dot are loaded from memory as they are (no conversion in
    registers), so on sm_90 each product is a wgmma with both operands in shared memory.
    A split A therefore comes pre-split (hi and lo stored 16-bit by its producer):
    split here, its parts were register operands, and Triton 3.6 leaves the loop's last
    register-A wgmma in flight across the back-edge while ptxas reuses its registers for
    the next step's loads (triton-lang/triton#9433; the fp16 backward's dx was wrong on
    an H200 at N = 256, where the loads are pipelined)."""
    pid = tl.program_id(0)
    z = tl.program_id(1)
    bi = (z // NCH).to(tl.int64)
    ci = (z % NCH).to(tl.int64)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + bi * stride_a_b + ci * stride_a_c + offs_m[:, None] * stride_a_m + offs_k[None, :] * stride_a_k
    b_ptrs = Bm + bi * stride_b_b + ci * stride_b_c + offs_k[:, None] * stride_b_k + offs_n[None, :] * stride_b_n
    valid_m = offs_m < M
    valid_n = offs_n < N
    # K = N >= 1 at every launch. Told so, the compiler drops the path that skips the
    # loop, whose zeroed accumulator reached the final wgmma wait and made ptxas
    # serialise every wgmma of the kernel (warning C7515, sm_90): each K step's product
    # waited for the previous one. (The interpreter checks the assumption.)
    tl.assume(K > 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a_ok = valid_m[:, None] & k_ok[None, :]
        a = tl.load(a_ptrs, mask=a_ok, other=0.0)
        bt = tl.load(b_ptrs, mask=k_ok[:, None] & valid_n[None, :], other=0.0)
        if SPLIT_A:
            lo = tl.load(a_ptrs + stride_a_lo, mask=a_ok, other=0.0)
            acc = tl.dot(a, bt, acc)
            acc = tl.dot(lo, bt, acc)
        else:
            acc = tl.dot(a, bt, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_a_k
        b_ptrs += BLOCK_K * stride_b_k
    o_ptrs = OUT + bi * stride_o_b + ci * stride_o_c + offs_m[:, None] * stride_o_m + offs_n[None, :] * stride_o_n
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=valid_m[:, None] & valid_n[None, :])


@triton.jit
def _epilogue_kernel(
    T,  # [B, H, P] fp32 triangular product, channel-major
    LN_W, LN_B,  # [H] LayerNorm_out weight and bias
    W_PO,  # [C, H] p_out weight, in the dot dtype
    GO,  # [B, P, C] output gate (position-major, channel stride 1)
    OUT,  # [B, P, C] out, any strides
    P, C, H, eps,
    stride_t_b, stride_t_c,  # T's position stride is 1
    stride_go_b, stride_go_p,
    stride_o_b, stride_o_p, stride_o_c,
    PRECISION: tl.constexpr,
    HP: tl.constexpr,  # H padded to a power of two >= 16
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program (p * n_slabs + n, b): out = (LayerNorm_out(t) p_out^T) * gate for output
    channels [n*BLOCK_N, ...) of BLOCK_P positions (one grid axis for both, as in
    ``_prologue_kernel``)."""
    # Inductor passes Python floats as fp64 scalars; the arithmetic stays fp32.
    eps = tl.cast(eps, tl.float32)
    n_slabs = tl.cdiv(C, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % n_slabs
    pid_p = pid // n_slabs
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_h = tl.arange(0, HP)
    valid_p = offs_p < P
    valid_h = offs_h < H
    t = tl.load(T + b * stride_t_b + offs_h[None, :].to(tl.int64) * stride_t_c + offs_p[:, None],
                mask=valid_p[:, None] & valid_h[None, :], other=0.0).to(tl.float32)
    mean, rstd = _row_stats(t, valid_h[None, :], H, eps)
    lw = tl.load(LN_W + offs_h, mask=valid_h, other=0.0).to(tl.float32)
    lb = tl.load(LN_B + offs_h, mask=valid_h, other=0.0).to(tl.float32)
    u = ((t - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]).to(W_PO.dtype.element_ty)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_n = offs_n < C
    w = tl.load(W_PO + offs_n[None, :].to(tl.int64) * H + offs_h[:, None],
                mask=valid_n[None, :] & valid_h[:, None], other=0.0)
    y = tl.dot(u, w, input_precision=PRECISION)
    ok = valid_p[:, None] & valid_n[None, :]
    go = tl.load(GO + b * stride_go_b + offs_p[:, None] * stride_go_p + offs_n[None, :], mask=ok, other=0.0)
    out = y * go.to(tl.float32)
    tl.store(OUT + b * stride_o_b + offs_p[:, None] * stride_o_p + offs_n[None, :] * stride_o_c,
             out.to(OUT.dtype.element_ty), mask=ok)
