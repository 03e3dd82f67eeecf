"""foldops.ops.attention_pair_bias: a thin functional over triangle_attention (I = M samples)."""

import dataclasses

import pytest
import torch

from foldops import backends
from foldops.backends import BackendUnavailableError
from foldops.ops import attention_pair_bias, triangle_attention
from foldops.reference.triangle_attention import triangle_attention as reference
from foldops.testing import check_against_float64

BACKENDS = ("torch", "reference")


def make_inputs(batch, samples, queries, keys, heads, dim, mask_rank=2):
    q = torch.randn(batch, samples, queries, heads, dim, dtype=torch.float64)
    k, v = (torch.randn(batch, samples, keys, heads, dim, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(batch, heads, queries, keys, dtype=torch.float64)
    if mask_rank == 2:
        mask = torch.rand(batch, keys) > 0.3
        mask[:, 0] = True
    else:
        mask = torch.rand(batch, samples, keys) > 0.3
        mask[:, :, 0] = True
        if samples > 1:
            mask[0, 1] = False  # a sample with every key masked
    return q, k, v, bias, mask


def expand_mask(mask, samples):
    return mask[:, None].expand(-1, samples, -1) if mask.dim() == 2 else mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize(
    "batch, samples, queries, keys, mask_rank",
    [(1, 1, 1, 1, 2), (2, 1, 13, 13, 2), (1, 3, 7, 7, 2), (2, 3, 7, 7, 3), (2, 2, 5, 11, 2), (1, 3, 4, 9, 3)],
)
def test_vs_float64(backend, dtype, batch, samples, queries, keys, mask_rank):
    heads, dim = 3, 16
    q, k, v, bias, mask = make_inputs(batch, samples, queries, keys, heads, dim, mask_rank)
    full_mask = expand_mask(mask, samples)
    result = check_against_float64(
        lambda *t: attention_pair_bias(*t, mask, backend=backend), lambda *t: reference(*t, full_mask),
        (q, k, v, bias), dtype, names=("q", "k", "v", "bias"),
    )
    (fast,), fast_g = result.outputs, result.grads
    assert fast.dtype == dtype and fast.shape == q.shape
    dead = ~full_mask.any(-1)
    assert (fast[dead] == 0).all() and (fast_g[0][dead] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_mask_equals_per_sample_mask_and_triangle_attention(backend):
    q, k, v, bias, mask = (t.float() if t.is_floating_point() else t for t in make_inputs(2, 3, 6, 6, 2, 8))
    shared = attention_pair_bias(q, k, v, bias, mask, backend=backend)
    per_sample = attention_pair_bias(q, k, v, bias, expand_mask(mask, 3).contiguous(), backend=backend)
    as_float = attention_pair_bias(q, k, v, bias, mask.float(), backend=backend)
    tri = triangle_attention(q, k, v, bias, expand_mask(mask, 3), backend=backend)
    assert torch.equal(shared, per_sample) and torch.equal(shared, tri) and torch.equal(shared, as_float)


def test_without_mask_and_scale():
    q, k, v, bias, _ = make_inputs(1, 2, 5, 5, 2, 8)
    out = attention_pair_bias(q, k, v, bias, scale=0.3)
    torch.testing.assert_close(out, reference(q, k, v, bias, None, scale=0.3))
    q, k, v, bias, _ = make_inputs(1, 2, 5, 8, 2, 8)
    out = attention_pair_bias(q, k, v, bias, scale=0.3)
    torch.testing.assert_close(out, reference(q, k, v, bias, None, scale=0.3))


def test_dispatch_through_its_own_registry(monkeypatch):
    """attention_pair_bias has its own backends and its own FOLDOPS_BACKEND_<OP> override."""
    calls = []
    table = backends._REGISTRY["attention_pair_bias"]
    for name, backend in list(table.items()):
        def spy(*args, _fn=backend.fn, _name=name):
            calls.append(_name)
            return _fn(*args)
        monkeypatch.setitem(table, name, dataclasses.replace(backend, fn=spy))
    monkeypatch.delenv("FOLDOPS_BACKEND", raising=False)
    monkeypatch.setenv("FOLDOPS_BACKEND_ATTENTION_PAIR_BIAS", "reference")
    q, k, v, bias, mask = make_inputs(1, 1, 4, 4, 2, 8)
    attention_pair_bias(q, k, v, bias, mask)
    assert calls == ["reference"]
    monkeypatch.delenv("FOLDOPS_BACKEND_ATTENTION_PAIR_BIAS")
    attention_pair_bias(q, k, v, bias, mask, backend="torch")
    assert calls == ["reference", "torch"]
    attention_pair_bias(*make_inputs(1, 1, 4, 6, 2, 8)[:4])  # windowed: auto picks torch
    assert calls == ["reference", "torch", "torch"]
    names = [name for name, _ in backends.availability("attention_pair_bias", device=torch.device("cpu"),
             dtype=torch.float32, head_dim=8, scale=1.0, masked=False, queries=4, keys=4)]
    assert names == ["triton", "torch", "reference"]


def test_reference_module_matches_triangle_attention_reference():
    from foldops.reference.attention_pair_bias import attention_pair_bias as apb_reference

    q, k, v, bias, mask = make_inputs(2, 3, 6, 6, 2, 8)
    assert torch.equal(apb_reference(q, k, v, bias, mask), reference(q, k, v, bias, expand_mask(mask, 3)))


def test_windowed_rejects_other_backends():
    q, k, v, bias, mask = make_inputs(1, 1, 4, 6, 2, 16)
    with pytest.raises(BackendUnavailableError, match="'triton' cannot run attention_pair_bias: 4 queries and 6 keys"):
        attention_pair_bias(q.float(), k.float(), v.float(), bias.float(), mask, backend="triton")
    with pytest.raises(TypeError, match="backend"):
        attention_pair_bias(q, k, v, bias, mask, backend=1)


def good(keys=5):
    q, k, v, bias, mask = make_inputs(2, 3, 5, keys, 2, 8)
    return dict(q=q, k=k, v=v, bias=bias, mask=mask)


@pytest.mark.parametrize("keys", (5, 7))
@pytest.mark.parametrize(
    "field, make, error, pattern",
    [
        ("q", lambda n: torch.randn(2, 5, 2, 8), ValueError, "q: expected shape"),
        ("k", lambda n: torch.randn(2, 3, n, 3, 8), ValueError, r"k: expected shape \(2, 3, '\*', 2, 8\)"),
        ("v", lambda n: torch.randn(2, 3, n + 1, 2, 8), ValueError, "v: expected shape"),
        ("bias", lambda n: torch.randn(2, 2, 5, n + 1), ValueError, "bias: expected shape"),
        ("bias", lambda n: torch.randn(2, 2, 5, n, dtype=torch.float16), TypeError, "bias: expected dtype"),
        ("mask", lambda n: torch.ones(2, n + 1), ValueError, r"mask: expected shape \(2, \d+\), got \(2, \d+\)"),
        ("mask", lambda n: torch.ones(2, 4, n), ValueError, r"mask: expected shape \(2, 3, \d+\)"),
        ("mask", lambda n: torch.ones(2, 3, n, 1), ValueError, r"mask: expected shape \(2, \d+\) or \(2, 3, \d+\)"),
        ("mask", lambda n: torch.ones(2, n, dtype=torch.complex64), TypeError, "mask: expected a bool"),
    ],
)
def test_bad_inputs(keys, field, make, error, pattern):
    args = good(keys)
    args[field] = make(keys)
    with pytest.raises(error, match=pattern):
        attention_pair_bias(args["q"], args["k"], args["v"], args["bias"], args["mask"])


@pytest.mark.parametrize("keys", (5, 7))
def test_bad_chunk_size(keys):
    with pytest.raises(ValueError, match="chunk_size"):
        attention_pair_bias(*good(keys).values(), chunk_size=0)
