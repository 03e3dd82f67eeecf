"""Registered custom ops of invariant point attention, their autograd, and the entry point.

- ``foldops::ipa_fwd(q, k, v, qp, kp, vp, w, bias, z, mask, scale) -> (o, op, oz, lse, op_rel)`` and
  ``foldops::ipa_bwd(...)``: ``torch.library.triton_op`` (torch.compile traces the
  kernels; the body is also the fake implementation), an opaque ``custom_op`` under the
  Triton interpreter. Autograd is registered on the forward.
- Eager calls take an ``autograd.Function`` over the launchers with direct Triton
  launches (the ops' dispatch costs host time per launch); torch.compile, fake tensors,
  dispatch modes and torch.func transforms take the registered ops.
- ``invariant_point_attention(q, k, v, q_pts, k_pts, v_pts, bias, point_weights, z,
  mask, scale)``: flattens the points to fp32 ``[B, N, H, 3 P]`` and runs the core;
  the outputs come back in fp32 and are cast to the callers' dtypes outside the op.
  ``lse`` and ``op_rel`` (the point output relative to each row's own value points,
  what the backward's delta takes) are saved for the backward, not differentiable.
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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return ipa_forward(q, k, v, qp, kp, vp, w, bias, z, mask, scale)


@_op("foldops::ipa_bwd")
def _bwd_op(
    do: torch.Tensor, dop: torch.Tensor, doz: torch.Tensor,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor,
    w: torch.Tensor, bias: torch.Tensor, z: torch.Tensor, mask: Optional[torch.Tensor],
    o: torch.Tensor, op_rel: torch.Tensor, oz: torch.Tensor, lse: torch.Tensor, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    return ipa_backward(do, dop, doz, q, k, v, qp, kp, vp, w, bias, z, mask, o, op_rel, oz, lse, scale)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, qp, kp, vp, w, bias, z, mask, scale = inputs
    o, _, oz, lse, op_rel = output  # the backward takes op_rel, not op
    ctx.save_for_backward(q, k, v, qp, kp, vp, w, bias, z, mask, o, op_rel, oz, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse, op_rel)


def _grads(ctx, do, dop, doz, backward):
    q, k, v, qp, kp, vp, w, bias, z, mask, o, op_rel, oz, lse = ctx.saved_tensors
    do = torch.zeros_like(o) if do is None else do
    dop = torch.zeros_like(op_rel) if dop is None else dop
    doz = torch.zeros_like(oz) if doz is None else doz
    return backward(do, dop, doz, q, k, v, qp, kp, vp, w, bias, z, mask, o, op_rel, oz, lse, ctx.scale)


def _op_backward(ctx, do, dop, doz, _dlse, _dop_rel):
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
    def backward(ctx, do, dop, doz, _dlse, _dop_rel):
        with set_wrap_triton_enabled(False):
            grads = _grads(ctx, do, dop, doz, ipa_backward)
        return (*grads, None, None)


def invariant_point_attention(q, k, v, q_pts, k_pts, v_pts, bias, point_weights, z, mask, scale):
    """Differentiable IPA core on the Triton kernels (arguments as ``foldops.ops``'s,
    already validated). Returns ``(out, out_pts, out_pair)``."""
    # Points as given, not moved: the kernels take value points relative to each row's
    # own (vp_j - vp_i), which any common translation would only round.
    qp, kp, vp = (t.to(torch.float32).flatten(-2) for t in (q_pts, k_pts, v_pts))  # [B, N, H, 3 P]
    w = point_weights.to(torch.float32)
    scale = float(scale)
    if _use_registered_ops(q):
        o, op, oz, _, _ = torch.ops.foldops.ipa_fwd(q, k, v, qp, kp, vp, w, bias, z, mask, scale)
    else:
        o, op, oz, _, _ = _EagerIPA.apply(q, k, v, qp, kp, vp, w, bias, z, mask, scale)
    out_pts = op.unflatten(-1, (v_pts.shape[-2], 3))  # padded rows are zero
    return o.to(q.dtype), out_pts.to(v_pts.dtype), oz.to(z.dtype)
