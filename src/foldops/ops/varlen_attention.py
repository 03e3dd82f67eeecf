"""Variable-length (packed) attention, flash_attn's varlen layout, without flash_attn.

    q: [total_q, H, D]   k, v: [total_k, H_kv, D]   H % H_kv == 0 (MQA / GQA: query
                                                     head h reads kv head h // (H // H_kv))
    cu_seqlens_q, cu_seqlens_k: int32 [B+1], 0 = cu[0] <= ... <= cu[B] = total
    out: [total_q, H, D] in q's dtype     lse (return_lse=True): fp32 [H, total_q]

Sequence b is queries cu_seqlens_q[b]:cu_seqlens_q[b+1] (Lq) against keys
cu_seqlens_k[b]:cu_seqlens_k[b+1] (Lk); ``causal`` lets query i see keys
j <= i + Lk - Lq (bottom-right, as flash_attn >= 2.1). A query that sees no key (Lk = 0,
or causal rows with i < Lq - Lk) gives zeros and lse = -inf, never NaN, with zero
gradients. ``padded_attention`` is the dense form ``[B, L, H, D]`` with a key-padding mask.

Backends:

- ``triton`` (CUDA cc >= 8.0; fp16/bf16/fp32; head dim <= 128): kernels on the packed
  tensors, a program per (query block, head, sequence); see
  docs/kernels/varlen_attention.md. No dropout: with ``dropout_p > 0`` ``auto`` takes
  ``torch`` and a named ``triton`` raises.
- ``torch`` (any device, any float dtype): on NVIDIA GPUs of cc >= 8.0 with fp16/bf16,
  no dropout and head dim <= 256 (multiple of 8), ``torch.nn.attention.varlen`` (PyTorch's
  flash kernel on the packed tensors). Everywhere else sequences of similar length are
  grouped into padded buckets for ``scaled_dot_product_attention`` with a key mask: padded
  tokens per bucket at most ``PADDING_WASTE`` (1.25) x its real tokens, and a bucket's
  [n, H, Lq, Lk] score-sized intermediates within ``foldops.budget`` (split otherwise).
  Memory O(sum over buckets of n * H * Lq_max * Lk_max) for the mask and, where SDPA
  falls back to its math kernel, the scores: never [B, Lmax, Lmax] over the whole batch.
  The buckets are formed on the host from the sequence lengths (one read of cu_seqlens).
  ``return_lse`` or dropout with an explicit ``generator`` computes the softmax
  explicitly per bucket.
- ``reference``: float64-capable, loops over the sequences; never picked by ``auto``.

Input checks: shapes, dtypes and devices always (no device work). The values of
cu_seqlens (int32, starts at 0, non-decreasing, ends at total, longest <= max_seqlen) are
read once per cu_seqlens tensor: free on CPU; on an accelerator one small device-to-host
copy (a sync) the first time a given cu_seqlens tensor is seen, remembered by the
tensor's identity and version so the layers of one model share one check. Skipped while
torch.compile traces.
"""

from __future__ import annotations

import math
import weakref
from typing import Dict, List, Optional, Tuple

import torch

from foldops import backends, budget
from foldops._checks import as_bool_mask, check_tensor
from foldops.device import kernel_support, nvidia_capability
from foldops.reference import varlen_attention as _reference

OP = "varlen_attention"
KERNEL_MAX_HEAD_DIM = 128
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PADDING_WASTE = 1.25
"""Bucketed torch path: padded tokens of a bucket at most this many times its real tokens."""


# Input checks --------------------------------------------------------------------------

_checked: Dict[int, Tuple[weakref.ref, int, int, int, torch.Tensor]] = {}


