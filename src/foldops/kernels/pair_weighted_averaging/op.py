"""Registered ops and autograd of the pair-weighted averaging kernels, and the
differentiable entry ``pair_weighted_averaging(v, logits, g, mask, msa_mask)``.

- custom ops ``foldops::pair_weighted_averaging_fwd`` / ``_bwd``
  (``torch.library.triton_op``: the body is also the fake implementation; autograd
  registered on the forward), which torch.compile traces and opcheck checks;
- under the Triton interpreter, opaque ``custom_op`` s with the same bodies as fake
  implementations (tracing cannot capture interpreted launches);
- eager calls skip the ops' dispatch (``_EagerPairWeightedAveraging``, an
  ``autograd.Function`` over the launchers, or the forward launcher alone without
  autograd): less host time, which is the op's speed at small N.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch._library.triton import set_wrap_triton_enabled
from torch.autograd.function import once_differentiable

from foldops.kernels._utils import register_op as _op
from foldops.kernels._utils import use_registered_ops as _use_registered_ops
from foldops.kernels.pair_weighted_averaging.launch import (
    backward_with_keep,
    forward_with_keep,
    pair_weighted_averaging_backward,
    pair_weighted_averaging_forward,
)


@_op("foldops::pair_weighted_averaging_fwd")
def _fwd_op(
    v: torch.Tensor,
    logits: torch.Tensor,
    g: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    msa_mask: Optional[torch.Tensor],
    allow_tf32: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return pair_weighted_averaging_forward(v, logits, g, mask, msa_mask, allow_tf32)


@_op("foldops::pair_weighted_averaging_bwd")
def _bwd_op(
    grad_out: torch.Tensor,
    v: torch.Tensor,
    logits: torch.Tensor,
    g: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    msa_mask: Optional[torch.Tensor],
    p: torch.Tensor,
    allow_tf32: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dv, dlogits, dg = pair_weighted_averaging_backward(grad_out, v, logits, g, mask, msa_mask, p, allow_tf32)
    return dv, dlogits, dg if dg is not None else v.new_empty(0)


def _setup_context(ctx, inputs, output) -> None:
    v, logits, g, mask, msa_mask, allow_tf32 = inputs
    _, p = output
    ctx.save_for_backward(v, logits, g, mask, msa_mask, p)
    ctx.allow_tf32 = allow_tf32
    ctx.mark_non_differentiable(p)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_p):
    v, logits, g, mask, msa_mask, p = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None
    dv, dlogits, dg = torch.ops.foldops.pair_weighted_averaging_bwd(
        grad_out, v, logits, g, mask, msa_mask, p, ctx.allow_tf32
    )
    return dv, dlogits, (dg if g is not None else None), None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _direct_launches():
    """Eager launches go straight to Triton, as in ``triton_op``'s own eager path: with
    ``wrap_triton`` enabled each launch is dispatched as a higher-order op, which costs
    host time per launch."""
    return set_wrap_triton_enabled(False)


class _EagerPairWeightedAveraging(torch.autograd.Function):
    """The registered ops' forward and backward, on the launchers directly.

    Eager calls with autograd take this path: torch.library's dispatch of the two
    custom ops costs host time, and at small N the GPU waits for the host
    (``benchmarks/host_path_cpu.py --op pwa``). It also keeps the value keep-mask for the
    backward instead of rebuilding it. The forward takes ``ctx`` (no
    ``setup_context``): ``apply`` then skips binding the arguments by signature."""

    @staticmethod
    def forward(ctx, v, logits, g, mask, msa_mask, allow_tf32):
        with _direct_launches():
            out, p, keep = forward_with_keep(v, logits, g, mask, msa_mask, allow_tf32)
        ctx.save_for_backward(v, g, p, keep)
        ctx.logits_dtype = logits.dtype
        ctx.allow_tf32 = allow_tf32
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        v, g, p, keep = ctx.saved_tensors
        with _direct_launches():
            dv, dlogits, dg = backward_with_keep(grad_out, v, ctx.logits_dtype, g, keep, p, ctx.allow_tf32)
        return dv, dlogits, dg, None, None, None


@torch.compiler.assume_constant_result
def _allow_tf32() -> bool:
    # torch's own switch: torch.set_float32_matmul_precision("high") allows TF32.
    return torch.get_float32_matmul_precision() != "highest"


def pair_weighted_averaging(
    v: torch.Tensor,
    logits: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    msa_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Differentiable ``sigmoid(g) * sum_j softmax_j(logits | mask) v`` on the kernels.

    Args:
        v: ``[B, S, N, H, C]`` fp16 / bf16 / fp32, any strides, C <= 64.
        logits: ``[B, H, N, N]`` in v's dtype or fp32, any strides.
        g: ``[B, S, N, H, C]`` gate before the sigmoid, v's dtype, or None (no gate).
        mask: ``[B, N, N]`` bool keep-mask over (i, j), or None.
        msa_mask: ``[B, S, N]`` bool; values of False entries count as zero. Or None.

    Returns:
        ``[B, S, N, H, C]`` contiguous, in v's dtype.
    """
    allow_tf32 = _allow_tf32()
    if _use_registered_ops(v):
        out, _ = torch.ops.foldops.pair_weighted_averaging_fwd(v, logits, g, mask, msa_mask, allow_tf32)
        return out
    if torch.is_grad_enabled() and (v.requires_grad or logits.requires_grad or (g is not None and g.requires_grad)):
        return _EagerPairWeightedAveraging.apply(v, logits, g, mask, msa_mask, allow_tf32)
    with _direct_launches():  # inference: no autograd, no saved softmax
        out, _ = pair_weighted_averaging_forward(v, logits, g, mask, msa_mask, allow_tf32)
    return out
