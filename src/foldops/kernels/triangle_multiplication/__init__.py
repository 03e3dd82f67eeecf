"""Triton kernels of the triangle multiplicative update (imported lazily, with Triton).

- ``common.py``: shared @triton.jit helpers (row LayerNorm statistics, sigmoid);
- ``forward.py``: the LayerNorm-prologue projection, the per-channel triangular product
  (also used by the backward), the LayerNorm-epilogue output projection;
- ``backward.py``: the output-side and input-side backward row kernels;
- ``configs.py``: tile tables;
- ``launch.py``: launchers ``triangle_multiplication_forward`` / ``_backward``;
- ``op.py``: the registered custom ops, autograd, and ``triangle_multiplication(...)``.
"""

from foldops.kernels.triangle_multiplication.launch import (  # noqa: F401
    triangle_multiplication_backward,
    triangle_multiplication_forward,
)
from foldops.kernels.triangle_multiplication.op import triangle_multiplication  # noqa: F401
