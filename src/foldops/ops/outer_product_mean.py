"""Outer product mean (MSA -> pair communication): the public functional.

    a: [B, S, N, C]   b: [B, S, N, D]   mask: [B, S, N] or None (True = keep)
    out_weight: [O, C * D]   out_bias: [O] or None
    out: [B, N, N, O]

    out[b,i,j] = out_weight @ vec(sum_s m[s,i] m[s,j] a[b,s,i] (x) b[b,s,j])
                 / max(1, sum_s m[s,i] m[s,j]) + out_bias

vec flattens (c, d) c-major, as Boltz's ``proj_o`` reads it. Masked MSA positions
contribute nothing (already-masked inputs give the same result); a pair (i, j) that
no MSA row keeps gives ``out_bias``. The output is in a's dtype. Precision: on CPU
everything runs in fp32 (fp64 for fp64 inputs), as Boltz does; with fp16/bf16
features on an accelerator the outer order's matmuls run in that dtype with fp32
accumulation (as Boltz's einsum does under autocast), while the 1/count scaling,
the bias and sums across chunks stay in fp32 (see ``matmul_dtype``).

Backends:

- ``torch``: memory-bounded PyTorch with its own backward. It never materialises
  the ``[B, N, N, C, D]`` outer product; it picks the cheaper of two contraction
  orders and works ``chunk_size`` token rows at a time:

  * ``outer`` (large S): per chunk of rows i, ``z[i,j,(c,d)] = sum_s a b`` as one
    matmul, then ``z @ out_weight.T``; FLOPs ~ 2 N^2 C D (S + O).
  * ``fold`` (small S, e.g. single-sequence inputs): fold out_weight into b,
    ``t[s,j,o,c] = sum_d b[s,j,d] W[o,c,d]``, then ``out[i,j,o] = sum_{s,c} a t`` as
    one matmul per chunk of columns j; FLOPs ~ 2 S N C O (D + N).

  Extra memory O(B N (2 C D + O) * chunk) (outer) or O(B S (2 O C + D) * chunk)
  (fold) besides the output, in forward and backward alike: the backward recomputes
  chunks instead of saving them (except an outer product built in a single chunk,
  which is kept for the weight gradient), so training memory is bounded too.
- ``reference``: one shot, O(B N^2 C D); never picked by ``auto``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from foldops import backends
from foldops._checks import as_bool_mask, check_aux_dtype, check_positive_int, check_same_dtype, check_tensor
from foldops.budget import rows_per_chunk
from foldops.device import fp32_region
from foldops.ops._common import zeros_output
from foldops.reference import outer_product_mean as _reference

OP = "outer_product_mean"
ORDERS = ("outer", "fold")


def contraction_flops(order: str, rows: int, n: int, c: int, d: int, o: int) -> int:
    """Multiply-adds per batch element of the forward in ``order`` ("outer" or "fold")."""
    if order == "outer":
        return n * n * c * d * (rows + o)
    if order == "fold":
        return rows * n * d * o * c + n * n * rows * c * o
    raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")


def choose_order(rows: int, n: int, c: int, d: int, o: int) -> str:
    """The contraction order with fewer FLOPs (ties go to ``outer``)."""
    outer = contraction_flops("outer", rows, n, c, d, o)
    fold = contraction_flops("fold", rows, n, c, d, o)
    return "fold" if fold < outer else "outer"


def _chunk_for(order: str, batch: int, rows: int, n: int, c: int, d: int, o: int, device: torch.device) -> int:
    """Token rows (outer) or columns (fold) per step: one step's temporaries, counted
    in fp32, stay within ``foldops.budget``'s chunk budget."""
    if order == "outer":
        per_row = batch * n * (2 * c * d + o)
    else:
        per_row = batch * rows * (2 * o * c + d) + batch * n * o
    return rows_per_chunk(device, per_row * 4, n)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def matmul_dtype(x: torch.Tensor, half_matmuls: Optional[bool] = None) -> torch.dtype:
    """The dtype of the outer order's matmuls for features like ``x``.

    fp16/bf16 features multiply in their own dtype (fp32 accumulation, tensor cores)
    on accelerators, where fp32 matmuls are an order of magnitude slower; on CPU, or
    with ``half_matmuls=False``, everything runs in fp32. Sums over pairs, the 1/count
    scaling, the bias and gradient accumulation across chunks stay in fp32 either way.
    """
    acc = _accumulation_dtype(x.dtype)
    if x.dtype not in (torch.float16, torch.bfloat16):
        return acc
    if half_matmuls is None:
        half_matmuls = x.device.type != "cpu"
    return x.dtype if half_matmuls else acc


