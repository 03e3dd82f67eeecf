"""The ``torch`` backend of foldops.ops.varlen_attention (any device), and the dense form.

- ``torch_varlen``: ``torch.nn.attention.varlen`` (PyTorch's flash kernel on the packed
  tensors) where it runs: NVIDIA cc >= 8.0, fp16/bf16, head dim <= 256 and a multiple of
  8, no dropout.
- ``torch_buckets``: everywhere else. Sequences sorted by length are grouped greedily into
  buckets whose padded tokens stay within ``PADDING_WASTE`` (1.25; 1.1 on CPU) x their real tokens
  and whose Lq*Lk-sized intermediates stay within ``foldops.budget``; each bucket is one
  ``scaled_dot_product_attention`` call on [n, H, Lq_max, D] with a key mask (the
  memory-efficient kernel on V100-class GPUs, the flash kernel on CPU). Device work is
  per bucket, never per sequence. The plan (gather indices, slots, key masks, causal
  key limits) is NumPy arithmetic over all buckets at once, sent to the device in one
  copy (from pinned memory, asynchronous, on CUDA); causal masks are built there from one
  key limit per query row.
  Memory: padded copies of q, k, v, out within 1.25x the packed tensors, plus per
  bucket the causal mask O(n Lq Lk) or, for the explicit softmax (``return_lse``,
  dropout with a generator, fp64), the scores O(n H Lq Lk).
- ``dense``: the padded form [B, L, H, D] with a [B, Lk] keep-mask through SDPA (or the
  explicit softmax for the reference).
"""

from __future__ import annotations

import inspect
import itertools
import math
from typing import List, Optional

import numpy as np
import torch

from foldops import budget
from foldops.device import host_to_device, nvidia_capability, sdpa_has_fused_kernels

PADDING_WASTE = 1.25
"""Padded tokens of a bucket at most this many times its real tokens (accelerators: each
bucket is a few launches, so fewer, looser buckets)."""
PADDING_WASTE_CPU = 1.1
"""The same on CPU, where a bucket costs no launch but every padded token costs FLOPs
and freshly faulted memory (64 proteins of 20-200 tokens, 2 cores: fwd+bwd 335 -> 245 ms
against 1.25)."""


# Rows without keys ----------------------------------------------------------------------


def rows_with_keys(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, causal: bool) -> torch.Tensor:
    """[total_q] bool: whether each query sees at least one key (device ops only, no sync)."""
    pos = torch.arange(total_q, device=cu_q.device, dtype=cu_q.dtype)
    seq = torch.searchsorted(cu_q[1:].contiguous(), pos, right=True)
    lq = (cu_q[seq + 1] - cu_q[seq]).long()
    lk = (cu_k[seq + 1] - cu_k[seq]).long()
    if not causal:
        return lk > 0
    return (pos.long() - cu_q[seq].long()) + lk - lq >= 0


def connected_zeros(shape, *inputs: torch.Tensor) -> torch.Tensor:
    """Zeros of ``shape`` (first input's dtype and device) that depend on every input in
    the autograd graph with zero gradients, for outputs no input element reaches. Sums of
    empty slices: no value read (inf inputs give no NaN), no sync, traceable. The slices
    are views (a flatten would copy a non-contiguous input); unsqueeze covers 0-d ones."""
    return inputs[0].new_zeros(shape) + sum(t.unsqueeze(0)[:0].sum() for t in inputs)


