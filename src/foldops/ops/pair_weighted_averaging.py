"""MSA pair-weighted averaging (Boltz-2 / AF3 MSA module): the public functional.

    v, gate: [B, S, N, H, D]   logits: [B, H, N, N]   mask: [B, N, N] or None (True = keep)
    msa_mask: [B, S, N] or None (True = keep)   out: [B, S, N, H, D]

    out[b,s,i,h] = sigmoid(gate[b,s,i,h])
                   * sum_j softmax_j(logits[b,h,i,j] masked by mask[b,i,j]) * msa_mask[b,s,j] * v[b,s,j,h]

(no gate factor when ``gate`` is None; values of padded MSA rows, msa_mask False,
count as zero). ``pair_weighted_averaging_core(v, b, g, mask)`` is the same with the
bias laid out ``[B, N, N, H]`` (the Ligo kernel's API).

One softmax over j, in fp32 whatever the input dtype, is shared by every MSA row s;
the weighted sum runs in v's dtype and the output is in v's dtype. Rows i whose keys
are all masked, or whose logits are all -inf, give zeros, with zero gradients; a key
masked for every row contributes nothing whatever v holds there. Empty in, empty out. ``logits`` may have any strides:
layers pass a permuted view of their ``[B, N, N, H]`` pair projection.

Backends:

- ``triton`` (CUDA cc >= 8.0, fp16/bf16/fp32, head dim up to 64): one kernel forms the
  weighted sum as a tensor-core product per head, W [N_i, N_j] @ V [N_j, S * D], with
  the gate in its epilogue; the fp32 softmax W is computed once per (b, h) and shared
  by all MSA rows (nothing of size [S, N, N] exists). Backward: dg and dO' in one pass,
  dv = W^T dO', dW = dO' V^T over (s, d), deterministic. Memory O(B H N^2 + B S N H D)
  in both directions (one S N H D buffer for dO' in backward, with a gate).
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
from foldops._checks import as_bool_mask, check_aux_dtype, check_positive_int, check_same_dtype, check_tensor
from foldops.budget import rows_per_chunk
from foldops.device import fp32_region, kernel_support
from foldops.ops._common import needs_grad, zeros_output
from foldops.reference import pair_weighted_averaging as _reference

OP = "pair_weighted_averaging"
KERNEL_MAX_HEAD_DIM = 64  # foldops.kernels.pair_weighted_averaging.configs.MAX_HEAD_DIM (not imported: lazy)


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


def _zero_dead_keys(v: torch.Tensor, mask: Optional[torch.Tensor], msa_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """v with the keys j that every query row i masks zeroed: such a key contributes
    nothing, even NaN/inf (a key masked for some rows only meets weight 0 in a matmul,
    which cannot stop a NaN there); and with the values of padded MSA rows zeroed."""
    if mask is not None:
        v = v.masked_fill(~mask.any(dim=1)[:, None, :, None, None], 0)
    if msa_mask is not None:
        v = v.masked_fill(~msa_mask[..., None, None], 0)
    return v


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


def _torch_backend(v, logits, mask, gate, msa_mask, chunk_size):
    batch, rows, n, heads, dim = v.shape
    softmax_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    with fp32_region(v):
        if torch.is_grad_enabled() and (v.requires_grad or logits.requires_grad
                                        or (gate is not None and gate.requires_grad)):
            weights = softmax_weights(logits, mask, softmax_dtype).to(v.dtype)
            out = weighted_sum(weights, _zero_dead_keys(v, mask, msa_mask))
            return out.contiguous() if gate is None else torch.sigmoid(gate) * out
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
                chunk_msa = None if msa_mask is None else msa_mask[:, s0:s1]
                block = weighted_sum(weights, _zero_dead_keys(v[:, s0:s1, :, h0:h1], mask, chunk_msa))
                if gate is not None:
                    block = block.mul_(gate[:, s0:s1, :, h0:h1].sigmoid())
                out[:, s0:s1, :, h0:h1] = block
        return out


def _reference_backend(v, logits, mask, gate, msa_mask, chunk_size):
    return _reference.pair_weighted_averaging(v, logits, mask, gate, msa_mask)


def _triton_backend(v, logits, mask, gate, msa_mask, chunk_size):
    from foldops.kernels.pair_weighted_averaging import pair_weighted_averaging as kernel

    return kernel(v, logits, gate, mask, msa_mask)


def _triton_supports(device, dtype, head_dim=1, explicit=True, **_):
    reason = kernel_support(device, explicit)
    if reason is not None:
        return reason
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (kernel supports fp16, bf16, fp32)"
    if head_dim > KERNEL_MAX_HEAD_DIM:
        return f"head dim {head_dim} (kernel supports up to {KERNEL_MAX_HEAD_DIM})"
    try:
        import foldops.kernels.pair_weighted_averaging  # noqa: F401 (a statement, which Dynamo traces; import_module breaks the graph)
    except ImportError as exc:
        return f"kernel module unavailable: {exc}"
    return None


backends.register(OP, "triton", _triton_backend, priority=100, supports=_triton_supports)
backends.register(OP, "torch", _torch_backend, priority=50)
backends.register(OP, "reference", _reference_backend, priority=0, auto=False)


def validate(v, logits, mask, gate=None, msa_mask=None):
    """Check shapes, dtypes and devices; return the masks as bool (or None)."""
    check_tensor("v", v, (None, None, None, None, None))
    batch, rows, n, heads, _ = v.shape
    check_tensor("logits", logits, (batch, heads, n, n), device=v.device)
    check_aux_dtype("logits", logits, v)
    if gate is not None:
        check_tensor("gate", gate, tuple(v.shape), device=v.device)
        check_same_dtype("v", v, gate=gate)
    msa_mask = as_bool_mask("msa_mask", msa_mask, (batch, rows, n), v.device)
    return as_bool_mask("mask", mask, (batch, n, n), v.device), msa_mask


def pair_weighted_averaging(
    v: torch.Tensor,
    logits: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    gate: Optional[torch.Tensor] = None,
    msa_mask: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Average MSA values over j with pair-derived softmax weights; see the module doc.

    Args:
        v: ``[B, S, N, H, D]`` projected MSA values, any strides.
        logits: ``[B, H, N, N]`` pair logits (softmax over the last dim), v's dtype or
            fp32, any strides.
        mask: ``[B, N, N]`` keep-mask over (i, j) (bool or 0/1 float), or None.
        gate: ``[B, S, N, H, D]`` gate *before* the sigmoid (v's dtype, any strides):
            the output is ``sigmoid(gate) * average``. None: no gate.
        msa_mask: ``[B, S, N]`` keep-mask of MSA entries (bool or 0/1 float); values
            of padded entries count as zero. None: all kept.
        chunk_size: MSA rows per step of the ``torch`` backend at inference
            (default: v and output copies within ``foldops.budget``'s chunk budget).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``.

    Returns:
        ``[B, S, N, H, D]`` in v's dtype.
    """
    mask, msa_mask = validate(v, logits, mask, gate, msa_mask)
    check_positive_int("chunk_size", chunk_size)
    if v.numel() == 0:
        return zeros_output(v.shape, v, (v, logits, gate))
    impl = backends.select(OP, backend, device=v.device, dtype=v.dtype, head_dim=v.shape[-1], n=v.shape[2],
                           training=needs_grad(v, logits, gate))
    return impl.fn(v, logits, mask, gate, msa_mask, chunk_size)