def _tracing(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or t.device.type == "meta" or is_fake(t)


def _host_lengths(name: str, cu: torch.Tensor, total: int, max_seqlen: int, max_name: str) -> torch.Tensor:
    """Check the values of ``cu`` (see the module doc) and return its lengths [B] (int64, CPU)."""
    key = id(cu)
    hit = _checked.get(key)
    if hit is not None and hit[0]() is cu and hit[1:4] == (cu._version, total, max_seqlen):
        return hit[4]
    host = cu.detach().to("cpu", torch.int64)
    if host[0].item() != 0:
        raise ValueError(f"{name}: expected cu_seqlens[0] == 0, got {host[0].item()}")
    lengths = host[1:] - host[:-1]
    if bool((lengths < 0).any()):
        bad = int(torch.nonzero(lengths < 0)[0])
        raise ValueError(f"{name}: expected non-decreasing values, got {host[bad].item()} then "
                         f"{host[bad + 1].item()} at index {bad}")
    if host[-1].item() != total:
        raise ValueError(f"{name}: expected the last value to equal the packed length {total}, "
                         f"got {host[-1].item()}")
    longest = int(lengths.max()) if lengths.numel() else 0
    if longest > max_seqlen:
        raise ValueError(f"{max_name}: expected at least the longest sequence ({longest}), got {max_seqlen}")
    if len(_checked) > 256:
        _checked.clear()
    _checked[key] = (weakref.ref(cu), cu._version, total, max_seqlen, lengths)
    return lengths


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a Python int (it sizes the launch grid; no device "
                            f"read), got a tensor")
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    return value


def validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale):
    """Check every argument; return the host lengths ``(len_q, len_k)`` or ``None`` when tracing."""
    check_tensor("q", q, (None, None, None))
    total_q, heads, head_dim = q.shape
    check_tensor("k", k, (None, None, head_dim), device=q.device)
    check_tensor("v", v, tuple(k.shape), device=q.device)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (as q), got {t.dtype}")
    kv_heads = k.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k: expected a number of heads dividing q's {heads} (MQA/GQA), got {kv_heads}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu, (None,), dtypes=None, device=q.device)
        if cu.dtype != torch.int32:
            raise TypeError(f"{name}: expected dtype torch.int32, got {cu.dtype}")
        if cu.shape[0] < 1:
            raise ValueError(f"{name}: expected shape [B+1] with B >= 0, got {tuple(cu.shape)}")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k: expected shape {tuple(cu_seqlens_q.shape)} (as cu_seqlens_q), "
                         f"got {tuple(cu_seqlens_k.shape)}")
    max_seqlen_q = _check_int("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _check_int("max_seqlen_k", max_seqlen_k)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    if softmax_scale is not None and (not isinstance(softmax_scale, (int, float))
                                      or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale: expected a finite float or None, got {softmax_scale!r}")
    if _tracing(q) or _tracing(cu_seqlens_q) or _tracing(cu_seqlens_k):
        return None
    len_q = _host_lengths("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q")
    len_k = _host_lengths("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    return len_q, len_k


# Rows without keys ----------------------------------------------------------------------


def _rows_with_keys(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, causal: bool) -> torch.Tensor:
    """[total_q] bool: whether each query sees at least one key (device ops only, no sync)."""
    pos = torch.arange(total_q, device=cu_q.device, dtype=cu_q.dtype)
    seq = torch.searchsorted(cu_q[1:].contiguous(), pos, right=True)
    lq = (cu_q[seq + 1] - cu_q[seq]).long()
    lk = (cu_k[seq + 1] - cu_k[seq]).long()
    if not causal:
        return lk > 0
    return (pos.long() - cu_q[seq].long()) + lk - lq >= 0


# torch backend: torch.nn.attention.varlen --------------------------------------------------


def _torch_varlen_reason(q: torch.Tensor, dropout_p: float, generator) -> Optional[str]:
    """None if ``torch.nn.attention.varlen`` runs these inputs, else why not."""
    capability = nvidia_capability(q)
    if capability is None or capability < (8, 0):
        return "torch.nn.attention.varlen needs an NVIDIA GPU of cc >= 8.0"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"torch.nn.attention.varlen needs fp16/bf16, got {q.dtype}"
    if q.shape[-1] > 256 or q.shape[-1] % 8:
        return f"torch.nn.attention.varlen needs a head dim <= 256, a multiple of 8, got {q.shape[-1]}"
    if dropout_p > 0:
        return "torch.nn.attention.varlen has no dropout"
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return "torch.nn.attention.varlen is not in this torch"
    return None


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, return_lse):
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    result = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale,
                         window_size=(-1, 0) if causal else (-1, -1),
                         enable_gqa=q.shape[1] != k.shape[1],
                         return_aux=AuxRequest(lse=True) if return_lse else None)
    if not return_lse:
        return result, None
    out, lse = result
    # The flash kernel marks rows without keys with lse = +inf; here they are -inf.
    keep = _rows_with_keys(cu_q, cu_k, q.shape[0], causal)
    return out, torch.where(keep[None, :], lse.detach().float(), -math.inf)


