"""Shared @triton.jit helpers of the triangle attention kernels: exp2/log2 precision,
the fp64 lse split, key-mask biases (per key and as a tensor-core product), the
all-kept row check, the Hopper wgmma wait, and the fp32 dot-product FMA chain.

Conventions of every kernel here: offsets are int64 (at N = 4096 one [B, I, N, H, D]
tensor has 2^31 elements, and a transposed view of the ending node strides j by N*H*D).
Logits s = scale * q.k + bias stay in natural units; the softmax runs in base 2 with
log2(e) folded into the one FFMA that also subtracts the row max or the lse:
p = exp2(s * log2(e) - m2).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

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
def _all_kept(mask_ptr, stride_mask_k, N, BLOCK: tl.constexpr):
    """Whether one mask row keeps every key (then the per-logit mask is skipped)."""
    offs = tl.arange(0, BLOCK)
    dropped = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), 0)
    for start in range(0, N, BLOCK):
        cur = start + offs
        keep = tl.load(mask_ptr + cur.to(tl.int64) * stride_mask_k, mask=cur < N, other=1)
        dropped += tl.sum((keep == 0).to(tl.int32), 0)
    return dropped == 0


@triton.jit
def _has_nan(x):
    """Whether the fp32 tile ``x`` [M, C] holds a NaN: one reduction (NaN is sticky
    through a sum; an inf - inf there also reads as NaN, which only costs a needless
    exact pass).

    The kernels' fast loops mask keys arithmetically (a -inf added to the logit, p = 0
    multiplied into v, k, dO.v), exact for finite values. A non-finite k, v or bias at a
    masked key turns that arithmetic into NaN (NaN + -inf, +inf - inf, 0 * NaN), and the
    NaN reaches the program's accumulator (a NaN p or dS multiplies into every column
    of its row). Checked once per program after its loop; only then does the program
    run again with masked keys selected out (a -inf logit set, not added, and their k,
    v loaded as 0)."""
    total = tl.sum(tl.sum(x, 1), 0)
    return total != total


@triton.jit
def _fresh_range(SIZE: tl.constexpr):
    """0 .. SIZE-1 as int64, built so that the compiler does not merge it (nor what is
    computed from it) with the kernel's own ``tl.arange(0, SIZE)`` index tensors: the
    exact-mask paths use it so that they keep no tensor of the fast loop's setup alive
    through that loop (registers)."""
    return tl.arange(SIZE, 2 * SIZE).to(tl.int64) - SIZE


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
def _rowdot_fma(a_ptrs, b_ptrs, stride_a_d, stride_b_d, valid, D: tl.constexpr):
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
        a = tl.load(a_ptrs + dd * stride_a_d, mask=valid, other=0.0).to(tl.float32)
        b = tl.load(b_ptrs + dd * stride_b_d, mask=valid, other=0.0).to(tl.float32)
        acc = tl.fma(a, b, acc)
    return acc
