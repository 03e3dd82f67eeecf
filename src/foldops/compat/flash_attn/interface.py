"""flash_attn.flash_attn_interface's functions on foldops's variable-length attention.

Signatures, argument names, defaults and return conventions are flash_attn 2.x's
(checked against flash_attn 2.8): dense ``[B, S, H, D]`` and packed ``[total, H, D]``
layouts, ``cu_seqlens`` int32 ``[B+1]``, MQA/GQA (``nheads`` divisible by ``nheads_k``),
``softmax_scale`` default ``1/sqrt(headdim)``, ``causal`` aligned to the bottom-right
corner (flash_attn >= 2.1), a fully masked query row gives zeros. Every function runs on
any device and dtype that ``foldops.ops.varlen_attention`` takes (its ``backend="auto"``:
Triton kernels on CUDA cc >= 8.0, PyTorch elsewhere).

``return_attn_probs=True`` returns ``(out, softmax_lse, None)`` as flash_attn does without
dropout (lse fp32: ``[B, H, S]`` dense, ``[H, total_q]`` packed); with dropout flash_attn
would also return the dropout pattern, which foldops does not produce, so that raises.
``window_size=(-1, 0)`` is causal attention, as in flash_attn. Unsupported: any other
sliding window, ``softcap > 0``, ``alibi_slopes``, ``block_table`` (paged KV): each raises
``ValueError`` naming the argument. ``deterministic`` is accepted (the backward has no
nondeterministic accumulation to switch off on the PyTorch path).

Bad input raises ``TypeError``/``ValueError`` naming the caller's argument: the op checks
``cu_seqlens_q``/``max_seqlen_q``..., and the packed functions report them under their own
names (``cu_seqlens``, ``max_seqlen``, ``qkv``, ``kv``).
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import re
from typing import Dict, Optional, Sequence

import torch

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
]


def _options(causal, window_size, softcap, alibi_slopes, dropout_p, return_attn_probs,
             block_table=None) -> bool:
    """Check the arguments foldops does not implement; return the effective ``causal``."""
    try:
        window = tuple(int(w) for w in window_size)
    except TypeError:
        raise TypeError(f"window_size: expected a pair of ints, got {window_size!r}") from None
    if len(window) != 2:
        raise ValueError(f"window_size: expected a pair (left, right), got {window_size!r}")
    if window == (-1, 0):
        causal = True
    elif window != (-1, -1) and not (causal and window[0] < 0):
        raise ValueError(f"window_size: sliding-window attention {window} is not supported by foldops; "
                         "use (-1, -1) (or (-1, 0) for causal)")
    if softcap is not None and float(softcap) > 0.0:
        raise ValueError(f"softcap: softcapping ({softcap}) is not supported by foldops; use 0.0")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes: ALiBi is not supported by foldops; pass None")
    if block_table is not None:
        raise ValueError("block_table: paged KV caches are not supported by foldops; pass None")
    if return_attn_probs and dropout_p > 0.0:
        raise ValueError("return_attn_probs: the attention probabilities / dropout pattern (S_dmask) are not "
                         "produced by foldops; with dropout_p=0 return_attn_probs=True returns (out, lse, None)")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p!r}")
    return bool(causal)


def _dims(name: str, x, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected shape {layout}, got {tuple(x.shape)}")
    return x


# The user's names of varlen_attention's arguments, per calling convention: errors of the op
# start with its own argument's name, which the function the user called may not have.
_QKV_PACKED = {"q": "qkv", "k": "qkv", "v": "qkv"}
_KV_PACKED = {"k": "kv", "v": "kv"}
_ONE_CU = {"cu_seqlens_q": "cu_seqlens", "cu_seqlens_k": "cu_seqlens",
           "max_seqlen_q": "max_seqlen", "max_seqlen_k": "max_seqlen"}
_CU_NAMES = re.compile(r"\b(cu_seqlens_[qk]|max_seqlen_[qk])\b")


def _rename(exc: Exception, names: Dict[str, str]) -> Exception:
    """``exc`` with the argument names of varlen_attention replaced by the caller's: the leading
    ``name:`` always; cu_seqlens / max_seqlen names anywhere in the message."""
    if type(exc) not in (TypeError, ValueError):
        return exc
    head, sep, rest = str(exc).partition(":")
    if not sep or head not in names:
        return exc
    rest = _CU_NAMES.sub(lambda m: names.get(m.group(1), m.group(1)), rest)
    return type(exc)(f"{names[head]}:{rest}").with_traceback(exc.__traceback__)


def _as_int(name: str, value):
    """``max_seqlen`` as a Python int: integral numbers convert (ints, NumPy integers,
    one-element integer tensors, floats with an integral value); a number with a
    fractional part raises ``ValueError`` naming the argument (truncating it would
    undersize the launch grid). Anything else (bool, None, strings...) goes on to the op's
    check, which names the argument."""
    if value is None or isinstance(value, (bool, torch.SymInt)):
        return value
    try:
        return operator.index(value)
    except TypeError:
        pass
    is_float = isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.numel() == 1
                                                    and value.is_floating_point())
    if not is_float:
        return value
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return int(number)


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, return_lse, names=None):
    from foldops.ops import varlen_attention

    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    try:
        max_q, max_k = _as_int("max_seqlen_q", max_q), _as_int("max_seqlen_k", max_k)
        return varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal,
                                softmax_scale=float(softmax_scale), dropout_p=float(dropout_p), return_lse=return_lse)
    except (TypeError, ValueError) as exc:
        renamed = _rename(exc, names) if names else exc
        if renamed is exc:
            raise
        raise renamed from None


@functools.lru_cache(maxsize=64)
def _uniform_cu(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens of ``batch`` sequences of ``seqlen``, kept so that varlen_attention's one-time
    check of its values (a host read on accelerators) happens once per shape, not per call."""
    return torch.arange(batch + 1, device=device, dtype=torch.int32) * seqlen