# torch backend: padded buckets for scaled_dot_product_attention -----------------------------


def _plan_buckets(len_q: List[int], len_k: List[int], cell_bytes: int, budget_bytes: int) -> List[List[int]]:
    """Group sequences (with queries and keys) into buckets, longest first.

    A bucket's padded tokens n * (Lq_max + Lk_max) stay within PADDING_WASTE x its real
    tokens, and its score-sized intermediates n * Lq_max * Lk_max * cell_bytes within the
    budget (a single sequence may exceed it). Host arithmetic over B integers.
    """
    order = sorted((b for b in range(len(len_q)) if len_q[b] and len_k[b]),
                   key=lambda b: -(len_q[b] + len_k[b]))
    buckets: List[List[int]] = []
    current: List[int] = []
    mq = mk = tokens = 0
    for b in order:
        nq, nk = max(mq, len_q[b]), max(mk, len_k[b])
        n = len(current) + 1
        fits = (n * (nq + nk) <= PADDING_WASTE * (tokens + len_q[b] + len_k[b])
                and n * nq * nk * cell_bytes <= budget_bytes)
        if current and not fits:
            buckets.append(current)
            current, mq, mk, tokens = [], 0, 0, 0
            nq, nk = len_q[b], len_k[b]
        current.append(b)
        mq, mk, tokens = nq, nk, tokens + len_q[b] + len_k[b]
    if current:
        buckets.append(current)
    return buckets


