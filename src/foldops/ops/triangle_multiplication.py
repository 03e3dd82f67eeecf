"""Triangle multiplicative update (AF3 Algorithms 12/13 as in Boltz-2): the public functional.

    x: [B, N, N, D]   mask: [B, N, N] keep-mask (bool or 0/1 float) or None
    norm_in_weight, norm_in_bias, norm_out_weight, norm_out_bias: [D]
    p_in_weight, g_in_weight: [2D, D]   p_out_weight, g_out_weight: [D, D]
    out: [B, N, N, D]

    h      = LayerNorm_in(x)
    [a, b] = (h p_in^T) * sigmoid(h g_in^T) * mask
    t      = outgoing: t[i,j] = sum_k a[i,k] b[j,k];  incoming: t[i,j] = sum_k a[k,i] b[k,j]
    out    = (LayerNorm_out(t) p_out^T) * sigmoid(h g_out^T)

The argument list mirrors cuEquivariance's ``triangle_multiplicative_update`` (what
Boltz-2 calls with ``use_kernels=True``). The triangular product and LayerNorm_out run
in fp32 (fp64 for fp64 inputs) whatever the input dtype, as Boltz casts ``a, b`` to
float; the projections run in the input dtype, or autocast's. The output at a masked
pair is not zeroed (as in Boltz and cuEquivariance): only ``a`` and ``b`` are.

Backends:

- ``torch``: at inference (no gradient needed) memory-bounded: ``h`` is kept once in the
  compute dtype and overwritten by the output, ``t`` is built in ``[B, D, N, N]``
  layout by batched matmuls, ``chunk_size`` channels at a time, from gated
  projections computed straight into that layout. Extra memory O(B N^2 D) for ``h``
  and ``t`` plus O(chunk N^2) for one chunk of ``a, b`` and its gate (the 2D-wide
  projection is never materialised whole). Measured peak on CPU, fp32, D = 128,
  N = 256: about 3x the size of x (Boltz's module: about 7x). Few large ops, reused
  workspaces. With gradients it
  runs the reference's autograd graph (O(B N^2 D) activations, as Boltz's module).
- ``reference``: the plain composition (O(B N^2 D) with several 2D-wide temporaries);
  never picked by ``auto``.
- ``cuequivariance``: NVIDIA's fused op, only where ``cuequivariance_torch`` imports
  and the input is on an NVIDIA GPU; never picked by ``auto``. It ignores ``chunk_size``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from foldops import backends
from foldops._checks import (
    FLOAT_DTYPES,
    as_bool_mask,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_tensor,
)
from foldops.budget import rows_per_chunk
from foldops.device import autocast_dtype_in_effect, fp32_region
from foldops.reference import triangle_multiplication as _reference
from foldops.reference.triangle_multiplication import DIRECTIONS, product_dtype

OP = "triangle_multiplication"

WEIGHT_NAMES = (
    "norm_in_weight",
    "norm_in_bias",
    "p_in_weight",
    "g_in_weight",
    "norm_out_weight",
    "norm_out_bias",
    "p_out_weight",
    "g_out_weight",
)
# A chunk never has fewer than _MIN_CHUNK channels: thinner chunks would re-read h
# too often.
_MIN_CHUNK = 8


def _compute_dtype(x: torch.Tensor):
    """(dtype of the projections, whether LayerNorm_in runs in fp32 under autocast)."""
    amp = autocast_dtype_in_effect(x)
    if amp is not None and x.dtype != torch.float64:  # autocast leaves fp64 alone
        return amp, True
    return x.dtype, False


def _default_chunk(n: int, dim: int, device: torch.device = torch.device("cpu"), dtype=torch.float32) -> int:
    """Channels of the product per step: a chunk's a, b ([2c, N, N] in the product dtype),
    their gate and projection ([2c, N, N] each in ``dtype``, the projection only when
    it differs from the product dtype) stay within ``foldops.budget``'s chunk budget."""
    size, wide = torch.finfo(dtype).bits // 8, product_dtype(dtype)
    per_channel = 2 * n * n * (torch.finfo(wide).bits // 8 + size * (1 if wide == dtype else 2))
    return max(min(_MIN_CHUNK, dim), rows_per_chunk(device, per_channel, dim))


def _positions_per_block(dim: int, positions: int, device: torch.device) -> int:
    """Positions per LayerNorm / output step: its four or so ``[block, D]`` temporaries
    (counted in fp32) stay within ``foldops.budget``'s chunk budget."""
    return rows_per_chunk(device, 16 * dim, positions)


def _autograd_path(x, mask, direction, w, eps):
    # With gradients, chunking would bound nothing (autograd keeps every chunk), so this is
    # the plain composition: the reference's graph, rounding for rounding.
    return _reference.triangle_multiplication(x, mask, direction=direction, eps=eps, **w)


@torch.no_grad()
def _inference_path(x, mask, direction, w, eps, chunk_size):
    batch, n, _, dim = x.shape
    nn_ = n * n
    cdt, amp = _compute_dtype(x)
    ln_dtype = torch.float32 if amp else cdt
    wide = product_dtype(cdt)
    chunk = min(dim, chunk_size or _default_chunk(n, dim, x.device, cdt))
    block = _positions_per_block(dim, nn_, x.device)
    dev = x.device
    with fp32_region(x):  # dtypes are explicit below
        p_in, g_in = w["p_in_weight"].to(cdt), w["g_in_weight"].to(cdt)
        p_out, g_out = w["p_out_weight"].to(cdt), w["g_out_weight"].to(cdt)
        ln_in = (w["norm_in_weight"].to(ln_dtype), w["norm_in_bias"].to(ln_dtype))
        ln_out = (w["norm_out_weight"].to(wide), w["norm_out_bias"].to(wide))
        keep = None if mask is None else mask.reshape(batch, nn_).to(cdt)

        # h: LayerNorm_in(x), kept once; it becomes the output at the end.
        h = torch.empty((batch, n, n, dim), dtype=cdt, device=dev)
        rows = max(1, block // n)
        for i in range(0, n, rows):
            h[:, i : i + rows] = F.layer_norm(x[:, i : i + rows].to(ln_dtype), (dim,), *ln_in, eps)
        hf = h.view(batch, nn_, dim)

        # t[b, d] = a[b, d] @ b[b, d]^T (outgoing) or a^T @ b (incoming), ``chunk`` channels
        # at a time. Workspaces are allocated once and reused: few, large ops (each one a
        # thread-pool barrier on CPU) and no page faults from fresh buffers per chunk.
        t = torch.empty((batch, dim, n, n), dtype=wide, device=dev)
        ab = torch.empty((2 * chunk, nn_), dtype=wide, device=dev)
        gate = torch.empty((2 * chunk, nn_), dtype=cdt, device=dev)
        proj = ab if cdt == wide else torch.empty((2 * chunk, nn_), dtype=cdt, device=dev)
        for c0 in range(0, dim, chunk):
            c = min(chunk, dim - c0)
            sel = torch.arange(c0, c0 + c, device=dev)
            sel = torch.cat([sel, sel + dim])  # channels of a, then of b
            w_p, w_g = p_in.index_select(0, sel), g_in.index_select(0, sel)  # [2c, D]
            pc, gc, abc = proj[: 2 * c], gate[: 2 * c], ab[: 2 * c]
            for bi in range(batch):
                ht = hf[bi].T  # [D, N*N]: the projections come out channel-major
                torch.matmul(w_p, ht, out=pc)
                torch.matmul(w_g, ht, out=gc)
                pc.mul_(gc.sigmoid_())
                if keep is not None:
                    pc.mul_(keep[bi])
                if pc.data_ptr() != abc.data_ptr():
                    abc.copy_(pc)  # to fp32 after the gating, as the reference rounds
                a, b = ab[:c].view(c, n, n), ab[c : 2 * c].view(c, n, n)
                if direction == "outgoing":
                    torch.bmm(a, b.transpose(1, 2), out=t[bi, c0 : c0 + c])
                else:
                    torch.bmm(a.transpose(1, 2), b, out=t[bi, c0 : c0 + c])
        del ab, gate, proj

        # out = LayerNorm_out(t) p_out^T * sigmoid(h g_out^T), written over h block by block
        # (the gate first: it reads the block of h that the projection then overwrites).
        gate = torch.empty((min(block, nn_), dim), dtype=cdt, device=dev)
        for bi in range(batch):
            tf = t[bi].view(dim, nn_)
            for s in range(0, nn_, block):
                hb = hf[bi, s : s + block]
                gb = gate[: hb.shape[0]]
                torch.matmul(hb, g_out.T, out=gb)
                gb.sigmoid_()
                y = F.layer_norm(tf[:, s : s + block].T, (dim,), *ln_out, eps)
                torch.matmul(y.to(cdt), p_out.T, out=hb)
                hb.mul_(gb)
    return h


def _torch_backend(x, mask, direction, w, eps, chunk_size):
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in w.values()))
    if needs_grad or x.numel() == 0:
        return _autograd_path(x, mask, direction, w, eps)
    return _inference_path(x, mask, direction, w, eps, chunk_size)


