"""The float64 test harness shared by every op's, kernel's and layer's tests.

The accuracy rule (after flash-attention's tests): a fast backend's error against a
float64 reference is at most twice the error of the plain PyTorch computation run in
the same low precision, plus a small floor relative to the reference's magnitude.

- ``leaves``: fresh leaf copies of inputs in a dtype, strides kept (non-contiguous
  inputs stay non-contiguous).
- ``forward_backward``: one forward and backward; the outputs and the gradients of
  every differentiable input and parameter.
- ``check_against_float64``: a fast function against its reference, forward and the
  gradient of every input, with ``assert_within_baseline``.
- ``assert_deterministic``: two runs give bitwise equal outputs and gradients.
- ``forbid_host_sync``: a dispatch mode that raises on host reads of device values,
  tensors made from host data and copies between devices (what CUDA graph capture
  refuses), to check launchers on any device.
- ``capture_cuda_graph`` (from ``foldops.device``): CUDA graph capture of a function
  that, when the capture fails, leaves the process usable for the next test.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from foldops.device import capture_cuda_graph  # noqa: F401  (part of this harness)

# Floor relative to max|reference|, by the dtype the backend ran in.
DEFAULT_REL_FLOOR: Dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-4,
    torch.bfloat16: 1e-3,
}


def max_abs_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    """max |x - exact| in float64; inf if x holds a NaN/inf that ``exact`` does not."""
    diff = (x.detach().to(torch.float64) - exact.detach().to(torch.float64)).abs()
    if not torch.isfinite(diff).all():
        return float("inf")
    return diff.max().item() if diff.numel() else 0.0


def assert_within_baseline(
    name: str,
    fast: torch.Tensor,
    exact: torch.Tensor,
    baseline: torch.Tensor,
    dtype: Optional[torch.dtype] = None,
    factor: float = 2.0,
    rel_floor: Optional[float] = None,
) -> None:
    """Assert err(fast) <= factor * err(baseline) + floor, all against ``exact`` (fp64)."""
    if tuple(fast.shape) != tuple(exact.shape):
        raise AssertionError(f"{name}: shape {tuple(fast.shape)} != reference {tuple(exact.shape)}")
    dtype = dtype or fast.dtype
    if rel_floor is None:
        rel_floor = DEFAULT_REL_FLOOR.get(dtype, 1e-3)
    scale = exact.detach().abs().max().item() if exact.numel() else 0.0
    err_fast = max_abs_error(fast, exact)
    err_base = max_abs_error(baseline, exact)
    bound = factor * err_base + rel_floor * max(scale, 1e-30)
    if not err_fast <= bound:
        raise AssertionError(
            f"{name}: error {err_fast:.3e} > {factor} x baseline error {err_base:.3e} "
            f"+ floor {rel_floor:.1e} x {scale:.3e} (= {bound:.3e})"
        )


DTypes = Union[None, torch.dtype, Sequence[Optional[torch.dtype]]]


def _per_input(value, count: int) -> list:
    if value is None or isinstance(value, (torch.dtype, bool)):
        return [value] * count
    value = list(value)
    if len(value) != count:
        raise ValueError(f"expected {count} entries (one per input), got {len(value)}")
    return value


def leaves(
    inputs: Sequence[Optional[torch.Tensor]],
    dtype: DTypes = None,
    differentiable: Union[bool, Sequence[bool], None] = None,
) -> List[Optional[torch.Tensor]]:
    """Fresh leaf copies of ``inputs`` with their strides kept.

    ``dtype``: one dtype for every floating input, or one per input (None: keep).
    Non-float inputs (bool masks) and None pass through unchanged. ``differentiable``:
    which copies require grad (default: every floating one).
    """
    dtypes = _per_input(dtype, len(inputs))
    needs = _per_input(differentiable, len(inputs))
    out = []
    for t, dt, need in zip(inputs, dtypes, needs):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            out.append(t)
            continue
        dt = dt or t.dtype
        copy = torch.empty_strided(t.shape, t.stride(), dtype=dt, device=t.device)
        copy.copy_(t.detach())
        out.append(copy.requires_grad_(True if need is None else bool(need)))
    return out


class Result(NamedTuple):
    outputs: Tuple[torch.Tensor, ...]
    """Detached outputs."""
    grads: Tuple[Optional[torch.Tensor], ...]
    """Gradient of each input (None where it needs none)."""
    param_grads: Dict[str, Optional[torch.Tensor]]
    """Gradient of each parameter of ``module`` by name (empty without a module)."""


def grad_outputs_like(outputs, seed: Optional[int] = None) -> List[torch.Tensor]:
    """Random float64 cotangents shaped as ``outputs`` (a tensor or a tuple), from
    ``seed``, or from the global generator when ``seed`` is None."""
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in outputs]


def forward_backward(
    fn: Callable,
    inputs: Sequence,
    grad_outs: Optional[Sequence[torch.Tensor]] = None,
    module: Optional[torch.nn.Module] = None,
    seed: Optional[int] = None,
) -> Result:
    """``fn(*inputs)``, then backward of ``sum(out * grad_out)``; see :class:`Result`.

    ``inputs`` are used as given (make them with :func:`leaves`). ``grad_outs``: one
    cotangent per output, cast to the output's dtype (default: random, from ``seed``).
    """
    if module is not None:
        module.zero_grad(set_to_none=True)
    outs = fn(*inputs)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    if grad_outs is None:
        grad_outs = grad_outputs_like(outs, seed)
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    params = [] if module is None else [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    targets = wanted + [p for _, p in params]
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grad_outs) if o.requires_grad]
    found = [None] * len(targets)
    if targets and pairs:
        found = torch.autograd.grad(
            [o for o, _ in pairs], targets, [g for _, g in pairs], allow_unused=True
        )
    by_id = {id(t): g for t, g in zip(wanted, found[: len(wanted)])}
    grads = tuple(by_id.get(id(t)) if isinstance(t, torch.Tensor) else None for t in inputs)
    param_grads = {n: g for (n, _), g in zip(params, found[len(wanted):])}
    return Result(tuple(o.detach() for o in outs), grads, param_grads)


def check_against_float64(
    fn: Callable,
    reference: Callable,
    inputs: Sequence,
    dtype: DTypes,
    *,
    names: Optional[Sequence[str]] = None,
    differentiable: Union[bool, Sequence[bool], None] = None,
    grad_outs: Optional[Sequence[torch.Tensor]] = None,
    seed: Optional[int] = None,
    compare_dtype: Optional[torch.dtype] = None,
    backward: bool = True,
) -> Result:
    """Check ``fn`` against ``reference`` by the accuracy rule; return ``fn``'s result.

    ``reference(*inputs)`` runs twice: in float64 (the exact answer) and in ``dtype``
    (the baseline: plain PyTorch in the same precision); ``fn`` runs in ``dtype``.
    Every output and the gradient of every differentiable input are compared with
    :func:`assert_within_baseline`; ``names`` label the inputs in messages.
    ``compare_dtype``: the precision the floor is taken for (default: each tensor's).
    ``backward=False``: ``fn`` runs under ``torch.no_grad()`` (an inference path) and
    only the outputs are compared.
    Every run gets the same float64 cotangents (default: random from ``seed``), cast
    to each run's output dtype; pass cotangents rounded to the low precision to take
    their rounding out of the comparison.
    """
    names = list(names or [f"input {i}" for i in range(len(inputs))])
    exact_inputs = leaves(inputs, torch.float64, differentiable)
    if grad_outs is None:
        with torch.no_grad():
            grad_outs = grad_outputs_like(reference(*exact_inputs), seed)
    exact = forward_backward(reference, exact_inputs, grad_outs)
    base = forward_backward(reference, leaves(inputs, dtype, differentiable), grad_outs)
    if backward:
        fast = forward_backward(fn, leaves(inputs, dtype, differentiable), grad_outs)
    else:
        with torch.no_grad():
            fast = forward_backward(fn, leaves(inputs, dtype, False))
    for i, (f, e, b) in enumerate(zip(fast.outputs, exact.outputs, base.outputs)):
        if f.dtype != b.dtype:
            raise AssertionError(f"output {i}: dtype {f.dtype}, the reference gives {b.dtype}")
        assert_within_baseline(f"output {i}", f, e, b, dtype=compare_dtype or f.dtype)
    for name, f, e, b in zip(names, fast.grads, exact.grads, base.grads):
        if e is None:
            continue
        if f is None:
            raise AssertionError(f"grad of {name}: missing (the reference has one)")
        if f.dtype != b.dtype:
            raise AssertionError(f"grad of {name}: dtype {f.dtype}, the reference gives {b.dtype}")
        assert_within_baseline(f"grad of {name}", f, e, b, dtype=compare_dtype or f.dtype)
    return fast


def assert_deterministic(
    fn: Callable,
    inputs: Sequence,
    *,
    module: Optional[torch.nn.Module] = None,
    names: Optional[Sequence[str]] = None,
    runs: int = 2,
    seed: int = 0,
) -> Result:
    """Run ``fn(*inputs)`` forward and backward ``runs`` times (same cotangents); every
    output, input gradient and parameter gradient must be bitwise equal each time."""
    names = list(names or [f"input {i}" for i in range(len(inputs))])
    first = forward_backward(fn, inputs, module=module, seed=seed)
    if not any(g is not None for g in first.grads) and not first.param_grads:
        raise AssertionError("no gradient to compare: make the inputs with leaves()")
    for run in range(1, runs):
        again = forward_backward(fn, inputs, module=module, seed=seed)
        pairs = [(f"output {i}", a, b) for i, (a, b) in enumerate(zip(first.outputs, again.outputs))]
        pairs += [(f"grad of {n}", a, b) for n, a, b in zip(names, first.grads, again.grads)]
        pairs += [(f"grad of {n}", first.param_grads[n], again.param_grads[n]) for n in first.param_grads]
        for label, a, b in pairs:
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                raise AssertionError(f"{label}: run {run + 1} differs from run 1 (not bitwise deterministic)")
    return first


# Ops that read a device value on the host or build a tensor from host data: each is a
# host<->device transfer or a sync on a GPU, which CUDA graph capture refuses.
_HOST_SYNC_OPS = {
    "aten._local_scalar_dense": "a host read of a tensor value (.item(), bool(t), int(t), float(t))",
    # Seen instead of _local_scalar_dense inside a custom op's body (autograd keys
    # excluded there, so these composite ops reach the mode undecomposed).
    "aten.item": "a host read of a tensor value (.item(), int(t), float(t))",
    "aten.is_nonzero": "a host read of a tensor value (bool(t), if t: ...)",
    "aten.equal": "a host read of a comparison (torch.equal)",
    "aten.allclose": "a host read of a comparison (torch.allclose)",
    "aten.nonzero": "an output sized by the data (nonzero / boolean indexing)",
    "aten.nonzero_static": None,  # sized by its argument: no sync
    # Composite ops over nonzero, seen undecomposed inside a custom op's body.
    "aten.nonzero_numpy": "an output sized by the data (nonzero(as_tuple=True))",
    "aten.argwhere": "an output sized by the data (argwhere)",
    "aten.masked_select": "an output sized by the data (masked_select / boolean indexing)",
    "aten._unique": "an output sized by the data (unique)",
    "aten._unique2": "an output sized by the data (unique)",
    "aten.unique_dim": "an output sized by the data (unique)",
    "aten.unique_consecutive": "an output sized by the data (unique_consecutive)",
    "aten.unique_dim_consecutive": "an output sized by the data (unique_consecutive)",
    "aten.bincount": "an output sized by the data (bincount: max(input) + 1 bins)",
    "aten._pin_memory": "a pinned host buffer (host memory allocated per call)",
}


class forbid_host_sync(TorchDispatchMode):
    """Raise ``AssertionError`` on any op that would read a device value on the host,
    build a tensor from host data, or copy between devices.

    Use as a context manager around a forward and backward: on a GPU each such op is a
    host<->device transfer or a stream sync that CUDA graph capture refuses
    (``cudaErrorStreamCaptureUnsupported`` / ``...Implicit``); on the CPU the same code
    paths run, so the check holds there too. Custom ops of ``namespaces`` (default
    ``foldops``) are entered: their Python bodies run under the mode, so the launchers
    inside are checked as well. Not seen: device synchronisation and other CUDA
    runtime calls that bypass the dispatcher, ``Tensor.tolist()`` of a CPU tensor (no
    op is dispatched; on a GPU it is a copy to the host, which is seen), and work done
    before the mode is entered.
    """

    def __init__(self, namespaces: Sequence[str] = ("foldops",)):
        super().__init__()
        self.namespaces = tuple(namespaces)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = str(func.overloadpacket)
        reason = _HOST_SYNC_OPS.get(packet)
        if reason is None and packet in ("aten._to_copy", "aten.copy_"):
            reason = _cross_device(func, args, kwargs)
        if reason is None and packet in _DATA_DEPENDENT:
            reason = _DATA_DEPENDENT[packet](func, args, kwargs)
        if reason is not None:
            raise AssertionError(f"forbid_host_sync: {func} is {reason}")
        if func.namespace in self.namespaces:
            body = _custom_op_body(func)
            if body is not None:
                with self:  # the op's Python body, under this mode
                    return body(*args, **kwargs)
        return func(*args, **kwargs)


def _cross_device(func, args, kwargs) -> Optional[str]:
    """Why a ``_to_copy`` / ``copy_`` call moves data between devices, or None."""
    if str(func.overloadpacket) == "aten._to_copy":
        src, dst = args[0].device, kwargs.get("device") or args[0].device
    else:
        dst, src = args[0].device, args[1].device if isinstance(args[1], torch.Tensor) else args[0].device
    if torch.device(src).type != torch.device(dst).type:
        return f"a copy from {src} to {dst} (a host<->device transfer)"
    return None


def _arg(args, kwargs, index: int, name: str, default=None):
    """Argument ``name`` (position ``index``) of an aten call."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _host_scalar(value, self: torch.Tensor) -> bool:
    """Whether ``value`` is a one-element host tensor beside a device ``self``: read on
    the host without a sync (a Python number in ``x[mask] = 1.0``). On the CPU every
    tensor is a host tensor, so there a one-element tensor value counts as a device
    value: that is what it is where the same code runs on a GPU."""
    return (isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type == "cpu"
            and self.device.type != "cpu")


def _index(func, args, kwargs) -> Optional[str]:
    if any(_is_mask(t) for t in _arg(args, kwargs, 1, "indices", ())):
        return "an output sized by the data (indexing with a boolean mask)"
    return None


def _index_put(func, args, kwargs) -> Optional[str]:
    """A boolean index is turned into positions by nonzero, except for one mask and a
    host scalar without accumulation (``x[mask] = 1.0``: a masked_fill)."""
    indices = [t for t in _arg(args, kwargs, 1, "indices", ()) if t is not None]
    if not any(_is_mask(t) for t in indices):
        return None
    value, accumulate = _arg(args, kwargs, 2, "values"), _arg(args, kwargs, 3, "accumulate", False)
    if len(indices) == 1 and not accumulate and _host_scalar(value, args[0]):
        return None
    return "an output sized by the data (index_put_ / x[mask] = value with a boolean mask)"


def _lift_fresh(func, args, kwargs) -> Optional[str]:
    """A tensor built from host data, except a Python number wrapped as a 0-d host tensor
    (``x[mask] = 1.0``, ``x + 2``): it stays on the host, and using it beside a device
    tensor costs no transfer (the ops that would read it are checked on their own)."""
    if isinstance(args[0], torch.Tensor) and args[0].dim() == 0 and args[0].device.type == "cpu":
        return None
    return "a tensor built from host data (torch.tensor / torch.as_tensor)"


def _masked_fill(func, args, kwargs) -> Optional[str]:
    if func._overloadname == "Tensor" and not _host_scalar(_arg(args, kwargs, 2, "value"), args[0]):
        return "a host read of a tensor value (masked_fill with a tensor value: value.item())"
    return None


def _repeat_interleave(func, args, kwargs) -> Optional[str]:
    """Repeats given as a tensor size the output by their sum unless ``output_size`` is."""
    repeats = args[0] if func._overloadname == "Tensor" else _arg(args, kwargs, 1, "repeats")
    if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
        return "an output sized by the data (repeat_interleave of tensor repeats without output_size)"
    return None


def _histc(func, args, kwargs) -> Optional[str]:
    """histc's default range (min == max) is the data's min and max, read on the host."""
    if _arg(args, kwargs, 2, "min", 0) == _arg(args, kwargs, 3, "max", 0):
        return "a host read of the data's range (histc without min < max)"
    return None


def _narrow(func, args, kwargs) -> Optional[str]:
    if func._overloadname == "Tensor":
        return "a host read of a tensor value (narrow with a tensor start)"
    return None


def _where(func, args, kwargs) -> Optional[str]:
    if func._overloadname == "default":  # where(condition), the one-argument form
        return "an output sized by the data (where(condition): nonzero)"
    return None


# Ops that sync for some arguments only: packet -> (func, args, kwargs) -> reason or None.
_DATA_DEPENDENT: Dict[str, Callable[..., Optional[str]]] = {
    "aten.index": _index,
    "aten._unsafe_index": _index,
    "aten.lift_fresh": _lift_fresh,
    "aten.lift_fresh_copy": _lift_fresh,
    "aten.index_put": _index_put,
    "aten.index_put_": _index_put,
    "aten._index_put_impl_": _index_put,
    "aten._unsafe_index_put": _index_put,
    "aten.masked_fill": _masked_fill,
    "aten.masked_fill_": _masked_fill,
    "aten.repeat_interleave": _repeat_interleave,
    "aten.histc": _histc,
    "aten.narrow": _narrow,
    "aten.where": _where,
}


def _custom_op_body(func) -> Optional[Callable]:
    """The Python function registered as the custom op ``func`` (torch.library.custom_op
    or triton_op), or None."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(f"{func.namespace}::{func._opname}")
    return None if opdef is None else opdef._init_fn
