"""Test helpers shared by foldops's tests and benchmarks.

The accuracy rule (after flash-attention's tests): a fast backend's error against a
float64 reference is at most twice the error of the plain PyTorch computation run in
the same low precision, plus a small floor relative to the reference's magnitude.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

# Floor relative to max|reference|, by the dtype the backend ran in.
DEFAULT_REL_FLOOR: Dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-4,
    torch.bfloat16: 1e-3,
}


def max_abs_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    """max |x - exact| in float64; inf if x holds a NaN/inf that ``exact`` does not."""
    diff = (x.detach().to(torch.float64) - exact.detach().to(torch.float64)).abs()
    if not torch.isfinite(diff).all():
        return float("inf")
    return diff.max().item() if diff.numel() else 0.0


def assert_within_baseline(
    name: str,
    fast: torch.Tensor,
    exact: torch.Tensor,
    baseline: torch.Tensor,
    dtype: Optional[torch.dtype] = None,
    factor: float = 2.0,
    rel_floor: Optional[float] = None,
) -> None:
    """Assert err(fast) <= factor * err(baseline) + floor, all against ``exact`` (fp64)."""
    if tuple(fast.shape) != tuple(exact.shape):
        raise AssertionError(f"{name}: shape {tuple(fast.shape)} != reference {tuple(exact.shape)}")
    dtype = dtype or fast.dtype
    if rel_floor is None:
        rel_floor = DEFAULT_REL_FLOOR.get(dtype, 1e-3)
    scale = exact.detach().abs().max().item() if exact.numel() else 0.0
    err_fast = max_abs_error(fast, exact)
    err_base = max_abs_error(baseline, exact)
    bound = factor * err_base + rel_floor * max(scale, 1e-30)
    if not err_fast <= bound:
        raise AssertionError(
            f"{name}: error {err_fast:.3e} > {factor} x baseline error {err_base:.3e} "
            f"+ floor {rel_floor:.1e} x {scale:.3e} (= {bound:.3e})"
        )


def grads(output: torch.Tensor, inputs: Iterable[torch.Tensor], grad_output: torch.Tensor):
    """Gradients of ``(output * grad_output).sum()`` w.r.t. ``inputs`` (None where unused)."""
    inputs = list(inputs)
    return torch.autograd.grad(output, inputs, grad_output, allow_unused=True)