def visible_or_all(keep: torch.Tensor) -> torch.Tensor:
    """``keep`` (bool [..., Lk]) with rows that keep no key opened to every key.

    Masks here are -inf: a finite "very negative" value is confused with real logits
    (fp16's finfo.min / 2 = -32752 lies inside the logit range, below some real logits and,
    added, above a masked key's large one). An all -inf row would make the softmax NaN, so
    rows without keys attend to every key; callers zero their outputs (times
    ``keep.any(-1)``), which makes their gradients exactly zero too."""
    return keep | ~keep.any(-1, keepdim=True)


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``keep``, -inf elsewhere, in ``dtype`` (SDPA's float mask)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, -math.inf)


# torch backend: torch.nn.attention.varlen --------------------------------------------------


_VARLEN_ATTN_PARAMETERS: Optional[frozenset] = None


def varlen_attn_parameters() -> frozenset:
    """Keyword names of the installed ``varlen_attn`` (its signature changed across torch
    releases: ``enable_gqa`` arrived after 2.11); empty without it. Read on first use, not
    at import: importing ``torch.nn.attention.varlen`` imports Triton."""
    global _VARLEN_ATTN_PARAMETERS
    if _VARLEN_ATTN_PARAMETERS is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _VARLEN_ATTN_PARAMETERS = frozenset()
        else:
            _VARLEN_ATTN_PARAMETERS = frozenset(inspect.signature(varlen_attn).parameters)
    return _VARLEN_ATTN_PARAMETERS


def torch_varlen_reason(q: torch.Tensor, dropout_p: float, generator, return_lse: bool = False) -> Optional[str]:
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
    params = varlen_attn_parameters()
    if not params:
        return "torch.nn.attention.varlen is not in this torch"
    if return_lse and "return_aux" not in params:
        return "this torch's varlen_attn cannot return the log-sum-exp"
    return None


def torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, return_lse):
    if q.shape[0] == 0 or k.shape[0] == 0:  # no attention anywhere (shapes only: no sync, traceable)
        lse = q.new_full((q.shape[1], q.shape[0]), -math.inf, dtype=torch.float32) if return_lse else None
        return connected_zeros(q.shape, q, k, v), lse
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    params = varlen_attn_parameters()
    kwargs = {"scale": scale}
    if return_lse:
        kwargs["return_aux"] = AuxRequest(lse=True)
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:  # older signature: a causal flag
        kwargs["is_causal"] = causal
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # torch <= 2.11 has no GQA here: kv head h // group for query head h
            group = q.shape[1] // k.shape[1]
            k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    result = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    if not return_lse:
        return result, None
    out, lse = result
    if lse.shape != (q.shape[1], q.shape[0]):  # [total_q, H] in some versions' docs; [H, total_q] wanted
        lse = lse.transpose(0, 1)
    # The flash kernel marks rows without keys with lse = +inf; here they are -inf.
    keep = rows_with_keys(cu_q, cu_k, q.shape[0], causal)
    return out, torch.where(keep[None, :], lse.detach().float(), -math.inf)


# torch backend: padded buckets for scaled_dot_product_attention -----------------------------


