import pytest
import torch

from foldops import budget


def test_cpu_budget_is_cache_sized(monkeypatch):
    monkeypatch.delenv(budget.ENV_BUDGET_MB, raising=False)
    assert budget.chunk_budget_bytes(torch.device("cpu")) == budget.CPU_BUDGET_BYTES


def test_override_and_bad_override(monkeypatch):
    monkeypatch.setenv(budget.ENV_BUDGET_MB, "3")
    assert budget.chunk_budget_bytes(torch.device("cpu")) == 3 * 2**20
    monkeypatch.setenv(budget.ENV_BUDGET_MB, "lots")
    with pytest.raises(ValueError, match=budget.ENV_BUDGET_MB):
        budget.chunk_budget_bytes(torch.device("cpu"))
    monkeypatch.setenv(budget.ENV_BUDGET_MB, "0")
    with pytest.raises(ValueError, match="positive"):
        budget.chunk_budget_bytes(torch.device("cpu"))


def test_rows_per_chunk(monkeypatch):
    monkeypatch.setenv(budget.ENV_BUDGET_MB, "1")
    cpu = torch.device("cpu")
    assert budget.rows_per_chunk(cpu, bytes_per_row=2**10, rows=10_000) == 1024
    assert budget.rows_per_chunk(cpu, bytes_per_row=2**10, rows=100) == 100
    assert budget.rows_per_chunk(cpu, bytes_per_row=2**30, rows=100) == 1
    assert budget.rows_per_chunk(cpu, bytes_per_row=2**10, rows=0) == 1
    assert budget.rows_per_chunk(cpu, bytes_per_row=2**10, rows=100, chunk_size=7) == 7
    assert budget.rows_per_chunk(cpu, bytes_per_row=2**10, rows=5, chunk_size=7) == 5


def test_free_memory_is_unknown_on_cpu():
    from foldops.device import free_memory_bytes

    assert free_memory_bytes(torch.device("cpu")) is None


def test_cuda_free_memory_counts_the_allocators_unused_cache(monkeypatch):
    """Driver-free memory plus what PyTorch's caching allocator reserves but does not use
    (queried through the allocator's counters, so no GPU is needed here)."""
    from foldops.device import free_memory_bytes

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (3 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 60 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 20 * 2**30)
    assert free_memory_bytes(torch.device("cuda", 0)) == 43 * 2**30
