"""The Triton ops' forward and backward make no host read, host-built tensor or copy
between devices (``foldops.testing.forbid_host_sync``): what CUDA graph capture refuses.

Run on the CPU under the interpreter (the launchers' host code is the same as on a
GPU) and, marked ``gpu``, on CUDA tensors with the compiled kernels. Each op runs its
registered custom op (the dispatch mode takes that path; the mode enters the op's body)
and its eager ``autograd.Function`` over the launchers (what eager CUDA graph capture
runs). tests/nn/test_compile_layers.py captures triangle attention on a GPU.
"""

from __future__ import annotations

import sys

import pytest
import torch

import foldops.ops as ops
from foldops.device import kernel_support
from foldops.testing import forbid_host_sync

CPU_KERNELS = kernel_support("cpu", "triton") is None  # the interpreter
KERNEL_OPS = ("triangle_attention", "triangle_multiplication", "pair_weighted_averaging",
              "invariant_point_attention", "varlen_attention")


def _inputs(name, device):
    """(fn, leaves, warm-up needed): a triton-backend call of ``name`` at a small size."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_()

    b, n, h, d = 1, 7, 2, 16
    if name in ("triangle_attention", "attention_pair_bias"):
        q, k, v = randn(b, 3, n, h, d), randn(b, 3, n, h, d), randn(b, 3, n, h, d)
        bias = randn(b, h, n, n)
        mask = (torch.rand(b, 3, n, generator=gen) > 0.2).to(device)
        if name == "attention_pair_bias":
            mask = mask[:, 0]
        return (lambda: getattr(ops, name)(q, k, v, bias, mask, backend="triton")), [q, k, v, bias]
    if name == "triangle_multiplication":
        c = 16
        x = randn(b, n, n, c)
        weights = dict(norm_in_weight=randn(c), norm_in_bias=randn(c), p_in_weight=randn(2 * c, c),
                       g_in_weight=randn(2 * c, c), norm_out_weight=randn(c), norm_out_bias=randn(c),
                       p_out_weight=randn(c, c), g_out_weight=randn(c, c))
        mask = (torch.rand(b, n, n, generator=gen) > 0.2).to(device)
        fn = lambda: ops.triangle_multiplication(x, mask, direction="outgoing", backend="triton",  # noqa: E731
                                                 **weights)
        return fn, [x, *weights.values()]
    if name == "pair_weighted_averaging":
        v, gate = randn(b, 3, n, h, d), randn(b, 3, n, h, d)
        logits = randn(b, h, n, n)
        mask = (torch.rand(b, n, n, generator=gen) > 0.2).to(device)
        return (lambda: ops.pair_weighted_averaging(v, logits, mask, gate=gate, backend="triton")), [v, logits, gate]
    if name == "invariant_point_attention":
        c, pq, pv, cz = 16, 4, 8, 8
        q, k, v = randn(b, n, h, c), randn(b, n, h, c), randn(b, n, h, c)
        q_pts, k_pts, v_pts = randn(b, n, h, pq, 3), randn(b, n, h, pq, 3), randn(b, n, h, pv, 3)
        bias, z = randn(b, h, n, n), randn(b, n, n, cz)
        weights = (torch.rand(h, generator=gen) + 0.1).to(device).requires_grad_()
        mask = (torch.rand(b, n, generator=gen) > 0.2).to(device)
        leaves = [q, k, v, q_pts, k_pts, v_pts, bias, weights, z]

        def fn():
            return sum(t.sum() for t in ops.invariant_point_attention(*leaves, mask, backend="triton"))

        return fn, leaves
    if name == "varlen_attention":
        lens = [5, 2, 7]
        cu = torch.tensor([0, 5, 7, 14], dtype=torch.int32, device=device)
        q, k, v = randn(sum(lens), h, d), randn(sum(lens), h, d), randn(sum(lens), h, d)
        # On accelerators the host check of cu_seqlens is remembered per tensor: a warm-up
        # call (as before any capture) leaves nothing to read in the checked call. (CPU
        # reads it on every call, free there: _run_without_host_sync stands the memo in.)
        return (lambda: ops.varlen_attention(q, k, v, cu, cu, max(lens), max(lens), causal=True,
                                             backend="triton")), [q, k, v]
    raise AssertionError(name)


def _run_without_host_sync(name, device, path, monkeypatch):
    if path == "eager":  # skip the registered ops (a dispatch mode would take them)
        module = "triangle_attention" if name == "attention_pair_bias" else name
        monkeypatch.setattr(f"foldops.kernels.{module}.op._use_registered_ops", lambda t: False)
    if name == "varlen_attention" and device == "cpu":  # the accelerators' memo of checked cu_seqlens
        module = sys.modules["foldops.ops.varlen_attention"]  # (the package attribute is the function)
        monkeypatch.setattr(module, "_remembered", lambda cu: not cu.is_inference())
        monkeypatch.setattr(module, "_checked", {})
    fn, leaves = _inputs(name, device)
    out = fn()
    expected = torch.autograd.grad(out, leaves, torch.ones_like(out))  # warm-up: caches, compiles
    with forbid_host_sync():
        out = fn()
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.skipif(not CPU_KERNELS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("path", ["registered", "eager"])
@pytest.mark.parametrize("name", ["triangle_attention", "attention_pair_bias", *KERNEL_OPS[1:]])
def test_forward_backward_without_host_sync(name, path, monkeypatch):
    _run_without_host_sync(name, "cpu", path, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["registered", "eager"])
@pytest.mark.parametrize("name", ["triangle_attention", "attention_pair_bias", *KERNEL_OPS[1:]])
def test_gpu_forward_backward_without_host_sync(name, path, monkeypatch):
    _run_without_host_sync(name, "cuda", path, monkeypatch)


@pytest.mark.skipif(not CPU_KERNELS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("path", ["registered", "eager"])
@pytest.mark.parametrize("offence", ["bool", "item", "tensor"])
def test_the_guard_sees_into_the_launchers(offence, path, monkeypatch):
    """A host read or a host-built tensor inside a launcher's helper (the key-mask bias,
    built in the forward and again in the backward) is caught on both paths."""
    from foldops.kernels.triangle_attention import launch

    real, calls = launch._key_mask_bias, []

    def offending(mask, *args, **kwargs):
        calls.append(len(calls))
        if len(calls) == 2:  # the backward's call
            {"bool": lambda: bool(mask.any()), "item": lambda: mask.sum().item(),
             "tensor": lambda: torch.tensor([0.0, 1.0], device=mask.device)}[offence]()
        return real(mask, *args, **kwargs)

    monkeypatch.setattr(launch, "_key_mask_bias", offending)
    if path == "eager":
        monkeypatch.setattr("foldops.kernels.triangle_attention.op._use_registered_ops", lambda t: False)
    fn, leaves = _inputs("triangle_attention", "cpu")
    with pytest.raises(AssertionError, match="forbid_host_sync"), forbid_host_sync():
        out = fn()
        assert len(calls) == 1
        torch.autograd.grad(out, leaves, torch.ones_like(out))


def test_the_guard_catches_the_usual_offenders():
    x = torch.randn(4)
    offenders = [lambda: x.sum().item(), lambda: bool(x.any()), lambda: torch.tensor([1, 2]),
                 lambda: torch.tensor([2.0]), lambda: x[x > 0],
                 lambda: x.nonzero(), lambda: torch.zeros(2).to("meta"),
                 lambda: torch.empty(2, device="meta").copy_(x[:2])]
    for offender in offenders:
        with pytest.raises(AssertionError, match="forbid_host_sync"), forbid_host_sync():
            offender()
    with forbid_host_sync():  # allowed: device-side work, copies on one device
        y = torch.where(x > 0, x, 0.0).to(torch.float64).clone()
        y.copy_(x)


def _offenders(x):
    """Host reads and outputs sized by the data beyond .item() and nonzero."""
    m, i = x > 0, torch.tensor([0, 2]).clone()  # made before the mode: not a host-built tensor there
    return {
        "x[mask] = vec": lambda: x.clone().__setitem__(m, x.new_ones(()).expand(4)),
        "x[mask] = 0-dim tensor": lambda: x.clone().__setitem__(m, x.sum()),
        "index_put_ mask": lambda: x.clone().index_put_((m,), x.sum(), accumulate=True),
        "index_put mask": lambda: x.index_put((m,), x[:1] * 2),
        "masked_fill tensor": lambda: x.masked_fill(m, x.sum()),
        "bincount": lambda: torch.bincount(i),
        "histc": lambda: torch.histc(x),
        "masked_select": lambda: x.masked_select(m),
        "repeat_interleave": lambda: torch.repeat_interleave(i),
        "repeat_interleave self": lambda: x.repeat_interleave(i.new_ones(4)),
        "unique_consecutive": lambda: torch.unique_consecutive(x),
        "unique": lambda: torch.unique(x),
        "unique dim": lambda: torch.unique(x, dim=0),
        "argwhere": lambda: torch.argwhere(x),
        "where(cond)": lambda: torch.where(m),
        "narrow tensor start": lambda: x.narrow(0, i[0], 2),
        "allclose": lambda: torch.allclose(x, x),
    }


def _allowed(x):
    m, i = x > 0, torch.tensor([0, 2]).clone()
    return {
        "index with positions": lambda: x[i],
        "index_put positions": lambda: x.clone().index_put_((i,), x[:2]),
        "masked_fill scalar": lambda: x.masked_fill(m, 0.0),
        "repeat_interleave int": lambda: x.repeat_interleave(2),
        "repeat_interleave output_size": lambda: x.repeat_interleave(i.new_ones(4), output_size=4),
        "histc range": lambda: torch.histc(x, 4, -1.0, 1.0),
        "nonzero_static": lambda: torch.nonzero_static(x, size=2),
        "where(cond, a, b)": lambda: torch.where(m, x, x * 2),
        "narrow int start": lambda: x.narrow(0, 1, 2),
        "a Python number as a 0-d host tensor": lambda: torch.tensor(2.0) * x,
    }


@pytest.mark.parametrize("name", list(_offenders(torch.zeros(4))))
def test_the_guard_catches_data_dependent_shapes_and_host_reads(name):
    x = torch.randn(4, generator=torch.Generator().manual_seed(0))
    offender = _offenders(x)[name]
    with pytest.raises(AssertionError, match="forbid_host_sync"), forbid_host_sync():
        offender()


@pytest.mark.parametrize("name", list(_allowed(torch.zeros(4))))
def test_the_guard_lets_device_side_forms_pass(name):
    x = torch.randn(4, generator=torch.Generator().manual_seed(0))
    allowed = _allowed(x)[name]
    with forbid_host_sync():
        allowed()


_PROBE = {}


@torch.library.custom_op("foldops_sync_probe::run", mutates_args=())
def _probe(x: torch.Tensor) -> torch.Tensor:
    _PROBE["fn"]()  # works on the tensors it closes over
    return x.clone()


@pytest.mark.parametrize("name", ["argwhere", "where(cond)", "narrow tensor start", "allclose",
                                  "repeat_interleave self", "x[mask] = vec", "bincount", "histc"])
def test_the_guard_catches_composite_forms_inside_custom_ops(name, monkeypatch):
    """Inside a custom op's body (autograd keys excluded) composite ops reach the mode
    undecomposed: argwhere, not the nonzero it calls."""
    x = torch.randn(4, generator=torch.Generator().manual_seed(0))
    monkeypatch.setitem(_PROBE, "fn", _offenders(x)[name])
    with pytest.raises(AssertionError, match="forbid_host_sync"), forbid_host_sync(("foldops_sync_probe",)):
        _probe(x)
    monkeypatch.setitem(_PROBE, "fn", _allowed(x)["repeat_interleave int"])
    with forbid_host_sync(("foldops_sync_probe",)):
        _probe(x)
