"""Triangle attention (and pair-biased attention): the public functional.

    q, k, v: [B, I, N, H, D]   bias: [B, H, N, N]   mask: [B, I, N] or None (True = keep)
    out:     [B, I, N, H, D]

    out[b,i,j,h] = sum_k softmax_k(scale * q[b,i,j,h] . k[b,i,k,h] + bias[b,h,j,k]
                                   masked by mask[b,i,k]) * v[b,i,k,h]

Starting node: I is the first pair index. Ending node: pass transposed views
(``q.transpose(1, 2)``, ...), no copies; backends accept any strides. Rows whose keys
are all masked, or whose logits are all -inf, give zeros, with zero gradients; a
masked key contributes nothing whatever k, v and the bias hold there (``torch`` and
``reference``). Empty inputs give empty (or zero) outputs on every backend.

Backends: ``triton`` (CUDA cc >= 8.0, fp16/bf16/fp32, head dim up to 128; other than
16/32/64/128 zero-padded to the next),
``torch`` (memory-bounded PyTorch: logits are built ``chunk_size`` rows of I at a time;
O(chunk * H * N^2) extra memory at inference), ``reference`` (one shot, O(B I H N^2)).
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
from foldops.budget import rows_per_chunk
from foldops.device import kernel_support
from foldops.ops._common import needs_grad, zeros_output
from foldops.reference import triangle_attention as _reference

OP = "triangle_attention"
KERNEL_MAX_HEAD_DIM = 128  # 16/32/64/128 run as is, other head dims zero-padded to those


def _torch_backend(q, k, v, bias, mask, scale, chunk_size):
    batch, rows, n, heads, _ = q.shape
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias)):
        chunk_size = rows  # one graph: chunking bounds nothing while autograd keeps every chunk
    else:  # a chunk holds [B, c, H, N, N] logits and additive mask (counted in fp32)
        chunk_size = rows_per_chunk(q.device, batch * heads * n * n * 4, rows, chunk_size)
    head_dim = q.shape[-1]
    bias = bias.to(q.dtype)[:, None]  # [B, 1, H, N, N]
    outs = []
    for start in range(0, rows, chunk_size):
        stop = min(rows, start + chunk_size)
        count = stop - start
        # SDPA gets 4-D [B*c, H, N, D]: with 5-D inputs its CPU path fell back to the
        # generic math kernel (81 ms vs 23 ms per 16-row chunk at N=256).
        qc, kc, vc = (
            t[:, start:stop].transpose(2, 3).reshape(batch * count, heads, n, head_dim) for t in (q, k, v)
        )
        keep = None
        if mask is None:
            attn_bias = bias[:, 0] if batch == 1 else bias.expand(batch, count, heads, n, n).flatten(0, 1)
        else:
            keep = mask[:, start:stop]  # [B, c, N]
            # A masked key contributes nothing whatever k, v and the bias hold there: its
            # k and v are zeroed and its bias replaced (not added to), so NaN/inf cannot
            # leak. Finite (half the dtype's range): SDPA never sees an all -inf row;
            # such rows are zeroed below.
            dead = ~keep.reshape(batch * count, 1, n, 1)
            kc, vc = kc.masked_fill(dead, 0), vc.masked_fill(dead, 0)
            masked = torch.finfo(q.dtype).min / 2
            attn_bias = torch.where(keep[:, :, None, None, :], bias, masked).flatten(0, 1)  # [B*c, H, N, N]
        out = torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, attn_mask=attn_bias, scale=scale)
        out = out.view(batch, count, heads, n, head_dim).transpose(2, 3)  # [B, c, N, H, D]
        if keep is not None:
            out = out * keep.any(-1)[:, :, None, None, None].to(out.dtype)
        outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _reference_backend(q, k, v, bias, mask, scale, chunk_size):
    return _reference.triangle_attention(q, k, v, bias, mask, scale)


def _triton_backend(q, k, v, bias, mask, scale, chunk_size):
    from foldops.kernels.triangle_attention import triangle_attention as kernel

    return kernel(q, k, v, bias, mask, scale)


def _triton_supports(device, dtype, head_dim, explicit, scale=1.0, masked=False, **_):
    reason = kernel_support(device, explicit)
    if reason is not None:
        return reason
    if not math.isfinite(scale) or (masked and scale == 0.0):
        return f"scale {scale} (kernel needs a finite scale, nonzero with a mask)"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (kernel supports fp16, bf16, fp32)"
    if head_dim > KERNEL_MAX_HEAD_DIM:
        return f"head dim {head_dim} (kernel supports up to {KERNEL_MAX_HEAD_DIM})"
    try:
        import foldops.kernels.triangle_attention  # noqa: F401 (a statement, which Dynamo traces; import_module breaks the graph)
    except ImportError as exc:
        return f"kernel module unavailable: {exc}"
    return None


backends.register(OP, "triton", _triton_backend, priority=100, supports=_triton_supports)
backends.register(OP, "torch", _torch_backend, priority=50)
backends.register(OP, "reference", _reference_backend, priority=0, auto=False)


def validate(q, k, v, bias, mask):
    """Check shapes, dtypes and devices; return the mask as bool (or None)."""
    check_tensor("q", q, (None, None, None, None, None))
    batch, rows, n, heads, head_dim = q.shape
    check_tensor("k", k, q.shape, device=q.device)
    check_tensor("v", v, q.shape, device=q.device)
    check_tensor("bias", bias, (batch, heads, n, n), device=q.device)
    check_same_dtype("q", q, k=k, v=v)
    check_aux_dtype("bias", bias, q)
    return as_bool_mask("mask", mask, (batch, rows, n), q.device)


def triangle_attention(
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
    """Attention over N keys with a pair bias shared by all I rows; see the module doc.

    Args:
        q, k, v: ``[B, I, N, H, D]``, any strides.
        bias: ``[B, H, N, N]``, q's dtype or fp32, any strides.
        mask: ``[B, I, N]`` keep-mask over keys (bool or 0/1 float), or None.
        scale: finite logit scale, default ``1/sqrt(D)``.
        chunk_size: rows of I per step for the ``torch`` backend at inference
            (default: the chunk's logits within ``foldops.budget``'s budget).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``.

    Returns:
        ``[B, I, N, H, D]`` in q's dtype.
    """
    mask = validate(q, k, v, bias, mask)
    check_positive_int("chunk_size", chunk_size)
    scale = 1.0 / math.sqrt(max(1, q.shape[-1])) if scale is None else check_finite_float("scale", scale)
    if q.numel() == 0:
        return zeros_output(q.shape, q, (q, k, v, bias))
    impl = backends.select(OP, backend, device=q.device, dtype=q.dtype, head_dim=q.shape[-1],
                           scale=float(scale), masked=mask is not None, n=q.shape[2],
                           training=needs_grad(q, k, v, bias))
    return impl.fn(q, k, v, bias, mask, float(scale), chunk_size)
