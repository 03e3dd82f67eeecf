"""flash_attn.bert_padding's helpers (2.8 conventions): unpad a padded batch, pad it back.

``unpad_input`` returns five values as flash_attn >= 2.7 does (older versions returned the
first four). Gradients flow through all of them (``index_select`` / ``index_copy``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["index_first_axis", "index_put_first_axis", "pad_input", "unpad_input"]


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``input[indices]`` along the first axis: ``[N, ...]`` -> ``[len(indices), ...]``."""
    return input.index_select(0, indices)


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """Zeros ``[first_axis_dim, ...]`` with ``values`` placed at ``indices``."""
    out = values.new_zeros(first_axis_dim, *values.shape[1:])
    return out.index_copy(0, indices, values)


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask=None):
    """hidden_states ``[B, S, ...]``, attention_mask ``[B, S]`` (1 = real token) ->
    ``(hidden [total, ...], indices [total], cu_seqlens int32 [B+1], max_seqlen int,
    seqused int32 [B])``; ``unused_mask`` marks tokens that are kept but not counted as used."""
    if attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(f"attention_mask: expected shape {tuple(hidden_states.shape[:2])}, "
                         f"got {tuple(attention_mask.shape)}")
    all_masks = (attention_mask + unused_mask) if unused_mask is not None else attention_mask
    seqlens = all_masks.sum(dim=-1, dtype=torch.int32)
    used = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen, used


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """``[total, ...]`` at ``indices`` -> ``[batch, seqlen, ...]`` with zeros elsewhere."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])
