"""Variable-length (packed) attention, flash_attn's varlen layout, without flash_attn.

    q: [total_q, H, D]   k, v: [total_k, H_kv, D]   H % H_kv == 0 (MQA / GQA: query
                                                     head h reads kv head h // (H // H_kv))
    cu_seqlens_q, cu_seqlens_k: int32 [B+1], 0 = cu[0] <= ... <= cu[B] = total
    out: [total_q, H, D] in q's dtype     lse (return_lse=True): fp32 [H, total_q]

Sequence b is queries cu_seqlens_q[b]:cu_seqlens_q[b+1] (Lq) against keys
cu_seqlens_k[b]:cu_seqlens_k[b+1] (Lk); ``causal`` lets query i see keys
j <= i + Lk - Lq (bottom-right, as flash_attn >= 2.1). A query that sees no key (Lk = 0,
or causal rows with i < Lq - Lk) gives zeros and lse = -inf, never NaN, with zero
gradients; a batch with no attention at all (every length 0, B = 0, or no keys) still
returns outputs that depend on q, k, v (``backward`` gives zero gradients), on every
backend. Masked keys get exactly zero weight at any logit (masks are -inf, never a
finite "very negative" value). ``padded_attention`` is the dense form ``[B, L, H, D]`` with a key-padding mask.

Backends:

- ``triton`` (CUDA cc >= 8.0; fp16/bf16/fp32; head dim <= 128): kernels on the packed
  tensors, a program per (query block, head, sequence); see
  docs/kernels/varlen_attention.md. Dropout in the kernels (a Philox mask from one seed
  drawn on the device, redrawn by the backward).
- ``torch`` (any device, any float dtype): on NVIDIA GPUs of cc >= 8.0 with fp16/bf16,
  no dropout and head dim <= 256 (multiple of 8), ``torch.nn.attention.varlen`` (PyTorch's
  flash kernel on the packed tensors). Everywhere else sequences of similar length are
  grouped into padded buckets for ``scaled_dot_product_attention`` with a key mask:
  padded tokens per bucket at most ``PADDING_WASTE`` (1.25; 1.1 on CPU) x its real tokens, and a
  bucket's Lq*Lk-sized intermediates (causal mask; scores where the softmax is explicit:
  ``return_lse``, dropout with a ``generator``, fp64) within ``foldops.budget``: never a
  [B, Lmax, Lmax] or [total, total] tensor. The buckets are planned on the host from the
  sequence lengths (the one read of cu_seqlens below). See ``foldops/ops/_varlen_torch.py``.
  Under torch.compile (and on fake or meta tensors) the bucketed path is the registered
  op ``foldops::varlen_attention_torch_fwd``: opaque to the tracer (fullgraph works), its
  body runs eagerly, reads and checks the lengths; its backward, the op
  ``foldops::varlen_attention_torch_bwd``, recomputes that forward and differentiates it
  (one more forward per training step than eager; no double backward). Dropout there draws
  one seed that both ops replay (explicit softmax, as with a ``generator``). Not under
  CUDA graph capture, where a host read is illegal.
- ``reference``: float64-capable, loops over the sequences; never picked by ``auto``.

Input checks: shapes, dtypes and devices always (no device work). The values of
cu_seqlens (int32, starts at 0, non-decreasing, ends at total, longest <= max_seqlen):
on CPU read and checked on every call (free there); on an accelerator one small
device-to-host copy (a sync) the first time a given cu_seqlens tensor is seen,
remembered by the tensor's identity and version counter so the layers of one model share
one check. Contract there: an in-place change that bypasses autograd's version counter
(a write through ``.data``, through memory shared with NumPy or DLPack, or by a kernel
outside PyTorch) is not seen: the remembered lengths (stale) plan the buckets of the
``torch`` backend and the check is skipped. Pass a new tensor after such a change.
(Inference-mode tensors have no version counter: checked on every call.) Skipped while
torch.compile traces (the ``torch`` backend's registered op checks them when it runs) and
during CUDA graph capture (a host read is illegal there; a warm-up call before the
capture checks the same tensors).

Under torch.compile the ``torch`` backend's bucketed path is a registered op (its body
reads cu_seqlens when it runs; not for CUDA graphs, so ``mode="reduce-overhead"`` runs it
outside them). Dropout there with a ``generator=`` breaks the graph (an error under
``fullgraph=True``): without one the seed is drawn from the default generator.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Dict, Optional, Tuple

import torch

from foldops import backends
from foldops._checks import as_bool_mask, check_tensor
from foldops.device import autocast_dtype_in_effect, cuda_graph_capturing, fp32_region, kernel_support
from foldops.ops import _varlen_torch as _vt
from foldops.ops._common import needs_grad
from foldops.ops._varlen_torch import PADDING_WASTE  # noqa: F401  (documented here)
from foldops.reference import varlen_attention as _reference

OP = "varlen_attention"
KERNEL_MAX_HEAD_DIM = 128
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Input checks --------------------------------------------------------------------------

_checked: Dict[int, Tuple[weakref.ref, int, int, int, torch.Tensor]] = {}


def _remembered(cu: torch.Tensor) -> bool:
    """Whether a checked ``cu`` is remembered: on accelerators (where the read is a sync),
    never on CPU (a read there is free, and memory shared with NumPy changes unseen)."""
    return cu.device.type != "cpu" and not cu.is_inference()


def _tracing(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or t.device.type == "meta" or is_fake(t)


def _host_lengths(name: str, cu: torch.Tensor, total: int, max_seqlen: int, max_name: str) -> torch.Tensor:
    """Check the values of ``cu`` (see the module doc) and return its lengths [B] (int64, CPU)."""
    # Remembered by identity and version counter (see _remembered).
    key, version = id(cu), cu._version if _remembered(cu) else None
    hit = _checked.get(key)
    if version is not None and hit is not None and hit[0]() is cu and hit[1:4] == (version, total, max_seqlen):
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
    if version is not None:
        if len(_checked) > 256:
            _checked.clear()
        _checked[key] = (weakref.ref(cu), version, total, max_seqlen, lengths)
    return lengths


def _check_int(name: str, value: object) -> int:
    """A non-negative integer (int, NumPy integer; a SymInt while torch.compile traces) as
    an int; not a tensor (its value would be a device read), a bool or a float."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a Python int (it sizes the launch grid; no device "
                        f"read), got a tensor")
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    return int(value)


def validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale):
    """Check every argument; return the host lengths ``(len_q, len_k)``, or ``None`` when
    tracing or capturing a CUDA graph (values unchecked then)."""
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
    if _tracing(q) or _tracing(cu_seqlens_q) or _tracing(cu_seqlens_k) or cuda_graph_capturing():
        return None
    len_q = _host_lengths("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q")
    len_k = _host_lengths("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    return len_q, len_k


def _torch_backend(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, return_lse, generator, lengths):
    if _vt.torch_varlen_reason(q, dropout_p, generator, return_lse) is None:
        return _vt.torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, return_lse)
    if lengths is not None:  # eager: the bucketed path on the lengths validate() read
        return _vt.torch_buckets(q, k, v, lengths[0], lengths[1], causal, scale, dropout_p, generator, return_lse)
    _host_read_allowed(q)
    # Tracing (torch.compile, fake or meta tensors): the registered op, opaque to the tracer.
    # Its body runs with autocast off; the inputs get here the dtype autocast would give
    # the bucketed path's SDPA and matmuls eagerly, which the fake output declares.
    amp = autocast_dtype_in_effect(q)
    if amp is not None and q.dtype != torch.float64:
        q, k, v = q.to(amp), k.to(amp), v.to(amp)
    seed = None
    if dropout_p > 0:
        device = generator.device if generator is not None else q.device
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64)
    out, lse = torch.ops.foldops.varlen_attention_torch_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale,
                                                           dropout_p, return_lse, seed)
    return out, (lse if return_lse else None)


# The bucketed torch path as registered custom ops (what torch.compile traces) ------------
#
# The buckets are planned on the host from the values of cu_seqlens, which a tracer cannot
# read: under torch.compile the path is one opaque op whose body runs eagerly (a graph
# break neither Dynamo nor fullgraph=True sees), with a fake implementation for the
# shapes. Its backward is a second op that recomputes the bucketed forward and
# differentiates it with torch.func.vjp (one extra forward per backward, only on this
# traced path; eager calls keep the autograd graph of the forward). Dropout draws one
# seed tensor outside the op; both ops seed a generator of their own with it, so the
# backward sees the forward's mask (the explicit softmax; SDPA's own dropout could not
# be replayed).


def _seeded(seed: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Generator]:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed.item()))


def _host_read_allowed(q: torch.Tensor) -> None:
    if cuda_graph_capturing():  # e.g. torch.compile(mode="reduce-overhead") recording the op
        raise RuntimeError("varlen_attention: the bucketed torch path reads the sequence lengths on the host, "
                           "which a CUDA graph capture forbids; use backend='triton'")


# Not for CUDA graphs: the body reads cu_seqlens on the host (the tag, where torch has it,
# keeps reduce-overhead's graphs around the op).
_UNSAFE = {"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe") else {}


