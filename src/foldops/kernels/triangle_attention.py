"""Triton kernels for triangle attention: forward, backward (dQ, dK/dV, dBias).

    q, k, v, out: [B, I, N, H, D] (any strides)   bias: [B, H, N, N] (any strides)
    mask: [B, I, N] bool keep-mask over keys, or None
    out[b,i,j,h] = sum_k softmax_k(scale * q[b,i,j,h].k[b,i,k,h] + bias[b,h,j,k]
                                   | mask[b,i,k]) v[b,i,k,h]

Layers (see docs/kernels/triangle_attention.md for the design, floors and timings):

- kernels ``_fwd_kernel``, ``_bwd_delta_kernel``, ``_bwd_dbias_kernel``,
  ``_bwd_dkdv_kernel``, ``_bwd_dq_kernel`` (and ``_sum_splits_kernel``);
- launchers ``triangle_attention_forward`` / ``triangle_attention_backward``;
- custom ops ``foldops::triangle_attention_fwd`` / ``foldops::triangle_attention_bwd``
  (``torch.library.triton_op``: the body is also the fake implementation; autograd
  registered on the forward), which torch.compile traces;
- ``triangle_attention(q, k, v, bias, mask, scale)``: the differentiable entry point.
  Eager calls skip the ops' dispatch (an ``autograd.Function`` over the launchers, less
  host time) and, without autograd, the lse.

Key mask: the forward and dBias add it as one more tensor-core product (a K=16 wgmma of
ones against 16 copies of the row's 0/infinity key bias, ``_add_key_mask``); dQ runs a
second loop copy with a per-logit add for rows that do not keep every key; dK/dV, whose
key rows are fixed per program, adds it per row block only where a key is masked.

Softmax in base 2 and fp32: logits are ``s2 = log2(e) * (scale * q.k + bias)``; the
saved log-sum-exp ``lse`` [B, I, H, N] is in the same base (fp32; fp64 for fp32 inputs,
see ``_lse_parts``). Rows whose keys are all masked get ``lse = +inf``, so every
recomputed probability is 0: zero outputs and zero gradients without NaN.

The bias gradient is deterministic: a program owns a (j, k) tile of one (b, h) and
sums dS over rows i in registers; at small N the rows are split over a few programs
whose partial tiles are summed afterwards in a fixed order. No atomics anywhere.

Memory, beyond inputs and outputs: the forward saves lse, O(B I H N), and with a mask
holds the key-mask bias, O(B I N), for its launch. The backward allocates only its
gradients: delta = rowsum(dO*O), a transposed copy of the bias, the key-mask bias and
the partial bias gradients live in dq's, dv's and dk's storage until those are written
(a separate buffer only when I << N and dq is too small).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.function import once_differentiable
from torch._library.triton import set_wrap_triton_enabled
from torch.library import triton_op, wrap_triton
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from triton.language.extra import libdevice

from foldops.device import triton_interpret
from foldops.kernels._utils import patch_interpreter_bf16

if triton_interpret():
    patch_interpreter_bf16()

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

__all__ = [
    "triangle_attention",
    "triangle_attention_forward",
    "triangle_attention_backward",
    "HEAD_DIMS",
    "DTYPES",
]


# Kernels ---------------------------------------------------------------------------------
#
# Offsets are int64 throughout: at N = 4096 one [B, I, N, H, D] tensor has 2^31 elements,
# and a transposed view (ending node) strides j by N*H*D.
#
# Logits s = scale * q.k + bias stay in natural units; the softmax runs in base 2 with
# log2(e) folded into the one FFMA that also subtracts the row max or the lse:
# p = exp2(s * log2(e) - m2). The dQ loop comes in two copies (constexpr USE_MASK): rows
# that keep every key, the common case, skip the per-logit mask add.

LOG2E_C = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp2(x, PRECISE: tl.constexpr):
    # fp32 inputs: the accurate libdevice exp2 (ex2.approx errs ~2 ulp, visible against
    # fp32 PyTorch); 16-bit inputs round far above that.
    if PRECISE:
        return libdevice.exp2(x)
    else:
        return tl.math.exp2(x)


@triton.jit
def _lse_parts(lse):
    """(hi, lo) in fp32 with hi + lo = lse. fp32 inputs save lse in fp64: one fp32 lse
    of magnitude ~10 is off by up to 5e-7, the same for every probability of its row,
    which shows against fp32 PyTorch; 16-bit inputs save fp32 and use lo = 0."""
    if lse.dtype == tl.float64:
        finite = tl.where(lse == float("inf"), 0.0, lse)  # rows with no kept key: lo = 0
        lo = (finite - finite.to(tl.float32).to(tl.float64)).to(tl.float32)
        return lse.to(tl.float32), lo
    else:
        return lse, tl.zeros_like(lse)


@triton.jit
def _log2(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.log2(x)
    else:
        return tl.math.log2(x)


@triton.jit
def _key_bias(mask_ptr, offs_k, N, USE_MASK: tl.constexpr, EVEN_N: tl.constexpr):
    """[BLOCK_K] fp32: 0 for keys that count, -inf for masked or out-of-range keys
    (``mask_ptr``: a bool keep-mask)."""
    if USE_MASK:
        keep = tl.load(mask_ptr, mask=offs_k < N, other=0)
        return tl.where(keep != 0, 0.0, float("-inf"))
    elif EVEN_N:
        return tl.zeros(offs_k.shape, dtype=tl.float32)
    else:
        return tl.where(offs_k < N, 0.0, float("-inf"))


@triton.jit
def _all_kept(mask_ptr, smk, N, BLOCK: tl.constexpr):
    """Whether one mask row keeps every key (then the per-logit mask is skipped)."""
    offs = tl.arange(0, BLOCK)
    dropped = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), 0)
    for start in range(0, N, BLOCK):
        cur = start + offs
        keep = tl.load(mask_ptr + cur.to(tl.int64) * smk, mask=cur < N, other=1)
        dropped += tl.sum((keep == 0).to(tl.int32), 0)
    return dropped == 0


@triton.jit
def _retire_mma(token, MMA_WAIT: tl.constexpr):
    """Wait for this warpgroup's tensor-core products (Hopper wgmma) before the loop's
    back edge.

    Triton leaves a loop's accumulating product in flight into the next iteration. With
    a second copy of the loop (masked keys) or a block of zero-initialised accumulators
    laid out between the loop and its final wait, ptxas then finds "non wgmma
    instructions defining accumulator registers" inside that pipeline stage and
    serialises every wgmma of the kernel (warning C7515): each product waits for the
    previous one. Ending the stage inside the loop keeps the rest asynchronous.
    ``token`` is the int32 loop index (the asm takes one 32-bit register); the wait is
    placed by its order among Triton's own wgmma instructions, not by a data
    dependency. Only sm_90 launches set MMA_WAIT.
    """
    if MMA_WAIT:
        tl.inline_asm_elementwise("wgmma.wait_group.sync.aligned 0;", "=r,r", [token], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _add_key_mask(qk, mask_rows, MASK_PRECISION: tl.constexpr):
    """``qk`` plus the key mask's bias, as one more tensor-core product.

    ``mask_rows`` [16, BLOCK_K] holds the bias (0 kept, an infinity masked) in each of
    its 16 rows; ones [M, 16] @ mask_rows adds 16 copies, and 16 x 0 = 0, 16 x inf = inf
    exactly. A K=16 product per tile instead of an add per logit, and one loop for
    every row (a second, masked loop copy doubled the forward's shared memory). The
    logits are scaled after this, so the infinity has the sign of -scale
    (``_key_mask_bias``), and scale 0 is refused with a mask. MASK_PRECISION: "ieee",
    or for fp32 on GPUs with TF32 "tf32", exact here (tf32x3 would split inf into NaN).
    """
    ones = tl.full((qk.shape[0], 16), 1.0, dtype=mask_rows.dtype)
    return tl.dot(ones, mask_rows, qk, input_precision=MASK_PRECISION)


@triton.jit
def _mask_rows_ptrs(row_ptr, offs):
    """[16, BLOCK_K] pointers: 16 times the same keys of one row of the key-mask bias."""
    return row_ptr + offs[None, :] + tl.zeros((16, 1), dtype=tl.int64)


@triton.jit
def _fwd_step(q, kt, v, bias, mask_rows, key_bias, m_i, l_i, acc, scale, HAS_MASK: tl.constexpr,
              USE_KEY_BIAS: tl.constexpr, PRECISION: tl.constexpr, PRECISE: tl.constexpr,
              MASK_PRECISION: tl.constexpr):
    """One key block of the online softmax: the updated (m2, l, acc). ``mask_rows``
    [16, BLOCK_K] (HAS_MASK) as in ``_add_key_mask``; ``key_bias`` [BLOCK_K] is the -inf
    for keys past N of a last partial block (USE_KEY_BIAS)."""
    qk = tl.dot(q, kt, input_precision=PRECISION)
    if HAS_MASK:
        qk = _add_key_mask(qk, mask_rows, MASK_PRECISION)
    s = qk * scale + bias.to(tl.float32)
    if USE_KEY_BIAS:
        s += key_bias[None, :]
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
    q, kt_ptrs, v_ptrs, b_ptrs, mask_rows_ptrs, skn, svn, sbk, N, scale,
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
                                  m_i, l_i, acc, scale, HAS_MASK, False, PRECISION, PRECISE, MASK_PRECISION)
        kt_ptrs += BLOCK_K * skn
        v_ptrs += BLOCK_K * svn
        b_ptrs += BLOCK_K * sbk
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
                                      not HAS_MASK, PRECISION, PRECISE, MASK_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _fwd_kernel(
    Q, K, V, BIAS, MASK, OUT, LSE,
    sqb, sqi, sqn, sqh, sqd,
    skb, ski, skn, skh, skd,
    svb, svi, svn, svh, svd,
    sbb, sbh, sbj, sbk,
    smb, smi, smk,
    sob, soi, son, soh, sod,
    I, N, H, scale,
    HAS_MASK: tl.constexpr, EVEN_N: tl.constexpr, D: tl.constexpr,  # EVEN_N: N % both blocks == 0
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, PRECISE: tl.constexpr,
    MMA_WAIT: tl.constexpr, MASK_PRECISION: tl.constexpr, STORE_LSE: tl.constexpr,
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

    q = tl.load(Q + b * sqb + i * sqi + h * sqh + jc64[:, None] * sqn + offs_d[None, :] * sqd)
    kt_ptrs = K + b * skb + i * ski + h * skh + k64[None, :] * skn + offs_d[:, None] * skd
    v_ptrs = V + b * svb + i * svi + h * svh + k64[:, None] * svn + offs_d[None, :] * svd
    b_ptrs = BIAS + b * sbb + h * sbh + jc64[:, None] * sbj + k64[None, :] * sbk
    mask_rows_ptrs = _mask_rows_ptrs(MASK + b * smb + i * smi, k64)  # contiguous over keys

    m_i, l_i, acc = _fwd_loop(q, kt_ptrs, v_ptrs, b_ptrs, mask_rows_ptrs, skn, svn, sbk, N, scale,
                              HAS_MASK, EVEN_N, BLOCK_J, BLOCK_K, D, PRECISION, PRECISE, MMA_WAIT, MASK_PRECISION)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_ptrs = OUT + b * sob + i * soi + h * soh + j64[:, None] * son + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=valid_j[:, None])
    if STORE_LSE:
        log2_l = _log2(tl.where(has_keys, l_i, 1.0), PRECISE)
        if LSE.dtype.element_ty == tl.float64:  # m_i + log2_l exactly (fp32 inputs)
            lse = tl.where(has_keys, m_i.to(tl.float64) + log2_l.to(tl.float64), float("inf"))
        else:
            lse = tl.where(has_keys, m_i + log2_l, float("inf"))
        tl.store(LSE + ((b * I + i) * H + h) * N + j64, lse, mask=valid_j)


@triton.jit
def _rowdot_fma(a_ptrs, b_ptrs, sad, sbd, valid, D: tl.constexpr):
    """sum_d a[..., d] * b[..., d] (fp32) as one FMA chain over d = 0, 1, ..., D - 1 from
    0: the rounding of an fp32 "ieee" ``tl.dot`` on the GPU's FMA units (the CPU
    interpreter's numpy matmul need not round so). ``a_ptrs`` / ``b_ptrs`` point at
    column d = 0; ``valid`` masks rows.

    delta = dO.O taken so rounds exactly as dP = dO.v does: where a row keeps a single
    key, O = v and dS = P (dP - delta) is exactly 0, as in PyTorch's softmax backward
    (P = 1, sum(P dP) = dP), instead of the difference of two dot products summed in
    different orders, which dK sums over all N queries (fp32 dK up to ~5x PyTorch's
    error)."""
    acc = tl.zeros(valid.shape, dtype=tl.float32)
    for dd in tl.static_range(D):
        a = tl.load(a_ptrs + dd * sad, mask=valid, other=0.0).to(tl.float32)
        b = tl.load(b_ptrs + dd * sbd, mask=valid, other=0.0).to(tl.float32)
        acc = tl.fma(a, b, acc)
    return acc


@triton.jit
def _bwd_delta_kernel(
    OUT, DO, DELTA,
    sob, soi, son, soh, sod,
    sdob, sdoi, sdon, sdoh, sdod,
    I, N, H,
    D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr, FMA_CHAIN: tl.constexpr,
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
        delta = _rowdot_fma(DO + b * sdob + i * sdoi + j2 * sdon + h2 * sdoh,
                            OUT + b * sob + i * soi + j2 * son + h2 * soh, sdod, sod, row_ok, D)
    else:
        do = tl.load(DO + b * sdob + i * sdoi + j64 * sdon + h64 * sdoh + offs_d[None, None, :] * sdod,
                     mask=valid, other=0.0)
        o = tl.load(OUT + b * sob + i * soi + j64 * son + h64 * soh + offs_d[None, None, :] * sod,
                    mask=valid, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 2)  # [BLOCK_J, BLOCK_H]
    rows = (b * I + i) * H + offs_h[None, :].to(tl.int64)
    tl.store(DELTA + rows * N + offs_j[:, None], delta, mask=row_ok)


@triton.jit
def _sum_splits_kernel(PARTIAL, OUT, SPLITS, NUMEL, BLOCK: tl.constexpr):
    """OUT[x] = sum over s of PARTIAL[s, x], in a fixed order (deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < NUMEL
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(PARTIAL + s * NUMEL + offs, mask=valid, other=0.0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=valid)


@triton.jit
def _dq_step(q, do, lse_hi, lse_lo, delta, k, vt, bias, key_bias, dq, scale,
             USE_KEY_BIAS: tl.constexpr, LSE_LO: tl.constexpr, PRECISION: tl.constexpr, PRECISE: tl.constexpr):
    """dQ contribution of one key block."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    s = qk * scale + bias.to(tl.float32)
    if USE_KEY_BIAS:
        s += key_bias[None, :]
    x = s * LOG2E_C - lse_hi[:, None]
    if LSE_LO:
        x -= lse_lo[:, None]
    p = _exp2(x, PRECISE)
    dp = tl.dot(do, vt, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def _dq_loop(
    q, do, lse, delta, k_ptrs, vt_ptrs, b_ptrs, m_ptrs, skn, svn, sbk, smk, N, scale,
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
                      dq, scale, USE_MASK, LSE_LO, PRECISION, PRECISE)
        k_ptrs += BLOCK_K * skn
        vt_ptrs += BLOCK_K * svn
        b_ptrs += BLOCK_K * sbk
        if USE_MASK:
            m_ptrs += BLOCK_K * smk
        _retire_mma(start_k, MMA_WAIT)
    if not EVEN_N:
        if n_full < N:
            valid_k = n_full + offs_k < N
            key_bias = _key_bias(m_ptrs, n_full + offs_k, N, USE_MASK, False)
            k = tl.load(k_ptrs, mask=valid_k[:, None], other=0.0)
            vt = tl.load(vt_ptrs, mask=valid_k[None, :], other=0.0)
            bias = tl.load(b_ptrs, mask=valid_k[None, :], other=0.0)
            dq = _dq_step(q, do, lse_hi, lse_lo, delta, k, vt, bias, key_bias, dq, scale, True, LSE_LO,
                          PRECISION, PRECISE)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, BIAS, MASK, OUT, DO, LSE, DQ,
    sqb, sqi, sqn, sqh, sqd,
    skb, ski, skn, skh, skd,
    svb, svi, svn, svh, svd,
    sbb, sbh, sbj, sbk,
    smb, smi, smk,
    sob, soi, son, soh, sod,
    sdob, sdoi, sdon, sdoh, sdod,
    sdqb, sdqi, sdqn, sdqh, sdqd,
    I, N, H, scale,
    HAS_MASK: tl.constexpr, EVEN_N: tl.constexpr, D: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, PRECISE: tl.constexpr,
    MMA_WAIT: tl.constexpr, FMA_CHAIN: tl.constexpr,
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

    q = tl.load(Q + b * sqb + i * sqi + h * sqh + jc64[:, None] * sqn + offs_d[None, :] * sqd)
    do = tl.load(DO + b * sdob + i * sdoi + h * sdoh + jc64[:, None] * sdon + offs_d[None, :] * sdod)
    if FMA_CHAIN:  # fp32 "ieee": round as the dP products (_rowdot_fma)
        delta = _rowdot_fma(DO + b * sdob + i * sdoi + h * sdoh + jc64 * sdon,
                            OUT + b * sob + i * soi + h * soh + jc64 * son, sdod, sod, valid_j, D)
    else:
        o = tl.load(OUT + b * sob + i * soi + h * soh + jc64[:, None] * son + offs_d[None, :] * sod)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(LSE + ((b * I + i) * H + h) * N + jc64)

    k_ptrs = K + b * skb + i * ski + h * skh + k64[:, None] * skn + offs_d[None, :] * skd
    vt_ptrs = V + b * svb + i * svi + h * svh + k64[None, :] * svn + offs_d[:, None] * svd
    b_ptrs = BIAS + b * sbb + h * sbh + jc64[:, None] * sbj + k64[None, :] * sbk
    m_ptrs = MASK + b * smb + i * smi + k64 * smk
    if HAS_MASK:
        full = _all_kept(MASK + b * smb + i * smi, smk, N, 256)
    else:
        full = True
    if full:
        dq = _dq_loop(q, do, lse, delta, k_ptrs, vt_ptrs, b_ptrs, m_ptrs, skn, svn, sbk, smk, N, scale,
                      False, EVEN_N, BLOCK_J, BLOCK_K, D, PRECISION, PRECISE, MMA_WAIT)
    else:
        dq = _dq_loop(q, do, lse, delta, k_ptrs, vt_ptrs, b_ptrs, m_ptrs, skn, svn, sbk, smk, N, scale,
                      True, EVEN_N, BLOCK_J, BLOCK_K, D, PRECISION, PRECISE, MMA_WAIT)
    dq_ptrs = DQ + b * sdqb + i * sdqi + h * sdqh + j64[:, None] * sdqn + offs_d[None, :] * sdqd
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=valid_j[:, None])


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
def _dkdv_loop(
    k, v, key_bias, q_ptrs, do_ptrs, bt_ptrs, row_ptrs, LSE, DELTA, sqn, sdon, sbj, N, scale,
    USE_KEY_BIAS: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    D: tl.constexpr, PRECISION: tl.constexpr, PRECISE: tl.constexpr, MMA_WAIT: tl.constexpr,
):
    """dK, dV over all query blocks: full blocks unmasked (key rows past N read clamped,
    never stored), a partial last one masked with lse = +inf past N (as _fwd_loop)."""
    offs_j = tl.arange(0, BLOCK_J)
    dk = tl.zeros([BLOCK_K, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, D], dtype=tl.float32)
    n_full = N - N % BLOCK_J
    for start_j in range(0, n_full, BLOCK_J):
        dk, dv = _dkdv_step(k, v, key_bias, tl.load(q_ptrs), tl.load(do_ptrs), tl.load(LSE + row_ptrs),
                            tl.load(DELTA + row_ptrs), tl.load(bt_ptrs), dk, dv, scale,
                            USE_KEY_BIAS, PRECISION, PRECISE)
        q_ptrs += BLOCK_J * sqn
        do_ptrs += BLOCK_J * sdon
        bt_ptrs += BLOCK_J * sbj
        row_ptrs += BLOCK_J
        _retire_mma(start_j, MMA_WAIT)
    if not EVEN_N:
        if n_full < N:
            valid_j = n_full + offs_j < N
            q = tl.load(q_ptrs, mask=valid_j[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=valid_j[:, None], other=0.0)
            lse = tl.load(LSE + row_ptrs, mask=valid_j, other=float("inf"))
            delta = tl.load(DELTA + row_ptrs, mask=valid_j, other=0.0)
            bias_t = tl.load(bt_ptrs, mask=valid_j[None, :], other=0.0)
            dk, dv = _dkdv_step(k, v, key_bias, q, do, lse, delta, bias_t, dk, dv, scale,
                                USE_KEY_BIAS, PRECISION, PRECISE)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, BIAS, MASK, DO, LSE, DELTA, DK, DV,
    sqb, sqi, sqn, sqh, sqd,
    skb, ski, skn, skh, skd,
    svb, svi, svn, svh, svd,
    sbb, sbh, sbj, sbk,
    smb, smi, smk,
    sdob, sdoi, sdon, sdoh, sdod,
    sdkb, sdki, sdkn, sdkh, sdkd,
    sdvb, sdvi, sdvn, sdvh, sdvd,
    I, N, H, scale,
    HAS_MASK: tl.constexpr, EVEN_N: tl.constexpr, D: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, PRECISE: tl.constexpr,
    MMA_WAIT: tl.constexpr,
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

    k = tl.load(K + b * skb + i * ski + h * skh + kc64[:, None] * skn + offs_d[None, :] * skd)
    v = tl.load(V + b * svb + i * svi + h * svh + kc64[:, None] * svn + offs_d[None, :] * svd)
    key_bias = _key_bias(MASK + b * smb + i * smi + k64 * smk, offs_k, N, HAS_MASK, EVEN_N)

    q_ptrs = Q + b * sqb + i * sqi + h * sqh + j64[:, None] * sqn + offs_d[None, :] * sqd
    do_ptrs = DO + b * sdob + i * sdoi + h * sdoh + j64[:, None] * sdon + offs_d[None, :] * sdod
    bt_ptrs = BIAS + b * sbb + h * sbh + j64[None, :] * sbj + kc64[:, None] * sbk
    row_ptrs = ((b * I + i) * H + h) * N + j64
    # Key blocks with every key kept (the common case) skip the per-logit mask add.
    if HAS_MASK or not EVEN_N:
        full = tl.min(key_bias, 0) == 0.0
    else:
        full = True
    if full:
        dk, dv = _dkdv_loop(k, v, key_bias, q_ptrs, do_ptrs, bt_ptrs, row_ptrs, LSE, DELTA, sqn, sdon, sbj,
                            N, scale, False, EVEN_N, BLOCK_J, BLOCK_K, D, PRECISION, PRECISE, MMA_WAIT)
    else:
        dk, dv = _dkdv_loop(k, v, key_bias, q_ptrs, do_ptrs, bt_ptrs, row_ptrs, LSE, DELTA, sqn, sdon, sbj,
                            N, scale, True, EVEN_N, BLOCK_J, BLOCK_K, D, PRECISION, PRECISE, MMA_WAIT)

    dk_ptrs = DK + b * sdkb + i * sdki + h * sdkh + k64[:, None] * sdkn + offs_d[None, :] * sdkd
    dv_ptrs = DV + b * sdvb + i * sdvi + h * sdvh + k64[:, None] * sdvn + offs_d[None, :] * sdvd
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=valid_k[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=valid_k[:, None])


@triton.jit
def _dbias_row_vectors(LSE, DELTA, row_offs, offs_j, N, EVEN_N: tl.constexpr):
    """(lse [BLOCK_J], delta [BLOCK_J]) of one row i for the dBias pass.

    Masked rather than clamped past N: clamped offsets would hide their contiguity from
    the compiler, which then loads element by element.
    """
    if EVEN_N:
        lse = tl.load(LSE + row_offs)
        delta = tl.load(DELTA + row_offs)
    else:
        lse = tl.load(LSE + row_offs, mask=offs_j < N, other=float("inf"))
        delta = tl.load(DELTA + row_offs, mask=offs_j < N, other=0.0)
    return lse, delta


@triton.jit
def _bwd_dbias_kernel(
    Q, K, V, BIAS, MASK, DO, LSE, DELTA, DB,
    sqb, sqi, sqn, sqh, sqd,
    skb, ski, skn, skh, skd,
    svb, svi, svn, svh, svd,
    sbb, sbh, sbj, sbk,
    smb, smi, smk,
    sdob, sdoi, sdon, sdoh, sdod,
    sdbs, sdbb, sdbh, sdbj, sdbk,
    I, N, H, BH, scale, ROWS_PER_SPLIT,
    HAS_MASK: tl.constexpr, EVEN_N: tl.constexpr, D: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, PRECISE: tl.constexpr,
    MASK_PRECISION: tl.constexpr,
):
    """dBias[b, h, j-tile, k-tile] = sum over rows i (of this split) of dS, in registers.

    MASK: the key mask as a 0/infinity bias in q's dtype, rows padded with the infinity
    (``_key_mask_bias``), or unused without a mask.

    The q/dO/K/V tiles read query and key rows past N clamped to row N-1, unmasked: the
    loop has no masked (unpipelined) tile loads at any N, and the extra rows and columns
    of the tile are never stored.
    """
    scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as fp64
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_z = tl.program_id(2)  # (split, b, h) flattened, (b, h) fastest
    bh = pid_z % BH
    split = pid_z // BH
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    j64 = offs_j.to(tl.int64)
    k64 = offs_k.to(tl.int64)
    jc64 = tl.minimum(offs_j, N - 1).to(tl.int64)
    kc64 = tl.minimum(offs_k, N - 1).to(tl.int64)
    valid_j = offs_j < N
    valid_k = offs_k < N

    bias = tl.load(BIAS + b * sbb + h * sbh + j64[:, None] * sbj + k64[None, :] * sbk,
                   mask=valid_j[:, None] & valid_k[None, :], other=0.0).to(tl.float32)

    i_start = split * ROWS_PER_SPLIT
    n_rows = tl.minimum(ROWS_PER_SPLIT, I - i_start)
    i0 = i_start.to(tl.int64)
    # Pointers advance by one row i per step (64-bit pointer arithmetic, no overflow).
    q_ptrs = Q + b * sqb + i0 * sqi + h * sqh + jc64[:, None] * sqn + offs_d[None, :] * sqd
    do_ptrs = DO + b * sdob + i0 * sdoi + h * sdoh + jc64[:, None] * sdon + offs_d[None, :] * sdod
    kt_ptrs = K + b * skb + i0 * ski + h * skh + kc64[None, :] * skn + offs_d[:, None] * skd
    vt_ptrs = V + b * svb + i0 * svi + h * svh + kc64[None, :] * svn + offs_d[:, None] * svd
    row_offs = ((b * I + i0) * H + h) * N + j64
    # Loaded unmasked: k64 < the padded row length. Columns of keys past N are never
    # stored (they read the clamped key N-1), so they need no -inf without a mask.
    mask_rows_ptrs = _mask_rows_ptrs(MASK + b * smb + i0 * smi, k64)  # contiguous over keys
    # The per-row vectors (lse, delta) are loaded one row ahead into registers: Triton
    # pipelines only the tiles that feed tl.dot through shared memory, and a load used in
    # its own iteration would expose its full latency every row.
    lse, delta = _dbias_row_vectors(LSE, DELTA, row_offs, offs_j, N, EVEN_N)
    acc = tl.zeros([BLOCK_J, BLOCK_K], dtype=tl.float32)
    for it in range(0, n_rows):
        ahead = tl.minimum(it + 1, n_rows - 1).to(tl.int64)  # the last row reloads itself
        lse_next, delta_next = _dbias_row_vectors(LSE, DELTA, row_offs + ahead * (H * N), offs_j, N, EVEN_N)
        qk = tl.dot(tl.load(q_ptrs), tl.load(kt_ptrs), input_precision=PRECISION)
        if HAS_MASK:
            qk = _add_key_mask(qk, tl.load(mask_rows_ptrs), MASK_PRECISION)
            mask_rows_ptrs += smi
        s = qk * scale + bias
        lse_hi, lse_lo = _lse_parts(lse)
        x = s * LOG2E_C - lse_hi[:, None]
        if lse.dtype == tl.float64:
            x -= lse_lo[:, None]
        p = _exp2(x, PRECISE)
        dp = tl.dot(tl.load(do_ptrs), tl.load(vt_ptrs), input_precision=PRECISION)
        acc += p * (dp - delta[:, None])
        lse, delta = lse_next, delta_next
        q_ptrs += sqi
        do_ptrs += sdoi
        kt_ptrs += ski
        vt_ptrs += svi

    db_ptrs = DB + split.to(tl.int64) * sdbs + b * sdbb + h * sdbh + j64[:, None] * sdbj + k64[None, :] * sdbk
    tl.store(db_ptrs, acc.to(DB.dtype.element_ty), mask=valid_j[:, None] & valid_k[None, :])


# Launch configuration --------------------------------------------------------------------


def _interpreting() -> bool:
    return triton_interpret()


@functools.lru_cache(maxsize=None)
def _num_sms(index: Optional[int]) -> int:
    if _interpreting():
        return 4  # small, so the split path of the bias gradient runs in tests
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(index: Optional[int]) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# Which kernels end their loops with an explicit wgmma wait (_retire_mma) on sm_90.
# Without it ptxas serialised every wgmma of dK/dV always, of dQ (and, before session 6,
# the forward) with a key mask (two loop copies), and of dQ at head dim 64 without one
# (offline compile).
# The forward gains without a mask too (118 instead of 131 registers: 4 programs per
# SM). Measured on the H100 in docs/kernels/triangle_attention.md, "Session 5".
_MMA_WAIT = {"fwd": True, "dq": True, "dkdv": True}
# (kernel, key mask?, head dim) left without the wait: never serialised there, and the
# wait cost dQ 3% at D=32 (0.356 -> 0.366 ms, N=512).
_MMA_WAIT_SKIP = {("dq", False, 16), ("dq", False, 32)}


def _mma_wait(kind: str, t: torch.Tensor, has_mask: bool, d: int) -> bool:
    """MMA_WAIT for a launch on ``t``'s device (an NVIDIA sm_90 GPU only).

    Never while torch.compile traces the launcher (fake tensors): Inductor's mutation
    analysis cannot read inline asm, then assumes that every input is mutated, and the
    layer compile tests came out wrong on the H100 (cause not isolated further). Compiled
    models therefore keep the serialised kernels.
    """
    if _interpreting() or t.device.type != "cuda" or torch.version.hip is not None:
        return False
    if torch.compiler.is_compiling() or is_fake(t):
        return False
    if not _MMA_WAIT[kind] or (kind, has_mask, d) in _MMA_WAIT_SKIP:
        return False
    return _capability(t.device.index)[0] == 9


# (kind, head dim, fp32?) -> (BLOCK_J, BLOCK_K, num_warps, num_stages). Tuned on an H100
# in bf16 with the benchmark's key mask (D = 32 at N = 512 / 768 / 1024 in session 6; D =
# 16 follows D = 32, untimed); see docs/kernels/triangle_attention.md.
_CONFIGS = {
    ("fwd", 16, False): (64, 64, 4, 3),
    ("fwd", 32, False): (64, 64, 4, 3),
    ("fwd", 64, False): (128, 64, 4, 3),
    ("fwd", 128, False): (128, 64, 8, 2),
    ("dq", 16, False): (128, 32, 4, 3),
    ("dq", 32, False): (128, 32, 4, 3),
    ("dq", 64, False): (64, 64, 4, 3),
    ("dq", 128, False): (64, 64, 4, 2),
    ("dkdv", 16, False): (32, 64, 4, 3),
    ("dkdv", 32, False): (32, 64, 4, 3),
    ("dkdv", 64, False): (64, 64, 4, 3),
    ("dkdv", 128, False): (64, 64, 8, 2),
    ("dbias", 16, False): (64, 64, 4, 3),
    ("dbias", 32, False): (64, 64, 4, 3),
    ("dbias", 64, False): (64, 64, 4, 3),
    ("dbias", 128, False): (64, 64, 8, 2),
}
# fp32 without TF32, (kind, head dim, True): products on the FMA units, where two warps
# per program won the backward kinds (`bench --tune --dtypes float32`, N = 512, session 8:
# dK/dV 13.4 -> 7.3 ms, dQ 10.3 -> 6.0 ms against the clamped 16-bit tiles). Session 9
# (N = 512 and 1024, D = 32): the forward's 128x64 tile with 4 warps took 4.68 -> 3.85 and
# 36.2 -> 30.3 ms; dBias's 64x128 took 52.1 -> 45.2 ms at 1024 but lost at 512 (6.48 ->
# 7.18). D = 16 keeps session 8's tiles, untimed; D = 64 / 128 keep the clamped 16-bit
# tiles (untimed).
_CONFIGS.update({
    (kind, d, True): tile
    for d in (16, 32)
    for kind, tile in (("fwd", (64, 32, 2, 2)), ("dq", (32, 64, 2, 2)), ("dkdv", (32, 64, 2, 2)),
                       ("dbias", (32, 64, 2, 2)))
})
_CONFIGS[("fwd", 32, True)] = (128, 64, 4, 2)
_CONFIGS[("dbias", 32, True)] = (64, 128, 4, 2)
# Overrides for N <= 512: larger dBias tiles with 8 warps won there (0.42 -> 0.36 ms at
# N = 512) and lost above (768: 1.58 -> 1.66 ms, one 256-thread program per SM).
_CONFIGS_SMALL_N = {
    ("dbias", 16, False): (128, 64, 8, 3),
    ("dbias", 32, False): (128, 64, 8, 3),
    ("dbias", 32, True): (32, 64, 2, 2),
}


def _smem_bytes(kind: str, bj: int, bk: int, stages: int, d: int, e: int, be: int) -> int:
    """Rough shared memory of one program: pipelined tiles (x2 for dQ's two loop copies)."""
    if kind == "fwd":  # k, v, bias and the [16, BLOCK_K] key-mask rows
        return stages * (2 * bk * d * e + bj * bk * be + 16 * bk * e) + bj * d * e
    if kind == "dq":
        return 2 * stages * (2 * bk * d * e + bj * bk * be) + 2 * bj * d * e
    if kind == "dkdv":
        return 2 * stages * (2 * bj * d * e + bj * bk * be) + 2 * bk * d * e
    return stages * (2 * bj * d + 2 * bk * d + 16 * bk) * e  # q, dO, k, v, key-mask rows


_SMEM_BUDGET = 160 * 1024


def _config(kind: str, n, d: int, dtype: torch.dtype, bias_dtype: Optional[torch.dtype] = None,
            allow_tf32: bool = False) -> Tuple[int, int, int, int]:
    """(BLOCK_J, BLOCK_K, num_warps, num_stages), plain ints even for symbolic N.
    ``allow_tf32``: fp32 products may run on the tensor cores (the fp32 tiles, tuned for
    the FMA units, are then not used)."""
    if _interpreting():
        return 16, 16, 1, 1  # small tiles: multi-block loops at small N, fast interpretation
    fp32_tiles = dtype == torch.float32 and not allow_tf32 and (kind, d, True) in _CONFIGS
    key = (kind, d, fp32_tiles)
    # Symbolic N (torch.compile with dynamic shapes) takes the general tiles; TF32 was
    # not timed with the small-N ones.
    small = isinstance(n, int) and n <= 512 and (dtype != torch.float32 or fp32_tiles)
    bj, bk, warps, stages = _CONFIGS_SMALL_N[key] if small and key in _CONFIGS_SMALL_N else _CONFIGS[key]
    if dtype == torch.float32 and not fp32_tiles:  # fp32 operands take twice the registers and shared memory
        bj, bk, stages = min(bj, 64), min(bk, 64 if d <= 32 else 32), min(stages, 2)
    if n < 256:  # small N: smaller tiles for more programs and less padding
        cap = max(16, triton.next_power_of_2(int(n)))
        bj, bk = min(bj, cap), min(bk, cap)
    e = dtype.itemsize
    be = (bias_dtype or dtype).itemsize
    while _smem_bytes(kind, bj, bk, stages, d, e, be) > _SMEM_BUDGET:
        if stages > 2:
            stages -= 1
        elif bk > 16 and (kind != "dkdv" or bk >= bj):
            bk //= 2
        elif bj > 16:
            bj //= 2
        else:
            break
    return bj, bk, warps, stages


def _tracing_under_interpreter(t: torch.Tensor) -> bool:
    """True for fake/meta tensors under the interpreter: skip the launch.

    With TRITON_INTERPRET=1, ``wrap_triton`` hands back the interpreted kernel, which
    would run on the fake tensors of torch.compile / opcheck tracing. The allocations
    before the launch are all a fake implementation needs.
    """
    if not _interpreting():
        return False
    return t.device.type == "meta" or is_fake(t)


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    # TF32 products as three TF32 passes (Triton's "tf32x3"): a single pass truncates
    # the operands and errs about twice as much as PyTorch's own TF32 matmuls.
    return "tf32x3" if (dtype == torch.float32 and allow_tf32) else "ieee"


def _precise(dtype: torch.dtype) -> bool:
    """Accurate exp2/log2 for fp32 inputs (libdevice; not under the interpreter)."""
    return dtype == torch.float32 and not _interpreting()


# Launchers -------------------------------------------------------------------------------


def _empty_in_order(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Uninitialised tensor shaped like ``t`` with ``t``'s dimension order (dense).

    Like ``torch.empty_like`` but also for non-dense views such as q/k/v sliced out of
    one projection: the ending node's transposed views give a transposed result, which
    transposes back to contiguous for free.
    """
    if t.is_contiguous():  # the common case, one call (host time matters at N <= 512)
        return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -d))
    buf = torch.empty([t.shape[d] for d in order], dtype=dtype or t.dtype, device=t.device)
    return buf.permute([order.index(d) for d in range(t.dim())])


def _check(q, k, v, bias, mask, scale) -> None:
    if q.dim() != 5:
        raise ValueError(f"q: expected shape (B, I, N, H, D), got {tuple(q.shape)}")
    batch, rows, n, heads, d = q.shape
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"{name}: expected shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (as q), got {t.dtype}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q: expected dtype in {[str(x) for x in DTYPES]}, got {q.dtype}")
    if d not in HEAD_DIMS:
        raise ValueError(f"q: head dim (last axis) must be one of {HEAD_DIMS}, got {d}")
    if tuple(bias.shape) != (batch, heads, n, n):
        raise ValueError(f"bias: expected shape {(batch, heads, n, n)}, got {tuple(bias.shape)}")
    if bias.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"bias: expected dtype {q.dtype} or torch.float32, got {bias.dtype}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    if mask is not None and scale == 0.0:  # the mask is added before scaling (_add_key_mask)
        raise ValueError("scale: expected a nonzero number with a key mask, got 0")
    if mask is not None:
        if tuple(mask.shape) != (batch, rows, n):
            raise ValueError(f"mask: expected shape {(batch, rows, n)}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")


def _round_up_16(count: int) -> int:
    """``count`` rounded up to 16 elements: rows the kernels can prove vector-aligned."""
    return -(-count // 16) * 16


def _aligned_bias(bias: torch.Tensor) -> torch.Tensor:
    """``bias`` with unit stride over keys and 16-element aligned rows, copied if needed.

    The layers pass the bias as a permuted view of a ``[B, N, N, H]`` Linear output (key
    stride H or N*H); tiles of such a view load element by element, outside the
    shared-memory pipeline, and the forward and dQ loops issue ~45% more instructions
    per logit (benchmarks/triangle_attention_sass.py --layout start). Rows whose stride
    is not a multiple of 16 elements (N % 16 != 0) cannot be proven aligned for vector
    loads either, so the copy pads them. It is O(B H N^2), 1/D of q's size, and lives for
    one launch.
    """
    if bias.stride(-1) == 1 and bias.stride(-2) % 16 == 0 and bias.stride(-3) % 16 == 0:
        return bias
    batch, heads, n, _ = bias.shape
    padded = torch.empty((batch, heads, n, _round_up_16(n)), dtype=bias.dtype, device=bias.device)[..., :n]
    return padded.copy_(bias)


def _mask_args(mask, fallback):
    if mask is None:
        return fallback, (0, 0, 0), False
    return mask, tuple(mask.stride()), True


_MASK_ROW_ALIGN = 128  # >= every BLOCK_K: unmasked [16, BLOCK_K] tiles stay inside the rows


def _key_mask_bias(mask: torch.Tensor, dtype: torch.dtype, scale: float,
                   storage: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``mask`` [B, I, N] as a bias in ``dtype`` for ``_add_key_mask``, [B, I, N_pad]: 0
    for kept keys, for masked ones the infinity that ``scale`` turns into -inf, rows
    padded with it to a multiple of ``_MASK_ROW_ALIGN``. O(B I N), 1/(H D) of q's size;
    in ``storage``'s bytes (an output not yet written) if they suffice.

    The kernels read the padding, so they get the whole padded tensor, never a
    ``[..., :N]`` view of it: with the view, the layer compile tests gave wrong outputs
    on the H100 (presumably torch.compile handed the kernel a dense copy of the view,
    without the padding)."""
    batch, rows, n = mask.shape
    shape = (batch, rows, -(-n // _MASK_ROW_ALIGN) * _MASK_ROW_ALIGN)
    padded = None if storage is None else _scratch(storage, shape, dtype)
    if padded is None:
        padded = torch.empty(shape, dtype=dtype, device=mask.device)
    keys = padded[..., :n]
    torch.log(mask, out=keys)  # one op: log(True) = 0, log(False) = -inf
    if scale < 0:
        keys.neg_()
    if n < shape[-1]:
        padded[..., n:].fill_(float("-inf") if scale > 0 else float("inf"))
    return padded


def _mask_precision(t: torch.Tensor) -> str:
    """``_add_key_mask``'s product precision: one exact TF32 pass for fp32 on NVIDIA GPUs
    that have TF32 (sm_80 on), else IEEE (16-bit products ignore it)."""
    if t.dtype != torch.float32 or _interpreting() or t.device.type != "cuda" or torch.version.hip is not None:
        return "ieee"
    return "tf32" if _capability(t.device.index)[0] >= 8 else "ieee"


def triangle_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    allow_tf32: bool = False,
    need_lse: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher: ``(out [B, I, N, H, D] in q's dtype, lse [B, I, H, N] fp32, base 2)``.

    Without ``need_lse`` (inference: no backward will follow) lse is empty (0 elements)
    and never written: O(B I H N) less memory, the forward's peak is its output."""
    _check(q, k, v, bias, mask, scale)
    batch, rows, n, heads, d = q.shape
    d = int(d)  # a compile-time constant of the kernels (also under symbolic shapes)
    out = _empty_in_order(q)
    lse_dtype = torch.float64 if q.dtype == torch.float32 else torch.float32  # see _lse_parts
    lse = torch.empty((batch, rows, heads, n) if need_lse else (0,), dtype=lse_dtype, device=q.device)
    if out.numel() == 0 or _tracing_under_interpreter(q):
        return out, lse
    bias = _aligned_bias(bias)
    bj, bk, warps, stages = _config("fwd", n, d, q.dtype, bias.dtype, allow_tf32)
    assert _MASK_ROW_ALIGN % bk == 0, "the key-mask rows must cover every key block"
    mask_t, mask_strides, has_mask = _mask_args(None if mask is None else _key_mask_bias(mask, q.dtype, scale), q)
    grid = (triton.cdiv(n, bj), rows, batch * heads)
    wrap_triton(_fwd_kernel)[grid](
        q, k, v, bias, mask_t, out, lse if need_lse else out,
        *q.stride(), *k.stride(), *v.stride(), *bias.stride(), *mask_strides, *out.stride(),
        rows, n, heads, scale,
        HAS_MASK=has_mask, EVEN_N=bool(n % bj == 0 and n % bk == 0), D=d,
        BLOCK_J=bj, BLOCK_K=bk, PRECISION=_precision(q.dtype, allow_tf32), PRECISE=_precise(q.dtype),
        MMA_WAIT=_mma_wait("fwd", q, has_mask, d), MASK_PRECISION=_mask_precision(q), STORE_LSE=need_lse,
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def _empty_buffer(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tensor like ``t`` in ``t``'s dimension order, its dense 1-D storage)."""
    flat = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
    if t.is_contiguous():
        return flat.view(t.shape), flat
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -d))
    tensor = flat.view([t.shape[d] for d in order]).permute([order.index(d) for d in range(t.dim())])
    return tensor, flat


def _scratch(flat: torch.Tensor, shape: Tuple[int, ...], dtype: torch.dtype = torch.float32,
             byte_offset: int = 0) -> Optional[torch.Tensor]:
    """A ``dtype`` view of ``flat``'s bytes from ``byte_offset`` on (an output not yet
    written), or None if they are too few."""
    size = dtype.itemsize
    count = math.prod(shape)
    raw = flat.view(torch.uint8)
    if raw.numel() < byte_offset + count * size:
        return None
    return raw[byte_offset: byte_offset + count * size].view(dtype).view(shape)


def triangle_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    allow_tf32: bool = False,
    need_dbias: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher: ``(dq, dk, dv, dbias)``; dbias is empty (0 elements) unless
    ``need_dbias``. dq/dk/dv follow q/k/v's dimension order; dbias is contiguous in
    bias's dtype, deterministic.

    Passes, in this order: delta = rowsum(dO*O) [B, I, H, N] fp32, kept in dq's (not yet
    written) storage; the bias gradient, whose row-split partial sums live in dk's
    storage and whose key-mask bias lives in dv's; dK/dV, reading a transposed copy of
    the bias also kept in dq's storage; dQ last, over both. Peak memory is the
    gradients themselves.
    """
    _check(q, k, v, bias, mask, scale)
    batch, rows, n, heads, d = q.shape
    d = int(d)
    dq, dq_flat = _empty_buffer(q)
    dk, dk_flat = _empty_buffer(k)
    dv, dv_flat = _empty_buffer(v)
    dbias_shape = (batch, heads, n, n) if need_dbias else (0,)
    dbias = torch.empty(dbias_shape, dtype=bias.dtype, device=q.device)
    if q.numel() == 0:
        return dq, dk, dv, dbias.zero_()
    # dq's storage (2 B I N H D bytes or more) holds delta (fp32), then a copy of the bias
    # transposed for the dK/dV pass, until dq is written last. bias_kj's rows are padded
    # to 16 elements (and start 64-byte aligned) so that its tiles load as vectors
    # whatever N is.
    delta_bytes = 4 * _round_up_16(batch * rows * heads * n)
    n_pad = _round_up_16(n)
    scratch_bytes = delta_bytes + batch * heads * n * n_pad * bias.element_size()
    scratch = _scratch(dq_flat, (scratch_bytes,), torch.uint8)
    if scratch is None:  # few rows (I << N): dq is smaller than the bias
        scratch = torch.empty(scratch_bytes, dtype=torch.uint8, device=q.device)
    delta = _scratch(scratch, (batch, rows, heads, n))
    bias_kj = _scratch(scratch, (batch, heads, n, n_pad), bias.dtype, delta_bytes)[..., :n]
    if _tracing_under_interpreter(q):
        return dq, dk, dv, dbias
    bias_rows = _aligned_bias(bias)  # for the dQ and dBias tiles
    precision, precise = _precision(q.dtype, allow_tf32), _precise(q.dtype)
    mask_t, mask_strides, has_mask = _mask_args(mask, q)
    even = lambda bj, bk: bool(n % bj == 0 and n % bk == 0)  # noqa: E731
    # Up to N = 512 the GPU runs a pass faster than Python prepares the next: only what
    # delta and dBias need comes before their launches, the rest runs behind dBias.
    if need_dbias:
        dbias_cfg = _config("dbias", n, d, q.dtype, bias.dtype, allow_tf32)
        assert _MASK_ROW_ALIGN % dbias_cfg[1] == 0, "the key-mask rows must cover every key block"
        # The mask as a bias, in dv's not yet written storage.
        dbias_mask = _mask_args(None if mask is None else _key_mask_bias(mask, q.dtype, scale, dv_flat), q)
        tiles = triton.cdiv(n, dbias_cfg[0]) * triton.cdiv(n, dbias_cfg[1])
        room = dk_flat.numel() * dk_flat.element_size() // (4 * batch * heads * n * n)
        row_bytes = 4 * n * d * q.element_size()  # q, k, v, dO of one row i and head
        splits = min(_bias_splits(tiles * batch * heads, rows, dbias_cfg[2], q.device, row_bytes), max(1, room))
        rows_per_split = triton.cdiv(rows, splits)
        splits = triton.cdiv(rows, rows_per_split)
        if splits == 1:
            target, target_strides = dbias, (0, *dbias.stride())
        else:
            target = _scratch(dk_flat, (splits, batch, heads, n, n))
            target_strides = target.stride()

    # fp32 without TF32: delta rounds as the dP products (_rowdot_fma).
    fma_chain = q.dtype == torch.float32 and precision == "ieee"
    bh = min(triton.next_power_of_2(int(heads)), max(1, 256 // d))  # rows of up to 256 elements
    bj = min(max(16, 8192 // (bh * d)), max(16, triton.next_power_of_2(int(n))))  # 8K-element tiles
    wrap_triton(_bwd_delta_kernel)[(triton.cdiv(n, bj), rows, batch * triton.cdiv(heads, bh))](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), rows, n, heads,
        D=d, BLOCK_J=bj, BLOCK_H=bh, FMA_CHAIN=fma_chain, num_warps=4,
    )

    if need_dbias:
        bj, bk, warps, stages = dbias_cfg
        wrap_triton(_bwd_dbias_kernel)[(triton.cdiv(n, bj), triton.cdiv(n, bk), splits * batch * heads)](
            q, k, v, bias_rows, dbias_mask[0], grad_out, lse, delta, target,
            *q.stride(), *k.stride(), *v.stride(), *bias_rows.stride(), *dbias_mask[1],
            *grad_out.stride(), *target_strides,
            rows, n, heads, batch * heads, scale, rows_per_split,
            HAS_MASK=has_mask, EVEN_N=even(bj, bk), D=d,
            BLOCK_J=bj, BLOCK_K=bk, PRECISION=precision, PRECISE=precise,
            MASK_PRECISION=_mask_precision(q), num_warps=warps, num_stages=stages,
        )
        if splits > 1:
            numel = batch * heads * n * n
            wrap_triton(_sum_splits_kernel)[(triton.cdiv(numel, 1024),)](
                target, dbias, splits, numel, BLOCK=1024, num_warps=4,
            )

    # bias_kj[b, h, k, j] = bias[b, h, j, k]: the dK/dV tiles are [keys, queries], and
    # loading them laid out that way saves a shuffle per logit. It stays in the bias's
    # dtype: the pass is bound by L2 traffic (~5.5 TB/s on the H100), of which an fp32
    # copy was two thirds.
    bias_kj.copy_(bias.transpose(2, 3))
    bias_t = bias_kj.transpose(2, 3)
    bj, bk, warps, stages = _config("dkdv", n, d, q.dtype, bias.dtype, allow_tf32)
    wrap_triton(_bwd_dkdv_kernel)[(triton.cdiv(n, bk), rows, batch * heads)](
        q, k, v, bias_t, mask_t, grad_out, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *bias_t.stride(), *mask_strides,
        *grad_out.stride(), *dk.stride(), *dv.stride(),
        rows, n, heads, scale,
        HAS_MASK=has_mask, EVEN_N=even(bj, bk), D=d,
        BLOCK_J=bj, BLOCK_K=bk, PRECISION=precision, PRECISE=precise,
        MMA_WAIT=_mma_wait("dkdv", q, has_mask, d), num_warps=warps, num_stages=stages,
    )

    bj, bk, warps, stages = _config("dq", n, d, q.dtype, bias.dtype, allow_tf32)
    wrap_triton(_bwd_dq_kernel)[(triton.cdiv(n, bj), rows, batch * heads)](
        q, k, v, bias_rows, mask_t, out, grad_out, lse, dq,
        *q.stride(), *k.stride(), *v.stride(), *bias_rows.stride(), *mask_strides, *out.stride(),
        *grad_out.stride(), *dq.stride(),
        rows, n, heads, scale,
        HAS_MASK=has_mask, EVEN_N=even(bj, bk), D=d,
        BLOCK_J=bj, BLOCK_K=bk, PRECISION=precision, PRECISE=precise,
        MMA_WAIT=_mma_wait("dq", q, has_mask, d), FMA_CHAIN=fma_chain, num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv, dbias


# dBias programs resident per SM by num_warps, as compiled for the H100 (bf16, D = 32):
# the 4-warp tiles hold 168 registers (3 programs), the 8-warp ones one program. Only
# the row-split count depends on it, through the makespan model of _bias_splits.
_DBIAS_PROGRAMS_PER_SM = {4: 3, 8: 1}
_MAX_BIAS_SPLITS = 16
# An empirical bound on the q, k, v and dO rows that one split of one head streams
# through (rows x row_bytes), read as L2 reuse (50 MB) but not profiled. H100, bf16,
# D = 32 (`session9/passes_splits.txt`), against the best count at the same N: 51-85 MiB
# per split ran at the rate of N = 1024; 96 MiB +2%, 128 MiB +15%. Above that the cost is
# not monotonic: one split (576 MiB at N = 1536, 1 GiB at 2048) took +19% / +21%, two to
# six splits at 2048 +30-77%. fp32 takes the same rule (twice the bytes per row), timed
# only end to end together with its delta change (session 9).
_DBIAS_SPLIT_BYTES = 80 * 2**20


def _bias_splits(programs: int, rows: int, warps: int, device: torch.device, row_bytes: int = 0) -> int:
    """Row splits for the bias gradient, given ``programs`` (b, h, j-tile, k-tile) tiles
    and ``row_bytes``, what one row i of one head adds to the inputs a split reads.

    Each program sums its share of the rows one after another, so the pass takes about
    waves x rows per program, waves = ceil(programs x splits / resident programs); each
    extra split adds 1% for its partial sums. The count in 1..16 that minimises this,
    among those that give every SM a program and keep a split's rows within
    ``_DBIAS_SPLIT_BYTES``. On the H100 the model matched the measured dBias times within
    a few percent: 1 split took 1.57 ms at N = 768 and 2 took 1.15 (N = 1024: 3.03 ->
    ~2.8 ms); at N = 512 all counts model alike, and 1 split, with 4 of 132 SMs idle,
    measured 4% slower than 2. The byte bound alone sets bf16 N = 1536 and 2048 (8 and 13
    splits, where the makespan model chose 1 and 2): dBias 11.3 -> 9.4 ms and 39.1 ->
    21.8 ms.
    """
    sms = _num_sms(device.index if device.type != "cpu" else None)
    resident = sms * _DBIAS_PROGRAMS_PER_SM.get(warps, 2)

    def modelled_time(splits: int) -> float:
        waves = -(-programs * splits // resident)
        return waves * -(-rows // splits) * (1 + 0.01 * (splits - 1))

    most = max(1, min(rows, _MAX_BIAS_SPLITS))
    every_sm = -(-sms // max(1, programs))
    within_l2 = -(-rows * row_bytes // _DBIAS_SPLIT_BYTES)
    fewest = min(most, max(every_sm, within_l2))
    return min(range(fewest, most + 1), key=modelled_time)


# Custom ops ------------------------------------------------------------------------------


def _op(name: str):
    """``triton_op`` (torch.compile sees and schedules the kernels); under the Triton
    interpreter an opaque ``custom_op`` instead, since tracing cannot capture
    interpreted launches. The function body is the fake implementation either way."""

    def register(fn):
        if _interpreting():
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fn)
            return op
        return triton_op(name, mutates_args=())(fn)

    return register



@_op("foldops::triangle_attention_fwd")
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    allow_tf32: bool,
    need_lse: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return triangle_attention_forward(q, k, v, bias, mask, scale, allow_tf32, need_lse)


@_op("foldops::triangle_attention_bwd")
def _bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    allow_tf32: bool,
    need_dbias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return triangle_attention_backward(grad_out, q, k, v, bias, mask, out, lse, scale, allow_tf32, need_dbias)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, bias, mask, scale, allow_tf32 = inputs[:7]
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, mask, out, lse)
    ctx.scale = scale
    ctx.allow_tf32 = allow_tf32
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse


def _backward_with(ctx, grad_out, backward):
    q, k, v, bias, mask, out, lse = ctx.saved_tensors
    if lse.numel() == 0 and out.numel() > 0:
        raise RuntimeError("triangle attention: no backward for a forward run with need_lse=False")
    need_dbias = ctx.needs_input_grad[3]
    dq, dk, dv, dbias = backward(grad_out, q, k, v, bias, mask, out, lse, ctx.scale, ctx.allow_tf32, need_dbias)
    return dq, dk, dv, dbias if need_dbias else None


def _op_backward(ctx, grad_out, _grad_lse):
    return *_backward_with(ctx, grad_out, torch.ops.foldops.triangle_attention_bwd), None, None, None, None


_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


def _direct_launches():
    """Eager launches go straight to Triton, as in ``triton_op``'s own eager path: with
    ``wrap_triton`` enabled each launch is dispatched as a higher-order op: about 0.4 ms
    of host time per launch on the H100 machine (fwd+bwd 4.4 ms per call against 2.0)."""
    return set_wrap_triton_enabled(False)


class _EagerTriangleAttention(torch.autograd.Function):
    """The same forward and backward, on the launchers directly.

    Eager calls take this path: torch.library's dispatch of the two custom ops costs
    host time, and up to N = 512 the GPU waits for the host
    (``benchmarks/triangle_attention_host.py``). torch.compile, fake tensors, dispatch
    modes and torch.func transforms take the registered ops. The forward takes ``ctx``
    (no ``setup_context``): ``apply`` then skips binding the arguments by signature."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, allow_tf32):
        with _direct_launches():
            output = triangle_attention_forward(q, k, v, bias, mask, scale, allow_tf32)
        _setup_context(ctx, (q, k, v, bias, mask, scale, allow_tf32), output)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        with _direct_launches():
            grads = _backward_with(ctx, grad_out, triangle_attention_backward)
        return *grads, None, None, None


def _use_registered_ops(q: torch.Tensor) -> bool:
    """Whether this call must go through the custom ops: under torch.compile, on fake or
    meta tensors, inside a dispatch mode (FakeTensorMode, FlopCounterMode, ...) or a
    torch.func transform."""
    return (torch.compiler.is_compiling() or q.device.type == "meta" or is_fake(q)
            or is_in_torch_dispatch_mode() or torch._C._are_functorch_transforms_active())


@torch.compiler.assume_constant_result
def _allow_tf32() -> bool:
    # torch's own switch: torch.set_float32_matmul_precision("high") allows TF32.
    return torch.get_float32_matmul_precision() != "highest"


def _padded_head_dim(head_dim: int) -> int:
    """The kernel head dim that runs ``head_dim`` (the next of ``HEAD_DIMS``)."""
    for d in HEAD_DIMS:
        if head_dim <= d:
            return d
    raise ValueError(f"q: head dim (last axis) must be at most {HEAD_DIMS[-1]}, got {head_dim}")


def triangle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Differentiable triangle attention on the Triton kernels; see the module doc.

    Args:
        q, k, v: ``[B, I, N, H, D]``, fp16 / bf16 / fp32, any strides. D up to 128;
            one of 16/32/64/128 runs as is, any other is zero-padded to the next
            (Boltz's AttentionPairBias, 384 channels over 16 heads: D = 24 -> 32).
        bias: ``[B, H, N, N]`` in q's dtype or fp32, any strides.
        mask: ``[B, I, N]`` bool keep-mask over keys, or None.
        scale: logit scale, finite; nonzero with a mask (the kernels add the mask
            before scaling).

    Returns:
        ``[B, I, N, H, D]`` in q's dtype, laid out in q's dimension order. fp32 inputs
        use TF32 products when ``torch.get_float32_matmul_precision()`` is not "highest".
    """
    head_dim = q.shape[-1]
    padded = _padded_head_dim(head_dim)
    if padded != head_dim:
        # Zero columns change no logit (q.k) and give zero output columns (v): pad, run
        # the tile width above, slice. The copies cost O(B I N H D), never O(N^2).
        q, k, v = (torch.nn.functional.pad(t, (0, padded - head_dim)) for t in (q, k, v))
    scale, allow_tf32 = float(scale), _allow_tf32()
    need_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                             or bias.requires_grad)
    if _use_registered_ops(q):
        out, _ = torch.ops.foldops.triangle_attention_fwd(q, k, v, bias, mask, scale, allow_tf32, need_grad)
    elif need_grad:
        out, _ = _EagerTriangleAttention.apply(q, k, v, bias, mask, scale, allow_tf32)
    else:  # inference: no lse
        with _direct_launches():
            out, _ = triangle_attention_forward(q, k, v, bias, mask, scale, allow_tf32, need_lse=False)
    return out if padded == head_dim else out[..., :head_dim]
