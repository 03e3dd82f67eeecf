"""Invariant point attention (AlphaFold 2 Algorithm 22; OpenFold, FrameFlow, Multiflow): the functional.

    q, k, v:        [B, N, H, C]        scalar queries, keys, values
    q_pts, k_pts:   [B, N, H, Pq, 3]    query / key points, already in the global frame
    v_pts:          [B, N, H, Pv, 3]    value points, global frame
    bias:           [B, H, N, N]        pair bias, added to the logits as given
    point_weights:  [H]                 gamma_h of the point term (see below)
    z:              [B, N, N, Cz]       pair values of the pair output
    mask:           [B, N] or None      True = a real residue (padding False)

    logits[b,h,i,j] = scale * q[b,i,h] . k[b,j,h] + bias[b,h,i,j]
                      - point_weights[h] / 2 * sum_p |q_pts[b,i,h,p] - k_pts[b,j,h,p]|^2
    a[b,h,i,:] = softmax over the kept keys j
    out      [B, N, H, C]      = sum_j a v[b,j,h]
    out_pts  [B, N, H, Pv, 3]  = sum_j a v_pts[b,j,h]      (global frame; apply invert_apply after)
    out_pair [B, N, H, Cz]     = sum_j a z[b,i,j]

With OpenFold's weights: ``scale = sqrt(1 / (3 C))``, ``bias = sqrt(1/3) * linear_b(z)``
(heads first), ``point_weights = softplus(head_weights) * sqrt(1 / (3 * Pq * 9 / 2))``:
the softplus and both factors are applied by the caller, the op only multiplies by
-1/2. Keys of padded residues get no weight; rows of padded residues are zero (outputs
and gradients), where OpenFold's additive ``-inf`` mask leaves them attending over all
keys. Padding never changes a real residue's outputs or gradients, whatever values the
padded residues hold (NaN and inf included: every backend selects them away, never
multiplies them by 0).

Backends: ``triton`` (CUDA cc >= 8.0: one pass over key tiles per query row computes
the logits, an online softmax and all three outputs, streaming z; the backward keeps
only the log-sum-exp), ``torch`` (any device: the squared distance is expanded as
|q|^2 + |k|^2 - 2 q.k, so the point term and the scalar term are one matmul, plus a
small exact one on grid-rounded coordinates that keeps the expansion's rounding at the
size of the distances (``point_operands``); no [B, N, N, H, P, 3] tensor; at inference
query rows are processed in chunks sized by ``foldops.budget``, so extra memory is
O(chunk * H * N)), ``reference`` (the algorithm
as written, O(B N^2 H Pq) memory).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from foldops import backends
from foldops._checks import as_bool_mask, check_positive_int, check_same_dtype, check_tensor
from foldops.budget import rows_per_chunk
from foldops.device import fp32_region, kernel_support
from foldops.ops._common import needs_grad, zeros_output
from foldops.reference import invariant_point_attention as _reference

OP = "invariant_point_attention"
_POINT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _centre(pts, mask, dtype):
    """Mean of the real residues' points per batch item and head, ``[B, 1, H, 1, 3]`` in
    ``dtype``, without gradient (a common translation; the callers' results do not
    depend on it in exact arithmetic)."""
    with torch.no_grad():
        pts = pts.to(dtype)
        if mask is None:
            return pts.mean(dim=(1, 3), keepdim=True)
        keep = mask[:, :, None, None, None]
        count = keep.to(dtype).sum(dim=1, keepdim=True).clamp_min(1.0) * pts.shape[3]
        # A selection, not a product: padded residues' points may be NaN or inf.
        return torch.where(keep, pts, 0.0).sum(dim=(1, 3), keepdim=True) / count


def _grid_bits(coordinates: int) -> int:
    """Bits b of the integer grid coordinates: a sum of ``coordinates`` squared
    differences of integers below 2^b, expanded as ``|q|^2 + |k|^2 - 2 q.k``, keeps every
    partial sum below 2^24 (exact in fp32 in any order)."""
    return max(1, int((22 - math.log2(max(1, coordinates))) // 2))


def point_operands(q_pts, k_pts, point_weights, mask, dtype):
    """The point term ``-w/2 |q - k|^2`` as a dot product plus a scaled exact integer term.

    Returns ``(qa, ka, qe, ke, qn, kn, factor)``: ``qa, ka`` ``[B, N, H, 6 Pq + 2]``,
    ``qe, ke`` ``[B, N, H, 3 Pq]``, ``qn, kn`` ``[B, N, H]`` and ``factor`` ``[B, H]``, all
    in ``dtype``, with

        -w/2 |q_i - k_j|^2 = qa_i . ka_j + factor * (qe_i . ke_j + qn_i + kn_j)

    Points are moved by the mean of the real residues' key points (per batch item and
    head; no distance changes) and split as ``x = hi + lo``: ``hi`` on a grid of step
    ``g`` (a power of two; ``|hi| / g <= 2^b``, ``_grid_bits``), ``|lo| <= g / 2``.
    ``qe . ke + qn + kn = -2 qi . ki + |qi|^2 + |ki|^2 = |hi_q - hi_k|^2 / g^2`` (``qi``,
    ``ki`` the integers ``hi / g``) is a sum of integers, exact in fp32 in any order;
    ``factor = -w/2 g^2``. Only ``-2 qi . ki`` goes through a matmul: its operands,
    integers of at most 11 significant bits, are exact in TF32 too (a matmul that rounds
    fp32 inputs to 10 mantissa bits), where the squared norms (up to 2^22) would not
    be; the norms are added as a row and a column in fp32. ``qa . ka`` holds the rest,
    ``-w/2 (2 (hi_q - hi_k).(lo_q - lo_k) + |lo_q - lo_k|^2)``, whose terms are of size
    |x| g, not |x|^2: the plain expansion ``w q.k - w/2 |q|^2 - w/2 |k|^2`` rounds terms
    of the protein's squared radius, so the logits of nearby points (the ones that get
    weight) carried errors of eps * w * radius^2: 2-37x plain PyTorch's error in the
    outputs and gradients on a protein-like cloud (tests/ops). ``hi`` carries no
    gradient and ``lo = x - hi`` all of it, so autograd differentiates the exact
    function. The query's own ``-w/2 |q|^2`` is part of the sums: the softmax cancels a
    row constant, but its gradient is zero only where the logits' gradient has rows
    summing exactly to zero, which in floating point they do not (without it, 4-14x
    plain PyTorch's error in the head weights' gradient of a layer).
    """
    batch, n, heads, points, _ = q_pts.shape
    coords = 3 * points
    centre = _centre(k_pts, mask, dtype)
    qx = (q_pts.to(dtype) - centre).reshape(batch, n, heads, coords)
    kx = (k_pts.to(dtype) - centre).reshape(batch, n, heads, coords)
    with torch.no_grad():
        reach = torch.maximum(_kept_max(qx, mask), _kept_max(kx, mask))  # [B, 1, H, 1]
        reach = torch.where(reach > 0, reach, torch.ones_like(reach))  # no real residue, or all at the centre
        step = torch.exp2(torch.ceil(torch.log2(reach)) - _grid_bits(coords))
        qi, ki = torch.round(qx / step), torch.round(kx / step)  # integers, |.| <= 2^b on real residues
        if mask is not None:  # padded residues: hi = 0, whatever their coordinates
            pad = ~mask[:, :, None, None]
            qi, ki = qi.masked_fill(pad, 0.0), ki.masked_fill(pad, 0.0)
        qh, kh = qi * step, ki * step
    ql, kl = qx - qh, kx - kh  # exact; all the gradient
    w = point_weights.to(dtype)[:, None]  # [H, 1]
    half = -0.5 * w
    row = half * (2 * qh + ql).mul(ql).sum(-1, keepdim=True)  # -w/2 (|q|^2 - |hi_q|^2)
    qa = torch.cat([w * qh, w * ql, row, half.expand(batch, n, heads, 1)], dim=-1)
    ka = torch.cat([kl, kx, kx.new_ones(kx.shape[:-1] + (1,)), (2 * kh + kl).mul(kl).sum(-1, keepdim=True)], dim=-1)
    factor = half.T * step[:, 0, :, 0].square()  # [B, H]
    return qa, ka, qi, -2 * ki, qi.square().sum(-1), ki.square().sum(-1), factor


def _kept_max(x, mask):
    """Largest |coordinate| of the real residues per batch item and head, ``[B, 1, H, 1]``."""
    if x.shape[-1] == 0:  # no query/key points
        return x.new_zeros(x.shape[0], 1, x.shape[2], 1)
    mag = x.abs().amax(dim=-1, keepdim=True)  # [B, N, H, 1]
    if mask is not None:
        mag = mag.masked_fill(~mask[:, :, None, None], 0.0)
    return mag.amax(dim=1, keepdim=True)


def _exact_product(qe, ke, qn, kn):
    """``qe @ ke + qn + kn``: ``|qi - ki|^2`` of the grid integers, exact (``point_operands``).
    ``qe`` ``[.., c, K]``, ``ke`` ``[.., K, N]``, ``qn`` ``[.., c, 1]``, ``kn`` ``[.., 1, N]``.
    Outside autocast (it would round the integers); the norms are added after the
    matmul, in fp32, so that a TF32 matmul rounds nothing."""
    with fp32_region(qe):
        return torch.matmul(qe, ke).add_(qn).add_(kn)


EXACT_ROWS = 64
"""Rows per block when the backward of ``_AddExactTerm`` recomputes the exact term."""


class _AddExactTerm(torch.autograd.Function):
    """``logits + factor * (qe @ ke + qn + kn)``, a new tensor; ``qe`` ``[B, H, c, K]``,
    ``ke`` ``[B, H, K, N]``, ``qn`` ``[B, H, c, 1]`` and ``kn`` ``[B, H, 1, N]`` are
    constants (the grid integers and their squared norms), ``factor`` ``[B, H, 1, 1]``.

    The backward recomputes the exact term for ``factor``'s gradient, a block of rows at
    a time, instead of keeping a ``[B, H, c, N]`` tensor from the forward.
    """

    @staticmethod
    def forward(ctx, logits, qe, ke, qn, kn, factor):
        ctx.save_for_backward(qe, ke, qn, kn)
        # The product is this function's own temporary: scaled and summed in place, it
        # becomes the result (no third [B, H, c, N] tensor beside logits).
        return _exact_product(qe, ke, qn, kn).mul_(factor).add_(logits)

    @staticmethod
    def backward(ctx, grad):
        d_factor = None
        if ctx.needs_input_grad[5]:
            qe, ke, qn, kn = ctx.saved_tensors
            d_factor = torch.zeros(grad.shape[:2], dtype=grad.dtype, device=grad.device)
            for start in range(0, grad.shape[2], EXACT_ROWS):
                rows = slice(start, start + EXACT_ROWS)
                exact = _exact_product(qe[:, :, rows], ke, qn[:, :, rows], kn)
                d_factor = d_factor + (grad[:, :, rows] * exact).sum(dim=(2, 3))
            d_factor = d_factor[:, :, None, None]
        return grad, None, None, None, None, d_factor


def _padded_to_zero(mask, *tensors):
    """``tensors`` ``[B, N, ...]`` with padded residues' entries set to 0 (selected, not
    multiplied: whatever they hold, NaN and inf included, reaches no real residue's
    outputs or gradients, and their own gradients are zero)."""
    return tuple(torch.where(mask.view(mask.shape + (1,) * (t.dim() - 2)), t, 0.0) for t in tensors)


class _PairProduct(torch.autograd.Function):
    """``a_t @ z_kept``: ``a_t`` ``[B, c, H, N]``, ``z`` ``[B, c, N, Cz]`` (a row chunk of the pair
    values, as given), ``pair_keep`` ``[B, c, N]`` bool or None; ``z_kept`` is ``z`` with
    the dropped pairs' entries set to 0 (0 * NaN would be NaN). It is formed a block of
    ``EXACT_ROWS`` rows at a time and not kept: the backward forms it again, so no copy
    of z lives beyond one block."""

    @staticmethod
    def _kept(z, pair_keep, rows):
        return z[:, rows].masked_fill(~pair_keep[:, rows, :, None], 0.0)

    @staticmethod
    def forward(ctx, a_t, z, pair_keep):
        ctx.save_for_backward(a_t, z, pair_keep)
        # The backward's products under the forward's autocast state, as a plain matmul's.
        device = a_t.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return torch.cat([torch.matmul(a_t[:, start:start + EXACT_ROWS],
                                       _PairProduct._kept(z, pair_keep, slice(start, start + EXACT_ROWS)))
                          for start in range(0, z.shape[1], EXACT_ROWS)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        a_t, z, pair_keep = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        d_a = d_z = None
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            if ctx.needs_input_grad[0]:
                d_a = torch.cat([torch.matmul(grad[:, start:start + EXACT_ROWS],
                                              _PairProduct._kept(z, pair_keep, slice(start, start + EXACT_ROWS)).mT)
                                 for start in range(0, z.shape[1], EXACT_ROWS)], dim=1)
            if ctx.needs_input_grad[1]:
                d_z = torch.matmul(a_t.mT, grad)  # zero at dropped pairs, where a_t is zero
        return (None if d_a is None else d_a.to(a_t.dtype)), (None if d_z is None else d_z.to(z.dtype)), None


def _torch_backend(q, k, v, q_pts, k_pts, v_pts, bias, point_weights, z, mask, scale, chunk_size):
    batch, n, heads, channels = q.shape
    if mask is not None:
        q, k, v, q_pts, k_pts, v_pts = _padded_to_zero(mask, q, k, v, q_pts, k_pts, v_pts)
    acc = _accumulator(q.dtype)
    qa, ka, qe, ke, qn, kn, factor = point_operands(q_pts, k_pts, point_weights, mask, acc)
    # One matmul for the scalar term and the point term's small part, one exact one.
    q_all = torch.cat([q.to(acc) * scale, qa], dim=-1).transpose(1, 2)  # [B, H, N, C + 6Pq + 2]
    k_all = torch.cat([k.to(acc), ka], dim=-1).permute(0, 2, 3, 1)  # [B, H, C + 6Pq + 2, N]
    qe, ke = qe.transpose(1, 2), ke.permute(0, 2, 3, 1)  # [B, H, N, 3Pq], [B, H, 3Pq, N]
    qn, kn = qn.transpose(1, 2)[..., None], kn.transpose(1, 2)[:, :, None]  # [B, H, N, 1], [B, H, 1, N]
    factor = factor[:, :, None, None]
    pv = v_pts.shape[3]
    # Value points relative to their mean (the weighted sum carries a translation
    # through exactly; it is added back below): the logits' gradient a * (dA - rowsum(a
    # dA)) then cancels terms of the protein's size, not of its distance from the
    # origin (with points 20 A off the origin, 2-3x plain PyTorch's error in the point
    # weights' gradient otherwise).
    v_centre = _centre(v_pts, mask, acc)  # [B, 1, H, 1, 3]
    # Values and value points in one matmul too: [B, H, N, C + 3 Pv].
    v_all = torch.cat([v.to(acc), (v_pts.to(acc) - v_centre).flatten(-2)], dim=-1).transpose(1, 2)
    keep = None if mask is None else mask
    need_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, q_pts, k_pts, v_pts, bias, point_weights, z))
    bytes_per_row = batch * heads * n * 5 * torch.finfo(acc).bits // 8
    step = n if need_grad else rows_per_chunk(q.device, bytes_per_row, n, chunk_size)
    outs, outs_pair = [], []
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        with fp32_region(q):
            logits = torch.matmul(q_all[:, :, rows], k_all) + bias[:, :, rows].to(acc)  # [B, H, c, N]
        logits = _AddExactTerm.apply(logits, qe[:, :, rows], ke, qn[:, :, rows], kn, factor)
        if keep is None:
            a = torch.softmax(logits, dim=-1)
            pair_keep = None
        else:
            # Dropped pairs (padded key or padded row) selected away, whatever the bias
            # holds there; padded rows (and all-padded items) are zero.
            pair_keep = keep[:, rows, None] & keep[:, None, :]  # [B, c, N]
            a = torch.softmax(logits.masked_fill(~pair_keep[:, None], torch.finfo(acc).min), dim=-1)
            a = torch.where(keep[:, None, rows, None], a, 0.0)
        outs.append(torch.matmul(a, v_all))  # [B, H, c, C + 3 Pv]
        # Pair output: for each row i, [H, N] @ [N, Cz]; z is read in its own dtype.
        a_t = a.transpose(1, 2).to(z.dtype)
        outs_pair.append(torch.matmul(a_t, z[:, rows]) if keep is None  # [B, c, H, Cz]
                         else _PairProduct.apply(a_t, z[:, rows], pair_keep))
    o_all = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)).transpose(1, 2)  # [B, N, H, C + 3 Pv]
    out_pair = outs_pair[0] if len(outs_pair) == 1 else torch.cat(outs_pair, dim=1)
    out = o_all[..., :channels].to(q.dtype)
    out_pts = o_all[..., channels:].reshape(batch, n, heads, pv, 3)
    out_pts = out_pts + (v_centre if keep is None else torch.where(keep[:, :, None, None, None], v_centre, 0.0))
    out_pts = out_pts.to(v_pts.dtype)
    return out, out_pts, out_pair.to(z.dtype)


def _reference_backend(q, k, v, q_pts, k_pts, v_pts, bias, point_weights, z, mask, scale, chunk_size):
    return _reference.invariant_point_attention(q, k, v, q_pts, k_pts, v_pts, bias, point_weights, z, mask, scale)


def _triton_backend(q, k, v, q_pts, k_pts, v_pts, bias, point_weights, z, mask, scale, chunk_size):
    from foldops.kernels.invariant_point_attention import invariant_point_attention as kernel

    return kernel(q, k, v, q_pts, k_pts, v_pts, bias, point_weights, z, mask, scale)


def _triton_supports(device, dtype, explicit, sizes=(), **_):
    reason = kernel_support(device, explicit)
    if reason is not None:
        return reason
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (kernel supports fp16, bf16, fp32)"
    try:
        from foldops.kernels.invariant_point_attention import unsupported
    except ImportError as exc:
        return f"kernel module unavailable: {exc}"
    return unsupported(*sizes)


backends.register(OP, "triton", _triton_backend, priority=100, supports=_triton_supports)
backends.register(OP, "torch", _torch_backend, priority=50)
backends.register(OP, "reference", _reference_backend, priority=0, auto=False)


def validate(q, k, v, q_pts, k_pts, v_pts, bias, point_weights, z, mask):
    """Check shapes, dtypes and devices; return the mask as bool (or None)."""
    check_tensor("q", q, (None, None, None, None))
    batch, n, heads, channels = q.shape
    dev = q.device
    check_tensor("k", k, q.shape, device=dev)
    check_tensor("v", v, q.shape, device=dev)
    check_same_dtype("q", q, k=k, v=v)
    check_tensor("q_pts", q_pts, (batch, n, heads, None, 3), dtypes=_POINT_DTYPES, device=dev)
    check_tensor("k_pts", k_pts, q_pts.shape, dtypes=_POINT_DTYPES, device=dev)
    check_tensor("v_pts", v_pts, (batch, n, heads, None, 3), dtypes=_POINT_DTYPES, device=dev)
    check_same_dtype("q_pts", q_pts, k_pts=k_pts, v_pts=v_pts)
    if q_pts.dtype not in (q.dtype, torch.float32, torch.float64):
        raise TypeError(f"q_pts: expected dtype {q.dtype}, torch.float32 or torch.float64, got {q_pts.dtype}")
    check_tensor("bias", bias, (batch, heads, n, n), device=dev)
    if bias.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"bias: expected dtype {q.dtype} or torch.float32, got {bias.dtype}")
    check_tensor("point_weights", point_weights, (heads,), device=dev)
    check_tensor("z", z, (batch, n, n, None), device=dev)
    if z.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"z: expected dtype {q.dtype} or torch.float32, got {z.dtype}")
    return as_bool_mask("mask", mask, (batch, n), dev)


def invariant_point_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pts: torch.Tensor,
    k_pts: torch.Tensor,
    v_pts: torch.Tensor,
    bias: torch.Tensor,
    point_weights: torch.Tensor,
    z: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Invariant point attention's core; see the module doc for the formula.

    Args:
        q, k, v: ``[B, N, H, C]``, one dtype, any strides.
        q_pts, k_pts: ``[B, N, H, Pq, 3]``; v_pts: ``[B, N, H, Pv, 3]``; global frame;
            one dtype: q's, fp32 or fp64 (OpenFold's frames make them fp32 under autocast).
        bias: ``[B, H, N, N]``, q's dtype or fp32, added to the logits as is.
        point_weights: ``[H]``, the point term's weight per head, already positive and
            scaled: OpenFold's ``softplus(head_weights) * sqrt(1 / (3 * Pq * 9 / 2))``.
            The op multiplies it by ``-1/2`` and the summed squared distances.
        z: ``[B, N, N, Cz]``, q's dtype or fp32: the pair output's values. The
            ``reference`` and ``triton`` backends form the pair product in q's dtype (an
            fp32 z rounded on the fly, as a matmul under autocast rounds it; no copy);
            ``torch`` forms it in fp32.
        mask: ``[B, N]`` residue keep-mask (bool or 0/1 float), or None.
        scale: scalar-term factor, default OpenFold's ``sqrt(1 / (3 C))``.
        chunk_size: query rows per step for the ``torch`` backend at inference
            (default from ``foldops.budget``).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``.

    Returns:
        ``(out [B, N, H, C] in q's dtype, out_pts [B, N, H, Pv, 3] in the points' dtype,
        out_pair [B, N, H, Cz] in z's dtype)``. Softmax in fp32 (fp64 for fp64 inputs).
    """
    mask = validate(q, k, v, q_pts, k_pts, v_pts, bias, point_weights, z, mask)
    check_positive_int("chunk_size", chunk_size)
    if scale is None:
        scale = 1.0 / math.sqrt(3 * max(1, q.shape[-1]))
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    sizes = (q.shape[-1], q_pts.shape[3], v_pts.shape[3], z.shape[-1], q.shape[2])
    inputs = (q, k, v, q_pts, k_pts, v_pts, bias, point_weights, z)
    impl = backends.select(OP, backend, device=q.device, dtype=q.dtype, sizes=sizes, n=q.shape[1],
                           training=needs_grad(*inputs))
    if q.shape[0] == 0 or q.shape[1] == 0 or q.shape[2] == 0:  # no rows: empty outputs, zero gradients
        batch, n, heads = q.shape[:3]
        return (zeros_output(q.shape, q, inputs), zeros_output(v_pts.shape, v_pts, inputs),
                zeros_output((batch, n, heads, z.shape[-1]), z, inputs))
    return impl.fn(q, k, v, q_pts, k_pts, v_pts, bias, point_weights, z, mask, float(scale), chunk_size)
