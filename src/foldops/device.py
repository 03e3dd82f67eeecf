"""Device runtime: the one place that knows about CUDA, XPU and MPS.

Everything else in foldops asks this module which device to use, how to autocast
there, and how to read memory, so that the same code runs on an NVIDIA GPU, an
Intel XPU, Apple MPS or a plain CPU. Nothing here touches a device at import time.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional, Tuple, Union

import torch

DeviceLike = Union[str, torch.device, None]

_DEVICE_TYPES = ("cuda", "xpu", "mps", "cpu")


def _xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


def _available(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available()
    if device_type == "xpu":
        return _xpu_available()
    if device_type == "mps":
        return _mps_available()
    return device_type == "cpu"


def resolve_device(device: DeviceLike = "auto") -> torch.device:
    """Turn ``"auto"``, a device string or a ``torch.device`` into a ``torch.device``.

    ``"auto"`` (or ``None``) prefers CUDA, then XPU, then MPS, then CPU. An explicit
    device type that this machine does not have raises ``ValueError``.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        for device_type in _DEVICE_TYPES:
            if _available(device_type):
                return torch.device(device_type)
        return torch.device("cpu")  # pragma: no cover - cpu is always available
    if not isinstance(device, (str, torch.device)):
        raise TypeError(
            f"device: expected 'auto', a device string or torch.device, got {type(device).__name__}"
        )
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(
            f"device: expected 'auto' or one of {_DEVICE_TYPES} (optionally ':index'), got {device!r}"
        ) from exc
    if dev.type not in _DEVICE_TYPES and dev.type != "meta":
        raise ValueError(f"device: unsupported device type {dev.type!r}; expected one of {_DEVICE_TYPES}")
    if dev.type != "meta" and not _available(dev.type):
        raise ValueError(f"device: {dev.type!r} was requested but is not available on this machine")
    return dev


def device_type_of(obj: Union[torch.Tensor, DeviceLike]) -> str:
    """The device type string ('cuda', 'cpu', ...) of a tensor or device-like."""
    if isinstance(obj, torch.Tensor):
        return obj.device.type
    if obj is None or obj == "auto":
        return resolve_device(obj).type
    return torch.device(obj).type


# Autocast ------------------------------------------------------------------------------

def autocast_device_type(obj: Union[torch.Tensor, DeviceLike]) -> str:
    """Device type to hand to ``torch.autocast`` for ``obj``.

    Autocast is keyed by device type, so an fp32 guard written as
    ``torch.autocast("cuda", enabled=False)`` does nothing on CPU, XPU or MPS: the guarded
    region silently runs in bf16 there. Use ``fp32_region(x)`` (or this helper) instead.
    """
    device_type = device_type_of(obj)
    return device_type if device_type in _DEVICE_TYPES else "cpu"


def default_autocast_dtype(device_type: str) -> torch.dtype:
    """bf16 where the device does it well, fp16 on MPS before bf16 support."""
    if device_type == "mps" and not _mps_supports_bf16():
        return torch.float16
    return torch.bfloat16


def _mps_supports_bf16() -> bool:
    # bf16 on MPS needs macOS 14; torch reports it through a probe allocation.
    try:
        torch.empty(1, dtype=torch.bfloat16, device="mps")
        return True
    except Exception:  # pragma: no cover - only on old macOS
        return False


def autocast(
    device: Union[torch.Tensor, DeviceLike] = "auto",
    dtype: Optional[torch.dtype] = None,
    enabled: bool = True,
) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for whatever device ``device`` is, with a dtype it supports.

    ``dtype=None`` picks bf16 (fp16 on MPS without bf16). ``enabled=False`` gives a
    region with autocast off for that device type.
    """
    device_type = autocast_device_type(device)
    if dtype is None:
        dtype = default_autocast_dtype(device_type)
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: autocast dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled)


def fp32_region(obj: Union[torch.Tensor, DeviceLike]) -> contextlib.AbstractContextManager:
    """A region where autocast is off on ``obj``'s device type (fp32-guarded math)."""
    return torch.autocast(device_type=autocast_device_type(obj), enabled=False)


def autocast_dtype_in_effect(obj: Union[torch.Tensor, DeviceLike]) -> Optional[torch.dtype]:
    """The autocast dtype active for ``obj``'s device type, or ``None`` if autocast is off."""
    device_type = autocast_device_type(obj)
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


# Memory and synchronisation ------------------------------------------------------------

def _module_for(device: torch.device):
    """The torch.<device> module for memory/sync calls, or None (CPU, or not available)."""
    if device.type == "cuda":
        return torch.cuda
    if device.type == "xpu" and hasattr(torch, "xpu"):
        return torch.xpu
    if device.type == "mps" and hasattr(torch, "mps"):
        return torch.mps
    return None


def synchronize(device: DeviceLike = "auto") -> None:
    """Wait for all work queued on ``device``; a no-op on CPU."""
    dev = resolve_device(device)
    module = _module_for(dev)
    if module is not None:
        module.synchronize()


