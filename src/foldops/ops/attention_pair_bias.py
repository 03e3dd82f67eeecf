"""Attention with a pair bias (AF3 / Boltz-2 ``AttentionPairBias``): the public functional.

    q:    [B, M, Nq, H, D]   k, v: [B, M, Nk, H, D]   bias: [B, H, Nq, Nk]
    mask: [B, Nk] or [B, M, Nk] or None (True = keep, over keys)
    out:  [B, M, Nq, H, D]

    out[b,m,i,h] = sum_j softmax_j(scale * q[b,m,i,h] . k[b,m,j,h] + bias[b,h,i,j]
                                   masked by mask[b,(m,)j]) * v[b,m,j,h]

M counts samples that share one pair bias (Boltz's diffusion ``multiplicity``; 1 in
the Pairformer): the bias is read once per b, never repeated M times. With Nq == Nk
this is triangle attention with I = M, so it runs on every backend of
``foldops.ops.triangle_attention`` (Triton kernel included) and honours its
``FOLDOPS_BACKEND_TRIANGLE_ATTENTION`` override. Windowed attention (Nq != Nk, as in
Boltz's atom transformer, small windows) runs the PyTorch reference math.
Rows whose keys are all masked give zeros, with zero gradients.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from foldops import backends
from foldops._checks import as_bool_mask, check_positive_int, check_same_dtype, check_tensor
from foldops.ops.triangle_attention import triangle_attention as _triangle_attention
from foldops.reference import triangle_attention as _reference


def _validate_mask(mask, batch, samples, keys, device):
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        keep = as_bool_mask("mask", mask, (batch, keys), device)
        return keep[:, None, :].expand(batch, samples, keys)  # a view: no copy per sample
    if isinstance(mask, torch.Tensor) and mask.dim() != 3:
        raise ValueError(
            f"mask: expected shape {(batch, keys)} or {(batch, samples, keys)}, got {tuple(mask.shape)}"
        )
    return as_bool_mask("mask", mask, (batch, samples, keys), device)


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
        scale: logit scale, default ``1/sqrt(D)``.
        chunk_size: samples per step for the ``torch`` backend at inference.
        backend: as for ``foldops.ops.triangle_attention``.

    Returns:
        ``[B, M, Nq, H, D]`` in q's dtype. Softmax in fp32 (fp64 for fp64 inputs).
    """
    check_tensor("q", q, (None, None, None, None, None))
    batch, samples, queries, heads, head_dim = q.shape
    check_tensor("k", k, (batch, samples, None, heads, head_dim), device=q.device)
    keys = k.shape[2]
    if queries == keys:
        mask = _validate_mask(mask, batch, samples, keys, q.device)
        return _triangle_attention(q, k, v, bias, mask, scale=scale, chunk_size=chunk_size, backend=backend)

    # Windowed attention: only the PyTorch math handles Nq != Nk.
    check_tensor("v", v, k.shape, device=q.device)
    check_tensor("bias", bias, (batch, heads, queries, keys), device=q.device)
    check_same_dtype("q", q, k=k, v=v)
    if bias.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"bias: expected dtype {q.dtype} or torch.float32, got {bias.dtype}")
    check_positive_int("chunk_size", chunk_size)
    mask = _validate_mask(mask, batch, samples, keys, q.device)
    if backend is None:
        backend = backends.AUTO
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name string, got {type(backend).__name__}")
    if backend not in (backends.AUTO, "torch", "reference"):
        raise backends.BackendUnavailableError(
            f"backend: {backend!r} cannot run attention_pair_bias with {queries} queries and {keys} keys "
            "(only 'torch'/'reference' handle Nq != Nk)"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    return _reference.triangle_attention(q, k, v, bias, mask, float(scale))
