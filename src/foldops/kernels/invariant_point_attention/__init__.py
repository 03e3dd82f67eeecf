"""Triton kernels for invariant point attention (imported lazily, with Triton).

- ``common.py``: shared @triton.jit helpers (head-tile loads, the logits of one query row).
- ``forward.py``: the forward kernel: one query row, all heads, one pass over key tiles.
- ``backward.py``: the backward kernels: per query row (dq, dS, dz) and per key block (dk, dv).
- ``configs.py``: tile sizes as plain data, with the reason for each.
- ``launch.py``: plain launchers ``ipa_forward`` / ``ipa_backward`` (check, allocate, launch).
- ``op.py``: the registered custom ops, their autograd, and the differentiable entry point
  ``invariant_point_attention`` that ``foldops.ops`` calls.
"""

from foldops.kernels.invariant_point_attention.launch import ipa_backward, ipa_forward, unsupported
from foldops.kernels.invariant_point_attention.op import invariant_point_attention

__all__ = ["invariant_point_attention", "ipa_backward", "ipa_forward", "unsupported"]
