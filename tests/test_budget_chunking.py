"""Chunk only when memory needs it: on accelerators the torch backends and layers run
unchunked while their intermediates fit the budget (a share of free memory), and chunk
past it; CPU keeps cache-sized chunks. Budgets are monkeypatched (no GPU needed)."""

import importlib

import pytest
import torch

from foldops import budget
from foldops.ops.triangle_attention import triangle_attention

opm_module = importlib.import_module("foldops.ops.outer_product_mean")
transition_module = importlib.import_module("foldops.ops.transition")
GPU = torch.device("cuda")  # a device object only: nothing is allocated on it
GIB = 2**30


@pytest.fixture
def free_memory(monkeypatch):
    """Set the free memory every accelerator reports."""
    monkeypatch.delenv(budget.ENV_BUDGET_MB, raising=False)

    def set_free(nbytes):
        monkeypatch.setattr(budget, "_query_free_bytes", lambda device: nbytes)

    return set_free


def test_accelerator_budget_is_share_of_free_memory(free_memory):
    free_memory(80 * GIB)
    assert budget.chunk_budget_bytes(GPU) == int(80 * GIB * budget.ACCELERATOR_FREE_FRACTION)
    assert budget.chunk_budget_bytes(torch.device("cpu")) == budget.CPU_BUDGET_BYTES  # CPU unchanged
    free_memory(None)  # not queryable
    assert budget.chunk_budget_bytes(GPU) == budget.ACCELERATOR_FALLBACK_BYTES


def test_user_override_wins(free_memory, monkeypatch):
    free_memory(80 * GIB)
    monkeypatch.setenv(budget.ENV_BUDGET_MB, "8")
    assert budget.chunk_budget_bytes(GPU) == 8 * 2**20


@pytest.mark.parametrize("n", [256, 1024])
def test_ops_unchunked_on_a_free_gpu_and_chunked_when_short(free_memory, n):
    free_memory(80 * GIB)
    # triangle attention torch backend: [B, c, H, N, N] fp32 logits per chunk of rows.
    assert budget.rows_per_chunk(GPU, 1 * 4 * n * n * 4, n) == n
    # swiglu transition at Boltz sizes (D 128, hidden 512) over N^2 positions, bf16.
    assert transition_module._positions_per_chunk(n * n, 128, 512, torch.bfloat16, GPU) == n * n
    # outer product mean (S 1024, C 32, O 128): all rows in one step.
    assert opm_module._chunk_for("outer", 1, 1024, n, 32, 32, 128, GPU) == n
    free_memory(64 * 2**20)  # little free memory: chunks again
    assert budget.rows_per_chunk(GPU, 1 * 4 * n * n * 4, n) < n
    assert transition_module._positions_per_chunk(n * n, 128, 512, torch.bfloat16, GPU) < n * n
    # CPU: cache-sized chunks whatever the accelerator reports.
    assert transition_module._positions_per_chunk(n * n, 128, 512, torch.bfloat16, torch.device("cpu")) < n * n


def _count_sdpa(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    return calls


def test_triangle_attention_torch_backend_one_pass_when_it_fits(monkeypatch):
    """With an accelerator-sized budget the torch backend runs one SDPA call; with a tiny
    one it chunks; the results agree."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 9, 2, 8, generator=gen) for _ in range(3))
    bias = torch.randn(1, 2, 9, 9, generator=gen)
    mask = torch.rand(1, 9, 9, generator=gen) > 0.3
    calls = _count_sdpa(monkeypatch)
    monkeypatch.setattr(budget, "chunk_budget_bytes", lambda device: 20 * GIB)
    with torch.no_grad():
        whole = triangle_attention(q, k, v, bias, mask, backend="torch")
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr(budget, "chunk_budget_bytes", lambda device: 1)
    with torch.no_grad():
        chunked = triangle_attention(q, k, v, bias, mask, backend="torch")
    assert len(calls) == 9
    torch.testing.assert_close(whole, chunked)


def test_triangle_attention_layer_one_shot_when_it_fits(monkeypatch):
    from foldops.nn import TriangleAttention

    layer = TriangleAttention(8, 4, 2, backend="torch").eval()
    x = torch.randn(1, 11, 11, 8)
    calls = _count_sdpa(monkeypatch)
    monkeypatch.setattr(budget, "chunk_budget_bytes", lambda device: 20 * GIB)
    with torch.no_grad():
        whole = layer(x)
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr(budget, "chunk_budget_bytes", lambda device: 4096)
    with torch.no_grad():
        chunked = layer(x)
    assert len(calls) > 1
    torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=1e-6)


def _count_queries(monkeypatch):
    calls = []
    monkeypatch.delenv(budget.ENV_BUDGET_MB, raising=False)
    monkeypatch.setattr(budget, "_query_free_bytes", lambda device: calls.append(device) or 80 * GIB)
    return calls


def test_training_paths_ask_no_free_memory(monkeypatch):
    """With gradients nothing is chunked (autograd keeps every chunk), so the torch paths
    must not pay a free-memory query (tens of microseconds of host time on CUDA) to size
    chunks they will not use. Meta tensors stand in for an accelerator's: past
    ``ACCELERATOR_SMALL_BYTES`` of intermediates, inference asks once (the check that
    this test would see a query)."""
    from foldops.nn import AttentionPairBias

    calls = _count_queries(monkeypatch)
    n, heads = 256, 4  # [1, 256, 4, 256, 256] fp32 logits: 256 MiB
    q, k, v = (torch.empty(1, n, n, heads, 32, device="meta", requires_grad=True) for _ in range(3))
    bias = torch.empty(1, heads, n, n, device="meta", requires_grad=True)
    triangle_attention(q, k, v, bias, backend="torch")
    assert calls == []
    with torch.no_grad():
        triangle_attention(q, k, v, bias, backend="torch")
    assert len(calls) == 1

    calls.clear()
    layer = AttentionPairBias(16, 384, 4, backend="torch").to("meta")
    s = torch.empty(1, n, 16, device="meta")
    z = torch.empty(1, n, n, 384, device="meta")  # z and its normalised copy: 192 MiB
    mask = torch.ones(1, n, dtype=torch.bool, device="meta")
    layer(s, z, mask, s)
    assert calls == []
    with torch.no_grad():
        layer(s, z, mask, s)
    assert len(calls) == 1
