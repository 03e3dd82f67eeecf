"""Triton kernels for MSA pair-weighted averaging (AF3 Algorithm 10): forward and backward.

    v, g, out: [B, S, N, H, C] (any strides)   logits: [B, H, N, N] (any strides)
    mask: [B, N, N] bool pair keep-mask or None   msa_mask: [B, S, N] bool or None
    out[b,s,i,h] = sigmoid(g[b,s,i,h]) * sum_j softmax_j(logits[b,h,i,j] | mask[b,i,j]) v[b,s,j,h]

Files (design, floors and timings: docs/kernels/pair_weighted_averaging.md):

- ``forward.py``: ``_wx_kernel``, the weighted sum W @ V with MSA rows folded into the
  product's columns and the gate in the epilogue (also the backward's dg/dO' and dv passes);
- ``backward.py``: ``_dw_kernel``, dW = dO' V^T reduced over (s, c), deterministic;
- ``configs.py``: tile tables (data);
- ``launch.py``: launchers ``pair_weighted_averaging_forward`` / ``_backward`` (softmax
  and its backward on [B, H, N, N] in fp32 PyTorch, everything S * N-sized in the kernels);
- ``op.py``: custom ops ``foldops::pair_weighted_averaging_fwd`` / ``_bwd`` with autograd,
  and ``pair_weighted_averaging(v, logits, g, mask, msa_mask)``, the differentiable entry.

Imported lazily by ``foldops.ops.pair_weighted_averaging``, never at ``import foldops``.
"""

from __future__ import annotations

from foldops.device import triton_interpret
from foldops.kernels._utils import patch_interpreter_bf16

if triton_interpret():
    patch_interpreter_bf16()

from foldops.kernels.pair_weighted_averaging.configs import DTYPES, MAX_HEAD_DIM  # noqa: E402
from foldops.kernels.pair_weighted_averaging.launch import (  # noqa: E402
    pair_weighted_averaging_backward,
    pair_weighted_averaging_forward,
)
from foldops.kernels.pair_weighted_averaging.op import pair_weighted_averaging  # noqa: E402

__all__ = [
    "pair_weighted_averaging",
    "pair_weighted_averaging_forward",
    "pair_weighted_averaging_backward",
    "MAX_HEAD_DIM",
    "DTYPES",
]
