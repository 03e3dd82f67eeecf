"""MSA pair-weighted averaging (Boltz-2 / AF3 MSA module): the public functional.

    v: [B, S, N, H, D]   logits: [B, H, N, N]   mask: [B, N, N] or None (True = keep)
    out: [B, S, N, H, D]

    out[b,s,i,h] = sum_j softmax_j(logits[b,h,i,j] masked by mask[b,i,j]) * v[b,s,j,h]

One softmax over j, in fp32 whatever the input dtype, is shared by every MSA row s;
the weighted sum runs in v's dtype and the output is in v's dtype. Rows i whose keys
are all masked, or whose logits are all -inf, give zeros, with zero gradients; a key
masked for every row contributes nothing whatever v holds there. Empty in, empty out. ``logits`` may have any strides:
layers pass a permuted view of their ``[B, N, N, H]`` pair projection.

Backends:

- ``torch``: PyTorch matmuls batched over (b, h). At inference it works on groups of
  heads and chunks of MSA rows, so besides the output it holds O(B h N^2) softmax
  weights and O(B s N h D) of v and output copies per step (h heads, s rows per step,
  each within ``foldops.budget``'s chunk budget); with autograd it runs in one shot (O(B H N^2 + B S N H D)
  saved for backward), since chunking bounds nothing while autograd keeps every chunk.
- ``reference``: one shot, O(B H N^2 + B S N H D); never picked by ``auto``.
"""

from __future__ import annotations

from typing import Optional

import torch

from foldops import backends
from foldops._checks import as_bool_mask, check_aux_dtype, check_positive_int, check_tensor
from foldops.budget import rows_per_chunk
from foldops.device import fp32_region
from foldops.ops._common import zeros_output
from foldops.reference import pair_weighted_averaging as _reference

OP = "pair_weighted_averaging"


def softmax_weights(logits: torch.Tensor, mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``[B, h, N, N]`` softmax over the last dim in ``dtype``; fully masked rows are zero.

    ``mask`` is a bool ``[B, N, N]`` keep-mask or None. Masked keys get exactly zero
    weight whatever their logit; rows with no kept key, or whose logits are all
    ``-inf``, are softmaxed as zeros, then zeroed, so that no -inf row (and no NaN,
    forward or backward) ever appears.
    """
    logits = logits.to(dtype)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None], float("-inf"))
    dead = logits.amax(dim=-1, keepdim=True) == float("-inf")
    return torch.softmax(logits.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def _zero_dead_keys(v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """v with the keys j that every query row i masks zeroed: such a key contributes
    nothing, even NaN/inf (a key masked for some rows only meets weight 0 in a matmul,
    which cannot stop a NaN there)."""
    if mask is None:
        return v
    return v.masked_fill(~mask.any(dim=1)[:, None, :, None, None], 0)


def weighted_sum(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``out[b,s,i,h,:] = sum_j weights[b,h,i,j] v[b,s,j,h,:]``, one matmul batched over (b, h).

    ``weights`` ``[B, H, N, N]`` (already normalised, v's dtype), ``v`` ``[B, S, N, H, D]``
    any strides; returns a ``[B, S, N, H, D]`` view of a ``[B, H, N, S, D]`` buffer. For
    callers that apply one set of weights to several blocks of MSA rows.
    """
    batch, rows, n, heads, dim = v.shape
    v_t = v.permute(0, 3, 2, 1, 4).reshape(batch, heads, n, rows * dim)  # [B, H, N_j, (s,d)]
    out = torch.matmul(weights, v_t).view(batch, heads, n, rows, dim)
    return out.permute(0, 3, 2, 1, 4)  # [B, S, N_i, H, D] view


def _torch_backend(v, logits, mask, chunk_size):
    batch, rows, n, heads, dim = v.shape
    softmax_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    with fp32_region(v):
        if torch.is_grad_enabled() and (v.requires_grad or logits.requires_grad):
            weights = softmax_weights(logits, mask, softmax_dtype).to(v.dtype)
            return weighted_sum(weights, _zero_dead_keys(v, mask)).contiguous()
        # Heads per group: a group's fp32 weights [B, h, N, N] stay within the budget;
        # MSA rows per step: that step's v and output copies [B, s, N, h, D] too.
        group = rows_per_chunk(v.device, batch * n * n * 4, heads)
        chunk_size = rows_per_chunk(v.device, batch * n * group * dim * 4, rows, chunk_size)
        out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        for h0 in range(0, heads, group):
            h1 = min(heads, h0 + group)
            weights = softmax_weights(logits[:, h0:h1], mask, softmax_dtype).to(v.dtype)
            for s0 in range(0, rows, chunk_size):
                s1 = min(rows, s0 + chunk_size)
                out[:, s0:s1, :, h0:h1] = weighted_sum(weights, _zero_dead_keys(v[:, s0:s1, :, h0:h1], mask))
        return out


def _reference_backend(v, logits, mask, chunk_size):
    return _reference.pair_weighted_averaging(v, logits, mask)


backends.register(OP, "torch", _torch_backend, priority=50)
backends.register(OP, "reference", _reference_backend, priority=0, auto=False)


def validate(v, logits, mask):
    """Check shapes, dtypes and devices; return the mask as bool (or None)."""
    check_tensor("v", v, (None, None, None, None, None))
    batch, _, n, heads, _ = v.shape
    check_tensor("logits", logits, (batch, heads, n, n), device=v.device)
    check_aux_dtype("logits", logits, v)
    return as_bool_mask("mask", mask, (batch, n, n), v.device)


def pair_weighted_averaging(
    v: torch.Tensor,
    logits: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Average MSA values over j with pair-derived softmax weights; see the module doc.

    Args:
        v: ``[B, S, N, H, D]`` projected MSA values, any strides.
        logits: ``[B, H, N, N]`` pair logits (softmax over the last dim), v's dtype or
            fp32, any strides.
        mask: ``[B, N, N]`` keep-mask over (i, j) (bool or 0/1 float), or None.
        chunk_size: MSA rows per step of the ``torch`` backend at inference
            (default: v and output copies within ``foldops.budget``'s chunk budget).
        backend: ``"auto"``, ``"torch"`` or ``"reference"``.

    Returns:
        ``[B, S, N, H, D]`` in v's dtype.
    """
    mask = validate(v, logits, mask)
    check_positive_int("chunk_size", chunk_size)
    if v.numel() == 0:
        return zeros_output(v.shape, v, (v, logits))
    impl = backends.select(OP, backend, device=v.device, dtype=v.dtype)
    return impl.fn(v, logits, mask, chunk_size)


__all__ = ["pair_weighted_averaging", "softmax_weights", "weighted_sum"]
