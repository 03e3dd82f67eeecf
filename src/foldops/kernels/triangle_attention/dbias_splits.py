"""Row splits of the triangle attention bias gradient: how many programs share the rows
i of one dBias tile (their partial tiles are then summed in a fixed order). The model's
constants are in ``configs``; ``launch.triangle_attention_backward`` calls
``bias_splits`` at each launch (tests and benchmarks may replace it, or ``num_sms``).
"""

from __future__ import annotations

import torch

from foldops.device import multiprocessor_count, triton_interpret
from foldops.kernels.triangle_attention import configs


def num_sms(device: torch.device) -> int:
    """SMs of ``device`` for the dBias split model; 4 under the interpreter, so that the
    split path of the bias gradient runs in tests."""
    if triton_interpret():
        return 4
    return multiprocessor_count(device)


def bias_splits(programs: int, rows: int, warps: int, device: torch.device, row_bytes: int = 0) -> int:
    """Row splits for the bias gradient, given ``programs`` (b, h, j-tile, k-tile) tiles
    and ``row_bytes``, what one row i of one head adds to the inputs a split reads.

    Each program sums its share of the rows one after another, so the pass takes about
    waves x rows per program, waves = ceil(programs x splits / resident programs); each
    extra split adds 1% for its partial sums. The count in 1..MAX_BIAS_SPLITS that
    minimises this, among those that give every SM a program and keep a split's rows
    within ``configs.DBIAS_SPLIT_BYTES``. On the H100 the model tracked the measured dBias
    times within a few percent up to N = 1024 (at N = 512, where all counts model alike,
    one split leaves SMs idle and measured slower than two); at N = 1536 and 2048 (bf16)
    the byte bound alone sets the count.
    """
    sms = num_sms(device)
    resident = sms * configs.DBIAS_PROGRAMS_PER_SM.get(warps, 2)

    def modelled_time(splits: int) -> float:
        waves = -(-programs * splits // resident)
        return waves * -(-rows // splits) * (1 + 0.01 * (splits - 1))

    most = max(1, min(rows, configs.MAX_BIAS_SPLITS))
    every_sm = -(-sms // max(1, programs))
    within_l2 = -(-rows * row_bytes // configs.DBIAS_SPLIT_BYTES)
    fewest = min(most, max(every_sm, within_l2))
    return min(range(fewest, most + 1), key=modelled_time)
