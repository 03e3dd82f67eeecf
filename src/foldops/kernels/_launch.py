"""How every foldops Triton kernel is launched: traceable under torch.compile, and cheap
on the host in eager code.

``launcher(kernel)[grid](*args, **meta)`` is ``wrap_triton(kernel)[grid](*args, **meta)``
with a faster eager path (the same call shape, so tests and tools can stand in a
recorder for ``launcher`` in a launch module). Triton's own launch (``kernel[grid](...)``) binds the
arguments, builds a string cache key, looks the compiled kernel up and collects
profiler metadata on every call: measured on an H100 with Triton 3.6, 29 us of host
time per launch against 8.5 us for calling the compiled kernel's launcher directly
(``benchmarks/tools/launch_overhead.py``). An op issues three to eight launches, so
at small N that difference is most of its host time.

The fast path keeps its own cache from a key at least as fine as Triton's
specialisation: per tensor its dtype and whether its address is 16-byte aligned, per
int whether it is 1, divisible by 16 and within int32, the type of every other
argument, and every constexpr (keyword or positional) and launch option by value. A miss launches through
Triton (which compiles if needed) and stores the compiled kernel; a hit calls its
launcher with the current stream. It is taken only

- in eager code that turned ``wrap_triton`` off (the ops' autograd.Functions; under
  torch.compile or a dispatch mode the launch must be traced instead),
- on a Triton version whose launcher signature was checked (``_VERIFIED``),
- with no Triton launch hooks installed (profilers such as proton need the slow path's
  metadata), and not under the interpreter,
- and not when ``FOLDOPS_DIRECT_LAUNCH`` is ``0``, ``false``, ``off`` or ``no`` (the switch
  back to Triton's own launch).

The cache key once ignored constexprs passed positionally (the IPA kernels' C and D), so
two IPA shapes with the same padded widths shared a binary that reads and writes past
rows of the smaller one: an illegal memory access in a later test of an H100 run. With
the key fixed, the whole GPU suite passed on an H100 with direct launches on
(tests/kernels/test_launch.py compares them with Triton's launch).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch
import triton
from torch._library.triton import is_wrap_triton_enabled
from torch.library import wrap_triton

from foldops.device import triton_interpret

# Triton versions whose CompiledKernel.run(grid0, grid1, grid2, stream, function,
# packed_metadata, launch_metadata, enter_hook, exit_hook, *all_args) was checked
# against kernel[grid] on a GPU (tests/kernels/test_launch.py).
_VERIFIED = ((3, 6),)

_INT32 = 2**31


def _version() -> Tuple[int, ...]:
    try:
        return tuple(int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:  # a local build's odd version string
        return ()


_OFF = ("0", "false", "off", "no")  # values of FOLDOPS_DIRECT_LAUNCH that turn it off


def _off_reason() -> Optional[str]:
    """Why eager launches go through Triton's ``kernel[grid]`` here, or None (direct)."""
    # NVIDIA only: ROCm's Triton also specialises tensors on their size (buffer ops), and
    # other devices have their own current device and stream.
    if torch.version.cuda is None or torch.version.hip is not None:
        return "not an NVIDIA CUDA build of PyTorch"
    if _version() not in _VERIFIED:
        return f"Triton {triton.__version__} not among the checked versions {_VERIFIED}"
    if triton_interpret():
        return "TRITON_INTERPRET=1"
    switch = os.environ.get("FOLDOPS_DIRECT_LAUNCH", "1")
    if switch.strip().lower() in _OFF:
        return f"FOLDOPS_DIRECT_LAUNCH={switch}"
    return None


_DIRECT = _off_reason() is None


def describe() -> str:
    """How eager launches go here, and why (``foldops doctor``)."""
    if _DIRECT:
        return ("direct (compiled kernels' launchers from foldops's cache, Triton's own launch while "
                "launch hooks are installed or under torch.compile; FOLDOPS_DIRECT_LAUNCH=0 turns it off)")
    return f"through Triton's kernel[grid] ({_off_reason()})"


_CACHE: Dict[tuple, tuple] = {}


def _arg_key(a: Any):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() & 15 == 0
    if type(a) is int:
        return a == 1, a & 15 == 0, -_INT32 <= a < _INT32
    return type(a)


def _hook_set(hook) -> bool:
    # Newer Tritons hold the hooks in an always-present HookChain; older ones use None.
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_installed() -> bool:
    runtime = triton.knobs.runtime
    return _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook)


def _tail(kernel, n_args: int, meta: Dict[str, Any]) -> tuple:
    """The values of the parameters after the positional ones, in signature order
    (the launcher takes every parameter, constexprs included)."""
    values = []
    for param in kernel.params[n_args:]:
        if param.name in meta:
            values.append(meta[param.name])
        elif param.has_default:
            values.append(param.default)
        else:
            raise TypeError(f"{kernel.fn.__name__}: missing argument {param.name!r}")
    return tuple(values)


_CONSTEXPR_POSITIONS: Dict[Any, Tuple[int, ...]] = {}


def _constexpr_positions(kernel) -> Tuple[int, ...]:
    """Indices of the kernel's constexpr parameters: passed positionally, their values
    must key the cache (the compiled launcher ignores them; the binary has them baked in)."""
    found = _CONSTEXPR_POSITIONS.get(kernel)
    if found is None:
        found = tuple(i for i, p in enumerate(kernel.params) if p.is_constexpr)
        _CONSTEXPR_POSITIONS[kernel] = found
    return found


def _key(kernel, device: int, args: tuple, meta: Dict[str, Any]) -> tuple:
    n = len(args)
    consts = tuple(args[i] for i in _constexpr_positions(kernel) if i < n)
    return kernel, device, tuple(map(_arg_key, args)), consts, tuple(meta.items())


def launch(kernel, grid: Tuple[int, ...], *args: Any, **meta: Any) -> None:
    """Launch the ``@triton.jit`` ``kernel`` on ``grid`` (1-3 ints) with positional
    ``args`` (every non-constexpr parameter, in order) and keyword ``meta`` (constexprs
    and launch options such as ``num_warps``)."""
    if is_wrap_triton_enabled() or _hooks_installed():
        wrap_triton(kernel)[grid](*args, **meta)
        return
    device = torch._C._cuda_getDevice()  # as Triton: the current device, not the tensors'
    key = _key(kernel, device, args, meta)
    entry = _CACHE.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **meta)
        _CACHE[key] = (compiled, _tail(kernel, len(args), meta))
        return
    compiled, tail = entry
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = torch._C._cuda_getCurrentRawStream(device)
    compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *args, *tail)


class _Launcher:
    __slots__ = ("kernel",)

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid: Tuple[int, ...]):
        kernel = self.kernel
        return lambda *args, **meta: launch(kernel, grid, *args, **meta)


def launcher(kernel):
    """``launcher(kernel)[grid](*args, **meta)``: ``launch`` in ``wrap_triton``'s shape;
    ``wrap_triton`` itself while direct launches are off (nothing added per launch)."""
    return _Launcher(kernel) if _DIRECT else wrap_triton(kernel)
