"""Shared helpers for the Boltz-parity tests of foldops.nn.

Parity recipe: a Boltz module with random parameters (its own init zeroes the output
projections, which would make every comparison trivial); its state dict loaded with
``strict=True`` into a foldops module in fp32 and into one in fp64 running the
``reference`` backend (the exact answer). Outputs and gradients (inputs and parameters)
are compared at unmasked positions, the loss weighting padded outputs by zero:

- accuracy: foldops fp32's error vs fp64 is at most 2x Boltz fp32's, plus the fp32 floor;
- agreement: Boltz fp32 agrees with the fp64 answer as well as foldops fp32 does (2x
  plus floor), which fails if foldops computed something else than Boltz.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, Sequence

import pytest
import torch

from foldops import testing
from foldops.testing import DEFAULT_REL_FLOOR, assert_within_baseline


def import_boltz(module: str):
    """``boltz.<module>``, or skip the test when boltz (or a dependency of it) is missing.

    Boltz installs with ``--no-deps``; its layers need only torch, numpy, scipy and einops.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.skip(f"{module} is not importable: {exc}")


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a generic random value of sensible scale."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.dim() >= 2:
            value = noise / p.shape[-1] ** 0.5
        elif name.endswith("weight"):
            value = 1.0 + 0.2 * noise
        else:
            value = 0.2 * noise
        p.copy_(value.to(p.dtype))
    return module


def load_into(ours: torch.nn.Module, theirs: torch.nn.Module) -> torch.nn.Module:
    missing = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return ours


def forward_backward(
    module: torch.nn.Module,
    call: Callable,
    inputs: Sequence[torch.Tensor],
    grad_outs: Sequence[torch.Tensor],
    dtype: torch.dtype,
    differentiable: Sequence[bool],
    seed: int = 1234,
):
    """Run ``call(module, *inputs)`` on fresh ``dtype`` leaves, backprop ``grad_outs``;
    return outputs, input grads, parameter grads (by name), all detached."""
    inputs = testing.leaves(inputs, dtype, differentiable)
    torch.manual_seed(seed)  # same dropout masks for every model
    result = testing.forward_backward(lambda *t: call(module, *t), inputs, grad_outs, module=module)
    return list(result.outputs), list(result.grads), result.param_grads


def check_parity(
    boltz: torch.nn.Module,
    make_ours: Callable[..., torch.nn.Module],
    call: Callable,
    inputs: Sequence[torch.Tensor],
    out_valid: Sequence[torch.Tensor],
    in_valid: Sequence,
    train: bool = False,
    boltz_call: Callable = None,
) -> Dict[str, torch.Tensor]:
    """Boltz fp32 vs foldops fp32 vs foldops fp64 (reference backend); see the module doc.

    ``out_valid[i]`` / ``in_valid[i]``: keep-masks broadcastable to output / input i (None:
    input i is not differentiated, e.g. a mask). Returns foldops fp32's outputs and grads.
    """
    boltz = boltz.float().train(train)
    ours32 = load_into(make_ours(dtype=torch.float32), boltz).train(train)
    exact = load_into(make_ours(dtype=torch.float64, backend="reference"), boltz).train(train)
    boltz_call = boltz_call or call

    # Outputs: probe them once for shapes, then weight padded entries by zero.
    with torch.no_grad():
        probe = call(ours32, *testing.leaves(inputs, torch.float32, False))
    probe = probe if isinstance(probe, tuple) else (probe,)
    gen = torch.Generator().manual_seed(7)
    grad_outs = [
        torch.randn(p.shape, generator=gen, dtype=torch.float64) * v.to(torch.float64)
        for p, v in zip(probe, out_valid)
    ]

    diff = [v is not None for v in in_valid]
    b_out, b_in, b_par = forward_backward(boltz, boltz_call, inputs, grad_outs, torch.float32, diff)
    o_out, o_in, o_par = forward_backward(ours32, call, inputs, grad_outs, torch.float32, diff)
    e_out, e_in, e_par = forward_backward(exact, call, inputs, grad_outs, torch.float64, diff)

    def compare(name, ours, ref, base, valid):
        assert torch.isfinite(ours).all(), f"{name}: foldops fp32 has NaN/inf (padded positions included)"
        if valid is not None:
            v = valid.to(torch.float64)
            ours, ref, base = ours * v, ref * v, base * v
        assert_within_baseline(f"{name} (foldops fp32 vs fp64)", ours, ref, base, dtype=torch.float32)
        assert_within_baseline(f"{name} (boltz fp32 vs foldops fp64)", base, ref, ours, dtype=torch.float32)

    for i, (o, e, b, v) in enumerate(zip(o_out, e_out, b_out, out_valid)):
        assert o.dtype == b.dtype, f"output {i}: dtype {o.dtype} != boltz {b.dtype}"
        compare(f"output {i}", o, e, b, v)
    for i, (o, e, b, v) in enumerate(zip(o_in, e_in, b_in, in_valid)):
        if v is not None and o is not None:
            compare(f"grad of input {i}", o, e, b, v)
    assert set(o_par) == set(b_par)
    grad_scale = max(g.abs().max().item() for g in e_par.values() if g is not None)
    for name in b_par:
        if b_par[name] is None:
            assert o_par[name] is None or not o_par[name].any(), name
            continue
        if e_par[name].abs().max().item() <= 1e-10 * grad_scale:
            # Zero by symmetry (e.g. a bias that shifts every logit of a softmax alike): both
            # fp32 results are pure rounding noise, on the scale of the module's gradients.
            check_symmetry_zero(f"grad of {name}", o_par[name], b_par[name], grad_scale)
            continue
        compare(f"grad of {name}", o_par[name], e_par[name], b_par[name], None)
    return {"outputs": o_out, "input_grads": o_in, "param_grads": o_par}


def check_symmetry_zero(name, ours: torch.Tensor, boltz: torch.Tensor, scale: float) -> None:
    """A gradient that is exactly zero in exact arithmetic: the fp32 noise of each must stay
    within 2x the other's plus the fp32 floor of the module's gradient scale."""
    floor = DEFAULT_REL_FLOOR[torch.float32] * scale
    err_ours, err_boltz = ours.abs().max().item(), boltz.abs().max().item()
    assert err_ours <= 2 * err_boltz + floor, f"{name}: foldops {err_ours:.3e} vs boltz {err_boltz:.3e}, floor {floor:.3e}"
    assert err_boltz <= 2 * err_ours + floor, f"{name}: boltz {err_boltz:.3e} vs foldops {err_ours:.3e}, floor {floor:.3e}"


def padding_masks(batch_lengths: Sequence[int], n: int):
    """Token mask [B, N] (float, as Boltz passes it) with the given valid lengths, and its pair mask."""
    mask = torch.zeros(len(batch_lengths), n)
    for b, length in enumerate(batch_lengths):
        mask[b, :length] = 1.0
    return mask, mask[:, :, None] * mask[:, None, :]


_HELPERS = sys.modules[__name__]
"""This module, taken while it runs: later, ``sys.modules["conftest"]`` may be another
directory's conftest.py (pytest imports each one without an ``__init__.py`` as ``conftest``)."""


@pytest.fixture
def nnh():
    """These helpers, for the test modules of tests/nn."""
    return _HELPERS
