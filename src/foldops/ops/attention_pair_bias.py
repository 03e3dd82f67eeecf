"""Attention with a pair bias (AF3 / Boltz-2 ``AttentionPairBias``): the public functional.

    q:    [B, M, Nq, H, D]   k, v: [B, M, Nk, H, D]   bias: [B, H, Nq, Nk]
    mask: [B, Nk] or [B, M, Nk] or None (True = keep, over keys)
    out:  [B, M, Nq, H, D]

    out[b,m,i,h] = sum_j softmax_j(scale * q[b,m,i,h] . k[b,m,j,h] + bias[b,h,i,j]
                                   masked by mask[b,(m,)j]) * v[b,m,j,h]

M counts samples that share one pair bias (Boltz's diffusion ``multiplicity``; 1 in
the Pairformer): the bias is read once per b, never repeated M times. With Nq == Nk
this is triangle attention with I = M, and the ``triton`` and ``torch`` backends run
``foldops.ops.triangle_attention``'s. Windowed attention (Nq != Nk, as in Boltz's
atom transformer, small windows) runs on ``torch`` (the reference math in one shot)
and ``reference`` only. Rows whose keys are all masked give zeros, with zero
gradients. Backends: ``triton`` (Nq == Nk; as triangle attention's), ``torch``,
``reference``; ``FOLDOPS_BACKEND_ATTENTION_PAIR_BIAS`` overrides ``auto``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from foldops import backends
from foldops._checks import (
    as_bool_mask,
    check_aux_dtype,
    check_finite_float,
    check_positive_int,
    check_same_dtype,
    check_tensor,
)
from foldops.ops._common import needs_grad, zeros_output
from foldops.ops.triangle_attention import _torch_backend as _square_torch
from foldops.ops.triangle_attention import _triton_backend as _square_triton
from foldops.ops.triangle_attention import _triton_supports as _square_triton_supports
from foldops.reference import attention_pair_bias as _reference

OP = "attention_pair_bias"


def _torch_backend(q, k, v, bias, mask, scale, chunk_size):
    if q.shape[2] == k.shape[2]:
        return _square_torch(q, k, v, bias, mask, scale, chunk_size)
    return _reference.attention_pair_bias(q, k, v, bias, mask, scale)


def _reference_backend(q, k, v, bias, mask, scale, chunk_size):
    return _reference.attention_pair_bias(q, k, v, bias, mask, scale)


def _triton_backend(q, k, v, bias, mask, scale, chunk_size):
    return _square_triton(q, k, v, bias, mask, scale, chunk_size)


def _triton_supports(queries=None, keys=None, **ctx):
    if queries != keys:
        return f"{queries} queries and {keys} keys (the kernel needs Nq == Nk; windowed attention runs on 'torch')"
    return _square_triton_supports(**ctx)


backends.register(OP, "triton", _triton_backend, priority=100, supports=_triton_supports)
backends.register(OP, "torch", _torch_backend, priority=50)
backends.register(OP, "reference", _reference_backend, priority=0, auto=False)


def validate(q, k, v, bias, mask):
    """Check shapes, dtypes and devices; return the mask as a bool ``[B, M, Nk]`` (a view
    for a shared ``[B, Nk]`` mask) or None."""
    check_tensor("q", q, (None, None, None, None, None))
    batch, samples, queries, heads, head_dim = q.shape
    check_tensor("k", k, (batch, samples, None, heads, head_dim), device=q.device)
    keys = k.shape[2]
    check_tensor("v", v, k.shape, device=q.device)
    check_tensor("bias", bias, (batch, heads, queries, keys), device=q.device)
    check_same_dtype("q", q, k=k, v=v)
    check_aux_dtype("bias", bias, q)
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        keep = as_bool_mask("mask", mask, (batch, keys), q.device)
        return keep[:, None, :].expand(batch, samples, keys)  # a view: no copy per sample
    if isinstance(mask, torch.Tensor) and mask.dim() != 3:
        raise ValueError(
            f"mask: expected shape {(batch, keys)} or {(batch, samples, keys)}, got {tuple(mask.shape)}"
        )
    return as_bool_mask("mask", mask, (batch, samples, keys), q.device)


def attention_pair_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-head attention whose logits get a per-head pair bias; see the module doc.

    Args:
        q: ``[B, M, Nq, H, D]``, any strides.
        k, v: ``[B, M, Nk, H, D]``, q's dtype.
        bias: ``[B, H, Nq, Nk]``, q's dtype or fp32, shared by the M samples.
        mask: keep-mask over keys, ``[B, Nk]`` (shared by the samples) or ``[B, M, Nk]``;
            bool or 0/1 float; or None.
        scale: finite logit scale, default ``1/sqrt(D)``.
        chunk_size: samples per step for the ``torch`` backend at inference (Nq == Nk).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``.

    Returns:
        ``[B, M, Nq, H, D]`` in q's dtype. Softmax in fp32 (fp64 for fp64 inputs).
    """
    mask = validate(q, k, v, bias, mask)
    check_positive_int("chunk_size", chunk_size)
    scale = 1.0 / math.sqrt(max(1, q.shape[-1])) if scale is None else check_finite_float("scale", scale)
    if q.numel() == 0 or k.shape[2] == 0:  # no keys: every row fully masked
        return zeros_output(q.shape, q, (q, k, v, bias))
    impl = backends.select(
        OP, backend, device=q.device, dtype=q.dtype, head_dim=q.shape[-1], scale=float(scale),
        masked=mask is not None, queries=q.shape[2], keys=k.shape[2], n=k.shape[2],
        training=needs_grad(q, k, v, bias),
    )
    return impl.fn(q, k, v, bias, mask, float(scale), chunk_size)
