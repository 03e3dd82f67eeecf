"""Registered ops and autograd of the triangle attention kernels, and the public entry
``triangle_attention(q, k, v, bias, mask, scale)``.

- custom ops ``foldops::triangle_attention_fwd`` / ``foldops::triangle_attention_bwd``
  (``torch.library.triton_op``: the body is also the fake implementation; autograd
  registered on the forward), which torch.compile traces;
- ``triangle_attention``: the differentiable entry point. Eager calls skip the ops'
  dispatch (``_EagerTriangleAttention``, an ``autograd.Function`` over the launchers,
  less host time) and, without autograd, the lse.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch._library.triton import set_wrap_triton_enabled
from torch.autograd.function import once_differentiable

from foldops.kernels._utils import register_op as _op
from foldops.kernels._utils import use_registered_ops as _use_registered_ops
from foldops.kernels.triangle_attention.configs import HEAD_DIMS
from foldops.kernels.triangle_attention.launch import (
    triangle_attention_backward,
    triangle_attention_forward,
)


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
    ``wrap_triton`` enabled each launch is dispatched as a higher-order op, which costs
    host time per launch (see ``benchmarks/tools/triangle_attention_host.py``)."""
    return set_wrap_triton_enabled(False)


class _EagerTriangleAttention(torch.autograd.Function):
    """The same forward and backward, on the launchers directly.

    Eager calls take this path: torch.library's dispatch of the two custom ops costs
    host time, and up to N = 512 the GPU waits for the host
    (``benchmarks/tools/triangle_attention_host.py``). torch.compile, fake tensors, dispatch
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
    """Differentiable triangle attention on the Triton kernels.

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
