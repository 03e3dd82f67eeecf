"""Launchers of the triangle multiplication kernels: check, allocate, choose tiles, launch.

    x: [B, N, N, C]   mask: [B, N, N] bool or None   (P = N*N positions)
    H = p_in_weight.shape[0] // 2, the hidden (product) width (H = C in Boltz-2)
    forward saves  ab: [B, 2H, P] (a | b, channel-major, x's dtype)
                   go: [B, P, C] output gate (x's dtype)
                   t:  [B, H, P] fp32 triangular product, channel-major

``precision`` is the ``tl.dot`` input precision of fp32 inputs: "ieee", "tf32x3" or
"tf32" (16-bit inputs always run 16-bit products; see ``op.py`` for how it follows
``torch.get_float32_matmul_precision()``).

t stays fp32: LayerNorm_out subtracts its mean over channels, and where the channels
share a large common part (a sum of N correlated products) a 16-bit t loses the
centred remainder (2-3x PyTorch's bf16 error at N = 48-128 with such weights). Its
gradient dt carries no such cancellation: for bf16 x it is stored in bf16, which makes
da and db single 16-bit products. For fp16 x it is stored as two fp16 planes, hi and
lo = dt - hi: the fp16 baseline's product takes dt in fp32, and one fp16 plane (or a
bf16 one) would be coarser. The pair adds precision (about 21 significant bits), not
range: a |dt| past fp16's 65504 is stored as hi = +-inf, lo = 0 (not dt - hi = -+inf,
whose product would turn the overflow's inf into NaN). So da and db are two 16-bit
products whose operands the kernel loads as they are (see ``_product_kernel`` for why
the split is not done in registers there).

Memory: the forward holds ab, go and t beside x and out, O(B N^2 (C + H)) (about 5x x's
bytes for 16-bit x and H = C; at inference t only for a block of rows i, so about 3x
plus that block); the backward adds dt ([B, H, P]: bf16 for bf16 x, fp32 for fp32 x,
two fp16 planes [B, 2H, P] for fp16 x), dgate, d[a, b] and dx, plus
per-chunk buffers (u, dy, h, [dp | dg]) whose positions per chunk come from
``foldops.budget.rows_per_chunk``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from foldops import budget
from foldops.device import triton_interpret
from foldops.kernels._launch import launcher
from foldops.kernels._utils import cdiv, mask_bytes, next_pow2, patch_interpreter_bf16
from foldops.kernels.triangle_multiplication import configs
from foldops.kernels.triangle_multiplication.backward import _in_bwd_kernel, _out_bwd_kernel
from foldops.kernels.triangle_multiplication.forward import _epilogue_kernel, _product_kernel, _prologue_kernel

if triton_interpret():
    patch_interpreter_bf16()

MAX_CHANNELS = 512
"""Widest C (and H) the row kernels hold in registers."""

PRECISIONS = ("ieee", "tf32x3", "tf32")
"""``tl.dot`` input precisions of fp32 inputs, most accurate first."""


def _padded(c: int) -> int:
    return max(16, next_pow2(c))


def _slab(cp: int, bn: int, dtype: torch.dtype, most: int) -> int:
    """Output channels per weight tile: fp32 tiles (twice the bytes) at most ``most``."""
    return max(16, most // cp) if dtype == torch.float32 and cp * bn > most else bn


def _row_config(cp: int, backward: bool, dtype: torch.dtype):
    if triton_interpret():
        return configs.INTERPRET_ROW
    bp, bn, warps = (configs.ROW_BWD if backward else configs.ROW_FWD)[cp]
    most = configs.FP32_MAX_WEIGHT_TILE_BWD if backward else configs.FP32_MAX_WEIGHT_TILE
    return bp, _slab(cp, bn, dtype, most), warps


def grad_product_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the stored gradient of t for inputs of ``dtype``: bf16 for bf16, fp32
    for fp32; fp16 for fp16, stored split (``grad_product_split``)."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def grad_product_split(dtype: torch.dtype) -> bool:
    """Whether the gradient of t is stored as hi + lo planes for inputs of ``dtype``."""
    return dtype == torch.float16


def _prologue_config(cp: int, dtype: torch.dtype):
    if triton_interpret():
        return configs.INTERPRET_PROLOGUE
    table = configs.PROLOGUE_FP32 if dtype == torch.float32 else configs.PROLOGUE
    bp, bn, warps, all_slabs = table[cp]
    return bp, _slab(cp, bn, dtype, configs.FP32_MAX_WEIGHT_TILE), warps, all_slabs


def _precision(dtype: torch.dtype, precision: str) -> str:
    """The kernels' ``tl.dot`` precision: ``precision`` for fp32, "ieee" for 16-bit
    operands (tensor cores take them as they are)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    return precision if dtype == torch.float32 else "ieee"


def _check_widths(c: int, h: int) -> None:
    if c > MAX_CHANNELS:
        raise ValueError(f"x: at most {MAX_CHANNELS} channels, got {c}")
    if h > MAX_CHANNELS:
        raise ValueError(f"p_in_weight: a hidden width of at most {MAX_CHANNELS} (shape [2H, C]), got H = {h}")


def _skip_launch(t: torch.Tensor) -> bool:
    """Under the interpreter, fake/meta tensors (torch.compile / opcheck tracing) only
    need the allocations: the interpreter would run the kernel on them. Compiled
    kernels are traced (``launcher`` -> ``wrap_triton``) whatever the tensors."""
    return triton_interpret() and (t.device.type == "meta" or is_fake(t))


def _positions(x: torch.Tensor) -> torch.Tensor:
    """[B, N, N, C] -> [B, P, C] view (a copy only if the pair axes cannot merge)."""
    b, n, _, c = x.shape
    return x.reshape(b, n * n, c)


def _span(t: torch.Tensor, dim: int, start, end) -> torch.Tensor:
    """``t`` restricted to ``start:end`` along ``dim``; ``t`` itself when that is the whole
    axis (the usual single-chunk case: no view op per call)."""
    size = t.shape[dim]
    end = min(end, size)
    return t if start == 0 and end == size else t.narrow(dim, start, end - start)


def _mask_rows(mask: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return x.new_empty((1, 1), dtype=torch.uint8)
    b, n, _ = mask.shape
    return mask_bytes(mask.reshape(b, n * n))


def _launch_product(a, a_strides, bm, b_strides, out, o_strides, nch, m, n, k, split_a, precision, a_lo=0):
    """OUT[z] = A[z] @ B[z] over z = (batch, channel); strides are (b, c, row, col).
    ``split_a``: A = hi + lo, 16-bit parts ``a_lo`` elements apart."""
    if triton_interpret():
        bm_, bn_, bk_, group, warps, stages = configs.INTERPRET_PRODUCT
    elif split_a:
        bm_, bn_, bk_, group, warps, stages = configs.PRODUCT_SPLIT
    elif a.dtype == torch.float32:
        bm_, bn_, bk_, group, warps, stages = configs.PRODUCT_FP32
    else:
        bm_, bn_, bk_, group, warps, stages = configs.PRODUCT_16BIT
    batch = out.shape[0]
    grid = (cdiv(m, bm_) * cdiv(n, bn_), batch * nch)
    launcher(_product_kernel)[grid](
        a, bm, out, nch, m, n, k, *a_strides, a_lo, *b_strides, *o_strides,
        SPLIT_A=split_a, PRECISION=precision, BLOCK_M=bm_, BLOCK_N=bn_, BLOCK_K=bk_, GROUP_M=group,
        num_warps=warps, num_stages=stages,
    )


def triangle_multiplication_forward(
    x, mask, norm_in_weight, norm_in_bias, p_in_weight, g_in_weight,
    norm_out_weight, norm_out_bias, p_out_weight, g_out_weight,
    outgoing: bool, eps: float, precision: str, save: bool = True,
):
    """Returns (out [B, N, N, C], ab [B, 2H, P], go [B, P, C], t [B, H, P] fp32).

    ``save=False`` (inference): t is built and consumed a block of rows i at a time
    (rows from ``foldops.budget``), and the returned t is that last block."""
    batch, n, _, c = x.shape
    h = p_in_weight.shape[0] // 2
    p = n * n
    cp, hp = _padded(c), _padded(h)
    _check_widths(c, h)
    precision = _precision(x.dtype, precision)
    out = torch.empty((batch, n, n, c), dtype=x.dtype, device=x.device)
    ab = torch.empty((batch, 2 * h, p), dtype=x.dtype, device=x.device)
    go = torch.empty((batch, p, c), dtype=x.dtype, device=x.device)
    t = torch.empty((batch, h, p) if save or _skip_launch(x) else (batch, h, 0), dtype=torch.float32,
                    device=x.device)
    if _skip_launch(x) or x.numel() == 0:
        return out, ab, go, t
    xr = _positions(x)
    keep = _mask_rows(mask, x)
    bp, bn, warps, all_slabs = _prologue_config(cp, x.dtype)
    # Position blocks (times channel slabs) on axis 0: they pass the 65535 programs of
    # axes 1 and 2 at large N.
    slabs = 1 if all_slabs else cdiv(2 * h, bn) + cdiv(c, bn)
    launcher(_prologue_kernel)[(slabs * cdiv(p, bp), batch)](
        xr, norm_in_weight, norm_in_bias, p_in_weight, g_in_weight, g_out_weight, keep, ab, go,
        p, c, h, eps, *xr.stride(), keep.stride(0), ab.stride(0), ab.stride(1), go.stride(0), go.stride(1),
        HAS_MASK=mask is not None, PRECISION=precision, CP=cp, BLOCK_P=bp, BLOCK_N=bn, ALL_SLABS=all_slabs,
        num_warps=warps,
    )
    bp, bn, warps = _row_config(hp, backward=False, dtype=x.dtype)
    a_view, b_view = ab[:, :h], ab[:, h:]
    sb = ab.stride(0)
    out_r = _positions(out)
    # Rows i of t per step: all of them when t is saved for the backward; at inference
    # as many as the budget allows (t is the largest temporary: fp32 [B, H, rows, N]).
    rows = n if save else budget.rows_per_chunk(x.device, batch * h * n * 4, n)
    if not save:
        t = torch.empty((batch, h, rows * n), dtype=torch.float32, device=x.device)
    for i0 in range(0, n, rows):
        r = min(rows, n - i0)
        if outgoing:  # t[i, j] = sum_k a[i, k] b[j, k]
            a_rows, a_str, b_str = _span(a_view, 2, i0 * n, p), (sb, p, n, 1), (sb, p, 1, n)
        else:  # t[i, j] = sum_k a[k, i] b[k, j]
            a_rows, a_str, b_str = _span(a_view, 2, i0, p), (sb, p, 1, n), (sb, p, n, 1)
        tp = t.stride(1)
        _launch_product(a_rows, a_str, b_view, b_str, t, (h * tp, tp, n, 1), h, r, n, n, False, precision)
        o_r = _span(out_r, 1, i0 * n, (i0 + r) * n)
        go_r = _span(go, 1, i0 * n, (i0 + r) * n)
        launcher(_epilogue_kernel)[(cdiv(c, bn) * cdiv(r * n, bp), batch)](
            t, norm_out_weight, norm_out_bias, p_out_weight, go_r, o_r,
            r * n, c, h, eps, t.stride(0), t.stride(1), go_r.stride(0), go_r.stride(1), *o_r.stride(),
            PRECISION=precision, HP=hp, BLOCK_P=bp, BLOCK_N=bn, num_warps=warps,
        )
    return out, ab, go, t


def _chunk_positions(x: torch.Tensor, p: int, bytes_per_position: int, block: int) -> int:
    rows = budget.rows_per_chunk(x.device, bytes_per_position, p)
    return p if rows >= p else max(block, rows - rows % block)


def _sum_f32(acc: Optional[torch.Tensor], part: torch.Tensor) -> torch.Tensor:
    """Sum of chunk parts in fp32; a single part stays as computed (casting it to fp32
    and back to its dtype would give the same values at the cost of two kernels)."""
    return part if acc is None else acc.float() + part.float()


def triangle_multiplication_backward(
    grad_out, x, mask, norm_in_weight, norm_in_bias, p_in_weight, g_in_weight,
    norm_out_weight, norm_out_bias, p_out_weight, g_out_weight,
    ab, go, t, outgoing: bool, eps: float, precision: str,
):
    """Gradients (dx, d norm_in w, b, d p_in, d g_in, d norm_out w, b, d p_out, d g_out),
    each in its input's dtype. Weight gradients are deterministic GEMMs over positions."""
    batch, n, _, c = x.shape
    h = p_in_weight.shape[0] // 2
    p = n * n
    cp, hp = _padded(c), _padded(h)
    _check_widths(c, h)
    precision = _precision(x.dtype, precision)
    wdt = p_in_weight.dtype
    dev = x.device
    dx = torch.empty((batch, n, n, c), dtype=x.dtype, device=dev)
    shapes = [(c,), (c,), (2 * h, c), (2 * h, c), (h,), (h,), (c, h), (c, c)]
    params = (norm_in_weight, norm_in_bias, p_in_weight, g_in_weight, norm_out_weight, norm_out_bias,
              p_out_weight, g_out_weight)
    if _skip_launch(x) or x.numel() == 0:
        zeros = [torch.zeros(s, dtype=w.dtype, device=dev) for s, w in zip(shapes, params)]
        return (dx.zero_() if x.numel() == 0 else dx, *zeros)
    xr, dor = _positions(x), _positions(grad_out)
    keep = _mask_rows(mask, x)
    # The output-side kernel holds the H hidden channels of a position, the input-side
    # one its C pair channels: each has the tiles of its width (the same when H = C).
    bp_o, bn_o, warps_o = _row_config(hp, backward=True, dtype=wdt)
    bp_i, bn_i, warps_i = _row_config(cp, backward=True, dtype=wdt)
    esize = wdt.itemsize
    chunk = _chunk_positions(x, p, (c + 4 * h) * esize, max(bp_o, bp_i))  # u, dy | h, dp, dg

    # Output side: dt (channel-major), dgate; u and dy per chunk for dW_out.
    split = grad_product_split(wdt)
    # Split: hi in channels [0, H), lo in [H, 2H); the lo part is dt_lo elements further.
    dt = torch.empty((batch, 2 * h if split else h, p), dtype=grad_product_dtype(wdt), device=dev)
    dt_lo = h * dt.stride(1)
    dgo = torch.empty((batch, p, c), dtype=wdt, device=dev)
    part_o = torch.empty((batch, cdiv(chunk, bp_o), 2, hp), dtype=torch.float32, device=dev)
    u = torch.empty((batch, chunk, h), dtype=wdt, device=dev)
    dy = torch.empty((batch, chunk, c), dtype=wdt, device=dev)
    d_po = d_lnw = None
    for s in range(0, p, chunk):
        e = min(p, s + chunk)
        pc = e - s
        tc, dtc = _span(t, 2, s, e), _span(dt, 2, s, e)
        goc, doc, dgoc = _span(go, 1, s, e), _span(dor, 1, s, e), _span(dgo, 1, s, e)
        grid = (cdiv(pc, bp_o), batch)
        launcher(_out_bwd_kernel)[grid](
            tc, norm_out_weight, norm_out_bias, p_out_weight, goc, doc, dtc, dy, u, dgoc, part_o,
            pc, c, h, eps, tc.stride(0), tc.stride(1), goc.stride(0), goc.stride(1), *doc.stride(),
            dtc.stride(0), dtc.stride(1), dt_lo, dy.stride(0), dy.stride(1), u.stride(0), u.stride(1),
            dgoc.stride(0), dgoc.stride(1), part_o.stride(0),
            SPLIT_DY=wdt != torch.float32, SPLIT_DT=split,
            PRECISION=precision, HP=hp, BLOCK_P=bp_o, BLOCK_N=bn_o, num_warps=warps_o,
        )
        nb = grid[0]
        d_po = _sum_f32(d_po, _span(dy, 1, 0, pc).reshape(-1, c).T @ _span(u, 1, 0, pc).reshape(-1, h))
        d_lnw = _sum_f32(d_lnw, _span(part_o, 1, 0, nb).sum(dim=(0, 1)))
    del u, dy

    # d[a, b] = per-channel products of dt with b and a (dt is always the A operand).
    dab = torch.empty((batch, 2 * h, p), dtype=wdt, device=dev)
    sb, sdt = ab.stride(0), dt.stride(0)
    a_view, b_view = ab[:, :h], ab[:, h:]
    da, db = dab[:, :h], dab[:, h:]
    sdab = dab.stride(0)
    prod = dict(nch=h, m=n, n=n, k=n, split_a=split, precision=precision, a_lo=dt_lo)
    if outgoing:
        # da[i, k] = sum_j dt[i, j] b[j, k];  db[j, k] = sum_i dt[i, j] a[i, k]
        _launch_product(dt, (sdt, p, n, 1), b_view, (sb, p, n, 1), da, (sdab, p, n, 1), **prod)
        _launch_product(dt, (sdt, p, 1, n), a_view, (sb, p, n, 1), db, (sdab, p, n, 1), **prod)
    else:
        # da[k, i] = sum_j dt[i, j] b[k, j];  db[k, j] = sum_i dt[i, j] a[k, i]  (stored transposed)
        _launch_product(dt, (sdt, p, n, 1), b_view, (sb, p, 1, n), da, (sdab, p, 1, n), **prod)
        _launch_product(dt, (sdt, p, 1, n), a_view, (sb, p, 1, n), db, (sdab, p, 1, n), **prod)
    del dt

    # Input side, chunk by chunk: dx, and h, [dp | dg] for dW_in.
    part_i = part_o if (hp, bp_o) == (cp, bp_i) else torch.empty(
        (batch, cdiv(chunk, bp_i), 2, cp), dtype=torch.float32, device=dev)
    hn = torch.empty((batch, chunk, c), dtype=wdt, device=dev)
    dpg = torch.empty((batch, chunk, 4 * h), dtype=wdt, device=dev)
    dxr = _positions(dx)
    d_pg = d_go = d_lni = None
    for s in range(0, p, chunk):
        e = min(p, s + chunk)
        pc = e - s
        xc, dabc, dgoc, dxc = _span(xr, 1, s, e), _span(dab, 2, s, e), _span(dgo, 1, s, e), _span(dxr, 1, s, e)
        keepc = _span(keep, 1, s, e) if mask is not None else keep
        grid = (cdiv(pc, bp_i), batch)
        launcher(_in_bwd_kernel)[grid](
            xc, norm_in_weight, norm_in_bias, p_in_weight, g_in_weight, g_out_weight, keepc, dabc, dgoc,
            dxc, hn, dpg, part_i,
            pc, c, h, eps, *xc.stride(), keepc.stride(0), dabc.stride(0), dabc.stride(1), dgoc.stride(0),
            dgoc.stride(1), *dxc.stride(), hn.stride(0), hn.stride(1), dpg.stride(0), dpg.stride(1),
            part_i.stride(0), HAS_MASK=mask is not None, PRECISION=precision, CP=cp, BLOCK_P=bp_i, BLOCK_N=bn_i, num_warps=warps_i,
        )
        nb = grid[0]
        hc = _span(hn, 1, 0, pc).reshape(-1, c)
        d_pg = _sum_f32(d_pg, _span(dpg, 1, 0, pc).reshape(-1, 4 * h).T @ hc)
        d_go = _sum_f32(d_go, dgoc.reshape(-1, c).T @ hc)
        d_lni = _sum_f32(d_lni, _span(part_i, 1, 0, nb).sum(dim=(0, 1)))
    grads = (d_lni[0, :c], d_lni[1, :c], d_pg[: 2 * h], d_pg[2 * h:], d_lnw[0, :h], d_lnw[1, :h], d_po, d_go)
    # No aliased outputs: slices of one result (d_pg, the LayerNorm rows) are copied;
    # d_po and d_go (whole GEMM results, the last two) only if their dtype differs.
    return (dx, *(g.to(w.dtype, copy=i < 6) for i, (g, w) in enumerate(zip(grads, params))))