def empty_cache(device: DeviceLike = "auto") -> None:
    """Return cached allocator blocks to the device; a no-op on CPU."""
    dev = resolve_device(device)
    module = _module_for(dev)
    if module is not None and hasattr(module, "empty_cache"):
        module.empty_cache()


def reset_peak_memory(device: DeviceLike = "auto") -> bool:
    """Reset the peak-memory counter; returns False where the device has none."""
    dev = resolve_device(device)
    if dev.type in ("cuda", "xpu"):
        _module_for(dev).reset_peak_memory_stats(dev)
        return True
    return False


def peak_memory_bytes(device: DeviceLike = "auto") -> Optional[int]:
    """Peak bytes allocated since the last reset, or ``None`` where it cannot be read.

    CUDA and XPU report a true peak; MPS only reports current allocation (returned as the
    best available lower bound); CPU has no allocator counter (use a process RSS probe).
    """
    dev = resolve_device(device)
    if dev.type in ("cuda", "xpu"):
        return int(_module_for(dev).max_memory_allocated(dev))
    if dev.type == "mps":
        return int(torch.mps.current_allocated_memory())
    return None


def memory_allocated_bytes(device: DeviceLike = "auto") -> Optional[int]:
    """Bytes currently allocated by the device allocator, or ``None`` on CPU."""
    dev = resolve_device(device)
    if dev.type in ("cuda", "xpu"):
        return int(_module_for(dev).memory_allocated(dev))
    if dev.type == "mps":
        return int(torch.mps.current_allocated_memory())
    return None


def free_memory_bytes(device: DeviceLike = "auto") -> Optional[int]:
    """Memory a new allocation on an accelerator can get, in bytes, or None where it
    cannot be queried (CPU, MPS, an XPU runtime without ``mem_get_info``). On CUDA that
    is the driver's free memory plus the blocks PyTorch's caching allocator holds but
    does not use (it releases them to the driver before it fails an allocation): in a
    warm process the driver's figure alone can be a small part of what is available.
    The allocator's counters come from its nested statistics (tens of microseconds):
    ``memory_reserved`` / ``memory_allocated`` flatten every statistic first, about
    250 us each on an H200 host, which the ops paid on every call."""
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    try:
        if dev.type == "cuda":
            stats = torch.cuda.memory_stats_as_nested_dict(dev)
            cached = 0
            if stats:  # {} before the allocator's first use
                cached = stats["reserved_bytes"]["all"]["current"] - stats["allocated_bytes"]["all"]["current"]
            return torch.cuda.mem_get_info(dev)[0] + cached
        if dev.type == "xpu" and hasattr(torch.xpu, "mem_get_info"):
            return torch.xpu.mem_get_info(dev)[0]
    except RuntimeError:
        return None
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error on any backend."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    message = str(exc).lower()
    # MPS/XPU say "out of memory"; a refused host allocation says "can't allocate memory".
    return "out of memory" in message or "can't allocate memory" in message


def device_name(device: DeviceLike = "auto") -> str:
    """A human-readable name, e.g. 'NVIDIA H100 80GB HBM3' or 'cpu'."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "xpu":
        return torch.xpu.get_device_name(dev)
    if dev.type == "mps":
        return "Apple MPS"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


# Triton kernels ------------------------------------------------------------------------

def triton_interpret() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


@functools.lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    """None if Triton imports, else why not (checked once, lazily)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        how = (
            "pip install 'foldops[triton]' (or pip install triton; PyTorch's CUDA wheels for "
            "Linux include it). Triton runs on Linux x86_64 with an NVIDIA GPU; elsewhere the "
            "torch backends run"
        )
        if not (isinstance(exc, ModuleNotFoundError) and exc.name == "triton"):
            how = "reinstall it: " + how
        return f"triton is not importable ({type(exc).__name__}: {exc}); {how}"
    return None


MIN_KERNEL_CAPABILITY = (8, 0)


def nvidia_capability(device: Union[torch.Tensor, DeviceLike]) -> Optional[Tuple[int, int]]:
    """Compute capability of an NVIDIA CUDA device (not ROCm), or ``None`` for any other
    device. For ops that use PyTorch's own CUDA-only kernels (flash attention)."""
    dev = device.device if isinstance(device, torch.Tensor) else torch.device(device)
    if dev.type != "cuda" or torch.version.hip is not None or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(dev)


def kernel_support(device: Union[torch.Tensor, DeviceLike], explicit: bool = True) -> Optional[str]:
    """Why foldops's Triton kernels cannot run on ``device``, or ``None`` if they can.

    They run on CUDA devices of compute capability >= 8.0 with Triton importable, and
    on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1) when asked for
    explicitly (``explicit=True``): ``auto`` never picks the interpreter, it is for tests.
    """
    dev = device.device if isinstance(device, torch.Tensor) else resolve_device(device)
    if dev.type != "cuda" and not triton_interpret():
        # Decided without importing Triton (half a second, on every CPU-only first call).
        return f"Triton kernels need a CUDA device, got {dev.type}"
    # While torch.compile traces, the uncached body (Dynamo warns on lru_cache wrappers).
    reason = triton_import_error.__wrapped__() if torch.compiler.is_compiling() else triton_import_error()
    if reason is not None:
        return reason
    if triton_interpret():
        if dev.type == "cpu":
            return None if explicit else "TRITON_INTERPRET=1: the interpreter runs only when named"
        return f"TRITON_INTERPRET=1 runs kernels on CPU tensors only, got {dev.type}"
    if dev.type != "cuda":
        return f"Triton kernels need a CUDA device, got {dev.type}"
    capability = compute_capability(dev)  # cached: this check runs on every op call
    if capability < MIN_KERNEL_CAPABILITY:
        return (
            f"compute capability {capability[0]}.{capability[1]} < "
            f"{MIN_KERNEL_CAPABILITY[0]}.{MIN_KERNEL_CAPABILITY[1]}"
        )
    return None