@torch.library.custom_op("foldops::varlen_attention_torch_fwd", mutates_args=(), **_UNSAFE)
def _torch_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float,
                  dropout_p: float, return_lse: bool,
                  seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out [total_q, H, D] in q's dtype, lse fp32 [H, total_q])``; lse is ``[0]`` unless
    ``return_lse``. Checks the values of cu_seqlens (unchecked while tracing)."""
    _host_read_allowed(q)
    len_q = _host_lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    len_k = _host_lengths("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    with fp32_region(q):  # q's dtype, as the fake output says, whatever autocast the graph runs under
        out, lse = _vt.torch_buckets(q, k, v, len_q, len_k, causal, scale, dropout_p, _seeded(seed, q.device),
                                     return_lse)
    return out, (lse if return_lse else q.new_empty(0, dtype=torch.float32))


@_torch_fwd_op.register_fake
def _torch_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p,
                    return_lse, seed):
    lse_shape = (q.shape[1], q.shape[0]) if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("foldops::varlen_attention_torch_bwd", mutates_args=(), **_UNSAFE)
def _torch_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                  causal: bool, scale: float, dropout_p: float, return_lse: bool,
                  seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous, by differentiating a recomputed bucketed forward (the
    forward's path: ``return_lse`` takes the explicit softmax, as it did)."""
    _host_read_allowed(q)
    len_q = _host_lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    len_k = _host_lengths("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    generator = _seeded(seed, q.device)

    def forward(q, k, v):
        return _vt.torch_buckets(q, k, v, len_q, len_k, causal, scale, dropout_p, generator, return_lse)[0]

    # torch.func rather than torch.autograd: an op's body runs below the autograd
    # dispatch keys, which the functorch transform sets up again for its own level.
    with fp32_region(q):  # the forward op's dtypes
        _, vjp = torch.func.vjp(forward, q, k, v)
        return tuple(g.contiguous() for g in vjp(grad_out))


@_torch_bwd_op.register_fake
def _torch_bwd_fake(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                    dropout_p, return_lse, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _torch_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, return_lse, seed = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k, seed)
    ctx.args = (max_q, max_k, causal, scale, dropout_p, return_lse)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _torch_op_backward(ctx, grad_out, _grad_lse):
    q, k, v, cu_q, cu_k, seed = ctx.saved_tensors
    grads = (None, None, None)
    if grad_out is not None:
        grads = torch.ops.foldops.varlen_attention_torch_bwd(grad_out, q, k, v, cu_q, cu_k, *ctx.args, seed)
    return *grads, None, None, None, None, None, None, None, None, None


_torch_fwd_op.register_autograd(_torch_op_backward, setup_context=_torch_setup_context)


def _reference_backend(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, return_lse, generator,
                       lengths):
    out, lse = _reference.varlen_attention(q, k, v, cu_q, cu_k, causal, scale, dropout_p, generator)
    return out, (lse.detach().float() if return_lse else None)


def _triton_backend(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, return_lse, generator,
                    lengths):
    from foldops.kernels.varlen_attention import varlen_attention as kernel

    return kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, return_lse, dropout_p, generator)


def _triton_supports(device, dtype, head_dim, explicit, **_):
    reason = kernel_support(device, explicit)
    if reason is not None:
        return reason
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} (kernel supports fp16, bf16, fp32)"
    if head_dim > KERNEL_MAX_HEAD_DIM:
        return f"head dim {head_dim} (kernel supports up to {KERNEL_MAX_HEAD_DIM})"
    try:
        import foldops.kernels.varlen_attention  # noqa: F401
    except ImportError as exc:
        return f"kernel module unavailable: {exc}"
    return None


backends.register(OP, "triton", _triton_backend, priority=100, supports=_triton_supports)
backends.register(OP, "torch", _torch_backend, priority=50)
backends.register(OP, "reference", _reference_backend, priority=0, auto=False)


def _select(q, backend, dropout_p, n, training):
    """The backend for these inputs; ``n`` (keys: max_seqlen_k, a Python int, never read
    from cu_seqlens) and ``training`` go to the size rules (``foldops.backend_rules``)."""
    if backend == "triton" and q.shape[-1] > KERNEL_MAX_HEAD_DIM:
        raise ValueError(f"q: head dim (last axis) at most {KERNEL_MAX_HEAD_DIM} for backend='triton', "
                         f"got {q.shape[-1]}")
    return backends.select(OP, backend, device=q.device, dtype=q.dtype, head_dim=q.shape[-1],
                           dropout=dropout_p > 0, n=n, training=training)


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
            ending at total_q / total_k. On an accelerator their checked values are
            remembered per tensor and version counter: after an in-place change that
            bypasses the counter (``.data``, shared NumPy/DLPack memory), pass a new
            tensor (see the module doc). On CPU they are read on every call.
        max_seqlen_q, max_seqlen_k: ints (or NumPy integers) at least the longest
            sequence (they size the kernels' grids; larger is allowed).
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
    impl = _select(q, backend, dropout_p, max_seqlen_k, needs_grad(q, k, v))
    out, lse = impl.fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(causal), scale,
                       float(dropout_p), bool(return_lse), generator, lengths)
    return (out, lse) if return_lse else out


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
    row without keys gives zeros; a padded key contributes nothing whatever k and v hold
    there (NaN/inf included), and gets zero gradients. ``causal``: query i sees keys
    j <= i + Lk - L (and kept).

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
    impl = _select(q, backend, dropout_p, lk, needs_grad(q, k, v))
    if impl.name in ("reference", "torch") or (causal and keep is not None) or q.numel() == 0 or lk == 0:
        return _vt.dense(q, k, v, keep, causal, scale, dropout_p, exact=impl.name == "reference")
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
