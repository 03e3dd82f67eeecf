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
    stats = {"reserved_bytes": {"all": {"current": 60 * 2**30}}, "allocated_bytes": {"all": {"current": 20 * 2**30}}}
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", lambda dev: stats)
    assert free_memory_bytes(torch.device("cuda", 0)) == 43 * 2**30
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", lambda dev: {})  # allocator unused yet
    assert free_memory_bytes(torch.device("cuda", 0)) == 3 * 2**30


def test_small_work_on_an_accelerator_skips_the_memory_query(monkeypatch):
    """Up to ACCELERATOR_SMALL_BYTES of intermediates run whole without a free-memory
    query (host time); more asks the device; the override still wins."""
    from foldops import budget

    calls = []

    def query(device):
        calls.append(device)
        return 4 * 2**30  # a 1 GiB budget

    monkeypatch.setattr(budget, "_query_free_bytes", query)
    monkeypatch.delenv(budget.ENV_BUDGET_MB, raising=False)
    gpu = torch.device("cuda", 0)
    small = budget.ACCELERATOR_SMALL_BYTES
    assert budget.rows_per_chunk(gpu, bytes_per_row=small // 64, rows=64) == 64
    assert calls == []
    assert budget.rows_per_chunk(gpu, bytes_per_row=2**30 // 8, rows=64) == 8
    assert len(calls) == 1
    monkeypatch.setenv(budget.ENV_BUDGET_MB, "1")
    assert budget.rows_per_chunk(gpu, bytes_per_row=2**19, rows=64) == 2
