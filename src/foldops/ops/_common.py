"""Mechanics shared by the functionals in ``foldops.ops`` (not part of the public API)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def zeros_output(shape: Sequence[int], like: torch.Tensor, inputs: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """Zeros of ``shape`` in ``like``'s dtype and device, the answer of an op with an
    empty input (no rows, no keys, no channels). Attached to the autograd graph of the
    ``inputs`` that need grad, so backward gives them zero (or empty) gradients."""
    out = torch.zeros(tuple(shape), dtype=like.dtype, device=like.device)
    if torch.is_grad_enabled():
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                out = out + t.sum().mul(0).to(out.dtype)
    return out


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd will record a call on ``tensors`` (the training mode of
    ``foldops.backend_rules``)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
