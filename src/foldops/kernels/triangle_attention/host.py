"""Host side of the triangle attention launchers: grid arithmetic in plain Python and
the per-key caches of choices that depend only on shapes, dtypes and the device.

Grid arithmetic uses ``kernels._utils.cdiv`` / ``next_pow2`` (``triton.cdiv`` costs
microseconds per host call, 16 of them per backward). ``_CACHE`` holds ``launch._config`` results and the dBias split plans; call
``clear_caches()`` after editing ``configs``.
"""

from __future__ import annotations

from typing import Tuple

from foldops.kernels._utils import cdiv
from foldops.kernels.triangle_attention import dbias_splits

_CACHE: dict = {}
"""Per-key results of ``_config`` and of the dBias split plan (shape, dtype, device)."""


def clear_caches() -> None:
    """Forget cached tile and split choices (after editing ``configs``)."""
    _CACHE.clear()


def _smem_bytes(kind: str, bj: int, bk: int, stages: int, d: int, e: int, be: int) -> int:
    """Rough shared memory of one program: pipelined tiles (x2 for dQ's two loop copies)."""
    if kind == "fwd":  # k, v, bias and the [16, BLOCK_K] key-mask rows
        return stages * (2 * bk * d * e + bj * bk * be + 16 * bk * e) + bj * d * e
    if kind == "dq":
        return 2 * stages * (2 * bk * d * e + bj * bk * be) + 2 * bj * d * e
    if kind == "dkdv":
        return 2 * stages * (2 * bj * d * e + bj * bk * be) + 2 * bk * d * e
    return stages * (2 * bj * d + 2 * bk * d + 16 * bk) * e  # q, dO, k, v, key-mask rows


def _split_plan(batch, rows, n, heads, d, q, dbias_cfg, room) -> Tuple[int, int]:
    """(row splits, rows per split) of the bias gradient, cached per shape, dtype,
    device and split rule (the rule functions are part of the key: tests replace them)."""
    rule, sms = dbias_splits.bias_splits, dbias_splits.num_sms
    key = ("splits", batch, rows, n, heads, d, q.dtype, q.device, dbias_cfg, room, rule, sms)
    plan = _CACHE.get(key) if isinstance(n, int) and isinstance(rows, int) else None
    if plan is None:
        tiles = cdiv(n, dbias_cfg[0]) * cdiv(n, dbias_cfg[1])
        row_bytes = 4 * n * d * q.element_size()  # q, k, v, dO of one row i and head
        splits = min(rule(tiles * batch * heads, rows, dbias_cfg[2], q.device, row_bytes), max(1, room))
        rows_per_split = cdiv(rows, splits)
        plan = (cdiv(rows, rows_per_split), rows_per_split)
        if isinstance(n, int) and isinstance(rows, int):
            _CACHE[key] = plan
    return plan