def _dense(q, k, v, dropout_p, softmax_scale, causal, return_attn_probs, names=None):
    """Dense [B, S, H, D] attention as packed sequences of equal length (no copy if contiguous)."""
    batch, seqlen_q = q.shape[0], q.shape[1]
    seqlen_k = k.shape[1]
    if k.shape[0] != batch or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k, v: expected batch {batch} and equal sequence lengths, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    out = _varlen(q.reshape(batch * seqlen_q, *q.shape[2:]), k.reshape(batch * seqlen_k, *k.shape[2:]),
                  v.reshape(batch * seqlen_k, *v.shape[2:]), _uniform_cu(batch, seqlen_q, q.device),
                  _uniform_cu(batch, seqlen_k, q.device),
                  seqlen_q, seqlen_k, dropout_p, softmax_scale, causal, return_attn_probs, names)
    if not return_attn_probs:
        return out.reshape(q.shape[:3] + v.shape[-1:])
    out, lse = out
    lse = lse.reshape(lse.shape[0], batch, seqlen_q).transpose(0, 1)  # [B, H, S] as flash_attn
    return out.reshape(q.shape[:3] + v.shape[-1:]), lse, None


def _packed(out, return_attn_probs):
    if return_attn_probs:
        out, lse = out
        return out, lse, None
    return out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size: Sequence[int] = (-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """qkv ``[B, S, 3, H, D]`` -> out ``[B, S, H, D]`` (or ``(out, lse [B, H, S], None)``)."""
    _dims("qkv", qkv, 5, "[batch, seqlen, 3, nheads, headdim]")
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected shape [batch, seqlen, 3, nheads, headdim], got {tuple(qkv.shape)}")
    causal = _options(causal, window_size, softcap, alibi_slopes, dropout_p, return_attn_probs)
    q, k, v = qkv.unbind(2)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, return_attn_probs, _QKV_PACKED)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size: Sequence[int] = (-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """q ``[B, Sq, H, D]``, kv ``[B, Sk, 2, Hk, D]`` -> out ``[B, Sq, H, D]``."""
    _dims("q", q, 4, "[batch, seqlen_q, nheads, headdim]")
    _dims("kv", kv, 5, "[batch, seqlen_k, 2, nheads_k, headdim]")
    if kv.shape[2] != 2:
        raise ValueError(f"kv: expected shape [batch, seqlen_k, 2, nheads_k, headdim], got {tuple(kv.shape)}")
    causal = _options(causal, window_size, softcap, alibi_slopes, dropout_p, return_attn_probs)
    k, v = kv.unbind(2)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, return_attn_probs, _KV_PACKED)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size: Sequence[int] = (-1, -1), softcap=0.0, alibi_slopes=None,
                    deterministic=False, return_attn_probs=False):
    """q ``[B, Sq, H, D]``, k, v ``[B, Sk, Hk, D]`` -> out ``[B, Sq, H, D]``."""
    _dims("q", q, 4, "[batch, seqlen_q, nheads, headdim]")
    _dims("k", k, 4, "[batch, seqlen_k, nheads_k, headdim]")
    _dims("v", v, 4, "[batch, seqlen_k, nheads_k, headdim]")
    causal = _options(causal, window_size, softcap, alibi_slopes, dropout_p, return_attn_probs)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size: Sequence[int] = (-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv ``[total, 3, H, D]``, cu_seqlens int32 ``[B+1]`` -> out ``[total, H, D]``
    (or ``(out, lse [H, total], None)``)."""
    _dims("qkv", qkv, 4, "[total, 3, nheads, headdim]")
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv: expected shape [total, 3, nheads, headdim], got {tuple(qkv.shape)}")
    causal = _options(causal, window_size, softcap, alibi_slopes, dropout_p, return_attn_probs)
    q, k, v = qkv.unbind(1)
    out = _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                  return_attn_probs, {**_QKV_PACKED, **_ONE_CU})
    return _packed(out, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size: Sequence[int] = (-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False):
    """q ``[total_q, H, D]``, kv ``[total_k, 2, Hk, D]`` -> out ``[total_q, H, D]``."""
    _dims("q", q, 3, "[total_q, nheads, headdim]")
    _dims("kv", kv, 4, "[total_k, 2, nheads_k, headdim]")
    if kv.shape[1] != 2:
        raise ValueError(f"kv: expected shape [total_k, 2, nheads_k, headdim], got {tuple(kv.shape)}")
    causal = _options(causal, window_size, softcap, alibi_slopes, dropout_p, return_attn_probs)
    k, v = kv.unbind(1)
    out = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                  causal, return_attn_probs, _KV_PACKED)
    return _packed(out, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size: Sequence[int] = (-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False,
                           block_table: Optional[torch.Tensor] = None):
    """q ``[total_q, H, D]``, k, v ``[total_k, Hk, D]`` -> out ``[total_q, H, D]``."""
    _dims("q", q, 3, "[total_q, nheads, headdim]")
    _dims("k", k, 3, "[total_k, nheads_k, headdim]")
    _dims("v", v, 3, "[total_k, nheads_k, headdim]")
    causal = _options(causal, window_size, softcap, alibi_slopes, dropout_p, return_attn_probs, block_table)
    out = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                  causal, return_attn_probs)
    return _packed(out, return_attn_probs)
