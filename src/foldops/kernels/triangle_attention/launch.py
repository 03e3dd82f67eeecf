"""Launchers of the triangle attention kernels: ``triangle_attention_forward`` and
``triangle_attention_backward`` check the inputs, allocate outputs and scratch, choose
tiles (``configs``), the dBias row splits and the per-device switches, and launch.

    q, k, v, out: [B, I, N, H, D] (any strides)   bias: [B, H, N, N] (any strides)
    mask: [B, I, N] bool keep-mask over keys, or None
    lse: [B, I, H, N] base-2 log-sum-exp, fp32 (fp64 for fp32 inputs)

Memory, beyond inputs and outputs: the forward saves lse, O(B I H N), and with a mask
holds the key-mask bias, O(B I N), for its launch. The backward allocates only its
gradients: delta = rowsum(dO*O), a transposed copy of the bias, the key-mask bias and
the partial bias gradients live in dq's, dv's and dk's storage until those are written
(a separate buffer only when I << N and dq is too small).

Tests and benchmarks replace ``launcher`` and ``_config`` here and
``dbias_splits.bias_splits`` / ``num_sms``: the launchers look them up at each call.
Choices that depend only on shapes, dtypes and the device (tiles, dBias splits) are
cached per such key (``host.py``); after changing entries of ``configs`` call
``clear_caches()``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

from foldops.device import compute_capability, is_rocm, triton_interpret
from foldops.kernels._launch import launcher
from foldops.kernels.triangle_attention import configs
from foldops.kernels.triangle_attention.backward import _bwd_delta_kernel, _bwd_dkdv_kernel
from foldops.kernels.triangle_attention.backward_dq import _bwd_dq_kernel
from foldops.kernels.triangle_attention.backward_dbias import _bwd_dbias_kernel, _sum_splits_kernel
from foldops.kernels.triangle_attention.configs import DTYPES, HEAD_DIMS
from foldops.kernels._utils import cdiv, next_pow2
from foldops.kernels.triangle_attention.host import _CACHE, _smem_bytes, _split_plan
from foldops.kernels.triangle_attention.host import clear_caches  # noqa: F401  (re-exported)
from foldops.kernels.triangle_attention.forward import _fwd_kernel


def _interpreting() -> bool:
    """Whether kernels run under the Triton interpreter (small tiles, no GPU switches)."""
    return triton_interpret()


def _mma_wait(kind: str, t: torch.Tensor, has_mask: bool, d: int) -> bool:
    """MMA_WAIT for a launch on ``t``'s device (an NVIDIA sm_90 GPU only).

    Never while torch.compile traces the launcher (fake tensors): Inductor's mutation
    analysis cannot read inline asm and then assumes that every input is mutated, which
    gave wrong results in the layer compile tests on the H100. Compiled models therefore
    keep the serialised kernels.
    """
    if _interpreting() or t.device.type != "cuda" or is_rocm():
        return False
    if torch.compiler.is_compiling() or is_fake(t):
        return False
    if not configs.MMA_WAIT[kind] or (kind, has_mask, d) in configs.MMA_WAIT_SKIP:
        return False
    return compute_capability(t.device)[0] == 9


def _register_cap(kind: str, t: torch.Tensor, has_mask: bool, d: int, warps: int, even: bool) -> dict:
    """``maxnreg`` of a masked 16-bit launch on an NVIDIA GPU (``configs.MASKED_MAXNREG``):
    the kernels' exact-mask reruns (``_fwd_exact``, ...) otherwise let ptxas give some
    kernels a register count one residency step up. Not while torch.compile traces
    (launch options beyond warps and stages are not passed through there)."""
    if not has_mask or t.dtype == torch.float32 or _interpreting() or t.device.type != "cuda" or is_rocm():
        return {}
    if torch.compiler.is_compiling() or is_fake(t):
        return {}
    cap = configs.MASKED_MAXNREG.get((kind, d, warps, even))
    return {} if cap is None else {"maxnreg": cap}


def _config(kind: str, n, d: int, dtype: torch.dtype, bias_dtype: Optional[torch.dtype] = None,
            allow_tf32: bool = False) -> Tuple[int, int, int, int]:
    """(BLOCK_J, BLOCK_K, num_warps, num_stages), plain ints even for symbolic N.
    ``allow_tf32``: fp32 products may run on the tensor cores (the fp32 tiles, tuned for
    the FMA units, are then not used). Cached per key for integer N."""
    if not isinstance(n, int):
        return _choose_config(kind, n, d, dtype, bias_dtype, allow_tf32)
    key = ("config", kind, n, d, dtype, bias_dtype, allow_tf32, _interpreting())
    config = _CACHE.get(key)
    if config is None:
        config = _CACHE[key] = _choose_config(kind, n, d, dtype, bias_dtype, allow_tf32)
    return config


def _choose_config(kind: str, n, d: int, dtype: torch.dtype, bias_dtype: Optional[torch.dtype],
                   allow_tf32: bool) -> Tuple[int, int, int, int]:
    if _interpreting():
        return 16, 16, 1, 1  # small tiles: multi-block loops at small N, fast interpretation
    fp32_tiles = dtype == torch.float32 and not allow_tf32 and (kind, d, True) in configs.CONFIGS
    key = (kind, d, fp32_tiles)
    # Symbolic N (torch.compile with dynamic shapes) and fp32 with TF32 take the general
    # tiles (the small-N ones are tuned without TF32).
    small = isinstance(n, int) and n <= 512 and (dtype != torch.float32 or fp32_tiles)
    table = configs.CONFIGS_SMALL_N if small and key in configs.CONFIGS_SMALL_N else configs.CONFIGS
    bj, bk, warps, stages = table[key]
    if dtype == torch.float32 and not fp32_tiles:  # fp32 operands take twice the registers and shared memory
        bj, bk, stages = min(bj, 64), min(bk, 64 if d <= 32 else 32), min(stages, 2)
    if n < 256:  # small N: smaller tiles for more programs and less padding
        cap = max(16, next_pow2(int(n)))
        bj, bk = min(bj, cap), min(bk, cap)
    e = dtype.itemsize
    be = (bias_dtype or dtype).itemsize
    while _smem_bytes(kind, bj, bk, stages, d, e, be) > configs.SMEM_BUDGET:
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
    per logit (see benchmarks/tools/triangle_attention_sass.py --layout start). Rows whose stride
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


def _key_mask_bias(mask: torch.Tensor, dtype: torch.dtype, scale: float,
                   storage: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``mask`` [B, I, N] as a bias in ``dtype`` for ``_add_key_mask``, [B, I, N_pad]: 0
    for kept keys, for masked ones the infinity that ``scale`` turns into -inf, rows
    padded with it to a multiple of ``configs.MASK_ROW_ALIGN``. O(B I N), 1/(H D) of q's size;
    in ``storage``'s bytes (an output not yet written) if they suffice.

    The kernels read the padding, so they get the whole padded tensor, never a
    ``[..., :N]`` view of it: torch.compile may hand a kernel a dense copy of a view,
    without the padding (the layer compile tests gave wrong outputs that way)."""
    batch, rows, n = mask.shape
    shape = (batch, rows, -(-n // configs.MASK_ROW_ALIGN) * configs.MASK_ROW_ALIGN)
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
    if t.dtype != torch.float32 or _interpreting() or t.device.type != "cuda" or is_rocm():
        return "ieee"
    return "tf32" if compute_capability(t.device)[0] >= 8 else "ieee"


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
    assert configs.MASK_ROW_ALIGN % bk == 0, "the key-mask rows must cover every key block"
    mask_t, mask_strides, has_mask = _mask_args(None if mask is None else _key_mask_bias(mask, q.dtype, scale), q)
    grid = (cdiv(n, bj), rows, batch * heads)
    launcher(_fwd_kernel)[grid](
        q, k, v, bias, mask_t, out, lse if need_lse else out,
        *q.stride(), *k.stride(), *v.stride(), *bias.stride(), *mask_strides, *out.stride(),
        rows, n, heads, scale,
        HAS_MASK=has_mask, EVEN_N=bool(n % bj == 0 and n % bk == 0), D=d,
        BLOCK_J=bj, BLOCK_K=bk, PRECISION=_precision(q.dtype, allow_tf32), PRECISE=_precise(q.dtype),
        MMA_WAIT=_mma_wait("fwd", q, has_mask, d), MASK_PRECISION=_mask_precision(q), STORE_LSE=need_lse,
        num_warps=warps, num_stages=stages,
        **_register_cap("fwd", q, has_mask, d, warps, bool(n % bj == 0 and n % bk == 0)),
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
        assert configs.MASK_ROW_ALIGN % dbias_cfg[1] == 0, "the key-mask rows must cover every key block"
        # The mask as a bias, in dv's not yet written storage.
        dbias_mask = _mask_args(None if mask is None else _key_mask_bias(mask, q.dtype, scale, dv_flat), q)
        room = dk_flat.numel() * dk_flat.element_size() // (4 * batch * heads * n * n)
        splits, rows_per_split = _split_plan(batch, rows, n, heads, d, q, dbias_cfg, room)
        if splits == 1:
            target, target_strides = dbias, (0, *dbias.stride())
        else:
            target = _scratch(dk_flat, (splits, batch, heads, n, n))
            target_strides = target.stride()

    # fp32 without TF32: delta rounds as the dP products (_rowdot_fma).
    fma_chain = q.dtype == torch.float32 and precision == "ieee"
    bh = min(next_pow2(int(heads)), max(1, 256 // d))  # rows of up to 256 elements
    bj = min(max(16, 8192 // (bh * d)), max(16, next_pow2(int(n))))  # 8K-element tiles
    launcher(_bwd_delta_kernel)[(cdiv(n, bj), rows, batch * cdiv(heads, bh))](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), rows, n, heads,
        D=d, BLOCK_J=bj, BLOCK_H=bh, FMA_CHAIN=fma_chain, num_warps=4,
    )

    if need_dbias:
        bj, bk, warps, stages = dbias_cfg
        launcher(_bwd_dbias_kernel)[(cdiv(n, bj), cdiv(n, bk), splits * batch * heads)](
            q, k, v, bias_rows, dbias_mask[0], grad_out, lse, delta, target,
            *q.stride(), *k.stride(), *v.stride(), *bias_rows.stride(), *dbias_mask[1],
            *grad_out.stride(), *target_strides,
            rows, n, heads, batch * heads, scale, rows_per_split,
            HAS_MASK=has_mask, EVEN_N=even(bj, bk), D=d,
            BLOCK_J=bj, BLOCK_K=bk, PRECISION=precision, PRECISE=precise,
            MASK_PRECISION=_mask_precision(q), num_warps=warps, num_stages=stages,
            **_register_cap("dbias", q, has_mask, d, warps, even(bj, bk)),
        )
        if splits > 1:
            numel = batch * heads * n * n
            launcher(_sum_splits_kernel)[(cdiv(numel, 1024),)](
                target, dbias, splits, numel, BLOCK=1024, num_warps=4,
            )

    # bias_kj[b, h, k, j] = bias[b, h, j, k]: the dK/dV tiles are [keys, queries], and
    # loading them laid out that way saves a shuffle per logit. It stays in the bias's
    # dtype: the pass is bound by L2 traffic, which an fp32 copy would mostly be.
    bias_kj.copy_(bias.transpose(2, 3))
    bias_t = bias_kj.transpose(2, 3)
    bj, bk, warps, stages = _config("dkdv", n, d, q.dtype, bias.dtype, allow_tf32)
    launcher(_bwd_dkdv_kernel)[(cdiv(n, bk), rows, batch * heads)](
        q, k, v, bias_t, mask_t, grad_out, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *bias_t.stride(), *mask_strides,
        *grad_out.stride(), *dk.stride(), *dv.stride(),
        rows, n, heads, scale,
        HAS_MASK=has_mask, EVEN_N=even(bj, bk), D=d,
        BLOCK_J=bj, BLOCK_K=bk, PRECISION=precision, PRECISE=precise,
        MMA_WAIT=_mma_wait("dkdv", q, has_mask, d), num_warps=warps, num_stages=stages,
    )

    bj, bk, warps, stages = _config("dq", n, d, q.dtype, bias.dtype, allow_tf32)
    launcher(_bwd_dq_kernel)[(cdiv(n, bj), rows, batch * heads)](
        q, k, v, bias_rows, mask_t, out, grad_out, lse, dq,
        *q.stride(), *k.stride(), *v.stride(), *bias_rows.stride(), *mask_strides, *out.stride(),
        *grad_out.stride(), *dq.stride(),
        rows, n, heads, scale,
        HAS_MASK=has_mask, EVEN_N=even(bj, bk), D=d,
        BLOCK_J=bj, BLOCK_K=bk, PRECISION=precision, PRECISE=precise,
        MMA_WAIT=_mma_wait("dq", q, has_mask, d), FMA_CHAIN=fma_chain, num_warps=warps, num_stages=stages,
        **_register_cap("dq", q, has_mask, d, warps, even(bj, bk)),
    )
    return dq, dk, dv, dbias
