"""Memory budgets for inference-time chunking: one rule for every op.

The ``torch`` backends and the layers split work into chunks only to bound peak
memory. How large a chunk may be depends on the device:

- CPU: a cache-sized budget. Chunks whose intermediates stay in the last-level cache
  run faster than one large pass (measured on a 2-core CPU: triangle attention at
  N = 256 ran 2x faster in chunks of <= 16 rows than in one shot).
- Accelerators (CUDA, XPU, MPS): unchunked while the intermediates fit a fraction of
  the device's free memory (on CUDA the driver's free memory plus the blocks PyTorch's
  caching allocator holds unused: ``foldops.device.free_memory_bytes``); every extra
  chunk there costs kernel launches and buys nothing until memory is short. Work of
  at most ``ACCELERATOR_SMALL_BYTES`` runs whole without asking.

``FOLDOPS_CHUNK_BUDGET_MB`` overrides the budget on every device (an integer number
of MiB of intermediates per chunk).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from foldops.device import free_memory_bytes

ENV_BUDGET_MB = "FOLDOPS_CHUNK_BUDGET_MB"

CPU_BUDGET_BYTES = 16 * 2**20
"""Intermediates of one chunk on CPU: about a last-level cache (4M fp32 elements)."""

ACCELERATOR_FREE_FRACTION = 0.25
"""Share of the accelerator's free memory one chunk's intermediates may take."""

ACCELERATOR_FALLBACK_BYTES = 1024 * 2**20
"""Budget on an accelerator whose free memory cannot be queried (MPS, old XPU)."""

ACCELERATOR_SMALL_BYTES = 128 * 2**20
"""Work whose intermediates total at most this runs unchunked on an accelerator without
a free-memory query: the query costs tens of microseconds of host time on every call,
as much as a small op's kernels, and a device with so little memory left would fail
the op's other allocations anyway."""


_last_free: dict = {}
"""Free bytes last queried per device: what ``torch.compile`` tracing reads (a query
there would break the graph; the budget is a host-side choice baked into the graph)."""


def _free_bytes(device: torch.device) -> Optional[int]:
    if torch.compiler.is_compiling():
        return _last_free.get(str(device))
    free = _query_free_bytes(device)
    _last_free[str(device)] = free
    return free


def _query_free_bytes(device: torch.device) -> Optional[int]:
    return free_memory_bytes(device)


def chunk_budget_bytes(device: torch.device) -> int:
    """Bytes of intermediates one chunk may hold on ``device`` (see the module doc)."""
    override = os.environ.get(ENV_BUDGET_MB, "").strip()
    if override:
        try:
            mib = int(override)
        except ValueError:
            raise ValueError(f"{ENV_BUDGET_MB}: expected a positive integer (MiB), got {override!r}") from None
        if mib <= 0:
            raise ValueError(f"{ENV_BUDGET_MB}: expected a positive integer (MiB), got {override!r}")
        return mib * 2**20
    if device.type == "cpu":
        return CPU_BUDGET_BYTES
    free = _free_bytes(device)
    if free is None:
        return ACCELERATOR_FALLBACK_BYTES
    return max(CPU_BUDGET_BYTES, int(free * ACCELERATOR_FREE_FRACTION))


def rows_per_chunk(
    device: torch.device,
    bytes_per_row: int,
    rows: int,
    chunk_size: Optional[int] = None,
) -> int:
    """How many of ``rows`` rows to process at once.

    ``bytes_per_row``: the intermediates one row costs (all temporaries the chunk
    body allocates, in bytes). ``chunk_size`` (a user's explicit choice) wins.
    Always at least 1 and at most ``rows`` (1 when ``rows`` is 0).
    """
    if chunk_size is not None:
        return max(1, min(rows, chunk_size))
    if (device.type != "cpu" and bytes_per_row * rows <= ACCELERATOR_SMALL_BYTES
            and not os.environ.get(ENV_BUDGET_MB, "").strip()):
        return max(1, rows)
    per_chunk = chunk_budget_bytes(device) // max(1, bytes_per_row)
    return max(1, min(max(rows, 1), per_chunk))
