"""Triton kernels for variable-length (packed) attention; imported lazily by the op.

- ``forward.py``: ``_fwd_kernel`` (online softmax over the keys of one sequence).
- ``backward.py``: ``_bwd_delta_kernel``, ``_bwd_dkdv_kernel``, ``_bwd_dq_kernel``.
- ``configs.py``: tile table (block sizes, warps, stages) as plain data.
- ``launch.py``: launchers ``varlen_attention_forward`` / ``varlen_attention_backward``.
- ``op.py``: custom ops ``foldops::varlen_attention_fwd`` / ``_bwd`` with autograd and
  fake implementations, and ``varlen_attention``, the differentiable entry point.
"""

from foldops.kernels.varlen_attention.launch import (
    DTYPES,
    MAX_HEAD_DIM,
    varlen_attention_backward,
    varlen_attention_forward,
)
from foldops.kernels.varlen_attention.op import varlen_attention

__all__ = ["DTYPES", "MAX_HEAD_DIM", "varlen_attention", "varlen_attention_backward", "varlen_attention_forward"]