def _bucket_attention(q, k, v, starts_q, starts_k, lq, lk, causal, scale, dropout_p, generator, return_lse):
    """Attention of the sequences of one bucket, padded to its longest; returns
    ``(rows, targets, lse_rows)``: the real query rows [n_real, H, D], their packed
    positions, and their lse [H, n_real] (or None)."""
    device, heads, head_dim = q.device, q.shape[1], q.shape[2]
    group = heads // k.shape[1]
    mq, mk = int(lq.max()), int(lk.max())
    aq, ak = torch.arange(mq), torch.arange(mk)
    valid_q = aq[None, :] < lq[:, None]  # [n, Mq] host
    valid_k = ak[None, :] < lk[:, None]
    pos_q = torch.where(valid_q, starts_q[:, None] + aq[None, :], 0)
    pos_k = torch.where(valid_k, starts_k[:, None] + ak[None, :], 0)
    n = lq.shape[0]
    uniform = bool((lq == mq).all() and (lk == mk).all())
    pos_q_dev, pos_k_dev = pos_q.to(device).flatten(), pos_k.to(device).flatten()
    qb = q.index_select(0, pos_q_dev).view(n, mq, heads, head_dim).transpose(1, 2)
    kb, vb = (t.index_select(0, pos_k_dev).view(n, mk, -1, head_dim).transpose(1, 2) for t in (k, v))
    if group > 1:  # [n, H_kv, Mk, D] -> [n, H, Mk, D], kv head h // group for query head h
        kb, vb = (t.repeat_interleave(group, dim=1) for t in (kb, vb))
    keep = row_keep = None
    if not (uniform and (not causal or mq == mk)):
        keep = valid_k[:, None, :].expand(n, mq, mk)
        if causal:
            keep = keep & (ak[None, None, :] <= aq[None, :, None] + (lk - lq)[:, None, None])
        row_keep = keep.any(-1).to(device)  # [n, Mq]
        keep = keep.to(device)
    explicit = return_lse or (dropout_p > 0 and generator is not None) or q.dtype == torch.float64
    if explicit or keep is not None:
        masked_value = torch.finfo(q.dtype).min / 2  # finite: SDPA never sees an all -inf row
    if not explicit:
        mask = None
        if keep is not None:
            mask = torch.zeros(keep.shape, dtype=q.dtype, device=device).masked_fill(~keep, masked_value)
            mask = mask[:, None]  # [n, 1, Mq, Mk]
        out = torch.nn.functional.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, dropout_p=dropout_p, scale=scale,
            is_causal=causal and keep is None)
        lse = None
    else:
        softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        logits = torch.matmul(qb * scale, kb.transpose(-1, -2)).to(softmax_dtype)  # [n, H, Mq, Mk]
        if keep is not None:
            logits = logits.masked_fill(~keep[:, None], masked_value)
        elif causal:
            logits = logits.masked_fill(torch.ones(mq, mk, dtype=torch.bool, device=device).triu(1),
                                        masked_value)
        lse = torch.logsumexp(logits.detach(), -1).float() if return_lse else None
        weights = torch.softmax(logits, -1)
        if dropout_p > 0:
            drop = torch.rand(weights.shape, generator=generator, device=device) < dropout_p
            weights = weights.masked_fill(drop, 0.0) / (1.0 - dropout_p)
        out = torch.matmul(weights.to(vb.dtype), vb)
    out = out.transpose(1, 2)  # [n, Mq, H, D]
    if row_keep is not None:
        out = out * row_keep[:, :, None, None].to(out.dtype)
        if lse is not None:
            lse = lse.masked_fill(~row_keep[:, None, :], -math.inf)
    flat = torch.nonzero(valid_q.flatten()).flatten()
    targets = pos_q.flatten()[flat]
    flat_dev = flat.to(device)
    rows = out.reshape(n * mq, heads, head_dim).index_select(0, flat_dev)
    if lse is not None:
        lse = lse.transpose(0, 1).reshape(heads, n * mq).index_select(1, flat_dev)
    return rows, targets, lse


def _torch_buckets(q, k, v, len_q, len_k, causal, scale, dropout_p, generator, return_lse):
    heads = q.shape[1]
    starts_q = torch.cumsum(len_q, 0) - len_q
    starts_k = torch.cumsum(len_k, 0) - len_k
    score_bytes = 4 if q.dtype != torch.float64 else 8
    cell_bytes = heads * (2 * score_bytes) + q.element_size()  # scores + weights per head, mask
    buckets = _plan_buckets(len_q.tolist(), len_k.tolist(), cell_bytes, budget.chunk_budget_bytes(q.device))
    all_rows, all_targets, all_lse = [], [], []
    for members in buckets:
        idx = torch.tensor(members)
        rows, targets, lse = _bucket_attention(q, k, v, starts_q[idx], starts_k[idx], len_q[idx], len_k[idx],
                                               causal, scale, dropout_p, generator, return_lse)
        all_rows.append(rows)
        all_targets.append(targets)
        all_lse.append(lse)
    out = q.new_zeros(q.shape)
    lse = None
    if return_lse:
        lse = torch.full((heads, q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
    if all_rows:
        targets = torch.cat(all_targets).to(q.device)
        out = out.index_copy(0, targets, torch.cat(all_rows))
        if return_lse:
            lse = lse.index_copy(1, targets, torch.cat(all_lse, 1))
    return out, lse


def _torch_backend(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, return_lse, generator, lengths):
    if _torch_varlen_reason(q, dropout_p, generator) is None:
        return _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, return_lse)
    if lengths is None:
        raise RuntimeError("varlen_attention: the bucketed torch path needs the sequence lengths on the "
                           "host, which cannot be read while tracing; use backend='triton' or 'reference'")
    return _torch_buckets(q, k, v, lengths[0], lengths[1], causal, scale, dropout_p, generator, return_lse)


def _reference_backend(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, return_lse, generator,
                       lengths):
    out, lse = _reference.varlen_attention(q, k, v, cu_q, cu_k, causal, scale, dropout_p, generator)
    return out, (lse.detach().float() if return_lse else None)


def _triton_backend(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, return_lse, generator,
                    lengths):
    from foldops.kernels.varlen_attention import varlen_attention as kernel

    return kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, return_lse)