@functools.lru_cache(maxsize=None)
def sdpa_has_fused_kernels(device: torch.device) -> bool:
    """Whether ``scaled_dot_product_attention`` has fused kernels on ``device`` that never
    hold the score matrix (CUDA/ROCm and CPU); elsewhere its math fallback does."""
    return device.type in ("cuda", "cpu")


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a CPU tensor) on ``device``, in one copy that does not stop the host.

    On CUDA, ``.to(device)`` from pageable memory waits for the stream to drain (the host
    stops until the GPU is idle); here ``t`` is first copied into pinned (page-locked)
    memory and sent with ``non_blocking=True``, queued like a kernel. PyTorch's caching
    host allocator keeps the pinned block out of reuse until that copy has run, and
    ``t`` itself is not read after this returns. Elsewhere a plain ``.to(device)``."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def is_rocm() -> bool:
    """True on a ROCm (HIP) build of PyTorch, whose "cuda" devices are AMD GPUs."""
    return torch.version.hip is not None


def _cuda_index(device: Union[torch.Tensor, DeviceLike, int]) -> int:
    """The CUDA device index of a tensor, device, string or index (None: the current one)."""
    if isinstance(device, torch.Tensor):
        device = device.device
    if isinstance(device, torch.device):
        index = device.index
    else:
        index = device if device is None or isinstance(device, int) else torch.device(device).index
    return torch.cuda.current_device() if index is None else index


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def compute_capability(device: Union[torch.Tensor, DeviceLike, int] = None) -> tuple[int, int]:
    """``(major, minor)`` compute capability of a CUDA device, cached per device for the
    launchers' per-call checks (asks the driver on first use, never at import). Whether
    kernels run at all is ``kernel_support``'s rule."""
    return _capability(_cuda_index(device))


def multiprocessor_count(device: Union[torch.Tensor, DeviceLike, int] = None) -> int:
    """Streaming multiprocessors (SMs; compute units on ROCm) of a CUDA device (cached)."""
    return _multiprocessors(_cuda_index(device))


@contextlib.contextmanager
def device_guard(device: torch.device) -> Iterator[None]:
    """Make ``device`` current for launches (CUDA/XPU); a no-op elsewhere."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    elif device.type == "xpu":
        with torch.xpu.device(device):
            yield
    else:
        yield


def device_class(device: torch.device) -> str:
    """The class of ``device`` that measured rules are keyed by (``foldops.backend_rules``):
    ``"cuda-sm<major><minor>"`` for NVIDIA GPUs (``"cuda-sm90"``: H100), ``"rocm"`` for AMD
    GPUs, else the device type (``"cpu"``, ``"xpu"``, ``"mps"``)."""
    if device.type != "cuda":
        return device.type
    if is_rocm():
        return "rocm"
    major, minor = compute_capability(device)
    return f"cuda-sm{major}{minor}"


def cuda_graph_capturing() -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph (a host read
    of a device value is illegal then). False without CUDA; never initialises CUDA."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def capture_cuda_graph(fn, pool=None):
    """Capture ``fn()`` into a CUDA graph; return ``(graph, fn's result)``.

    On failure the error is raised after the CUDA state that a failed capture leaves
    behind is reset, so that later work in the process still runs: ``capture_end``
    raises before it ends the capture of the default CUDA generator, after which every
    random op of the process fails with "Offset increment outside graph capture
    encountered unexpectedly"; and the capture stream stays current. Here the stream
    that was current before the capture is made current again, and an empty-handed
    capture (an in-place add, no allocation) on a fresh stream ends the generator's
    capture state.
    """
    graph = torch.cuda.CUDAGraph()
    before = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph, pool=pool):
            result = fn()
    except BaseException:
        _reset_after_failed_capture(before)
        raise
    return graph, result


def _reset_after_failed_capture(before) -> None:
    torch.cuda.set_stream(before)
    scratch = torch.zeros(1, device=before.device)
    stream = torch.cuda.Stream(before.device)
    stream.wait_stream(torch.cuda.current_stream())
    rescue = torch.cuda.CUDAGraph()
    with torch.cuda.graph(rescue, stream=stream):  # capture_end ends the generator's capture
        scratch.add_(1)
    torch.cuda.current_stream(before.device).wait_stream(stream)
    torch.cuda.synchronize(before.device)
