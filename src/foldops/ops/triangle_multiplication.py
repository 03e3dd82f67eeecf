"""Triangle multiplicative update (AF3 Algorithms 12/13 as in Boltz-2): the public functional.

    x: [B, N, N, D]   mask: [B, N, N] keep-mask (bool or 0/1 float) or None
    norm_in_weight, norm_in_bias: [D]   norm_out_weight, norm_out_bias: [H]
    p_in_weight, g_in_weight: [2H, D]   p_out_weight: [D, H]   g_out_weight: [D, D]
    out: [B, N, N, D]

    h      = LayerNorm_in(x)
    [a, b] = (h p_in^T) * sigmoid(h g_in^T) * mask                  a, b: [B, N, N, H]
    t      = outgoing: t[i,j] = sum_k a[i,k] b[j,k];  incoming: t[i,j] = sum_k a[k,i] b[k,j]
    out    = (LayerNorm_out(t) p_out^T) * sigmoid(h g_out^T)

H is the hidden (product) width, read from ``p_in_weight.shape[0] // 2``: H = D in
Boltz-2 and AF3; AF2 / OpenFold's ``TriangleMultiplicativeUpdate(c_z, c_hidden)`` has
H = c_hidden (``linear_a_p | linear_b_p`` stacked are p_in, ``linear_a_g | linear_b_g``
g_in, ``layer_norm_out`` the [H] norm, ``linear_z`` p_out, ``linear_g`` g_out; biases
aside).

The argument list mirrors cuEquivariance's ``triangle_multiplicative_update`` (what
Boltz-2 calls with ``use_kernels=True``), hidden width included. The triangular product
and LayerNorm_out run in fp32 (fp64 for fp64 inputs) whatever the input dtype, as Boltz
casts ``a, b`` to float; the projections run in the input dtype, or autocast's. The output at a masked
pair is not zeroed (as in Boltz and cuEquivariance): only ``a`` and ``b`` are. So a
non-finite ``x`` at a masked pair stays out of the forward at kept pairs, but not out of
the backward: that pair's output gate is non-finite, and ``0 * nan`` there spreads
through the triangular product to every gradient (Boltz alike). Keep padding finite.

Backends:

- ``triton`` (CUDA cc >= 8.0, fp16 / bf16 / fp32, D <= 512 and H <= 512; picked by
  ``auto``): fused kernels in ``foldops.kernels.triangle_multiplication``: LayerNorm_in,
  both gated projections, the mask and the output gate in one prologue pass writing a,
  b channel-major; the per-channel product on tensor cores (fp32 accumulation);
  LayerNorm_out, p_out and the gate in one epilogue pass. For fp32 inputs every
  product in the kernels follows ``torch.get_float32_matmul_precision()``:
  ``"highest"`` (PyTorch's default): IEEE fp32 products; ``"high"``: TF32x3, three TF32
  products per product (near fp32's accuracy, faster than IEEE on tensor cores);
  ``"medium"``: plain TF32, one product of operands cut to 10-bit mantissas (relative
  error below 2**-10 per operand; the fastest). 16-bit inputs always run 16-bit
  products with fp32 accumulation. Backward in two row kernels plus per-channel
  products; weight gradients are GEMMs over positions (deterministic). Memory: training saves a, b,
  the gate and t (fp32), about 5x x for 16-bit x and H = D; inference builds t a block
  of rows at a time (``foldops.budget``), about 3x x plus the block. Under autocast the
  inputs and matrices are cast to the autocast dtype first.
- ``torch``: at inference (no gradient needed) memory-bounded: ``h`` is kept once in the
  compute dtype and overwritten by the output, ``t`` is built in ``[B, H, N, N]``
  layout by batched matmuls, ``chunk_size`` channels at a time, from gated
  projections computed straight into that layout. Extra memory O(B N^2 (D + H)) for
  ``h`` and ``t`` plus O(chunk N^2) for one chunk of ``a, b`` and its gate (the
  2H-wide projection is never materialised whole). Measured peak on CPU, fp32, D = 128,
  N = 256: about 3x the size of x (Boltz's module: about 7x). Few large ops, reused
  workspaces. With gradients it runs the reference's autograd graph (O(B N^2 (D + H))
  activations, as Boltz's module).
- ``reference``: the plain composition (O(B N^2 H) with several 2H-wide temporaries);
  never picked by ``auto``.
- ``cuequivariance``: NVIDIA's fused op, only where ``cuequivariance_torch`` imports
  and the input is on an NVIDIA GPU, for hidden widths that are multiples of 32 (its
  documented limit); never picked by ``auto``. It ignores ``chunk_size``.
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
from foldops.device import autocast_dtype_in_effect, fp32_region, kernel_support
from foldops.ops._common import needs_grad
from foldops.reference import triangle_multiplication as _reference
from foldops.reference.triangle_multiplication import DIRECTIONS, product_dtype

OP = "triangle_multiplication"
KERNEL_MAX_CHANNELS = 512  # the Triton kernels hold a position's channels (D, H) in registers

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
# Chunk sizes come from foldops.budget: on CPU a cache-sized budget (small chunks run
# faster there), on accelerators a share of free memory (usually one chunk: every extra
# chunk is more launches). A channel chunk never has fewer than _MIN_CHUNK channels:
# thinner chunks would re-read h too often.
_MIN_CHUNK = 8
# Bytes per position of the output step's temporaries: LayerNorm_out in fp32 (input
# view and output) over the H hidden channels, the gate and the projection (compute
# dtype) over the D pair channels.
_BLOCK_BYTES_PER_HIDDEN = 4 + 4
_BLOCK_BYTES_PER_CHANNEL = 2 + 2


def _compute_dtype(x: torch.Tensor):
    """(dtype of the projections, whether LayerNorm_in runs in fp32 under autocast)."""
    amp = autocast_dtype_in_effect(x)
    if amp is not None and x.dtype != torch.float64:  # autocast leaves fp64 alone
        return amp, True
    return x.dtype, False


def _default_chunk(device, n: int, dim: int, wide_bytes: int, cdt_bytes: int, fixed_bytes: int = 0,
                   hidden: Optional[int] = None) -> int:
    """Hidden channels of the product per step (of ``hidden``, default ``dim``): a chunk
    holds a, b (product dtype), their gate and, if narrower, the projection (compute
    dtype), each [2 * chunk, N, N]."""
    hidden = dim if hidden is None else hidden
    per_channel = 2 * n * n * (wide_bytes + cdt_bytes + (cdt_bytes if cdt_bytes != wide_bytes else 0))
    chunk = rows_per_chunk(device, per_channel, hidden)
    # Accelerators: every channel at once while the whole workspace and the path's fixed
    # buffers (h and t, ``fixed_bytes``, allocated after free memory was read) fit the
    # budget: few, large launches (at small N the chunk loop's launches cost more than
    # the arithmetic). Past it a chunk's workspace no larger than h (n^2 dim values), so
    # the peak stays near the fixed O(N^2 (D + H)) buffers and the longest N does not shrink.
    if device.type != "cpu" and rows_per_chunk(device, per_channel + -(-fixed_bytes // hidden), hidden) < hidden:
        chunk = min(chunk, (n * n * dim * cdt_bytes) // per_channel)
    return max(min(_MIN_CHUNK, hidden), chunk)


def _position_block(device, positions: int, dim: int, workspace_bytes: int, hidden: Optional[int] = None) -> int:
    """Positions per LayerNorm_in / output step; on accelerators also within the channel
    chunks' workspace (freed before the output step), so the peak does not grow."""
    hidden = dim if hidden is None else hidden
    per_position = hidden * _BLOCK_BYTES_PER_HIDDEN + dim * _BLOCK_BYTES_PER_CHANNEL
    rows = rows_per_chunk(device, per_position, positions)
    if device.type != "cpu":
        rows = min(rows, max(1, workspace_bytes // per_position))
    return rows


def _autograd_path(x, mask, direction, w, eps):
    # With gradients, chunking would bound nothing (autograd keeps every chunk), so this is
    # the plain composition: the reference's graph, rounding for rounding.
    return _reference.triangle_multiplication(x, mask, direction=direction, eps=eps, **w)


@torch.no_grad()
def _inference_path(x, mask, direction, w, eps, chunk_size):
    batch, n, _, dim = x.shape
    hidden = w["p_in_weight"].shape[0] // 2
    nn_ = n * n
    cdt, amp = _compute_dtype(x)
    ln_dtype = torch.float32 if amp else cdt
    wide = product_dtype(cdt)
    dev = x.device
    size = lambda dt: torch.empty((), dtype=dt).element_size()  # noqa: E731
    fixed = batch * nn_ * (dim * size(cdt) + hidden * size(wide))  # h and t
    chunk = min(hidden, chunk_size or _default_chunk(dev, n, dim, size(wide), size(cdt), fixed, hidden=hidden))
    workspace = 2 * chunk * nn_ * (size(wide) + 2 * size(cdt))
    block = _position_block(dev, nn_, dim, workspace, hidden=hidden)
    with fp32_region(x):  # dtypes are explicit below
        p_in, g_in = w["p_in_weight"].to(cdt), w["g_in_weight"].to(cdt)
        p_out, g_out = w["p_out_weight"].to(cdt), w["g_out_weight"].to(cdt)
        ln_in = (w["norm_in_weight"].to(ln_dtype), w["norm_in_bias"].to(ln_dtype))
        ln_out = (w["norm_out_weight"].to(wide), w["norm_out_bias"].to(wide))
        drop = None if mask is None else mask.reshape(batch, nn_) == 0

        # h: LayerNorm_in(x), kept once; it becomes the output at the end.
        h = torch.empty((batch, n, n, dim), dtype=cdt, device=dev)
        rows = max(1, block // n)
        for i in range(0, n, rows):
            h[:, i : i + rows] = F.layer_norm(x[:, i : i + rows].to(ln_dtype), (dim,), *ln_in, eps)
        hf = h.view(batch, nn_, dim)

        # t[b, e] = a[b, e] @ b[b, e]^T (outgoing) or a^T @ b (incoming) per hidden channel
        # e, ``chunk`` channels at a time. Workspaces are allocated once and reused: few,
        # large ops (each one a thread-pool barrier on CPU) and no page faults from fresh
        # buffers per chunk.
        t = torch.empty((batch, hidden, n, n), dtype=wide, device=dev)
        # Per chunk, one matmul gives each channel's rows [a, b, gate a, gate b]: the
        # weights are stacked once per call channel-major ([H, 4, D]), so a chunk's
        # weights are a view and a chunk costs six launches.
        w_pg = torch.stack([p_in[:hidden], p_in[hidden:], g_in[:hidden], g_in[hidden:]], dim=1)
        pg = torch.empty((chunk, 4, nn_), dtype=cdt, device=dev)
        ab = torch.empty((chunk, 2, nn_), dtype=wide, device=dev) if cdt != wide else None
        for c0 in range(0, hidden, chunk):
            c = min(chunk, hidden - c0)
            pgc = pg[:c]
            pc, gc = pgc[:, :2], pgc[:, 2:]  # [c, 2, N*N]: (a, b) and their gates
            for bi in range(batch):
                torch.matmul(w_pg[c0 : c0 + c].view(4 * c, dim), hf[bi].T, out=pgc.view(4 * c, nn_))
                pc.mul_(gc.sigmoid_())
                if drop is not None:
                    pc.masked_fill_(drop[bi], 0.0)  # not a product: 0 * nan would leak
                abc = pc
                if ab is not None:
                    abc = ab[:c]
                    abc.copy_(pc)  # to fp32 after the gating, as the reference rounds
                a, b = abc[:, 0].view(c, n, n), abc[:, 1].view(c, n, n)
                if direction == "outgoing":
                    torch.bmm(a, b.transpose(1, 2), out=t[bi, c0 : c0 + c])
                else:
                    torch.bmm(a.transpose(1, 2), b, out=t[bi, c0 : c0 + c])
        del ab, pg

        # out = LayerNorm_out(t) p_out^T * sigmoid(h g_out^T), written over h block by block
        # (the gate first: it reads the block of h that the projection then overwrites).
        gate = torch.empty((min(block, nn_), dim), dtype=cdt, device=dev)
        for bi in range(batch):
            tf = t[bi].view(hidden, nn_)
            for s in range(0, nn_, block):
                hb = hf[bi, s : s + block]
                gb = gate[: hb.shape[0]]
                torch.matmul(hb, g_out.T, out=gb)
                gb.sigmoid_()
                y = F.layer_norm(tf[:, s : s + block].T, (hidden,), *ln_out, eps)
                torch.matmul(y.to(cdt), p_out.T, out=hb)
                hb.mul_(gb)
    return h


def _torch_backend(x, mask, direction, w, eps, chunk_size):
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in w.values()))
    if needs_grad or x.numel() == 0:
        return _autograd_path(x, mask, direction, w, eps)
    return _inference_path(x, mask, direction, w, eps, chunk_size)


def _triton_backend(x, mask, direction, w, eps, chunk_size):
    from foldops.kernels.triangle_multiplication import triangle_multiplication as kernel

    cdt = _compute_dtype(x)[0]
    mats = ("p_in_weight", "g_in_weight", "p_out_weight", "g_out_weight")
    weights = [w[k].to(cdt) if k in mats else w[k] for k in WEIGHT_NAMES]
    with fp32_region(x):  # the kernels take explicit dtypes; no autocast inside
        return kernel(x.to(cdt), mask, weights, direction == "outgoing", eps)


def _triton_supports(device, dtype, explicit, dim=None, hidden=None, **_):
    reason = kernel_support(device, explicit)
    if reason is not None:
        return reason
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (kernel supports fp16, bf16, fp32)"
    if dim is not None and dim > KERNEL_MAX_CHANNELS:
        return f"{dim} channels (kernel supports up to {KERNEL_MAX_CHANNELS})"
    if hidden is not None and hidden > KERNEL_MAX_CHANNELS:
        return f"hidden width {hidden} (kernel supports up to {KERNEL_MAX_CHANNELS})"
    try:
        import foldops.kernels.triangle_multiplication  # noqa: F401
    except ImportError as exc:
        return f"kernel module unavailable: {exc}"
    return None


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


def _cuequivariance_supports(device, dtype, explicit, hidden=None, **_):
    try:
        _cuequivariance_import()
    except Exception as exc:  # ImportError, or a broken install
        return f"cuequivariance_torch is not importable ({type(exc).__name__}: {exc})"
    if device.type in ("cpu", "mps", "xpu", "meta"):
        return f"cuEquivariance runs on NVIDIA GPUs only, got {device.type}"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (cuEquivariance supports fp16, bf16, fp32)"
    if hidden is not None and hidden % 32:
        return f"hidden width {hidden} (cuEquivariance 0.13 documents multiples of 32 only)"
    return None


backends.register(OP, "triton", _triton_backend, priority=100, supports=_triton_supports)
backends.register(OP, "torch", _torch_backend, priority=50)
backends.register(
    OP, "cuequivariance", _cuequivariance_backend, priority=10, supports=_cuequivariance_supports, auto=False
)
backends.register(OP, "reference", _reference_backend, priority=0, auto=False)


def hidden_width(p_in_weight: torch.Tensor, dim: int) -> int:
    """H from ``p_in_weight`` ``[2H, D]``; a ValueError naming it for any other shape."""
    check_tensor("p_in_weight", p_in_weight, dtypes=None)
    shape = tuple(p_in_weight.shape)
    if len(shape) != 2 or shape[1] != dim or shape[0] < 2 or shape[0] % 2:
        raise ValueError(f"p_in_weight: expected shape (2H, {dim}) for a hidden width H >= 1 "
                         f"(D = {dim} from x; Boltz-2 has H = D), got {shape}")
    return shape[0] // 2


def validate(x, mask, direction, weights: Dict[str, torch.Tensor], eps) -> Optional[torch.Tensor]:
    """Check shapes, dtypes, devices and options; return the mask as bool (or None).
    The hidden width H is read from ``p_in_weight`` (``[2H, D]``)."""
    check_tensor("x", x)
    if x.dim() != 4 or x.shape[1] != x.shape[2]:
        raise ValueError(f"x: expected shape (B, N, N, D), got {tuple(x.shape)}")
    batch, n, _, dim = x.shape
    check_choice("direction", direction, DIRECTIONS)
    # Under autocast the weights may stay fp32 (autocast casts them); otherwise x's dtype.
    amp = _compute_dtype(x)[1]
    shapes = {"norm_in_weight": (dim,), "norm_in_bias": (dim,)}  # the rest once H is known
    hidden = None
    for name in WEIGHT_NAMES:
        t = check_tensor(name, weights[name], dtypes=None)
        if name == "p_in_weight":
            hidden = hidden_width(t, dim)
            shapes.update(p_in_weight=(2 * hidden, dim), g_in_weight=(2 * hidden, dim), norm_out_weight=(hidden,),
                          norm_out_bias=(hidden,), p_out_weight=(dim, hidden), g_out_weight=(dim, dim))
        if tuple(t.shape) != shapes[name]:
            source = f"D = {dim} from x" + ("" if hidden is None else f", H = {hidden} from p_in_weight [2H, D]")
            raise ValueError(f"{name}: expected shape {shapes[name]}, got {tuple(t.shape)} ({source})")
        check_tensor(name, t, dtypes=FLOAT_DTYPES, device=x.device)
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
        p_in_weight, g_in_weight: ``[2H, D]`` projection and gate of ``[a, b]``; H, the
            hidden (product) width, is ``p_in_weight.shape[0] // 2`` (Boltz-2: H = D).
        norm_out_weight, norm_out_bias: ``[H]`` LayerNorm of the product.
        p_out_weight: ``[D, H]`` output projection. g_out_weight: ``[D, D]`` output gate
            (from h, applied after the projection, as in OpenFold and Boltz-2).
            Weights have x's dtype (any float dtype under autocast).
        eps: LayerNorm epsilon of both norms.
        chunk_size: hidden channels of the product per step for the ``torch`` backend at
            inference (default: from ``foldops.budget``, at least 8 channels; on
            accelerators every channel while the whole workspace fits the budget, else
            a chunk's workspace at most the size of h).
        backend: ``"auto"``, ``"triton"``, ``"torch"``, ``"reference"`` or
            ``"cuequivariance"``. For fp32 inputs the ``triton`` kernels' products follow
            ``torch.get_float32_matmul_precision()``: ``"highest"`` IEEE fp32,
            ``"high"`` TF32x3 (near fp32), ``"medium"`` plain TF32 (fastest; operands
            keep 10 mantissa bits); see the module doc.

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
    impl = backends.select(OP, backend, device=x.device, dtype=x.dtype, dim=x.shape[-1],
                           hidden=p_in_weight.shape[0] // 2, n=x.shape[1],
                           training=needs_grad(x, *weights.values()))
    return impl.fn(x, mask, direction, weights, float(eps), chunk_size)
