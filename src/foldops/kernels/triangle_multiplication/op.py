"""Registered custom ops of the triangle multiplication, their autograd, and the
differentiable entry point ``triangle_multiplication``.

``foldops::triangle_multiplication_fwd`` returns the output and what the backward
needs (ab, gate, t); ``foldops::triangle_multiplication_bwd`` returns the gradient of
x and of the eight weights. Both are ``torch.library.triton_op`` (under the Triton
interpreter plain ``custom_op``), whose bodies double as fake implementations. Eager
calls go through an ``autograd.Function`` over the launchers (no dispatch cost).

Both ops take ``precision: str``, the ``tl.dot`` input precision of fp32 inputs
("ieee", "tf32x3" or "tf32"), which ``triangle_multiplication`` reads from
``torch.get_float32_matmul_precision()`` (see ``dot_precision``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch._library.triton import set_wrap_triton_enabled
from torch.autograd.function import once_differentiable

from foldops.kernels._utils import register_op as _op
from foldops.kernels._utils import use_registered_ops as _use_registered_ops
from foldops.kernels.triangle_multiplication.launch import (
    triangle_multiplication_backward,
    triangle_multiplication_forward,
)


@_op("foldops::triangle_multiplication_fwd")
def _fwd_op(
    x: torch.Tensor,
    mask: Optional[torch.Tensor],
    norm_in_weight: torch.Tensor,
    norm_in_bias: torch.Tensor,
    p_in_weight: torch.Tensor,
    g_in_weight: torch.Tensor,
    norm_out_weight: torch.Tensor,
    norm_out_bias: torch.Tensor,
    p_out_weight: torch.Tensor,
    g_out_weight: torch.Tensor,
    outgoing: bool,
    eps: float,
    precision: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return triangle_multiplication_forward(
        x, mask, norm_in_weight, norm_in_bias, p_in_weight, g_in_weight,
        norm_out_weight, norm_out_bias, p_out_weight, g_out_weight, outgoing, eps, precision)


@_op("foldops::triangle_multiplication_bwd")
def _bwd_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mask: Optional[torch.Tensor],
    norm_in_weight: torch.Tensor,
    norm_in_bias: torch.Tensor,
    p_in_weight: torch.Tensor,
    g_in_weight: torch.Tensor,
    norm_out_weight: torch.Tensor,
    norm_out_bias: torch.Tensor,
    p_out_weight: torch.Tensor,
    g_out_weight: torch.Tensor,
    ab: torch.Tensor,
    go: torch.Tensor,
    t: torch.Tensor,
    outgoing: bool,
    eps: float,
    precision: str,
) -> List[torch.Tensor]:
    return list(triangle_multiplication_backward(
        grad_out, x, mask, norm_in_weight, norm_in_bias, p_in_weight, g_in_weight,
        norm_out_weight, norm_out_bias, p_out_weight, g_out_weight, ab, go, t, outgoing, eps, precision))


def _setup_context(ctx, inputs, output) -> None:
    x, mask, *weights = inputs[:10]
    outgoing, eps, precision = inputs[10:13]
    _, ab, go, t = output
    ctx.save_for_backward(x, mask, *weights, ab, go, t)
    ctx.args = (outgoing, eps, precision)
    ctx.mark_non_differentiable(ab, go, t)
    ctx.set_materialize_grads(False)


def _grads(ctx, grad_out, backward):
    x, mask, *rest = ctx.saved_tensors
    weights, (ab, go, t) = rest[:8], rest[8:]
    grads = backward(grad_out.contiguous(), x, mask, *weights, ab, go, t, *ctx.args)
    return (grads[0], None, *grads[1:])


def _op_backward(ctx, grad_out, *_unused):
    return *_grads(ctx, grad_out, torch.ops.foldops.triangle_multiplication_bwd), None, None, None


_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The same forward and backward on the launchers, without the ops' dispatch."""

    @staticmethod
    def forward(ctx, x, mask, *args):
        inputs = (x, mask, *args)
        with set_wrap_triton_enabled(False):
            output = triangle_multiplication_forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        with set_wrap_triton_enabled(False):
            grads = _grads(ctx, grad_out, triangle_multiplication_backward)
        return *grads, None, None, None


# torch.get_float32_matmul_precision() -> the kernels' tl.dot input precision for fp32.
_DOT_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


@torch.compiler.assume_constant_result
def dot_precision() -> str:
    """The fp32 products' precision: "highest" -> IEEE fp32; "high" -> TF32x3 (three
    TF32 products, near fp32); "medium" -> plain TF32 (operands rounded to 10-bit
    mantissas; the fastest).

    Under torch.compile it is read when the graph is traced (Dynamo cannot trace
    ``torch.get_float32_matmul_precision``). Dynamo re-traces when the precision moves
    to or from "highest" (it guards whether TF32 is allowed) but not between "high"
    and "medium": after such a change, ``torch._dynamo.reset()`` before the next call.
    """
    return _DOT_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")


def triangle_multiplication(x, mask, weights, outgoing: bool, eps: float) -> torch.Tensor:
    """Differentiable triangle multiplicative update on the Triton kernels.

    Args:
        x: ``[B, N, N, C]`` fp16 / bf16 / fp32, any strides; C <= 512.
        mask: ``[B, N, N]`` bool keep-mask, or None.
        weights: the eight weights in ``foldops.ops.triangle_multiplication.WEIGHT_NAMES``
            order (p_in, g_in ``[2H, C]``, norm_out ``[H]``, p_out ``[C, H]``, g_out
            ``[C, C]``; H <= 512); the four matrices in x's dtype, the LayerNorm vectors
            any float dtype.
        outgoing: direction. eps: LayerNorm epsilon.

    Returns:
        ``[B, N, N, C]`` in x's dtype (contiguous). fp32 inputs run their products as
        ``torch.get_float32_matmul_precision()`` says (``dot_precision``): "highest"
        IEEE, "high" TF32x3, "medium" TF32.
    """
    args = (x, mask, *weights, bool(outgoing), float(eps), dot_precision())
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))
    if _use_registered_ops(x):
        return torch.ops.foldops.triangle_multiplication_fwd(*args)[0]
    if needs_grad:
        return _Eager.apply(*args)
    with set_wrap_triton_enabled(False):
        out, ab, go, t = triangle_multiplication_forward(*args, save=False)
    return out
