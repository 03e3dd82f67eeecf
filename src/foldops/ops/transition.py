"""SwiGLU transition (Boltz-2 ``Transition``): the public functional.

    x: [..., D]   norm_weight, norm_bias: [D]
    fc1_weight, fc2_weight: [H, D]   fc3_weight: [O, H]   (``nn.Linear`` layout, no biases)
    out: [..., O]

    h   = LayerNorm(x)
    out = (silu(h fc1^T) * (h fc2^T)) fc3^T

Backends:

- ``torch``: at inference (no gradient needed) memory-bounded: positions are processed
  ``chunk_size`` at a time with ``fc1``/``fc2`` fused in one matmul and the gate applied
  in place, so extra memory is O(M O) for the output plus O(chunk H) (M = number of
  positions); the hidden ``[M, H]`` activations never exist whole. (An ``x`` that
  cannot be viewed as ``[M, D]`` is copied once first.) With gradients it
  runs the reference's autograd graph (O(M H) activations, as Boltz's module).
- ``reference``: the plain composition (O(M H) with three hidden-wide temporaries);
  never picked by ``auto``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from foldops import backends
from foldops._checks import FLOAT_DTYPES, check_positive_float, check_positive_int, check_tensor
from foldops.budget import rows_per_chunk
from foldops.device import autocast_dtype_in_effect, fp32_region
from foldops.reference import transition as _reference

OP = "swiglu_transition"


def _compute_dtype(x: torch.Tensor):
    """(dtype of the matmuls, whether the LayerNorm runs in fp32 under autocast)."""
    amp = autocast_dtype_in_effect(x)
    if amp is not None and x.dtype != torch.float64:  # autocast leaves fp64 alone
        return amp, True
    return x.dtype, False


def _autograd_path(x, norm_weight, norm_bias, fc1_weight, fc2_weight, fc3_weight, eps):
    # With gradients, chunking would bound nothing (autograd keeps every chunk), so this is
    # the plain composition: the reference's graph, rounding for rounding.
    return _reference.swiglu_transition(
        x,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        fc1_weight=fc1_weight,
        fc2_weight=fc2_weight,
        fc3_weight=fc3_weight,
        eps=eps,
    )


def _positions_per_chunk(positions, dim, hidden, dtype, device, chunk_size=None) -> int:
    """Positions per step: the fused ``[chunk, 2H]`` hidden block (a workspace reused by
    every chunk) and the LayerNorm's ``[chunk, D]`` temporaries stay within
    ``foldops.budget``'s chunk budget. Large chunks mean few ops (each one a thread-pool
    barrier on CPU, a launch on GPU)."""
    per_position = 2 * hidden * (torch.finfo(dtype).bits // 8) + 3 * dim * 4
    return rows_per_chunk(device, per_position, positions, chunk_size)


@torch.no_grad()
def _inference_path(x, norm_weight, norm_bias, fc1_weight, fc2_weight, fc3_weight, eps, chunk_size):
    dim = x.shape[-1]
    hidden, out_dim = fc1_weight.shape[0], fc3_weight.shape[0]
    lead = x.shape[:-1]
    positions = math.prod(lead)
    cdt, amp = _compute_dtype(x)
    ln_dtype = torch.float32 if amp else cdt
    chunk = _positions_per_chunk(positions, dim, hidden, cdt, x.device, chunk_size)
    with fp32_region(x):  # dtypes are explicit below
        xf = x.reshape(positions, dim)
        w12 = torch.cat([fc1_weight, fc2_weight]).to(cdt)
        w3 = fc3_weight.to(cdt)
        ln = (norm_weight.to(ln_dtype), norm_bias.to(ln_dtype))
        out = torch.empty((positions, out_dim), dtype=cdt, device=x.device)
        work = torch.empty((chunk, 2 * hidden), dtype=cdt, device=x.device)
        for s in range(0, positions, chunk):
            h = F.layer_norm(xf[s : s + chunk].to(ln_dtype), (dim,), *ln, eps).to(cdt)
            u = work[: h.shape[0]]
            torch.matmul(h, w12.T, out=u)  # [chunk, 2H]: fc1 | fc2
            gate = F.silu(u[:, :hidden], inplace=True)
            gate.mul_(u[:, hidden:])
            torch.matmul(gate, w3.T, out=out[s : s + chunk])
    return out.view(*lead, out_dim)


def _torch_backend(x, norm_weight, norm_bias, fc1_weight, fc2_weight, fc3_weight, eps, chunk_size):
    weights = (norm_weight, norm_bias, fc1_weight, fc2_weight, fc3_weight)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in weights))
    if needs_grad or x.numel() == 0:
        return _autograd_path(x, *weights, eps)
    return _inference_path(x, *weights, eps, chunk_size)


def _reference_backend(x, norm_weight, norm_bias, fc1_weight, fc2_weight, fc3_weight, eps, chunk_size):
    return _reference.swiglu_transition(
        x,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        fc1_weight=fc1_weight,
        fc2_weight=fc2_weight,
        fc3_weight=fc3_weight,
        eps=eps,
    )


backends.register(OP, "torch", _torch_backend, priority=50)
backends.register(OP, "reference", _reference_backend, priority=0, auto=False)


def validate(x, norm_weight, norm_bias, fc1_weight, fc2_weight, fc3_weight, eps) -> None:
    """Check shapes, dtypes, devices and options."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected shape (..., D) with at least 1 dim, got {tuple(x.shape)}")
    dim = x.shape[-1]
    check_tensor("fc1_weight", fc1_weight, (None, dim), device=x.device)
    hidden = fc1_weight.shape[0]
    check_tensor("fc3_weight", fc3_weight, (None, hidden), device=x.device)
    shapes = {"norm_weight": (dim,), "norm_bias": (dim,), "fc2_weight": (hidden, dim)}
    tensors = {"norm_weight": norm_weight, "norm_bias": norm_bias, "fc2_weight": fc2_weight}
    for name, t in tensors.items():
        check_tensor(name, t, shapes[name], dtypes=FLOAT_DTYPES, device=x.device)
    # Under autocast the weights may stay fp32 (autocast casts them); otherwise x's dtype.
    if not _compute_dtype(x)[1]:
        tensors.update(fc1_weight=fc1_weight, fc3_weight=fc3_weight)
        for name, t in tensors.items():
            if t.dtype != x.dtype:
                raise TypeError(f"{name}: expected dtype {x.dtype} (as x), got {t.dtype}")
    check_positive_float("eps", eps)


