"""Per-row (per-sequence) conditioning applied to packed tokens without materialising it per token.

A packed batch holds ``total`` tokens ``[total, C]`` of B sequences; ``seq [total]`` is the
row of each token. adaLN conditioning is per row (``[B, C]``). Gathering it to ``[total, C]``
and multiplying works, but autograd then keeps every gathered ``[total, C]`` factor until
the backward pass (four per DDiT block). These two functions gather inside their forward,
keep only the ``[B, C]`` factor and the index, and reduce the row gradients with
``index_add`` in fp32. Under ``torch.compile`` the gathers fuse into the pointwise kernel.
"""

from __future__ import annotations

import torch


def _row_grad(values: torch.Tensor, seq: torch.Tensor, rows: int, like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(rows, values.shape[-1], device=values.device, dtype=torch.promote_types(values.dtype, torch.float32))
    return out.index_add_(0, seq, values.to(out.dtype)).to(like.dtype)


class _ModulateRows(torch.autograd.Function):
    """``x * (1 + scale[seq]) + shift[seq]``; x ``[T, C]``, shift/scale ``[B, C]``, seq ``[T]``."""

    @staticmethod
    def forward(ctx, x, shift, scale, seq):
        ctx.save_for_backward(x, shift, scale, seq)
        return torch.addcmul(shift.index_select(0, seq), x, scale.index_select(0, seq) + 1)

    @staticmethod
    def backward(ctx, grad):
        x, shift, scale, seq = ctx.saved_tensors
        gx = gshift = gscale = None
        if ctx.needs_input_grad[0]:
            gx = (grad * (scale.index_select(0, seq) + 1)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gshift = _row_grad(grad, seq, shift.shape[0], shift)
        if ctx.needs_input_grad[2]:
            gscale = _row_grad(grad * x, seq, scale.shape[0], scale)
        return gx, gshift, gscale, None


class _GatedAddRows(torch.autograd.Function):
    """``residual + gate[seq] * h``; h, residual ``[T, C]``, gate ``[B, C]``, seq ``[T]``."""

    @staticmethod
    def forward(ctx, h, gate, residual, seq):
        ctx.save_for_backward(h, gate, seq)
        ctx.residual_dtype = residual.dtype
        return torch.addcmul(residual, gate.index_select(0, seq), h)

    @staticmethod
    def backward(ctx, grad):
        h, gate, seq = ctx.saved_tensors
        gh = ggate = gres = None
        if ctx.needs_input_grad[0]:
            gh = (grad * gate.index_select(0, seq)).to(h.dtype)
        if ctx.needs_input_grad[1]:
            ggate = _row_grad(grad * h, seq, gate.shape[0], gate)
        if ctx.needs_input_grad[2]:
            gres = grad.to(ctx.residual_dtype)
        return gh, ggate, gres, None


def modulate_rows(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of packed tokens by per-row shift/scale (see the module docstring)."""
    return _ModulateRows.apply(x, shift, scale, seq)


def gated_add_rows(h: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """Gated residual update of packed tokens by a per-row gate (see the module docstring)."""
    return _GatedAddRows.apply(h, gate, residual, seq)