def _triton_supports(device, dtype, head_dim, explicit, dropout=False, **_):
    reason = kernel_support(device, explicit)
    if reason is not None:
        return reason
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} (kernel supports fp16, bf16, fp32)"
    if head_dim > KERNEL_MAX_HEAD_DIM:
        return f"head dim {head_dim} (kernel supports up to {KERNEL_MAX_HEAD_DIM})"
    if dropout:
        return "dropout_p > 0 (the kernel has no dropout; auto takes the torch backend)"
    try:
        import foldops.kernels.varlen_attention  # noqa: F401
    except ImportError as exc:
        return f"kernel module unavailable: {exc}"
    return None


def _torch_supports(device, dtype, tracing=False, **_):
    if tracing and nvidia_capability(device) is None:
        return "the bucketed path reads sequence lengths on the host (not while tracing)"
    return None


backends.register(OP, "triton", _triton_backend, priority=100, supports=_triton_supports)
backends.register(OP, "torch", _torch_backend, priority=50, supports=_torch_supports)
backends.register(OP, "reference", _reference_backend, priority=0, auto=False)


def _select(q, backend, dropout_p, tracing=False):
    if backend == "triton" and q.shape[-1] > KERNEL_MAX_HEAD_DIM:
        raise ValueError(f"q: head dim (last axis) at most {KERNEL_MAX_HEAD_DIM} for backend='triton', "
                         f"got {q.shape[-1]}")
    return backends.select(OP, backend, device=q.device, dtype=q.dtype, head_dim=q.shape[-1],
                           dropout=dropout_p > 0, tracing=tracing)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
):
    """Attention within each packed sequence; see the module doc.

    Args:
        q: ``[total_q, H, D]``. k, v: ``[total_k, H_kv, D]`` (H % H_kv == 0), q's dtype
            and device; any strides.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B+1]``, starting at 0, non-decreasing,
            ending at total_q / total_k.
        max_seqlen_q, max_seqlen_k: ints at least the longest sequence (they size the
            kernels' grids; larger is allowed).
        causal: query i of a sequence sees keys j <= i + Lk - Lq.
        softmax_scale: logit scale, default ``1/sqrt(D)``.
        dropout_p: attention dropout probability; pass 0 in evaluation (applied whenever
            it is > 0).
        return_lse: also return the log-sum-exp, fp32 ``[H, total_q]`` (not differentiable).
        generator: random generator for dropout (torch/reference backends).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``.

    Returns:
        ``out`` ``[total_q, H, D]`` in q's dtype, or ``(out, lse)`` with ``return_lse``.
    """
    lengths = validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                       softmax_scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    impl = _select(q, backend, dropout_p, tracing=lengths is None)
    out, lse = impl.fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(causal), scale,
                       float(dropout_p), bool(return_lse), generator, lengths)
    return (out, lse) if return_lse else out


# Dense form ------------------------------------------------------------------------------


