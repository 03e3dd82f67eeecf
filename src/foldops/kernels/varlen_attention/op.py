"""Registered custom ops of varlen attention and the differentiable entry point.

- ``foldops::varlen_attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale,
  dropout_p, seed) -> (out, lse)`` and ``foldops::varlen_attention_bwd(...) -> (dq, dk, dv)``:
  ``torch.library.triton_op`` (torch.compile sees the kernels; the body is also the fake
  implementation), autograd registered on the forward. Under the Triton interpreter they
  are opaque ``custom_op``s with the body as fake implementation.
- ``varlen_attention(...)``: eager calls run an ``autograd.Function`` over the launchers
  with direct Triton launches (less host time per call than the ops' dispatch, as for
  triangle attention); torch.compile, fake tensors, dispatch modes and torch.func take
  the registered ops.

lse is returned but not differentiable (as flash_attn's).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch._library.triton import set_wrap_triton_enabled
from torch.autograd.function import once_differentiable

from foldops.kernels._utils import register_op as _op
from foldops.kernels._utils import use_registered_ops as _use_registered_ops
from foldops.kernels.varlen_attention.launch import varlen_attention_backward, varlen_attention_forward


@_op("foldops::varlen_attention_fwd")
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
            scale: float, dropout_p: float, seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                    scale, dropout_p, seed)


@_op("foldops::varlen_attention_bwd")
def _bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
            max_seqlen_k: int, causal: bool, scale: float, dropout_p: float,
            seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return varlen_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, causal, scale, dropout_p, seed)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed)
    ctx.args = (max_q, max_k, causal, scale, dropout_p)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _backward_with(ctx, grad_out, backward):
    q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
    if grad_out is None:
        return None, None, None
    return backward(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.args, seed)


def _op_backward(ctx, grad_out, _grad_lse):
    dq, dk, dv = _backward_with(ctx, grad_out, torch.ops.foldops.varlen_attention_bwd)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerVarlenAttention(torch.autograd.Function):
    """The same forward and backward on the launchers, launched directly (eager only)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed):
        with set_wrap_triton_enabled(False):
            output = varlen_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed)
        _setup_context(ctx, (q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed), output)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        with set_wrap_triton_enabled(False):
            grads = _backward_with(ctx, grad_out, varlen_attention_backward)
        return *grads, None, None, None, None, None, None, None, None


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                     scale: float, return_lse: bool = False, dropout_p: float = 0.0,
                     generator: Optional[torch.Generator] = None):
    """``(out, lse or None)`` on the Triton kernels; shapes as in foldops.ops.varlen_attention.

    ``lse`` (fp32 ``[H, total_q]``) is returned when ``return_lse``; it is computed anyway
    (the backward needs it). With ``dropout_p > 0`` one Philox seed is drawn from
    ``generator`` (or the default generator of q's device), on the device: no host read.
    """
    seed = None
    if dropout_p > 0:
        device = generator.device if generator is not None else q.device
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64).to(q.device)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), bool(causal),
            float(scale), float(dropout_p), seed)
    need_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if _use_registered_ops(q):
        out, lse = torch.ops.foldops.varlen_attention_fwd(*args)
    elif need_grad:
        out, lse = _EagerVarlenAttention.apply(*args)
    else:
        with set_wrap_triton_enabled(False):
            out, lse = varlen_attention_forward(*args)
    return out, (lse if return_lse else None)
