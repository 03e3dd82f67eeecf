"""Shared @triton.jit helpers of the triangle multiplication kernels: row LayerNorm
statistics over a channel axis held whole in registers, and a numerically safe sigmoid."""

import triton
import triton.language as tl


@triton.jit
def _sigmoid(z):
    """sigmoid(z) in fp32: 1 / (1 + exp(-z)), finite for every finite z."""
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _row_stats(v, valid_c, C, eps):
    """Mean and 1/sqrt(var + eps) of each row of ``v`` [BLOCK_P, CP] (fp32) over its
    first ``C`` channels (``valid_c`` [1, CP] marks them; the rest of ``v`` must be 0)."""
    mean = tl.sum(v, axis=1) / C
    d = tl.where(valid_c, v - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / C
    return mean, 1.0 / tl.sqrt(var + eps)