def _dense(q, k, v, keep, causal, scale, dropout_p, exact):
    """[B, L, H, D] attention with a [B, Lk] keep-mask (or None) by SDPA (or explicit
    softmax for ``exact``: the reference); rows without keys give zeros."""
    batch, lq, heads, head_dim = q.shape
    lk = k.shape[1]
    group = heads // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if group > 1:
        kt, vt = (t.repeat_interleave(group, dim=1) for t in (kt, vt))
    allowed = None
    if keep is not None:
        allowed = keep[:, None, None, :]  # [B, 1, 1, Lk]
    if causal:
        tri = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        allowed = tri if allowed is None else allowed & tri
    if exact:
        softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        logits = torch.matmul(qt * scale, kt.transpose(-1, -2)).to(softmax_dtype)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, -math.inf)
        weights = torch.softmax(logits.masked_fill(torch.isneginf(logits).all(-1, keepdim=True), 0.0), -1)
        if allowed is not None:
            weights = weights * allowed.any(-1, keepdim=True)
        if dropout_p > 0:
            weights = torch.nn.functional.dropout(weights, dropout_p)
        out = torch.matmul(weights.to(v.dtype), vt)
    else:
        mask = None
        if allowed is not None:
            mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
            mask = mask.masked_fill(~allowed, torch.finfo(q.dtype).min / 2)
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask,
                                                               dropout_p=dropout_p, scale=scale)
        if allowed is not None:
            out = out * allowed.any(-1, keepdim=True).to(out.dtype)
    return out.transpose(1, 2)


def padded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Dense-form attention: ``q [B, L, H, D]``, ``k, v [B, Lk, H_kv, D]``.

    ``key_padding_mask``: ``[B, Lk]`` keep-mask (bool or 0/1), True = a real key; a batch
    row without keys gives zeros. ``causal``: query i sees keys j <= i + Lk - L (and kept).

    The ``triton`` backend runs the packed kernels without a host sync: the keys of each
    row are stably reordered kept-first, and each row becomes two packed sequences (its
    queries against its kept keys; no queries against its padding). Causal attention
    with a key mask (positions matter there) and the ``torch`` backend run SDPA on the
    dense batch with the mask; ``reference`` runs the explicit softmax.

    Returns ``[B, L, H, D]`` in q's dtype.
    """
    check_tensor("q", q, (None, None, None, None))
    batch, lq, heads, head_dim = q.shape
    check_tensor("k", k, (batch, None, None, head_dim), device=q.device)
    check_tensor("v", v, tuple(k.shape), device=q.device)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (as q), got {t.dtype}")
    lk, kv_heads = k.shape[1], k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k: expected a number of heads dividing q's {heads} (MQA/GQA), got {kv_heads}")
    keep = as_bool_mask("key_padding_mask", key_padding_mask, (batch, lk), q.device)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    impl = _select(q, backend, dropout_p)
    if impl.name in ("reference", "torch") or (causal and keep is not None) or q.numel() == 0 or lk == 0:
        return _dense(q, k, v, keep, causal, scale, dropout_p, exact=impl.name == "reference")
    int32 = torch.int32
    if keep is None:
        cu_q = torch.arange(batch + 1, device=q.device, dtype=int32) * lq
        cu_k = torch.arange(batch + 1, device=q.device, dtype=int32) * lk
        kk, vv = k.reshape(batch * lk, kv_heads, head_dim), v.reshape(batch * lk, kv_heads, head_dim)
    else:
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # kept keys first
        kk, vv = (t.gather(1, order[:, :, None, None].expand_as(t)).reshape(batch * lk, kv_heads, head_dim)
                  for t in (k, v))
        kept = keep.sum(1, dtype=int32)
        base = torch.arange(batch, device=q.device, dtype=int32)
        # 2B sequences: row b's queries against its kept keys, then no queries against its padding.
        cu_q = torch.cat([torch.stack([base * lq, (base + 1) * lq], 1).flatten(), base.new_full((1,), batch * lq)])
        cu_k = torch.cat([torch.stack([base * lk, base * lk + kept], 1).flatten(), base.new_full((1,), batch * lk)])
    out, _ = impl.fn(q.reshape(batch * lq, heads, head_dim), kk, vv, cu_q, cu_k, lq, lk, bool(causal), scale,
                     float(dropout_p), False, None, None)
    return out.view(batch, lq, heads, head_dim)
