"""Host path of the triangle attention launchers: plain-Python grid arithmetic equals
Triton's, cached choices equal fresh ones and follow replaced rules."""

import pytest
import torch

triton = pytest.importorskip("triton")

from foldops.kernels._utils import cdiv, next_pow2
from foldops.kernels.triangle_attention import dbias_splits, launch


def test_host_arithmetic_matches_triton():
    """The shared plain-Python grid arithmetic every launcher uses."""
    for x in range(1, 3000):
        assert next_pow2(x) == triton.next_power_of_2(x)
        for b in (1, 16, 64, 1024):
            assert cdiv(x, b) == triton.cdiv(x, b)


def test_config_cache_equals_fresh_choice(monkeypatch):
    monkeypatch.setattr(launch, "_interpreting", lambda: False)
    launch.clear_caches()
    for kind in ("fwd", "dq", "dkdv", "dbias"):
        for n in (17, 128, 384, 1024):
            for dtype in (torch.bfloat16, torch.float32):
                fresh = launch._choose_config(kind, n, 32, dtype, dtype, False)
                assert launch._config(kind, n, 32, dtype, dtype) == fresh
                assert launch._config(kind, n, 32, dtype, dtype) == fresh  # from the cache
    launch.clear_caches()


def test_split_plan_follows_replaced_rule(monkeypatch):
    q = torch.empty(1, 8, 32, 2, 16)
    launch.clear_caches()
    plans = []
    for splits in (1, 3, 1):
        monkeypatch.setattr(dbias_splits, "bias_splits", lambda *a, s=splits: s)
        plans.append(launch._split_plan(1, 8, 32, 2, 16, q, (16, 16, 4, 1), room=100))
    assert plans == [(1, 8), (3, 3), (1, 8)]
    launch.clear_caches()
