"""Triton kernels for triangle attention: forward, backward (dQ, dK/dV, dBias).

    q, k, v, out: [B, I, N, H, D] (any strides)   bias: [B, H, N, N] (any strides)
    mask: [B, I, N] bool keep-mask over keys, or None
    out[b,i,j,h] = sum_k softmax_k(scale * q[b,i,j,h].k[b,i,k,h] + bias[b,h,j,k]
                                   | mask[b,i,k]) v[b,i,k,h]

Files (design, floors and timings: docs/kernels/triangle_attention.md):

- ``common.py``: shared @triton.jit helpers (exp2/log2, lse parts, key-mask biases,
  the wgmma wait, the fp32 FMA-chain dot);
- ``forward.py``: ``_fwd_kernel``, output and base-2 lse;
- ``backward.py``: ``_bwd_delta_kernel``, ``_bwd_dkdv_kernel``;
- ``backward_dq.py``: ``_bwd_dq_kernel`` and its exact-mask rerun;
- ``backward_dbias.py``: ``_bwd_dbias_kernel``, ``_sum_splits_kernel``;
- ``configs.py``: tile tables, wgmma-wait table, dBias split-model constants (data);
- ``dbias_splits.py``: the dBias row-split count;
- ``host.py``: the launchers' host arithmetic and per-shape caches (tiles, dBias splits);
- ``launch.py``: launchers ``triangle_attention_forward`` / ``triangle_attention_backward``;
- ``op.py``: custom ops ``foldops::triangle_attention_fwd`` / ``_bwd`` with autograd,
  and ``triangle_attention(q, k, v, bias, mask, scale)``, the differentiable entry.

Softmax in base 2 and fp32: logits are ``s2 = log2(e) * (scale * q.k + bias)``; the
saved log-sum-exp ``lse`` [B, I, H, N] is in the same base (fp32; fp64 for fp32 inputs,
see ``common._lse_parts``). Rows whose keys are all masked get ``lse = +inf``, so every
recomputed probability is 0: zero outputs and zero gradients without NaN. The bias
gradient is deterministic (no atomics anywhere).

Imported lazily by ``foldops.ops.triangle_attention``, never at ``import foldops``.
"""

from __future__ import annotations

from foldops.device import triton_interpret
from foldops.kernels._utils import patch_interpreter_bf16

if triton_interpret():
    patch_interpreter_bf16()

from foldops.kernels.triangle_attention.configs import DTYPES, HEAD_DIMS  # noqa: E402
from foldops.kernels.triangle_attention.launch import (  # noqa: E402
    triangle_attention_backward,
    triangle_attention_forward,
)
from foldops.kernels.triangle_attention.op import triangle_attention  # noqa: E402

__all__ = [
    "triangle_attention",
    "triangle_attention_forward",
    "triangle_attention_backward",
    "HEAD_DIMS",
    "DTYPES",
]
