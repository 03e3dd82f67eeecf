"""Rotary position embeddings with flash_attn.layers.rotary's API, in plain PyTorch.

``apply_rotary_emb``, ``apply_rotary_emb_func``, ``apply_rotary_emb_qkv_``,
``apply_rotary_emb_kv_`` and ``RotaryEmbedding`` take flash_attn's arguments and follow
its conventions: ``cos``/``sin`` are ``[seqlen_ro, rotary_dim / 2]``; only the first
``rotary_dim`` channels of each head rotate; non-interleaved (GPT-NeoX: first half with
second half) or interleaved (GPT-J: even with odd channels); ``seqlen_offsets`` (int or
``[B]``) shift each sequence's positions; with ``cu_seqlens`` positions restart at every
sequence of a packed ``[total, H, D]`` tensor. A position at or beyond ``seqlen_ro`` with a
tensor offset is left unrotated (as flash_attn's kernel). The rotation runs in fp32 (fp64
for fp64 inputs) and is cast back to the input dtype. The ``*_`` functions rotate in place
and return their input; their gradient is the inverse rotation of the output gradient (no
gradient reaches ``cos``/``sin``, as in flash_attn).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

Offsets = Union[int, torch.Tensor]

__all__ = [
    "RotaryEmbedding",
    "apply_rotary_emb",
    "apply_rotary_emb_func",
    "apply_rotary_emb_kv_",
    "apply_rotary_emb_qkv_",
    "apply_rotary_emb_torch",
    "rotate_half",
]


def rotate_half(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """(-x2, x1) for halves (or even/odd pairs when ``interleaved``) of the last axis."""
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary_emb_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           interleaved: bool = False) -> torch.Tensor:
    """The plain formula: ``x [B, S, H, D]``, ``cos, sin [S, rd/2]`` or ``[B, S, rd/2]``."""
    ro_dim = cos.shape[-1] * 2
    if ro_dim > x.shape[-1]:
        raise ValueError(f"cos: rotary_dim {ro_dim} must be <= headdim {x.shape[-1]}")
    if interleaved:
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    else:
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    head = x[..., :ro_dim]
    return torch.cat([head * cos + rotate_half(head, interleaved) * sin, x[..., ro_dim:]], dim=-1)


# The core rotation ------------------------------------------------------------------------

def _check_cos_sin(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> int:
    if not isinstance(cos, torch.Tensor) or not isinstance(sin, torch.Tensor):
        raise TypeError("cos, sin: expected tensors of shape [seqlen_ro, rotary_dim / 2]")
    if cos.dim() != 2:
        raise ValueError(f"cos: expected shape [seqlen_ro, rotary_dim / 2], got {tuple(cos.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin: expected the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim > x.shape[-1]:
        raise ValueError(f"cos: rotary_dim {rotary_dim} must be <= headdim {x.shape[-1]}")
    return rotary_dim


def _positions(x: torch.Tensor, seqlen_ro: int, seqlen_offsets: Offsets,
               cu_seqlens: Optional[torch.Tensor], max_seqlen: Optional[int]) -> torch.Tensor:
    """Integer position of every token: ``[B, S]`` (batched) or ``[total]`` (packed)."""
    device = x.device
    if cu_seqlens is None:
        if x.dim() != 4:
            raise ValueError(f"x: expected shape [batch, seqlen, nheads, headdim], got {tuple(x.shape)}")
        batch, seqlen = x.shape[0], x.shape[1]
        pos = torch.arange(seqlen, device=device).expand(batch, seqlen)
    else:
        if x.dim() != 3:
            raise ValueError(f"x: expected shape [total_seqlen, nheads, headdim] with cu_seqlens, got {tuple(x.shape)}")
        if max_seqlen is None:
            raise ValueError("max_seqlen: required when cu_seqlens is given")
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        batch, seqlen = cu.numel() - 1, int(max_seqlen)
        token = torch.arange(x.shape[0], device=device)
        seq = torch.searchsorted(cu[1:], token, right=True).clamp_max(max(batch - 1, 0))
        pos = token - cu[seq]
    if isinstance(seqlen_offsets, torch.Tensor):
        if seqlen_offsets.shape != (batch,) or seqlen_offsets.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"seqlen_offsets: expected an int32/int64 tensor of shape ({batch},), "
                             f"got {seqlen_offsets.dtype} {tuple(seqlen_offsets.shape)}")
        off = seqlen_offsets.to(device=device, dtype=torch.long)
        pos = pos + (off[:, None] if cu_seqlens is None else off[seq])
    else:
        if int(seqlen_offsets) + seqlen > seqlen_ro:
            raise ValueError(f"cos: seqlen_ro {seqlen_ro} must be >= seqlen_offsets + seqlen "
                             f"({int(seqlen_offsets)} + {seqlen})")
        pos = pos + int(seqlen_offsets)
    return pos


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
            seqlen_offsets: Offsets = 0, cu_seqlens: Optional[torch.Tensor] = None,
            max_seqlen: Optional[int] = None, conjugate: bool = False) -> torch.Tensor:
    """The rotated copy of ``x`` (differentiable in x, cos and sin)."""
    rotary_dim = _check_cos_sin(x, cos, sin)
    seqlen_ro = cos.shape[0]
    pos = _positions(x, seqlen_ro, seqlen_offsets, cu_seqlens, max_seqlen)
    compute = torch.promote_types(x.dtype, torch.float32)
    idx = pos.clamp_max(seqlen_ro - 1)
    c = cos.to(compute)[idx]
    s = sin.to(compute)[idx]
    if isinstance(seqlen_offsets, torch.Tensor):  # int offsets were checked against the table
        valid = (pos < seqlen_ro)[..., None]  # beyond the table: identity, as flash_attn's kernel
        c = torch.where(valid, c, torch.ones_like(c))
        s = torch.where(valid, s, torch.zeros_like(s))
    if conjugate:
        s = -s
    c, s = c.unsqueeze(-2), s.unsqueeze(-2)  # over heads
    head = x[..., :rotary_dim].to(compute)
    if interleaved:
        x1, x2 = head[..., 0::2], head[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = head.chunk(2, dim=-1)
        out = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    out = out.to(x.dtype)
    if rotary_dim < x.shape[-1]:
        out = torch.cat((out, x[..., rotary_dim:]), dim=-1)
    return out


class _RotaryInplace(torch.autograd.Function):
    """Rotate views of one tensor in place; backward rotates the gradient back."""

    @staticmethod
    def forward(ctx, base, parts, interleaved, seqlen_offsets, cu_seqlens, max_seqlen):
        # parts: tuple of (view_fn, cos, sin); view_fn(base) is the view to rotate.
        with torch.no_grad():
            for view_fn, cos, sin in parts:
                view = view_fn(base)
                view.copy_(_rotate(view, cos, sin, interleaved, seqlen_offsets, cu_seqlens, max_seqlen))
        ctx.mark_dirty(base)
        ctx.parts, ctx.interleaved = parts, interleaved
        ctx.seqlen_offsets, ctx.cu_seqlens, ctx.max_seqlen = seqlen_offsets, cu_seqlens, max_seqlen
        return base

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        for view_fn, cos, sin in ctx.parts:
            view = view_fn(grad)
            view.copy_(_rotate(view, cos, sin, ctx.interleaved, ctx.seqlen_offsets, ctx.cu_seqlens,
                               ctx.max_seqlen, conjugate=True))
        return grad, None, None, None, None, None


def _inplace(base, parts, interleaved, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None):
    if torch.is_grad_enabled() and base.requires_grad:
        return _RotaryInplace.apply(base, tuple(parts), interleaved, seqlen_offsets, cu_seqlens, max_seqlen)
    for view_fn, cos, sin in parts:
        view = view_fn(base)
        view.copy_(_rotate(view, cos, sin, interleaved, seqlen_offsets, cu_seqlens, max_seqlen))
    return base


# flash_attn's functions -----------------------------------------------------------------

def apply_rotary_emb(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: Offsets = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of ``x``.

    x: ``[B, S, H, D]``, or ``[total, H, D]`` with ``cu_seqlens [B+1]`` and ``max_seqlen``.
    cos, sin: ``[seqlen_ro, rotary_dim / 2]``. Returns the rotated tensor (``x`` itself when
    ``inplace``).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if inplace:
        return _inplace(x, [(lambda t: t, cos, sin)], interleaved, seqlen_offsets, cu_seqlens, max_seqlen)
    return _rotate(x, cos, sin, interleaved, seqlen_offsets, cu_seqlens, max_seqlen)


apply_rotary_emb_func = apply_rotary_emb  # flash_attn's older name


def apply_rotary_emb_qkv_(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cos_k: Optional[torch.Tensor] = None,
    sin_k: Optional[torch.Tensor] = None,
    interleaved: bool = False,
    seqlen_offsets: Offsets = 0,
    num_heads_q: Optional[int] = None,
) -> torch.Tensor:
    """Rotate q and k of a packed qkv in place; v is untouched. Returns ``qkv``.

    qkv: ``[B, S, 3, H, D]``, or ``[B, S, Hq + 2 * Hk, D]`` with ``num_heads_q`` (MQA/GQA).
    cos, sin (and cos_k, sin_k for k, default cos, sin): ``[S_ro, rotary_dim / 2]``.
    """
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv: expected a torch.Tensor, got {type(qkv).__name__}")
    cos_k = cos if cos_k is None else cos_k
    sin_k = sin if sin_k is None else sin_k
    if qkv.dim() == 5:
        if qkv.shape[2] != 3:
            raise ValueError(f"qkv: expected shape [batch, seqlen, 3, nheads, headdim], got {tuple(qkv.shape)}")
        parts = [(lambda t: t[:, :, 0], cos, sin), (lambda t: t[:, :, 1], cos_k, sin_k)]
    elif qkv.dim() == 4:
        if num_heads_q is None:
            raise ValueError("num_heads_q: required when qkv is [batch, seqlen, nheads_q + 2 * nheads_k, headdim]")
        hk = (qkv.shape[2] - num_heads_q) // 2
        if num_heads_q <= 0 or qkv.shape[2] != num_heads_q + 2 * hk:
            raise ValueError(f"num_heads_q: {num_heads_q} does not split {qkv.shape[2]} heads as nheads_q + 2 * nheads_k")
        hq = num_heads_q
        parts = [(lambda t: t[:, :, :hq], cos, sin), (lambda t: t[:, :, hq:hq + hk], cos_k, sin_k)]
    else:
        raise ValueError(f"qkv: expected 5 dims [batch, seqlen, 3, nheads, headdim] or 4 with num_heads_q, "
                         f"got shape {tuple(qkv.shape)}")
    return _inplace(qkv, parts, interleaved, seqlen_offsets)


def apply_rotary_emb_kv_(
    kv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    seqlen_offsets: Offsets = 0,
) -> torch.Tensor:
    """Rotate k of a packed ``kv [B, S, 2, H, D]`` in place; returns ``kv``."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        shape = tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
        raise ValueError(f"kv: expected shape [batch, seqlen, 2, nheads, headdim], got {shape}")
    return _inplace(kv, [(lambda t: t[:, :, 0], cos, sin)], interleaved, seqlen_offsets)