def _masked(x: torch.Tensor, keep: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    # where, not a product: a masked position contributes nothing, NaN/inf included
    return x.contiguous() if keep is None else x.masked_fill(keep == 0, 0)


def _scale_bias_store(y, inv, bias, out_view, acc):
    """out_view <- y * inv + bias, rounded once to out_view's dtype (y: a fresh buffer)."""
    y = y.to(acc)
    y.mul_(inv)
    if bias is not None:
        y.add_(bias)
    out_view.copy_(y)


def _forward_outer(a, b, w, inv, bias, out, chunk, acc, keep_z=False):
    """Returns the outer product when it was built in one chunk and ``keep_z``, else None."""
    batch, rows, n, c = a.shape
    d = b.shape[-1]
    o = w.shape[0]
    b_flat = b.reshape(batch, rows, n * d)
    w_t = w.t()
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        ci = i1 - i0
        a_t = a[:, :, i0:i1].reshape(batch, rows, ci * c).transpose(1, 2)  # [B, ci*C, S]
        z = torch.bmm(a_t, b_flat).view(batch, ci, c, n, d)
        z = z.transpose(2, 3).reshape(batch * ci * n, c * d)  # [(b,i,j), (c,d)]
        y = torch.mm(z, w_t).view(batch, ci, n, o)
        scale = inv if not torch.is_tensor(inv) else inv[:, i0:i1, :, None]
        _scale_bias_store(y, scale, bias, out[:, i0:i1], acc)
    return z if keep_z and chunk >= n else None


def _w_dc(w, c, d):
    """W[o, (c,d)] -> [d, (o,c)]: the weight as folded into b."""
    o = w.shape[0]
    return w.view(o, c, d).permute(2, 0, 1).reshape(d, o * c)


def _fold_b(b, w_dc, j0, j1, c):
    """t[b, (s,c), (j,o)] = sum_d b[b,s,j,d] W[o,c,d] for columns j0:j1."""
    batch, rows, _, d = b.shape
    cj = j1 - j0
    o = w_dc.shape[1] // c
    b_c = b[:, :, j0:j1].reshape(batch * rows * cj, d)
    t = torch.mm(b_c, w_dc).view(batch, rows, cj, o, c)
    return b_c, t.permute(0, 1, 4, 2, 3).reshape(batch, rows * c, cj * o)


def _forward_fold(a, b, w, inv, bias, out, chunk, acc):
    batch, rows, n, c = a.shape
    d = b.shape[-1]
    o = w.shape[0]
    w_dc = _w_dc(w, c, d)
    a_rows = a.permute(0, 2, 1, 3).reshape(batch, n, rows * c)  # [B, N, (s,c)]
    for j0 in range(0, n, chunk):
        j1 = min(n, j0 + chunk)
        _, t = _fold_b(b, w_dc, j0, j1, c)
        y = torch.bmm(a_rows, t).view(batch, n, j1 - j0, o)
        scale = inv if not torch.is_tensor(inv) else inv[:, :, j0:j1, None]
        _scale_bias_store(y, scale, bias, out[:, :, j0:j1], acc)


def _backward_outer(a, b, w, gs, chunk, need_a, need_b, need_w, acc, gs_lo=None, z_saved=None):
    batch, rows, n, c = a.shape
    d = b.shape[-1]
    o = w.shape[0]
    b_flat = b.reshape(batch, rows, n * d)
    ga = torch.empty_like(a) if need_a else None
    # Sums across chunks accumulate in acc even when the matmuls run in fp16/bf16.
    gb = torch.zeros(b_flat.shape, dtype=acc, device=b.device) if need_b else None
    gw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
    same = a.dtype == acc
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        ci = i1 - i0
        a_c = a[:, :, i0:i1].reshape(batch, rows, ci * c)  # [B, S, (i,c)]
        g_c = gs[:, i0:i1].reshape(batch * ci * n, o)
        if need_w:
            if z_saved is not None:  # one chunk, kept from the forward
                z = z_saved
            else:
                z = torch.bmm(a_c.transpose(1, 2), b_flat).view(batch, ci, c, n, d)
                z = z.transpose(2, 3).reshape(batch * ci * n, c * d)
            if same:
                gw.addmm_(g_c.t(), z)
            else:
                # gs = hi + lo: the weight gradient sees gs unrounded, as z is rounded once.
                lo_c = gs_lo[:, i0:i1].reshape(batch * ci * n, o)
                both = torch.mm(torch.cat([g_c, lo_c], dim=1).t(), z)
                gw.add_(both[:o]).add_(both[o:])
        if need_a or need_b:
            gz = torch.mm(g_c, w).view(batch, ci, n, c, d)
            gz = gz.transpose(2, 3).reshape(batch, ci * c, n * d)  # [B, (i,c), (j,d)]
            if need_a:
                ga[:, :, i0:i1] = torch.bmm(b_flat, gz.transpose(1, 2)).view(batch, rows, ci, c)
            if need_b:
                if same:
                    gb.baddbmm_(a_c, gz)
                else:
                    gb.add_(torch.bmm(a_c, gz))
    return ga, (None if gb is None else gb.view(b.shape)), gw


def _backward_fold(a, b, w, gs, chunk, need_a, need_b, need_w, acc):
    batch, rows, n, c = a.shape
    d = b.shape[-1]
    o = w.shape[0]
    w_dc = _w_dc(w, c, d)
    a_rows = a.permute(0, 2, 1, 3).reshape(batch, n, rows * c)
    ga_rows = torch.zeros_like(a_rows) if need_a else None
    gb = torch.empty_like(b) if need_b else None
    gw_dc = torch.zeros_like(w_dc) if need_w else None
    for j0 in range(0, n, chunk):
        j1 = min(n, j0 + chunk)
        cj = j1 - j0
        b_c, t = _fold_b(b, w_dc, j0, j1, c)
        g_c = gs[:, :, j0:j1].reshape(batch, n, cj * o)
        if need_a:
            ga_rows.baddbmm_(g_c, t.transpose(1, 2))
        if need_b or need_w:
            gt = torch.bmm(a_rows.transpose(1, 2), g_c).view(batch, rows, c, cj, o)
            gt = gt.permute(0, 1, 3, 4, 2).reshape(batch * rows * cj, o * c)  # [(b,s,j), (o,c)]
            if need_b:
                gb[:, :, j0:j1] = torch.mm(gt, w_dc.t()).view(batch, rows, cj, d)
            if need_w:
                gw_dc.addmm_(b_c.t(), gt)
    ga = None if ga_rows is None else ga_rows.view(batch, n, rows, c).transpose(1, 2)
    gw = None if gw_dc is None else gw_dc.view(d, o, c).permute(1, 2, 0).reshape(o, c * d)
    return ga, gb, gw


class _OuterProductMean(torch.autograd.Function):
    """Chunked forward and a backward that recomputes chunks (nothing O(N^2 C D) kept)."""

    @staticmethod
    def forward(ctx, a, b, keep, inv, weight, bias, chunk, order, mm):
        acc = _accumulation_dtype(a.dtype)
        mm = mm if order == "outer" else acc  # the fold order is cheap: fp32 throughout
        batch, _, n, _ = a.shape
        with fp32_region(a):
            a_m, b_m = _masked(a, keep, mm), _masked(b, keep, mm)
            w = weight.to(mm).contiguous()
            bias_acc = None if bias is None else bias.to(acc)
            out = torch.empty(batch, n, n, weight.shape[0], dtype=a.dtype, device=a.device)
            z = None
            if order == "outer":
                # Within the budget in one chunk: keep the outer product for the weight
                # gradient rather than recompute it (as plain autograd would keep it).
                z = _forward_outer(a_m, b_m, w, inv, bias_acc, out, chunk, acc, keep_z=ctx.needs_input_grad[4])
            else:
                _forward_fold(a_m, b_m, w, inv, bias_acc, out, chunk, acc)
        ctx.save_for_backward(a, b, keep, weight, inv if torch.is_tensor(inv) else None, z)
        ctx.inv_scalar = None if torch.is_tensor(inv) else inv
        ctx.chunk, ctx.order, ctx.mm = chunk, order, mm
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        a, b, keep, weight, inv_t, z_saved = ctx.saved_tensors
        inv = ctx.inv_scalar if inv_t is None else inv_t[..., None]
        need_a, need_b, _, _, need_w, need_bias = ctx.needs_input_grad[:6]
        acc, mm = _accumulation_dtype(a.dtype), ctx.mm
        grad_a = grad_b = grad_w = grad_bias = None
        with fp32_region(a):
            g = grad_out.to(acc)
            if need_bias:
                grad_bias = g.sum(dim=(0, 1, 2)).to(weight.dtype)
            if need_a or need_b or need_w:
                gs_acc = g * inv
                gs = gs_acc.to(mm).contiguous()
                a_m, b_m = _masked(a, keep, mm), _masked(b, keep, mm)
                w = weight.to(mm).contiguous()
                if ctx.order == "outer":
                    gs_lo = (gs_acc - gs).to(mm) if (mm != acc and need_w) else None
                    ga, gb, gw = _backward_outer(
                        a_m, b_m, w, gs, ctx.chunk, need_a, need_b, need_w, acc, gs_lo, z_saved
                    )
                else:
                    ga, gb, gw = _backward_fold(a_m, b_m, w, gs, ctx.chunk, need_a, need_b, need_w, acc)
                if need_a:
                    grad_a = (ga if keep is None else ga * keep).to(a.dtype)
                if need_b:
                    grad_b = (gb if keep is None else gb * keep).to(b.dtype)
                if need_w:
                    grad_w = gw.to(weight.dtype)
        return grad_a, grad_b, None, None, grad_w, grad_bias, None, None, None


def _torch_backend(a, b, mask, out_weight, out_bias, chunk_size, order=None, half_matmuls=None):
    batch, rows, n, c = a.shape
    d, o = b.shape[-1], out_weight.shape[0]
    acc = _accumulation_dtype(a.dtype)
    if order is None:
        order = choose_order(rows, n, c, d, o)
    if chunk_size is None:
        chunk_size = _chunk_for(order, batch, rows, n, c, d, o, a.device)
    with fp32_region(a):
        if mask is None:
            keep, inv = None, 1.0 / max(1, rows)
        else:
            keep = mask.to(acc)
            count = torch.bmm(keep.transpose(1, 2), keep)  # [B, N, N] rows keeping both i and j
            inv = count.clamp_(min=1).reciprocal_()
            keep = keep[..., None]
    mm = matmul_dtype(a, half_matmuls)
    return _OuterProductMean.apply(a, b, keep, inv, out_weight, out_bias, chunk_size, order, mm)


def _reference_backend(a, b, mask, out_weight, out_bias, chunk_size):
    return _reference.outer_product_mean(a, b, mask, out_weight, out_bias)


backends.register(OP, "torch", _torch_backend, priority=50)
backends.register(OP, "reference", _reference_backend, priority=0, auto=False)


def validate(a, b, mask, out_weight, out_bias):
    """Check shapes, dtypes and devices; return the mask as bool (or None)."""
    check_tensor("a", a, (None, None, None, None))
    batch, rows, n, c = a.shape
    check_tensor("b", b, (batch, rows, n, None), device=a.device)
    check_same_dtype("a", a, b=b)
    d = b.shape[-1]
    check_tensor("out_weight", out_weight, (None, c * d), device=a.device)
    check_aux_dtype("out_weight", out_weight, a)
    if out_bias is not None:
        check_tensor("out_bias", out_bias, (out_weight.shape[0],), device=a.device)
        check_same_dtype("out_weight", out_weight, out_bias=out_bias)
    return as_bool_mask("mask", mask, (batch, rows, n), a.device)


def outer_product_mean(
    a: torch.Tensor,
    b: torch.Tensor,
    mask: Optional[torch.Tensor],
    out_weight: torch.Tensor,
    out_bias: Optional[torch.Tensor] = None,
    *,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean over MSA rows of the outer products a_i (x) b_j, projected; see the module doc.

    Args:
        a: ``[B, S, N, C]`` projected MSA features (left factor), any strides.
        b: ``[B, S, N, D]`` projected MSA features (right factor), a's dtype.
        mask: ``[B, S, N]`` keep-mask over MSA positions (bool or 0/1 float), or None.
        out_weight: ``[O, C * D]`` (an ``nn.Linear(C * D, O)`` weight), a's dtype or fp32.
        out_bias: ``[O]`` or None, out_weight's dtype.
        chunk_size: token rows (or, in the fold order, columns) per step of the
            ``torch`` backend (default: temporaries within ``foldops.budget``'s chunk
            budget).
        backend: ``"auto"``, ``"torch"`` or ``"reference"``.

    Returns:
        ``[B, N, N, O]`` in a's dtype.
    """
    mask = validate(a, b, mask, out_weight, out_bias)
    check_positive_int("chunk_size", chunk_size)
    batch, rows, n, _ = a.shape
    if batch * n * out_weight.shape[0] == 0:
        return zeros_output((batch, n, n, out_weight.shape[0]), a, (a, b, out_weight, out_bias))
    impl = backends.select(OP, backend, device=a.device, dtype=a.dtype)
    return impl.fn(a, b, mask, out_weight, out_bias, chunk_size)


__all__ = ["outer_product_mean", "choose_order", "contraction_flops"]