def _reference_backend(x, mask, direction, w, eps, chunk_size):
    return _reference.triangle_multiplication(x, mask, direction=direction, eps=eps, **w)


def _cuequivariance_import():
    try:
        from cuequivariance_torch import triangle_multiplicative_update
    except ImportError:
        from cuequivariance_torch.primitives.triangle import triangle_multiplicative_update
    return triangle_multiplicative_update


def _cuequivariance_backend(x, mask, direction, w, eps, chunk_size):
    fn = _cuequivariance_import()
    if mask is not None:
        mask = mask.to(x.dtype)
    return fn(x, direction=direction, mask=mask, eps=eps, **w)


def _cuequivariance_supports(device, dtype, explicit, **_):
    try:
        _cuequivariance_import()
    except Exception as exc:  # ImportError, or a broken install
        return f"cuequivariance_torch is not importable ({type(exc).__name__}: {exc})"
    if device.type in ("cpu", "mps", "xpu", "meta"):
        return f"cuEquivariance runs on NVIDIA GPUs only, got {device.type}"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (cuEquivariance supports fp16, bf16, fp32)"
    return None


backends.register(OP, "torch", _torch_backend, priority=50)
backends.register(
    OP, "cuequivariance", _cuequivariance_backend, priority=10, supports=_cuequivariance_supports, auto=False
)
backends.register(OP, "reference", _reference_backend, priority=0, auto=False)