def swiglu_transition(
    x: torch.Tensor,
    *,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc3_weight: torch.Tensor,
    eps: float = 1e-5,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm then the SwiGLU MLP ``fc3(silu(fc1(h)) * fc2(h))``; see the module doc.

    Args:
        x: ``[..., D]``, any strides.
        norm_weight, norm_bias: ``[D]`` LayerNorm.
        fc1_weight, fc2_weight: ``[H, D]`` gate and value projections.
        fc3_weight: ``[O, H]`` output projection. Weights have x's dtype (any float
            dtype under autocast).
        eps: LayerNorm epsilon.
        chunk_size: positions per step for the ``torch`` backend at inference
            (default: the ``[chunk, 2H]`` hidden block within ``foldops.budget``'s
            chunk budget).
        backend: ``"auto"``, ``"torch"`` or ``"reference"``.

    Returns:
        ``[..., O]`` in x's dtype (autocast's dtype under autocast).
    """
    validate(x, norm_weight, norm_bias, fc1_weight, fc2_weight, fc3_weight, eps)
    check_positive_int("chunk_size", chunk_size)
    impl = backends.select(OP, backend, device=x.device, dtype=x.dtype)
    return impl.fn(x, norm_weight, norm_bias, fc1_weight, fc2_weight, fc3_weight, float(eps), chunk_size)
