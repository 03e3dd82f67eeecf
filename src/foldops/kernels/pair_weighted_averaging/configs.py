"""Tile tables of the pair-weighted averaging kernels, as plain data.

Read by ``launch.py`` through this module, so a benchmark may replace an entry (then
call ``launch.clear_caches()``: the weighted-sum tiles are cached per shape and dtype).
``wx`` (16-bit) is the fastest of ``benchmarks/tools/pair_weighted_averaging_tune.py``'s
candidates on an H200 (op forward, bf16, S = 1024, 8 x 32: 0.76 vs 0.91 ms at N = 512,
1.32 vs 1.62 at 768 for the former (128, 64, 128, 8, 3)); the others are the usual
Hopper GEMM shapes for a memory-bound product with a short K, untuned.
"""

from __future__ import annotations

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # input dtypes the kernels take
MAX_HEAD_DIM = 64  # head dims 1..64 run as they are (C is a compile-time constant)

# kind -> (BLOCK_I, BLOCK_J or BLOCK_K, BLOCK_SC or BLOCK_J, num_warps, num_stages), 16-bit inputs.
CONFIGS = {
    "wx": (256, 64, 128, 8, 3),  # W@X: M = rows i, K = keys j, N = (s, c) columns; X tiles reused by 256 rows
    "dw": (128, 64, 128, 8, 3),  # dW: M = rows i, K = (s, c) columns, N = keys j
}
# fp32 inputs (twice the bytes per tile): smaller tiles keep the pipelined stages in shared memory.
CONFIGS_FP32 = {
    "wx": (64, 32, 128, 8, 2),  # same loop, half the K step
    "dw": (64, 32, 64, 4, 2),  # same loop, half the tile
}
INTERPRETER = (16, 16, 16, 1, 1)  # small tiles: multi-block loops at small sizes, fast interpretation
MIN_SPLIT_STEPS = 16  # dW column splits each run at least this many K steps (amortise the fp32 partial sum)