def validate(x, mask, direction, weights: Dict[str, torch.Tensor], eps) -> Optional[torch.Tensor]:
    """Check shapes, dtypes, devices and options; return the mask as bool (or None)."""
    check_tensor("x", x)
    if x.dim() != 4 or x.shape[1] != x.shape[2]:
        raise ValueError(f"x: expected shape (B, N, N, D), got {tuple(x.shape)}")
    batch, n, _, dim = x.shape
    check_choice("direction", direction, DIRECTIONS)
    shapes = {
        "norm_in_weight": (dim,),
        "norm_in_bias": (dim,),
        "p_in_weight": (2 * dim, dim),
        "g_in_weight": (2 * dim, dim),
        "norm_out_weight": (dim,),
        "norm_out_bias": (dim,),
        "p_out_weight": (dim, dim),
        "g_out_weight": (dim, dim),
    }
    # Under autocast the weights may stay fp32 (autocast casts them); otherwise x's dtype.
    amp = _compute_dtype(x)[1]
    for name in WEIGHT_NAMES:
        t = check_tensor(name, weights[name], shapes[name], dtypes=FLOAT_DTYPES, device=x.device)
        if not amp and t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (as x), got {t.dtype}")
    check_positive_float("eps", eps)
    return as_bool_mask("mask", mask, (batch, n, n), x.device)


def triangle_multiplication(
    x: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    direction: str,
    norm_in_weight: torch.Tensor,
    norm_in_bias: torch.Tensor,
    p_in_weight: torch.Tensor,
    g_in_weight: torch.Tensor,
    norm_out_weight: torch.Tensor,
    norm_out_bias: torch.Tensor,
    p_out_weight: torch.Tensor,
    g_out_weight: torch.Tensor,
    eps: float = 1e-5,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The whole triangle multiplicative update; see the module doc for the math.

    Args:
        x: ``[B, N, N, D]`` pair representation, any strides.
        mask: ``[B, N, N]`` keep-mask over pairs (bool or 0/1 float), or None.
        direction: ``"outgoing"`` (``t[i,j] = sum_k a[i,k] b[j,k]``) or ``"incoming"``
            (``t[i,j] = sum_k a[k,i] b[k,j]``).
        norm_in_weight, norm_in_bias: ``[D]`` input LayerNorm.
        p_in_weight, g_in_weight: ``[2D, D]`` projection and gate of ``[a, b]``.
        norm_out_weight, norm_out_bias: ``[D]`` LayerNorm of the product.
        p_out_weight, g_out_weight: ``[D, D]`` output projection and output gate.
            Weights have x's dtype (any float dtype under autocast).
        eps: LayerNorm epsilon of both norms.
        chunk_size: channels of the product per step for the ``torch`` backend at
            inference (default: one chunk of ``a, b`` within ``foldops.budget``'s chunk
            budget, at least 8 channels).
        backend: ``"auto"``, ``"torch"``, ``"reference"`` or ``"cuequivariance"``.

    Returns:
        ``[B, N, N, D]`` in x's dtype (autocast's dtype under autocast).
    """
    weights = {
        "norm_in_weight": norm_in_weight,
        "norm_in_bias": norm_in_bias,
        "p_in_weight": p_in_weight,
        "g_in_weight": g_in_weight,
        "norm_out_weight": norm_out_weight,
        "norm_out_bias": norm_out_bias,
        "p_out_weight": p_out_weight,
        "g_out_weight": g_out_weight,
    }
    mask = validate(x, mask, direction, weights, eps)
    check_positive_int("chunk_size", chunk_size)
    impl = backends.select(OP, backend, device=x.device, dtype=x.dtype, dim=x.shape[-1])
    return impl.fn(x, mask, direction, weights, float(eps), chunk_size)
