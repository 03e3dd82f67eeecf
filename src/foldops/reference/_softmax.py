"""Masked softmax that gives zeros (and zero gradients), never NaN, on fully masked rows."""

from __future__ import annotations

from typing import Optional

import torch


def masked_softmax(logits: torch.Tensor, keep: Optional[torch.Tensor], dim: int = -1) -> torch.Tensor:
    """Softmax of ``logits`` over ``dim`` restricted to ``keep`` (bool, broadcastable).

    Rows with no kept entry, or whose logits are all ``-inf``, are all zeros (with
    zero gradients), never NaN; an empty ``dim`` gives an empty result. Masked
    entries get exactly zero weight whatever their logit (NaN and inf included).
    Computed in ``logits``' dtype: callers pass fp32 (or fp64) logits.
    """
    if logits.shape[dim] == 0:
        return logits.clone()
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    row_max = logits.amax(dim=dim, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(logits - row_max)
    total = weights.sum(dim=dim, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))
