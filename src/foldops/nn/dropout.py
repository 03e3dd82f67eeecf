"""Row-wise and column-wise dropout of the Pairformer (Boltz-2 / AlphaFold semantics).

A pair update ``u`` of shape ``[B, N, N, C]`` is dropped whole rows at a time (one
Bernoulli draw per ``(b, i)``, mask ``[B, N, 1, 1]``) or whole columns (per ``(b, j)``,
mask ``[B, 1, N, 1]``), and kept entries are scaled by ``1 / (1 - p)``. For an MSA
tensor ``[B, S, N, C]`` the row-wise mask ``[B, S, 1, 1]`` drops whole MSA rows.

The mask is drawn exactly as Boltz draws it (``torch.rand`` of that shape in fp32,
kept where ``>= p``), so a layer seeded like Boltz's drops the same rows. Unlike
Boltz, nothing is drawn or multiplied in eval mode or when ``p == 0``: the result is
the same, without a pass over an N^2 tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from foldops._checks import check_tensor


def check_dropout_rate(name: str, p: object) -> float:
    """``p`` as a float in [0, 1), or ``ValueError`` naming ``name``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name}: expected a dropout rate in [0, 1), got {p!r}")
    return float(p)


def _mask_shape(x: Tensor, columnwise: bool):
    if columnwise:
        return (x.shape[0], 1, x.shape[2], 1)
    return (x.shape[0], x.shape[1], 1, 1)


def get_dropout_mask(dropout: float, z: Tensor, training: bool, columnwise: bool = False) -> Tensor:
    """Boltz's ``get_dropout_mask``: a scaled keep-mask broadcastable to ``z``.

    Args:
        dropout: rate in [0, 1).
        z: ``[B, N1, N2, C]`` (pair ``[B, N, N, C]`` or MSA ``[B, S, N, C]``).
        training: draw a mask only when True.
        columnwise: one draw per ``(b, n2)`` instead of per ``(b, n1)``.

    Returns:
        fp32 ``[B, N1, 1, 1]`` (``[B, 1, N2, 1]`` if columnwise) holding ``0`` or
        ``1/(1-p)``; all ones when not training.
    """
    p = check_dropout_rate("dropout", dropout) if training else 0.0
    check_tensor("z", z, (None, None, None, None))
    shape = _mask_shape(z, columnwise)
    if p == 0.0:
        return torch.ones(shape, dtype=torch.float32, device=z.device)
    keep = torch.rand(shape, dtype=torch.float32, device=z.device) >= p
    return keep * (1.0 / (1.0 - p))


def dropout_residual(x: Tensor, update: Tensor, dropout: float, training: bool, columnwise: bool = False) -> Tensor:
    """``x + get_dropout_mask(...) * update``, skipping the mask when it would be all ones.

    ``x``, ``update``: ``[B, N1, N2, C]``. Same values and dtype promotion as Boltz's
    ``z + mask * update``.
    """
    if not training or dropout == 0.0:
        return x + update
    return x + get_dropout_mask(dropout, update, training, columnwise) * update


class _StructuredDropout(nn.Module):
    columnwise = False

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = check_dropout_rate("p", p)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, N1, N2, C]``; returns ``x`` times the shared mask (``x`` in eval)."""
        if not self.training or self.p == 0.0:
            return x
        return x * get_dropout_mask(self.p, x, True, self.columnwise).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class DropoutRowwise(_StructuredDropout):
    """Dropout with one draw per row: mask ``[B, N1, 1, 1]`` (Boltz's default)."""


class DropoutColumnwise(_StructuredDropout):
    """Dropout with one draw per column: mask ``[B, 1, N2, 1]`` (Boltz's ``columnwise``)."""

    columnwise = True
