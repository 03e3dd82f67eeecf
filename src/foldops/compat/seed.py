"""``seed_everything``: one call that seeds python, numpy and torch (every device)."""

from __future__ import annotations

import os
import random
from typing import Optional

import torch

_MAX_SEED = 2**32 - 1


def seed_everything(seed: Optional[int] = None, workers: bool = False) -> int:
    """Seed ``random``, ``numpy.random`` and torch (CPU and every device); return the seed.

    ``seed=None`` reads ``FOLDOPS_GLOBAL_SEED`` (or Lightning's ``PL_GLOBAL_SEED``) and falls
    back to 0. The seed is exported as ``FOLDOPS_GLOBAL_SEED`` so that subprocesses can
    follow. ``workers`` is accepted for Lightning compatibility: DataLoader workers are
    seeded by torch itself from the loader's generator (python, numpy and torch since
    torch 1.9), so there is nothing more to do.
    """
    if seed is None:
        env = os.environ.get("FOLDOPS_GLOBAL_SEED", os.environ.get("PL_GLOBAL_SEED"))
        seed = int(env) if env is not None else 0
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed: expected 0 <= seed <= {_MAX_SEED}, got {seed}")
    os.environ["FOLDOPS_GLOBAL_SEED"] = str(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    torch.manual_seed(seed)  # seeds every device's default generator as well
    return seed
