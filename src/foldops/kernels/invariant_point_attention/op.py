"""Registered custom ops of invariant point attention, their autograd, and the entry point.

- ``foldops::ipa_fwd(q, k, v, qp, kp, vp, w, bias, z, mask, scale) -> (o, op, oz, lse)`` and
  ``foldops::ipa_bwd(...)``: ``torch.library.triton_op`` (torch.compile traces the
  kernels; the body is also the fake implementation), an opaque ``custom_op`` under the
  Triton interpreter. Autograd is registered on the forward.
- Eager calls take an ``autograd.Function`` over the launchers with direct Triton
  launches (the ops' dispatch costs host time per launch); torch.compile, fake tensors,
  dispatch modes and torch.func transforms take the registered ops.
- ``invariant_point_attention(q, k, v, q_pts, k_pts, v_pts, bias, point_weights, z,
  mask, scale)``: flattens the points to fp32 ``[B, N, H, 3 P]`` and runs the core;
  the outputs come back in fp32 and are cast to the callers' dtypes outside the op.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch._library.triton import set_wrap_triton_enabled
from torch.autograd.function import once_differentiable

from foldops.kernels._utils import register_op as _op
from foldops.kernels._utils import use_registered_ops as _use_registered_ops
from foldops.kernels.invariant_point_attention.launch import ipa_backward, ipa_forward


@_op("foldops::ipa_fwd")
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor,
    w: torch.Tensor, bias: torch.Tensor, z: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return ipa_forward(q, k, v, qp, kp, vp, w, bias, z, mask, scale)


@_op("foldops::ipa_bwd")
def _bwd_op(
    do: torch.Tensor, dop: torch.Tensor, doz: torch.Tensor,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor,
    w: torch.Tensor, bias: torch.Tensor, z: torch.Tensor, mask: Optional[torch.Tensor],
    o: torch.Tensor, op: torch.Tensor, oz: torch.Tensor, lse: torch.Tensor, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    return ipa_backward(do, dop, doz, q, k, v, qp, kp, vp, w, bias, z, mask, o, op, oz, lse, scale)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, qp, kp, vp, w, bias, z, mask, scale = inputs
    ctx.save_for_backward(q, k, v, qp, kp, vp, w, bias, z, mask, *output)
    ctx.scale = scale
    ctx.mark_non_differentiable(output[3])


def _grads(ctx, do, dop, doz, backward):
    q, k, v, qp, kp, vp, w, bias, z, mask, o, op, oz, lse = ctx.saved_tensors
    do = torch.zeros_like(o) if do is None else do
    dop = torch.zeros_like(op) if dop is None else dop
    doz = torch.zeros_like(oz) if doz is None else doz
    return backward(do, dop, doz, q, k, v, qp, kp, vp, w, bias, z, mask, o, op, oz, lse, ctx.scale)


def _op_backward(ctx, do, dop, doz, _dlse):
    return (*_grads(ctx, do, dop, doz, torch.ops.foldops.ipa_bwd), None, None)


_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerIPA(torch.autograd.Function):
    """The same forward and backward on the launchers, with direct Triton launches."""

    @staticmethod
    def forward(ctx, q, k, v, qp, kp, vp, w, bias, z, mask, scale):
        with set_wrap_triton_enabled(False):
            output = ipa_forward(q, k, v, qp, kp, vp, w, bias, z, mask, scale)
        _setup_context(ctx, (q, k, v, qp, kp, vp, w, bias, z, mask, scale), output)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dop, doz, _dlse):
        with set_wrap_triton_enabled(False):
            grads = _grads(ctx, do, dop, doz, ipa_backward)
        return (*grads, None, None)


def invariant_point_attention(q, k, v, q_pts, k_pts, v_pts, bias, point_weights, z, mask, scale):
    """Differentiable IPA core on the Triton kernels (arguments as ``foldops.ops``'s,
    already validated). Returns ``(out, out_pts, out_pair)``."""
    qp, kp = (t.to(torch.float32).flatten(-2) for t in (q_pts, k_pts))  # [B, N, H, 3 Pq]
    # Value points relative to their mean (a translation the weighted sum carries through
    # exactly): the point output and with it the backward's delta = rowsum(dO * O) then
    # have the protein's size, not its distance from the origin, and so does their error.
    centre = _value_centre(v_pts, mask)  # [B, 1, 1, 1, 3], no gradient
    vp = (v_pts.to(torch.float32) - centre).flatten(-2)
    w = point_weights.to(torch.float32)
    scale = float(scale)
    if _use_registered_ops(q):
        o, op, oz, _ = torch.ops.foldops.ipa_fwd(q, k, v, qp, kp, vp, w, bias, z, mask, scale)
    else:
        o, op, oz, _ = _EagerIPA.apply(q, k, v, qp, kp, vp, w, bias, z, mask, scale)
    out_pts = op.unflatten(-1, (v_pts.shape[-2], 3)) + centre
    if mask is not None:  # padded rows stay zero
        out_pts = out_pts * mask[:, :, None, None, None].to(out_pts.dtype)
    return o.to(q.dtype), out_pts.to(v_pts.dtype), oz.to(z.dtype)


def _value_centre(v_pts: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of the real residues' value points per batch item, ``[B, 1, 1, 1, 3]`` fp32."""
    with torch.no_grad():
        pts = v_pts.to(torch.float32)
        if mask is None:
            return pts.mean(dim=(1, 2, 3), keepdim=True)
        keep = mask.to(torch.float32)[:, :, None, None, None]
        count = (keep.sum(dim=1, keepdim=True) * pts.shape[2] * pts.shape[3]).clamp_min(1.0)
        return (pts * keep).sum(dim=(1, 2, 3), keepdim=True) / count