class RotaryEmbedding(torch.nn.Module):
    """flash_attn's RotaryEmbedding: cached cos/sin tables, applied in place to qkv / (q, kv).

    Args, as flash_attn 2.8 (same names, defaults and order): ``dim`` (rotary dim),
    ``base=10000.0``, ``interleaved=False``, ``scale_base=None`` (XPos when set),
    ``device=None``. Buffers ``inv_freq`` and ``scale`` are not persistent (no state-dict
    keys), as in flash_attn.

    ``pos_idx_in_fp32`` (keyword only) is flash_attn 2.0-2.7's argument, which sat before
    ``device`` and which 2.8 removed (2.8 always behaves as ``True``); it is accepted by
    keyword so code written for those versions runs. ``True`` (the default): positions
    and inverse frequencies are fp32 when the tables are built, whatever dtype the module
    was cast to (also the XPos decay). ``False``: positions take the ``inv_freq`` buffer's
    dtype and the buffers are used as they are, so a module cast to bf16 rounds positions
    to bf16 (1995 becomes 1992) and reproduces the tables of models trained that way.
    """

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False,
                 scale_base: Optional[float] = None, device=None, *, pos_idx_in_fp32: bool = True) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise ValueError(f"dim: expected a positive even int, got {dim!r}")
        if isinstance(device, bool):
            raise TypeError(f"device: expected a device or None, got {device!r}; flash_attn before 2.8 took "
                            "pos_idx_in_fp32 in this position: pass it by keyword")
        if not isinstance(pos_idx_in_fp32, bool):
            raise TypeError(f"pos_idx_in_fp32: expected a bool, got {pos_idx_in_fp32!r}")
        self.dim = dim
        self.base = float(base)
        self.pos_idx_in_fp32 = pos_idx_in_fp32
        self.register_buffer("inv_freq", self._compute_inv_freq(device), persistent=False)
        self.interleaved = interleaved
        self.scale_base = scale_base
        self.register_buffer("scale", self._compute_scale(device) if scale_base is not None else None,
                             persistent=False)
        self._seq_len_cached = 0
        self._cos_cached = self._sin_cached = self._cos_k_cached = self._sin_k_cached = None

    def _compute_inv_freq(self, device=None) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))

    def _compute_scale(self, device=None) -> torch.Tensor:
        return (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) + 0.4 * self.dim) / (1.4 * self.dim)

    def _update_cos_sin_cache(self, seqlen: int, device=None, dtype=None) -> None:
        if (seqlen > self._seq_len_cached or self._cos_cached is None or self._cos_cached.device != device
                or self._cos_cached.dtype != dtype or (self.training and self._cos_cached.is_inference())):
            self._seq_len_cached = seqlen
            if self.pos_idx_in_fp32:
                # fp32 positions and frequencies, even in a module cast to bf16/fp16: in bf16 the
                # positions themselves round (1995 -> 1992) and the angles lose their precision.
                t = torch.arange(seqlen, device=device, dtype=torch.float32)
                inv_freq = self.inv_freq if self.inv_freq.dtype == torch.float32 else self._compute_inv_freq(device)
            else:  # the buffer's dtype and values as they are (flash_attn < 2.8 with False)
                t = torch.arange(seqlen, device=device, dtype=self.inv_freq.dtype)
                inv_freq = self.inv_freq
            freqs = torch.outer(t, inv_freq.to(device))
            if self.scale is None:
                self._cos_cached, self._sin_cached = freqs.cos().to(dtype), freqs.sin().to(dtype)
            else:
                if self.pos_idx_in_fp32:  # the XPos decay in fp32 as well
                    xscale = self.scale if self.scale.dtype == torch.float32 else self._compute_scale(device)
                else:
                    xscale = self.scale
                power = (torch.arange(seqlen, dtype=xscale.dtype, device=device) - seqlen // 2) / self.scale_base
                scale = xscale.to(device) ** power[:, None]
                self._cos_cached = (freqs.cos() * scale).to(dtype)
                self._sin_cached = (freqs.sin() * scale).to(dtype)
                self._cos_k_cached = (freqs.cos() / scale).to(dtype)
                self._sin_k_cached = (freqs.sin() / scale).to(dtype)

    def forward(self, qkv: torch.Tensor, kv: Optional[torch.Tensor] = None, seqlen_offset: Offsets = 0,
                max_seqlen: Optional[int] = None, num_heads_q: Optional[int] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """qkv ``[B, S, 3, H, D]`` (or ``[B, S, Hq + 2Hk, D]`` with ``num_heads_q``), or q
        ``[B, S, H, D]`` with ``kv [B, S, 2, Hk, D]``; rotated in place and returned."""
        seqlen = qkv.shape[1]
        if max_seqlen is not None:
            self._update_cos_sin_cache(max_seqlen, device=qkv.device, dtype=qkv.dtype)
        elif isinstance(seqlen_offset, int):
            self._update_cos_sin_cache(seqlen + seqlen_offset, device=qkv.device, dtype=qkv.dtype)
        elif self._cos_cached is None:
            raise ValueError("max_seqlen: required with a tensor seqlen_offset before the cache is built")
        xpos = self.scale is not None
        if kv is None:
            return apply_rotary_emb_qkv_(
                qkv, self._cos_cached, self._sin_cached,
                self._cos_k_cached if xpos else None, self._sin_k_cached if xpos else None,
                interleaved=self.interleaved, seqlen_offsets=seqlen_offset, num_heads_q=num_heads_q)
        q = apply_rotary_emb(qkv, self._cos_cached, self._sin_cached, interleaved=self.interleaved,
                             inplace=True, seqlen_offsets=seqlen_offset)
        kv = apply_rotary_emb_kv_(kv, self._cos_k_cached if xpos else self._cos_cached,
                                  self._sin_k_cached if xpos else self._sin_cached,
                                  interleaved=self.interleaved, seqlen_offsets=seqlen_offset)
        return q, kv

