"""Masked softmax that gives zeros (and zero gradients), never NaN, on fully masked rows."""

from __future__ import annotations

from typing import Optional

import torch


def masked_softmax(logits: torch.Tensor, keep: Optional[torch.Tensor], dim: int = -1) -> torch.Tensor:
    """Softmax of ``logits`` over ``dim`` restricted to ``keep`` (bool, broadcastable).

    Rows with no kept entry are all zeros. Computed in ``logits``' dtype: callers pass
    fp32 (or fp64) logits.
    """
    if keep is None:
        return torch.softmax(logits, dim=dim)
    logits = logits.masked_fill(~keep, float("-inf"))
    row_max = logits.amax(dim=dim, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(logits - row_max)
    total = weights.sum(dim=dim, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))
