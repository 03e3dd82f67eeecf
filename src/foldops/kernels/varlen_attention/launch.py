"""Launchers of the varlen attention kernels: check, allocate, choose tiles, launch.

    varlen_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed)
        -> (out, lse)
    varlen_attention_backward(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale,
                              dropout_p, seed) -> (dq, dk, dv)

Grids are sized by max_seqlen (a Python int): (ceil(max_q / BLOCK_M), H, B) for the
forward and dQ, (ceil(max_k / BLOCK_N), H_kv, B) for dK/dV. cu_seqlens is read only by
the kernels, so nothing here waits for the device.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

from foldops.device import triton_interpret
from foldops.kernels._launch import launcher
from foldops.kernels._utils import cdiv, next_pow2, patch_interpreter_bf16
from foldops.kernels.varlen_attention import configs
from foldops.kernels.varlen_attention.backward import _bwd_delta_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel
from foldops.kernels.varlen_attention.forward import _fwd_kernel

if triton_interpret():
    patch_interpreter_bf16()

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _block_d(head_dim: int) -> int:
    return max(16, next_pow2(head_dim))


def _config(kind: str, head_dim: int, dtype: torch.dtype, dropout: bool = False) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) from the tile table."""
    if triton_interpret():
        return configs.INTERPRETER
    bm, bn, warps, stages = configs.CONFIGS[(kind, _block_d(head_dim), dtype == torch.float32)]
    if dropout and kind != "delta":
        warps = max(warps, configs.DROPOUT_MIN_WARPS)
    return bm, bn, warps, stages


def _precision(dtype: torch.dtype) -> str:
    # fp32 products in full fp32 (no TF32), as PyTorch's default matmul precision.
    return "ieee" if dtype == torch.float32 else "tf32"


def _skip_launch(t: torch.Tensor) -> bool:
    """Fake or meta tensors (torch.compile / opcheck tracing) under the interpreter: the
    allocations are all a fake implementation needs, and the interpreted kernel would run
    on them."""
    return triton_interpret() and (t.device.type == "meta" or is_fake(t))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _seed(seed: Optional[torch.Tensor], dropout_p: float, placeholder: torch.Tensor) -> torch.Tensor:
    """The seed tensor for a launch (any tensor stands in when there is no dropout)."""
    if dropout_p <= 0:
        return placeholder
    if seed is None or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != placeholder.device:
        raise ValueError(f"seed: dropout needs an int64 [1] tensor on {placeholder.device}, got "
                         f"{None if seed is None else (seed.dtype, tuple(seed.shape), seed.device)}")
    return seed


def check(q, k, v, cu_q, cu_k) -> None:
    """Shapes, dtypes and devices the kernels need (values of cu_seqlens are the op's job)."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"q, k, v: expected [total_q, H, D], [total_k, H_kv, D] x2, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v: expected one dtype of {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"q: head dim at most {MAX_HEAD_DIM}, got {q.shape[2]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k: heads {k.shape[1]} do not divide q's {q.shape[1]}")
    if cu_q.dtype != torch.int32 or cu_k.dtype != torch.int32 or cu_q.shape != cu_k.shape:
        raise TypeError("cu_seqlens_q, cu_seqlens_k: expected int32 [B+1] tensors of one shape")


def varlen_attention_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float,
                             dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None):
    """``(out [total_q, H, D] in q's dtype, lse fp32 [H, total_q])``; see the module doc.
    ``dropout_p > 0`` needs ``seed``, an int64 [1] tensor on q's device (the backward
    takes the same one)."""
    check(q, k, v, cu_q, cu_k)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    total_q, heads, head_dim = q.shape
    batch = cu_q.shape[0] - 1
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(heads, total_q, dtype=torch.float32, device=q.device)
    if _skip_launch(q):
        return out, lse
    if total_q == 0 or batch == 0 or max_q == 0 or k.shape[0] == 0 or max_k == 0:  # no attention anywhere
        return out.zero_(), lse.fill_(-math.inf)
    bm, bn, warps, stages = _config("fwd", head_dim, q.dtype, dropout_p > 0)
    bd = _block_d(head_dim)
    grid = (cdiv(max_q, bm), heads, batch)
    launcher(_fwd_kernel)[grid](
        q, k, v, out, lse, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        scale * LOG2E, head_dim, _seed(seed, dropout_p, cu_q), dropout_p, total_q, max_k,
        GROUP=heads // k.shape[1], CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, EVEN_D=bd == head_dim,
        PRECISION=_precision(q.dtype), DROPOUT=dropout_p > 0, num_warps=warps, num_stages=stages,
    )
    return out, lse


def varlen_attention_backward(do, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, causal: bool,
                              scale: float, dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None):
    """``(dq, dk, dv)`` shaped and typed as q, k, v; see the module doc."""
    check(q, k, v, cu_q, cu_k)
    q, k, v, do, out = (_last_dim_contiguous(t) for t in (q, k, v, do, out))
    total_q, heads, head_dim = q.shape
    total_k, kv_heads = k.shape[0], k.shape[1]
    batch = cu_q.shape[0] - 1
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if _skip_launch(q):
        return dq, dk, dv
    if batch == 0 or total_q == 0 or total_k == 0 or max_q == 0 or max_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    bd = _block_d(head_dim)
    even_d = bd == head_dim
    precision = _precision(q.dtype)
    group = heads // kv_heads

    bm, _, warps, stages = _config("delta", head_dim, q.dtype)
    delta = torch.empty(heads, total_q, dtype=torch.float32, device=q.device)
    launcher(_bwd_delta_kernel)[(cdiv(total_q, bm), heads)](
        out, do, delta, out.stride(0), out.stride(1), do.stride(0), do.stride(1), delta.stride(0),
        total_q, head_dim, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps, num_stages=stages,
    )
    lse = lse.contiguous()
    seed_arg = _seed(seed, dropout_p, cu_q)
    bm, bn, warps, stages = _config("dkdv", head_dim, q.dtype, dropout_p > 0)
    launcher(_bwd_dkdv_kernel)[(cdiv(max_k, bn), kv_heads, batch)](
        q, k, v, do, lse, delta, dk, dv, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
        scale * LOG2E, scale, head_dim, seed_arg, dropout_p, total_q, max_k,
        GROUP=group, CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, EVEN_D=even_d, PRECISION=precision,
        DROPOUT=dropout_p > 0, num_warps=warps, num_stages=stages,
    )
    bm, bn, warps, stages = _config("dq", head_dim, q.dtype, dropout_p > 0)
    launcher(_bwd_dq_kernel)[(cdiv(max_q, bm), heads, batch)](
        q, k, v, do, lse, delta, dq, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        scale * LOG2E, scale, head_dim, seed_arg, dropout_p, total_q, max_k,
        GROUP=group, CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, EVEN_D=even_d, PRECISION=precision,
        DROPOUT=dropout_p > 0, num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv
