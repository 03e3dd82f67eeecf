"""Plain launchers of the invariant point attention kernels: check, allocate, choose tiles, launch.

    ipa_forward(q, k, v, qp, kp, vp, w, bias, z, mask, scale) -> (o, op, oz, lse, op_rel)
    ipa_backward(do, dop, doz, q, k, v, qp, kp, vp, w, bias, z, mask, o, op_rel, oz, lse, scale)
        -> (dq, dk, dv, dqp, dkp, dvp, dw, dbias, dz)

Shapes: q, k, v [B, N, H, C] (one dtype: fp16/bf16/fp32); qp, kp [B, N, H, D] fp32
(query / key points, global frame, coordinates flattened: D = 3 Pq); vp [B, N, H, E]
fp32 (value points, E = 3 Pv); w [H] fp32 point weights; bias [B, H, N, N] (q's dtype
or fp32); z [B, N, N, CZ] (q's dtype or fp32; its products run in q's dtype); mask
[B, N] bool or None. Outputs, all
fp32: o [B, N, H, C], op [B, N, H, E], oz [B, N, H, CZ], lse [B, N, H, 2] (row max and
log of the row sum), op_rel [B, N, H, E]: the point output relative to the row's own
value points, ``sum_j a_ij (vp_j - vp_i)`` (0 on dropped rows), which the backward
takes in place of op.

Memory beyond inputs and outputs: the forward saves lse and op_rel, O(B N H (2 + E)).
The backward allocates its gradients and the dS buffer [B, H, N, N] fp32, which is the bias's
gradient (cast to the bias's dtype when that is not fp32).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

from foldops.device import triton_interpret
from foldops.kernels._launch import launcher
from foldops.kernels._utils import cdiv, next_pow2, patch_interpreter_bf16
from foldops.kernels.invariant_point_attention import configs
from foldops.kernels.invariant_point_attention.backward import ipa_bwd_column_kernel, ipa_bwd_row_kernel
from foldops.kernels.invariant_point_attention.forward import ipa_fwd_kernel

if triton_interpret():
    patch_interpreter_bf16()

MAX_WIDTH = 256  # widest per-head operand (C, 3 Pq + 1, 3 Pv, Cz) the row tiles take
MAX_HEADS = 64


def _p2(x: int, least: int = 16) -> int:
    return max(least, next_pow2(int(x)))


def unsupported(c: int, pq: int, pv: int, cz: int, heads: int) -> Optional[str]:
    """Why the kernels cannot run these sizes, or None."""
    for name, width in (("c_hidden", c), ("3 * no_qk_points", 3 * pq), ("3 * no_v_points", 3 * pv),
                        ("pair channels", cz)):
        if width > MAX_WIDTH:
            return f"{name} = {width} (kernel supports up to {MAX_WIDTH})"
    if heads > MAX_HEADS:
        return f"{heads} heads (kernel supports up to {MAX_HEADS})"
    return None


def _interpreting() -> bool:
    return triton_interpret()


def _skip_launch(t: torch.Tensor) -> bool:
    """Fake/meta tensors (torch.compile, opcheck): the allocations are the whole answer.
    Compiled kernels go through ``launcher`` (``wrap_triton`` when tracing); under the
    interpreter the launch itself would run on fake tensors, so it is skipped."""
    return t.device.type == "meta" or (_interpreting() and is_fake(t))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact products unless torch's own switch allows TF32.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32x3"
    return "ieee"


def _row_tiles(hp: int, widths) -> Tuple[int, int]:
    """(BLOCK_N, num_warps) of the row kernels: the largest power of two that keeps a
    [hp, BLOCK_N, widest] tile within ``configs.ROW_TILE_ELEMENTS``, clamped to the table's range."""
    if _interpreting():
        return configs.INTERPRETER_BLOCK, 1
    raw = max(1, configs.ROW_TILE_ELEMENTS // (hp * max(widths)))
    block = 1 << (raw.bit_length() - 1)
    return max(configs.ROW_MIN_BLOCK_N, min(configs.ROW_MAX_BLOCK_N, block)), configs.ROW_WARPS


def _sizes(q, qp, vp, z):
    batch, n, heads, c = q.shape
    d, e, cz = qp.shape[-1], vp.shape[-1], z.shape[-1]
    pads = dict(HP=_p2(heads), CP=_p2(c), DP=_p2(d), EP=_p2(e), CZP=_p2(cz))
    return batch, n, heads, c, d, e, cz, pads


def _mask_args(mask: Optional[torch.Tensor], fallback: torch.Tensor):
    if mask is None:
        return fallback, (0, 0), False
    return mask, mask.stride(), True


def ipa_forward(q, k, v, qp, kp, vp, w, bias, z, mask, scale: float):
    """Outputs ``(o, op, oz, lse)``; see the module doc for shapes."""
    batch, n, heads, c, d, e, cz, pads = _sizes(q, qp, vp, z)
    # Outputs in fp32: the backward's delta = rowsum(dO * O) needs them unrounded. Its
    # error multiplies the mean of each key column, and the key points' |k|^2 column is
    # far from zero mean (bf16-rounded outputs made the point weights' gradient 10x
    # less accurate than plain PyTorch's). The entry point casts them.
    o = torch.empty(batch, n, heads, c, dtype=torch.float32, device=q.device)
    op = torch.empty(batch, n, heads, e, dtype=torch.float32, device=q.device)
    oz = torch.empty(batch, n, heads, cz, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, n, heads, 2, dtype=torch.float32, device=q.device)
    op_rel = torch.empty_like(op)  # op's layout: the kernel takes op's strides for both
    if batch == 0 or n == 0 or heads == 0 or _skip_launch(q):  # (C = 0 still has point and pair outputs)
        return o, op, oz, lse, op_rel
    mask_t, mask_strides, has_mask = _mask_args(mask, q)
    block, warps = _row_tiles(pads["HP"], (pads["CP"], pads["DP"], pads["EP"]))
    launcher(ipa_fwd_kernel)[(n, batch)](
        q, k, v, qp, kp, vp, w, bias, z, mask_t, o, op, oz, op_rel, lse,
        *q.stride(), *k.stride(), *v.stride(), *qp.stride(), *kp.stride(), *vp.stride(),
        *bias.stride(), *z.stride(), *mask_strides, *o.stride(), *op.stride(), *oz.stride(), *lse.stride()[:3],
        n, heads, c, d, e, cz, float(scale),
        HAS_MASK=has_mask, BLOCK_N=block, PRECISION=_precision(q.dtype), SPLIT_P=q.dtype != torch.float32,
        num_warps=warps, **pads,
    )
    return o, op, oz, lse, op_rel


def ipa_backward(do, dop, doz, q, k, v, qp, kp, vp, w, bias, z, mask, o, op_rel, oz, lse, scale: float):
    """Gradients ``(dq, dk, dv, dqp, dkp, dvp, dw, dbias, dz)``; see the module doc."""
    batch, n, heads, c, d, e, cz, pads = _sizes(q, qp, vp, z)
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    dq = torch.empty(batch, n, heads, c, **f32)
    dk = torch.empty(batch, n, heads, c, **f32)
    dv = torch.empty(batch, n, heads, c, **f32)
    dqp = torch.empty(batch, n, heads, d, **f32)
    dkp = torch.empty(batch, n, heads, d, **f32)
    dvp = torch.empty(batch, n, heads, e, **f32)
    dw_rows = torch.empty(batch, n, heads, **f32)
    ds = torch.empty(batch, heads, n, n, **f32)
    dz = torch.empty(batch, n, n, cz, dtype=z.dtype, device=dev)
    grads_q = lambda: (dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype))  # noqa: E731
    if batch == 0 or n == 0 or heads == 0 or _skip_launch(q):
        return (*grads_q(), dqp, dkp, dvp, torch.zeros_like(w, dtype=torch.float32), ds.to(bias.dtype), dz)
    # The row kernel forms dP = dO.v + dOp.(vp_j - vp_i) + dOz.z with dO and dOz in q's dtype; delta =
    # rowsum(dO * O) over all three outputs (fp32, O(B N H (C + E + CZ))) takes them
    # rounded alike, so that the rows of dS sum to zero as they should. Its point term is
    # dOp . op_rel, matching the row kernel's dP, whose point term is dOp . (vp_j - vp_i):
    # a row constant that dS = P (dP - delta) cancels, taken out of both.
    do, dop, doz = do.to(q.dtype), dop.to(torch.float32), doz.to(q.dtype)
    delta = ((do.float() * o).sum(-1) + (dop * op_rel).sum(-1) + (doz.float() * oz).sum(-1)).contiguous()
    mask_t, mask_strides, has_mask = _mask_args(mask, q)
    precision = _precision(q.dtype)
    block, warps = _row_tiles(pads["HP"], (pads["CP"], pads["DP"], pads["EP"]))
    launcher(ipa_bwd_row_kernel)[(n, batch)](
        q, k, v, qp, kp, vp, w, bias, z, mask_t, do, dop, doz, lse, delta, dq, dqp, dw_rows, ds, dz,
        *q.stride(), *k.stride(), *v.stride(), *qp.stride(), *kp.stride(), *vp.stride(),
        *bias.stride(), *z.stride(), *mask_strides, *do.stride(), *dop.stride(), *doz.stride(),
        *lse.stride()[:3], *delta.stride(), *dq.stride(), *dqp.stride(), *ds.stride(), *dz.stride(),
        n, heads, c, d, e, cz, float(scale),
        HAS_MASK=has_mask, BLOCK_N=block, PRECISION=precision, num_warps=warps, **pads,
    )
    tiles = configs.COLUMN_TILES
    bj, bi, warps = tiles["block_j"], tiles["block_i"], tiles["warps"]
    if _interpreting():
        bj = bi = configs.INTERPRETER_BLOCK
        warps = 1
    launcher(ipa_bwd_column_kernel)[(cdiv(n, bj), heads, batch)](
        q, k, v, qp, kp, vp, w, bias, mask_t, do, dop, lse, ds, dk, dv, dkp, dvp,
        *q.stride(), *k.stride(), *v.stride(), *qp.stride(), *kp.stride(), *vp.stride(),
        *bias.stride(), *mask_strides, *do.stride(), *dop.stride(), *lse.stride()[:3], *ds.stride(),
        *dk.stride(), *dkp.stride(), *dvp.stride(),
        n, c, d, e, float(scale),
        HAS_MASK=has_mask, CP=pads["CP"], DP=pads["DP"], EP=pads["EP"], BLOCK_J=bj, BLOCK_I=bi,
        PRECISION=precision, num_warps=warps,
    )
    dw = dw_rows.sum(dim=(0, 1))
    return (*grads_q(), dqp, dkp, dvp, dw, ds if bias.dtype == torch.float32 else ds.to(bias.dtype), dz)
