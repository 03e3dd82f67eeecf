"""Launchers of the pair-weighted averaging kernels: ``pair_weighted_averaging_forward``
and ``pair_weighted_averaging_backward`` check, allocate, choose tiles and launch.

    v, g, out: [B, S, N, H, C] (any strides)   logits: [B, H, N, N] (any strides)
    mask: [B, N, N] bool pair keep-mask or None   msa_mask: [B, S, N] bool or None
    p: [B, H, N, N] fp32 softmax weights (saved for backward); w = p in v's dtype

The softmax over j (fp32, once per (b, h), N^2 H work next to the S N^2 H C of the
products) and the bias gradient ``p * (dW - rowsum(p * dW))`` are PyTorch ops on
[B, H, N, N] tensors; everything of size S * N runs in the kernels. Memory, beyond
inputs and outputs: forward p (B H N^2 fp32, saved for the backward, which then needs
no second softmax), w while the kernel runs and the value keep-mask (at most B S N
bytes, only with both masks); backward w again, dO' (one S * N * H * C buffer in v's
dtype, only with a gate) and fp32 dW (B H N^2; times the column splits while they are summed,
splits only where few (i, j) tiles leave SMs idle, i.e. small N).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

from foldops.device import multiprocessor_count, triton_interpret
from foldops.kernels._launch import launcher
from foldops.kernels._utils import cdiv, mask_bytes, next_pow2
from foldops.kernels.pair_weighted_averaging import configs
from foldops.kernels.pair_weighted_averaging.backward import _dw_kernel
from foldops.kernels.pair_weighted_averaging.forward import _wx_kernel


def _interpreting() -> bool:
    return triton_interpret()


def _tracing_under_interpreter(t: torch.Tensor) -> bool:
    """Fake/meta tensors under the interpreter: allocate, skip the launch (the
    interpreter would run the kernel on fake tensors)."""
    return _interpreting() and (t.device.type == "meta" or is_fake(t))


def _config(kind: str, dtype: torch.dtype) -> Tuple[int, int, int, int, int]:
    if _interpreting():
        return configs.INTERPRETER
    table = configs.CONFIGS_FP32 if dtype == torch.float32 else configs.CONFIGS
    return table[kind]


def _num_sms(device: torch.device) -> int:
    """SMs of ``device``; 4 under the interpreter, so that tests run the split dW path."""
    return 4 if _interpreting() else multiprocessor_count(device)


def dw_splits(tiles: int, columns: int, block_k: int, device: torch.device) -> int:
    """Column splits of the dW product: enough programs for two waves of the SMs, each
    split at least ``configs.MIN_SPLIT_STEPS`` steps of ``block_k`` columns (one under
    the interpreter, so that small tests split)."""
    want = cdiv(2 * _num_sms(device), max(1, tiles))
    min_steps = 1 if _interpreting() else configs.MIN_SPLIT_STEPS
    return max(1, min(want, columns // (min_steps * block_k)))


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    # fp32 products as three TF32 passes when TF32 is allowed, exact otherwise;
    # 16-bit inputs take the tensor cores either way ("ieee" is ignored for them).
    return "tf32x3" if (dtype == torch.float32 and allow_tf32) else "ieee"


def softmax_weights(logits: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 ``[B, H, N, N]`` softmax over j; masked keys get 0, rows with no kept key
    (or all logits -inf) are all 0."""
    logits = logits.float()
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None], float("-inf"))
    dead = logits.amax(dim=-1, keepdim=True) == float("-inf")
    return torch.softmax(logits.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def value_keep(mask: Optional[torch.Tensor], msa_mask: Optional[torch.Tensor], v: torch.Tensor):
    """uint8 ``[B, S or 1, N]``: 0 where a value counts as zero (a padded MSA row's
    entry, or a key j that every row i masks, which must not pass even a NaN), or None."""
    keep = None
    if mask is not None:
        keep = mask.any(dim=1)[:, None, :]  # [B, 1, N_j]
    if msa_mask is not None:
        keep = msa_mask if keep is None else msa_mask & keep
    return None if keep is None else mask_bytes(keep)


def _keep_args(keep: Optional[torch.Tensor], v: torch.Tensor):
    """(tensor, strides, HAS_KEEP, KEEP_PER_ROW) kernel arguments of a value keep-mask."""
    if keep is None:
        return v, (0, 0, 0), False, False
    strides = keep.stride()
    per_row = keep.shape[1] > 1
    return keep, (strides[0], strides[1] if per_row else 0, strides[2]), True, per_row


def _check(v, logits, g, mask, msa_mask) -> None:
    batch, rows, n, heads, dim = v.shape
    if v.dtype not in configs.DTYPES:
        raise TypeError(f"v: expected dtype in {configs.DTYPES}, got {v.dtype}")
    if dim > configs.MAX_HEAD_DIM:
        raise ValueError(f"v: head dim (last axis) must be at most {configs.MAX_HEAD_DIM}, got {dim}")
    if tuple(logits.shape) != (batch, heads, n, n):
        raise ValueError(f"logits: expected shape {(batch, heads, n, n)}, got {tuple(logits.shape)}")
    if g is not None and (g.shape != v.shape or g.dtype != v.dtype):
        raise ValueError(f"g: expected shape {tuple(v.shape)} and dtype {v.dtype}, got {tuple(g.shape)} {g.dtype}")
    for name, m, shape in (("mask", mask, (batch, n, n)), ("msa_mask", msa_mask, (batch, rows, n))):
        if m is not None and (m.dtype != torch.bool or tuple(m.shape) != shape):
            raise ValueError(f"{name}: expected a bool tensor of shape {shape}, got {m.dtype} {tuple(m.shape)}")


_PLANS: dict = {}
"""(grid, tile arguments) of ``_wx_kernel`` per (shape, dtype, TF32 switch, interpreter)."""


def clear_caches() -> None:
    """Forget cached tile choices (after editing ``configs``)."""
    _PLANS.clear()


def _wx_plan(shape, dtype: torch.dtype, allow_tf32: bool):
    """``(grid, tile keyword arguments)`` of a ``_wx_kernel`` launch on X of ``shape``;
    cached for int shapes (symbolic ones, under torch.compile, are recomputed)."""
    key = (tuple(shape), dtype, allow_tf32, _interpreting())
    plan = _PLANS.get(key)
    if plan is None:
        batch, rows, n, heads, dim = shape
        bi, bj, bsc, warps, stages = _config("wx", dtype)
        bsc = min(bsc, max(16, next_pow2(rows * dim)))
        grid = (cdiv(n, bi), cdiv(rows * dim, bsc), batch * heads)
        meta = dict(C=dim, BLOCK_I=bi, BLOCK_J=bj, BLOCK_SC=bsc, PRECISION=_precision(dtype, allow_tf32),
                    num_warps=warps, num_stages=stages)
        plan = (grid, meta)
        if all(type(d) is int for d in shape):
            _PLANS[key] = plan
    return plan


def _launch_wx(mode, w, x, g, do, keep, out, out2, allow_tf32, w_transposed=False):
    rows, n, heads = x.shape[1:4]
    grid, meta = _wx_plan(x.shape, x.dtype, allow_tf32)
    keep_t, keep_strides, has_keep, per_row = _keep_args(keep, x)
    sw = w.stride()
    w_strides = (sw[0], sw[1], sw[3], sw[2]) if w_transposed else sw
    g_t = g if g is not None else x
    do_t = do if do is not None else x
    out2_t = out2 if out2 is not None else out
    launcher(_wx_kernel)[grid](
        w, x, g_t, do_t, keep_t, out, out2_t,
        *w_strides, *x.stride(), *g_t.stride(), *do_t.stride(), *keep_strides, *out.stride(), *out2_t.stride(),
        rows, n, heads,
        MODE=mode, HAS_GATE=g is not None, HAS_KEEP=has_keep, KEEP_PER_ROW=per_row, **meta,
    )


def forward_with_keep(
    v: torch.Tensor,
    logits: torch.Tensor,
    g: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    msa_mask: Optional[torch.Tensor],
    allow_tf32: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``pair_weighted_averaging_forward``, also returning the value keep-mask
    (``value_keep``) for a backward that keeps it."""
    _check(v, logits, g, mask, msa_mask)
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    p = softmax_weights(logits, mask)
    if v.numel() == 0 or _tracing_under_interpreter(v):
        return out, p, None
    keep = value_keep(mask, msa_mask, v)
    _launch_wx(0, p.to(v.dtype), v, g, None, keep, out, None, allow_tf32)
    return out, p, keep


def pair_weighted_averaging_forward(
    v: torch.Tensor,
    logits: torch.Tensor,
    g: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    msa_mask: Optional[torch.Tensor],
    allow_tf32: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, p)``: ``out = sigmoid(g) * sum_j w v`` ([B, S, N, H, C], contiguous, v's
    dtype; no gate when ``g`` is None) and the softmax ``p`` [B, H, N, N] in fp32, saved
    for the backward (which then needs no second softmax); the kernel reads
    ``w = p.to(v.dtype)``."""
    out, p, _ = forward_with_keep(v, logits, g, mask, msa_mask, allow_tf32)
    return out, p


def pair_weighted_averaging_backward(
    grad_out: torch.Tensor,
    v: torch.Tensor,
    logits: torch.Tensor,
    g: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    msa_mask: Optional[torch.Tensor],
    p: torch.Tensor,
    allow_tf32: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(dv, dlogits, dg)``; dv and dg contiguous in v's dtype, dlogits [B, H, N, N]
    contiguous in logits' dtype, dg None without a gate. ``p``: the forward's fp32
    softmax. Deterministic (no atomics).

    Passes: with a gate, dg and dO' = dO * sigmoid(g) (one kernel, recomputing the
    weighted sum); dv = W^T dO'; dW = dO' v^T over the (s, c) columns; then the softmax
    backward on [B, H, N, N] in fp32.
    """
    _check(v, logits, g, mask, msa_mask)
    keep = None if v.numel() == 0 or _tracing_under_interpreter(v) else value_keep(mask, msa_mask, v)
    return backward_with_keep(grad_out, v, logits.dtype, g, keep, p, allow_tf32)


def backward_with_keep(
    grad_out: torch.Tensor,
    v: torch.Tensor,
    logits_dtype: torch.dtype,
    g: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
    p: torch.Tensor,
    allow_tf32: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``pair_weighted_averaging_backward`` on checked inputs, with the value keep-mask
    ``keep`` (``value_keep`` of the masks) in place of the masks."""
    batch, rows, n, heads, dim = v.shape
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dg = None if g is None else torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dw = torch.empty((batch, heads, n, n), dtype=torch.float32, device=v.device)
    if v.numel() == 0:
        return dv.zero_(), p.new_zeros(p.shape, dtype=logits_dtype), None if dg is None else dg.zero_()
    if not _tracing_under_interpreter(v):
        w = p.to(v.dtype)
        grad_out = grad_out if grad_out.dtype == v.dtype else grad_out.to(v.dtype)
        if g is not None:
            # dO' laid out [B, H, N, S, C]: the dW pass reads its rows i along (s, c).
            dop = torch.empty((batch, heads, n, rows, dim), dtype=v.dtype, device=v.device).permute(0, 3, 2, 1, 4)
            _launch_wx(1, w, v, g, grad_out, keep, dg, dop, allow_tf32)
        else:
            dop = grad_out
        _launch_wx(2, w, dop, None, None, keep, dv, None, allow_tf32, w_transposed=True)
        bi, bk, bj, warps, stages = _config("dw", v.dtype)
        keep_t, keep_strides, has_keep, per_row = _keep_args(keep, v)
        tiles = cdiv(n, bi) * cdiv(n, bj) * batch * heads
        splits = dw_splits(tiles, rows * dim, bk, v.device)
        cols_per_split = cdiv(cdiv(rows * dim, splits), bk) * bk
        splits = cdiv(rows * dim, cols_per_split)
        partial = dw[None] if splits == 1 else dw.new_empty((splits, batch, heads, n, n))
        launcher(_dw_kernel)[(cdiv(n, bi), cdiv(n, bj), splits * batch * heads)](
            dop, v, keep_t, partial,
            *dop.stride(), *v.stride(), *keep_strides, *partial.stride(),
            rows, n, heads, batch * heads, cols_per_split,
            HAS_KEEP=has_keep, KEEP_PER_ROW=per_row, C=dim, BLOCK_I=bi, BLOCK_J=bj, BLOCK_K=bk,
            PRECISION=_precision(v.dtype, allow_tf32), num_warps=warps, num_stages=stages,
        )
        if splits > 1:
            dw = partial.sum(dim=0)  # a fixed-order reduction: deterministic
    # p * (dW - rowsum(p * dW)) in fp32, as one op: torch.softmax's own backward.
    dlogits = torch._softmax_backward_data(dw, p, -1, torch.float32)
    return dv, dlogits.to(logits_dtype), dg