def pair_weighted_averaging_core(
    v: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    msa_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The core of AF3's MSA pair-weighted averaging, the Ligo kernel's API:

        out[b,s,i,h,c] = sigmoid(g[b,s,i,h,c]) * sum_j softmax_j(b[b,i,j,h]) v[b,s,j,h,c]

    Args:
        v: ``[B, S, N, H, C]`` values (MSA projected per head), any strides.
        b: ``[B, N, N, H]`` pair bias (logits), softmax over j (axis 2); v's dtype or fp32.
        g: ``[B, S, N, H, C]`` gate logits, *before* the sigmoid (the sigmoid is applied
            here, in fp32), v's dtype.
        mask: ``[B, N, N]`` pair keep-mask over (i, j), or ``[B, N]`` residue keep-mask
            (pair (i, j) kept when both are), bool or 0/1 float; None keeps all. Rows i
            with no kept key give zeros and zero gradients.
        msa_mask: ``[B, S, N]`` keep-mask of MSA entries; padded values count as zero.
        backend: as for ``pair_weighted_averaging``.

    Returns:
        ``[B, S, N, H, C]`` in v's dtype, differentiable in v, b and g.

    Example::

        >>> import torch
        >>> from foldops.ops import pair_weighted_averaging_core
        >>> B, S, N, H, C = 1, 4, 16, 8, 32
        >>> v, g = torch.randn(B, S, N, H, C), torch.randn(B, S, N, H, C)
        >>> bias = torch.randn(B, N, N, H, requires_grad=True)
        >>> out = pair_weighted_averaging_core(v, bias, g, torch.ones(B, N, dtype=torch.bool))
        >>> out.shape
        torch.Size([1, 4, 16, 8, 32])
        >>> out.sum().backward(); bias.grad.shape
        torch.Size([1, 16, 16, 8])
    """
    check_tensor("v", v, (None, None, None, None, None))
    batch, _, n, heads, _ = v.shape
    check_tensor("b", b, (batch, n, n, heads), device=v.device)
    check_tensor("g", g, tuple(v.shape), device=v.device)
    if mask is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
        residues = as_bool_mask("mask", mask, (batch, n), v.device)
        mask = residues[:, :, None] & residues[:, None, :]
    return pair_weighted_averaging(v, b.permute(0, 3, 1, 2), mask, gate=g, msa_mask=msa_mask, backend=backend)


__all__ = ["pair_weighted_averaging", "pair_weighted_averaging_core", "softmax_weights", "weighted_sum"]
