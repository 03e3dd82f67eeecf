"""Self-attention over packed variable-length sequences (or a padded batch).

``VarlenSelfAttention`` holds flash_attn's ``MHA`` parameter names (``Wqkv``,
``out_proj``) and calls ``foldops.ops.varlen_attention`` / ``padded_attention``:

    packed:  x [total, E], cu_seqlens int32 [B+1], max_seqlen -> [total, E]
    padded:  x [B, L, E], key_padding_mask [B, L] (True = real token) or None -> [B, L, E]

``Wqkv`` projects to [q (H * Dh) | k (H_kv * Dh) | v (H_kv * Dh)], Dh = E / H.
Attention dropout applies only in training mode.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from foldops.backends import check_module_backend, for_op
from foldops.ops import padded_attention, varlen_attention
from foldops.ops.varlen_attention import OP


class VarlenSelfAttention(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_heads_kv: Optional[int] = None,
        causal: bool = False,
        dropout: float = 0.0,
        softmax_scale: Optional[float] = None,
        qkv_proj_bias: bool = True,
        out_proj_bias: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of embed_dim {embed_dim}, got {num_heads}")
        if num_heads % num_heads_kv:
            raise ValueError(f"num_heads_kv: expected a divisor of num_heads {num_heads}, got {num_heads_kv}")
        factory = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.num_heads_kv = embed_dim, num_heads, num_heads_kv
        self.head_dim = embed_dim // num_heads
        self.causal, self.dropout, self.softmax_scale = causal, dropout, softmax_scale
        self.backend = check_module_backend(backend)
        self.Wqkv = nn.Linear(embed_dim, (num_heads + 2 * num_heads_kv) * self.head_dim, bias=qkv_proj_bias,
                              **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=out_proj_bias, **factory)

    def _split(self, x: torch.Tensor):
        qkv = self.Wqkv(x)
        hq, hk, d = self.num_heads, self.num_heads_kv, self.head_dim
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        return q.unflatten(-1, (hq, d)), k.unflatten(-1, (hk, d)), v.unflatten(-1, (hk, d))

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        dropout_p = self.dropout if self.training else 0.0
        q, k, v = self._split(x)
        if cu_seqlens is not None:
            if x.dim() != 2 or max_seqlen is None:
                raise ValueError("x: packed input is [total, E] with cu_seqlens and max_seqlen; got "
                                 f"{tuple(x.shape)}, max_seqlen={max_seqlen}")
            out = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=self.causal,
                                   softmax_scale=self.softmax_scale, dropout_p=dropout_p,
                                   backend=for_op(OP, self.backend))
        else:
            if x.dim() != 3:
                raise ValueError(f"x: expected [B, L, E] without cu_seqlens, got {tuple(x.shape)}")
            out = padded_attention(q, k, v, key_padding_mask, causal=self.causal, softmax_scale=self.softmax_scale,
                                   dropout_p=dropout_p, backend=for_op(OP, self.backend))
        return self.out_proj(out.flatten(-2))