def plan_buckets(len_q: List[int], len_k: List[int], cell_bytes: int, budget_bytes: int,
                 waste: float = PADDING_WASTE) -> List[List[int]]:
    """Group sequences (with queries and keys) into buckets, longest first.

    A bucket's padded tokens n * (Lq_max + Lk_max) stay within ``waste`` x its real
    tokens, and its score-sized intermediates n * Lq_max * Lk_max * cell_bytes within the
    budget (a single sequence may exceed it). Host arithmetic over B integers.
    """
    if cell_bytes == 0:
        cell_bytes, budget_bytes = 1, math.inf
    order = sorted((b for b in range(len(len_q)) if len_q[b] and len_k[b]),
                   key=lambda b: -(len_q[b] + len_k[b]))
    buckets: List[List[int]] = []
    current: List[int] = []
    mq = mk = tokens = 0
    for b in order:
        nq, nk = max(mq, len_q[b]), max(mk, len_k[b])
        n = len(current) + 1
        fits = (n * (nq + nk) <= waste * (tokens + len_q[b] + len_k[b])
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


def _padded_rows(starts: np.ndarray, lens: np.ndarray, m: np.ndarray):
    """Packed rows of sequences (``starts``, ``lens``, every length > 0), each padded to
    its ``m``, all concatenated (host, NumPy, in ``starts``' dtype). Returns ``(rows, pos,
    lens)``: the packed row of each padded row, its position in its padded sequence and
    the length of that sequence. A sequence's padding repeats its own rows (start + pos
    mod len): padding never reads another sequence, and no row is gathered more than
    ceil(m / len) times. (The CUDA backward of a gather accumulates the duplicates of one
    row one after another: padding that pointed at a single row made the bucketed
    backward as slow as a loop over sequences.)"""
    dtype = starts.dtype
    pos = np.arange(int(m.sum()), dtype=dtype) - np.repeat((np.cumsum(m) - m).astype(dtype), m)
    wraps = (m <= 2 * lens).all()  # then pos mod len is pos or pos - len: no division
    lens = np.repeat(lens.astype(dtype), m)
    return np.repeat(starts, m) + (pos - (pos >= lens) * lens if wraps else pos % lens), pos, lens


def _slots(lens: np.ndarray, members: np.ndarray, bases: np.ndarray, dtype) -> tuple:
    """``(slot, missing)``: for each packed row (of sequences of ``lens``), the padded row
    holding it, sequence ``members[i]`` from padded row ``bases[i]`` on (host, NumPy);
    ``missing``: the packed rows in no bucket (None if none), whose slot is 0."""
    starts = np.cumsum(lens) - lens
    shift = np.zeros(lens.shape[0], dtype=dtype)
    shift[members] = bases - starts[members]
    slot = np.arange(int(lens.sum()), dtype=dtype) + np.repeat(shift, lens)
    outside = np.ones(lens.shape[0], dtype=np.bool_)
    outside[members] = False
    if not (outside & (lens > 0)).any():
        return slot, None
    missing = np.repeat(outside, lens)
    slot[missing] = 0
    return slot, np.flatnonzero(missing)


_MASK_ALIGN = 128
"""Key masks of all buckets share one buffer (and their additive forms one tensor); each
bucket's starts a multiple of this many elements in, as aligned as a tensor of its own
would be for SDPA's kernels."""

_INT32_LIMIT = 2**31
"""The plan's arithmetic runs in int32 (twice as fast as int64 here) below this many rows."""


class _Plan:
    """The buckets' host plan (NumPy over all buckets at once): padded row indices, slots
    and masks, in one host buffer copied to the device at once.

    Padded rows of all buckets are concatenated, bucket after bucket, sequence after
    sequence: q rows (``rows_q``) and k/v rows (``rows_k``), each sequence padded with
    repeats of its own rows. ``slot[t]`` / ``slot_k[t]``: the padded row holding packed
    query / key t (0 and listed in ``missing_q`` / ``missing_k`` when in no bucket: no
    keys or queries); ``kept_q``: the queries in a bucket. A bucket needs a mask
    (``mask[b]``) unless its sequences fill it (and, causal, Mq == Mk). Without
    ``causal`` the mask is key padding (``key_pad``, True for padded keys, [n, 1, Mk] per
    bucket from ``mask_at[b]``); with ``causal``, query row i of a sequence sees keys
    j <= ``limit[i]`` = min(Lk - 1, i + Lk - Lq) (padding rows included), or every key
    (Mk - 1) where that leaves none (``visible_or_all``); those rows (``row_keep`` False,
    i < Lq - Lk) are zeroed afterwards. With ``len_q == len_k`` the k rows and slots are
    the q ones."""

    def __init__(self, len_q: np.ndarray, len_k: np.ndarray, buckets: List[List[int]], causal: bool):
        sizes = np.array([len(b) for b in buckets], dtype=np.int64)
        members = np.fromiter(itertools.chain.from_iterable(buckets), dtype=np.int64, count=int(sizes.sum()))
        first = np.cumsum(sizes) - sizes
        lq, lk = len_q[members], len_k[members]
        mq_b, mk_b = np.maximum.reduceat(lq, first), np.maximum.reduceat(lk, first)
        uniform = (np.minimum.reduceat(lq, first) == mq_b) & (np.minimum.reduceat(lk, first) == mk_b)
        self.mask = ~(uniform & (mq_b == mk_b)) if causal else ~uniform
        mq, mk = np.repeat(mq_b, sizes), np.repeat(mk_b, sizes)
        self.shapes = list(zip(sizes.tolist(), mq_b.tolist(), mk_b.tolist()))
        self.self_attention = np.array_equal(len_q, len_k)
        rows = max(int(len_q.sum()), int(len_k.sum()), int((sizes * np.maximum(mq_b, mk_b)).sum()))
        dtype = np.int32 if rows < _INT32_LIMIT else np.int64

        base_q = np.cumsum(mq) - mq
        rows_q, pos_q, lens_q = _padded_rows((np.cumsum(len_q) - len_q)[members].astype(dtype), lq, mq)
        slot, missing_q = _slots(len_q, members, base_q, dtype)
        longs = [rows_q, slot]
        self.missing_q = self.missing_k = 0
        if missing_q is not None:  # kept_q: the other queries (else slot stands in: not read)
            kept_q = np.ones(slot.shape[0], dtype=np.bool_)
            kept_q[missing_q] = False
            longs += [missing_q, np.flatnonzero(kept_q)]
            self.missing_q = missing_q.shape[0]
        if self.self_attention:
            pos_k, lens_k = pos_q, lens_q
            self.missing_k = self.missing_q
        else:
            rows_k, pos_k, lens_k = _padded_rows((np.cumsum(len_k) - len_k)[members].astype(dtype), lk, mk)
            slot_k, missing_k = _slots(len_k, members, np.cumsum(mk) - mk, dtype)
            longs += [rows_k, slot_k]
            if missing_k is not None:
                longs.append(missing_k)
                self.missing_k = missing_k.shape[0]

        ints: List[np.ndarray] = []
        masks: List[np.ndarray] = []
        self.mask_at = [0] * len(buckets)
        self.rows_cut = 0
        if not causal and self.mask.any():  # key padding of the buckets that need it, aligned
            key_at = np.cumsum(sizes * mk_b) - sizes * mk_b
            at = 0
            for b in np.flatnonzero(self.mask).tolist():
                cells, k0 = int(sizes[b] * mk_b[b]), int(key_at[b])
                key_pad = np.zeros(-(-cells // _MASK_ALIGN) * _MASK_ALIGN, dtype=np.bool_)
                np.greater_equal(pos_k[k0:k0 + cells], lens_k[k0:k0 + cells], out=key_pad[:cells])
                masks.append(key_pad)
                self.mask_at[b] = at
                at += key_pad.shape[0]
        if causal and self.mask.any():
            if self.self_attention:
                limit = np.minimum(lens_q - 1, pos_q)
            else:
                limit = np.minimum(np.repeat((lk - 1).astype(dtype), mq), pos_q + np.repeat((lk - lq).astype(dtype), mq))
            if (lk < lq).any():  # rows i < Lq - Lk see no key (limit < 0; Lk >= 1)
                row_keep = limit >= 0
                limit = np.where(row_keep, limit, np.repeat((mk - 1).astype(dtype), mq))
                masks.append(row_keep)
                self.rows_cut = row_keep.shape[0]
            ints = [limit.astype(np.int32, copy=False), np.arange(int(mk_b.max()), dtype=np.int32)]

        self.long_sizes = [t.shape[0] for t in longs]
        self.int_sizes = [t.shape[0] for t in ints]
        n_long, n_int = sum(self.long_sizes), sum(self.int_sizes)
        self.int_at = 8 * n_long
        self.bool_at = self.int_at + 4 * (n_int + n_int % 2)  # 8-byte aligned
        buffer = np.empty(self.bool_at + sum(t.shape[0] for t in masks), dtype=np.uint8)
        np.concatenate(longs, out=buffer[:self.int_at].view(np.int64))
        if ints:
            np.concatenate(ints, out=buffer[self.int_at:self.int_at + 4 * n_int].view(np.int32))
        if masks:
            np.concatenate(masks, out=buffer[self.bool_at:].view(np.bool_))
        self.buffer = buffer

    def to(self, device: torch.device):
        """The plan on ``device`` (one host-to-device copy; on CUDA asynchronous, from
        pinned memory: ``foldops.device.host_to_device``): ``(rows_q, slot, missing_q,
        kept_q, rows_k, slot_k, missing_k, limit, key_range, masks)``: int64 indices;
        ``limit`` and ``key_range`` (int32 [Mk]) for causal masks, else None; ``masks``
        (bool): ``row_keep`` (where some row sees no key, first) or the key padding."""
        dev = host_to_device(torch.from_numpy(self.buffer), device)
        longs = list(dev[:self.int_at].view(torch.int64).split(self.long_sizes))
        rows_q, slot = longs[:2]
        missing_q = kept_q = None
        if self.missing_q:
            missing_q, kept_q = longs[2:4]
            del longs[2:4]
        if self.self_attention:
            rows_k, slot_k, missing_k = rows_q, slot, missing_q
        else:
            rows_k, slot_k = longs[2:4]
            missing_k = longs[4] if self.missing_k else None
        empty = dev.new_empty(0, dtype=torch.int64)
        missing_q = empty if missing_q is None else missing_q
        missing_k = empty if missing_k is None else missing_k
        kept_q = slot if kept_q is None else kept_q
        limit = key_range = None
        if self.int_sizes:
            ints = dev[self.int_at:self.int_at + 4 * sum(self.int_sizes)].view(torch.int32)
            limit, key_range = ints.split(self.int_sizes)
        masks = dev[self.bool_at:].view(torch.bool)
        return rows_q, slot, missing_q, kept_q, rows_k, slot_k, missing_k, limit, key_range, masks


def _bucket_attention(qb, kb, vb, drop, bias, causal, scale, dropout_p, generator, return_lse):
    """Attention of the sequences of one bucket, given padded to its longest (qb
    [n, Mq, H, D], kb and vb [n, Mk, H_kv, D]); ``drop``: None (every row sees every key,
    or causal with Mq == Mk and no padding) or bool [n, 1 or Mq, Mk], True for the keys a
    row must not see, and ``bias`` its additive form [n, 1, 1 or Mq, Mk] (0 / -inf, for
    SDPA; None for the explicit softmax). Returns ``(out, lse)``: all n * Mq query rows
    [n * Mq, H, D] (padding rows included) and their lse [H, n * Mq] (or None)."""
    device, heads, head_dim = qb.device, qb.shape[2], qb.shape[3]
    group = heads // kb.shape[2]
    n, mq, mk = qb.shape[0], qb.shape[1], kb.shape[1]
    qb, kb, vb = (t.transpose(1, 2) for t in (qb, kb, vb))
    if group > 1:  # [n, H_kv, Mk, D] -> [n, H, Mk, D], kv head h // group for query head h
        kb, vb = (t.repeat_interleave(group, dim=1) for t in (kb, vb))
    if not _explicit_softmax(qb, dropout_p, generator, return_lse):
        out = torch.nn.functional.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=bias, dropout_p=dropout_p, scale=scale,
            is_causal=causal and drop is None)
        lse = None
    else:
        softmax_dtype = torch.float64 if qb.dtype == torch.float64 else torch.float32
        logits = torch.matmul(qb * scale, kb.transpose(-1, -2)).to(softmax_dtype)  # [n, H, Mq, Mk]
        if drop is not None:
            logits = logits.masked_fill(drop[:, None], -math.inf)
        elif causal:  # Mq == Mk: every row sees its diagonal
            logits = logits.masked_fill(torch.ones(mq, mk, dtype=torch.bool, device=device).triu(1),
                                        -math.inf)
        lse = torch.logsumexp(logits.detach(), -1).float() if return_lse else None
        weights = torch.softmax(logits, -1)
        if dropout_p > 0:
            drop_weights = torch.rand(weights.shape, generator=generator, device=device) < dropout_p
            weights = weights.masked_fill(drop_weights, 0.0) / (1.0 - dropout_p)
        out = torch.matmul(weights.to(vb.dtype), vb)
    out = out.transpose(1, 2).reshape(n * mq, heads, head_dim)  # [n, Mq, H, D] -> rows
    if lse is not None:
        lse = lse.transpose(0, 1).reshape(heads, n * mq)
    return out, lse


def _explicit_softmax(q, dropout_p, generator, return_lse) -> bool:
    """Whether a bucket computes its softmax explicitly (materialised scores) instead of SDPA."""
    return return_lse or (dropout_p > 0 and generator is not None) or q.dtype == torch.float64


def _cell_bytes(q, causal, dropout_p, generator, return_lse) -> int:
    """Bytes a bucket holds per (sequence, query, key) cell beyond its padded q/k/v/out
    copies (those stay within PADDING_WASTE x the packed tensors): the scores and weights
    of the explicit softmax, or SDPA's causal mask. SDPA's fused kernels (CUDA, CPU) hold
    no scores; elsewhere its math fallback does."""
    heads = q.shape[1]
    if _explicit_softmax(q, dropout_p, generator, return_lse):
        return heads * 2 * (8 if q.dtype == torch.float64 else 4) + 1
    return (0 if sdpa_has_fused_kernels(q.device) else heads * 2 * 4) + (q.element_size() if causal else 0)


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward is a gather too: ``grad_x[r] =
    grad[inverse[r]]``, zero for the rows in ``missing``. Exact when ``inverse[r]`` is
    the only occurrence of row r in ``index`` whose gradient can be nonzero: the other
    occurrences are padding (masked keys, discarded query rows), whose gradients are
    exactly zero. A gather's own backward would scatter with accumulation, which is
    serial over duplicate rows on CUDA and single-threaded per row on CPU.
    (setup_context style, a jvp and a generated vmap rule: torch.func keeps working.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, index, inverse, missing):
        return x.index_select(0, index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, index, inverse, missing = inputs
        ctx.save_for_backward(inverse, missing)
        ctx.index = index  # for jvp (forward mode has no saved tensors); not differentiable

    @staticmethod
    def backward(ctx, grad):
        inverse, missing = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad_x = grad.index_select(0, inverse)
        if missing.numel():
            grad_x = grad_x.index_fill(0, missing, 0)
        return grad_x, None, None, None

    @staticmethod
    def jvp(ctx, x_t, *_):
        return x_t.index_select(0, ctx.index)


class _PickRows(torch.autograd.Function):
    """``x.index_select(0, slot)`` with the rows in ``missing`` set to zero, where
    ``slot`` is injective outside ``missing`` (``kept``): its backward copies each
    gradient row to its one source row (``index_copy``, no accumulation); other rows of
    x get zero."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, slot, missing, kept):
        out = x.index_select(0, slot)
        return out.index_fill(0, missing, 0) if missing.numel() else out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, slot, missing, kept = inputs
        ctx.save_for_backward(slot, kept)
        ctx.rows = x.shape[0]
        ctx.slot, ctx.missing = slot, missing  # for jvp (forward mode has no saved tensors)

    @staticmethod
    def backward(ctx, grad):
        slot, kept = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if kept.numel() != slot.numel():
            slot, grad = slot.index_select(0, kept), grad.index_select(0, kept)
        grad_x = grad.new_zeros((ctx.rows, *grad.shape[1:]))
        return grad_x.index_copy(0, slot, grad), None, None, None

    @staticmethod
    def jvp(ctx, x_t, *_):
        out = x_t.index_select(0, ctx.slot)
        return out.index_fill(0, ctx.missing, 0) if ctx.missing.numel() else out


def torch_buckets(q, k, v, len_q, len_k, causal, scale, dropout_p, generator, return_lse):
    heads = q.shape[1]
    waste = PADDING_WASTE_CPU if q.device.type == "cpu" else PADDING_WASTE
    cell_bytes = _cell_bytes(q, causal, dropout_p, generator, return_lse)
    lens_q, lens_k = len_q.tolist(), len_k.tolist()
    buckets = plan_buckets(lens_q, lens_k, cell_bytes, budget.chunk_budget_bytes(q.device) if cell_bytes else 0,
                           waste)
    if not buckets:  # no sequence has both queries and keys
        lse = torch.full((heads, q.shape[0]), -math.inf, dtype=torch.float32, device=q.device) if return_lse else None
        return connected_zeros(q.shape, q, k, v), lse
    plan = _Plan(np.array(lens_q, dtype=np.int64), np.array(lens_k, dtype=np.int64), buckets, causal)
    rows_q, slot, missing_q, kept_q, rows_k, slot_k, missing_k, limit, key_range, masks = plan.to(q.device)

    # One gather per tensor for every bucket, split into per-bucket views.
    sizes_q = [n * mq for n, mq, _ in plan.shapes]
    sizes_k = [n * mk for n, _, mk in plan.shapes]
    qs = _GatherRows.apply(q, rows_q, slot, missing_q).split(sizes_q)
    ks = _GatherRows.apply(k, rows_k, slot_k, missing_k).split(sizes_k)
    vs = _GatherRows.apply(v, rows_k, slot_k, missing_k).split(sizes_k)
    explicit = _explicit_softmax(q, dropout_p, generator, return_lse)
    key_pad = masks[plan.rows_cut:]
    biases = None
    if not causal and plan.mask.any() and not explicit:  # additive key masks of all buckets at once
        biases = torch.zeros(key_pad.shape, dtype=q.dtype, device=q.device).masked_fill_(key_pad, -math.inf)
    outs, lses = [], []
    at = 0
    for b, ((n, mq, mk), qb, kb, vb) in enumerate(zip(plan.shapes, qs, ks, vs)):
        drop = bias = None
        if plan.mask[b]:
            if causal:  # [n, Mq, Mk]
                drop = key_range[None, None, :mk] > limit[at:at + n * mq].view(n, mq, 1)
                if not explicit:
                    bias = torch.zeros(drop.shape, dtype=q.dtype, device=q.device).masked_fill_(drop, -math.inf)
            else:  # [n, 1, Mk]
                cells = slice(plan.mask_at[b], plan.mask_at[b] + n * mk)
                drop = key_pad[cells].view(n, 1, mk)
                if biases is not None:
                    bias = biases[cells].view(n, 1, mk)
            if bias is not None:
                bias = bias[:, None]
        out, lse = _bucket_attention(qb.view(n, mq, heads, -1), kb.view(n, mk, k.shape[1], -1),
                                     vb.view(n, mk, v.shape[1], -1), drop, bias, causal, scale, dropout_p,
                                     generator, return_lse)
        outs.append(out)
        lses.append(lse)
        at += n * mq
    out = torch.cat(outs)
    lse = torch.cat(lses, 1) if return_lse else None
    if plan.rows_cut:  # causal rows i < Lq - Lk see no key: zeros, lse -inf
        row_keep = masks[:plan.rows_cut]
        out = out * row_keep[:, None, None].to(out.dtype)
        if lse is not None:
            lse = lse.masked_fill(~row_keep[None, :], -math.inf)
    out = _PickRows.apply(out, slot, missing_q, kept_q)
    if return_lse:
        lse = lse.index_select(1, slot)
        if plan.missing_q:
            lse.index_fill_(1, missing_q, -math.inf)
    return out, lse


def dense(q, k, v, keep, causal, scale, dropout_p, exact):
    """[B, L, H, D] attention with a [B, Lk] keep-mask (or None) by SDPA (or explicit
    softmax for ``exact``: the reference); rows without keys give zeros.

    A padded key (``keep`` False) contributes nothing whatever k and v hold there: both
    are zeroed (masked_fill, so NaN/inf there reach neither the outputs nor, through
    0 * NaN, any gradient; the padded keys' own gradients are zero) before the -inf mask,
    which then meets finite logits. Finite inputs give the same results as without."""
    batch, lq, heads, head_dim = q.shape
    lk = k.shape[1]
    group = heads // k.shape[2]
    if keep is not None:
        padded = ~keep[:, :, None, None]  # [B, Lk, 1, 1]
        k, v = k.masked_fill(padded, 0), v.masked_fill(padded, 0)
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
        if allowed is not None:  # -inf masks; rows without keys see every key, zeroed below
            mask = additive_mask(visible_or_all(allowed), q.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask,
                                                               dropout_p=dropout_p, scale=scale)
        if allowed is not None:
            out = out * allowed.any(-1, keepdim=True).to(out.dtype)
    return out.transpose(1, 2)
