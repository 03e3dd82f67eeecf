"""Helpers shared by foldops's Triton kernels (imported lazily, with Triton)."""

from __future__ import annotations

import functools

import numpy as np


def _f32_to_bf16_rtne(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), rounding to nearest even as the GPU does."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


@functools.lru_cache(maxsize=None)
def patch_interpreter_bf16() -> bool:
    """Make bf16 behave as on the GPU under the Triton interpreter.

    The interpreter (seen in Triton 3.9) stores bf16 as uint16 bit patterns and

    - hands them to ``np.matmul`` unconverted, so ``tl.dot`` on bf16 returns garbage:
      bf16 operands are widened to fp32 first (the exact products a tensor core forms,
      accumulated in fp32);
    - truncates fp32 -> bf16 casts (round toward zero), which doubles the rounding
      error of every cast: they round to nearest even here, as compiled kernels do.

    Applied only when the interpreter runs; compiled kernels are untouched. Returns
    whether the patch was installed.
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - no Triton
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    create_dot = getattr(builder, "create_dot", None)
    cast_impl = getattr(builder, "cast_impl", None)
    if create_dot is None or cast_impl is None or getattr(create_dot, "_foldops", False):
        return False

    def widen(handle):
        if handle.dtype == tl.bfloat16:
            bits = handle.data.astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return handle

    @functools.wraps(create_dot)
    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    @functools.wraps(cast_impl)
    def patched_cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_f32_to_bf16_rtne(src.data), dst_type.scalar)
        return cast_impl(self, src, dst_type)

    patched_dot._foldops = True
    builder.create_dot = patched_dot
    builder.cast_impl = patched_cast
    return True


def cdiv(a, b):
    """ceil(a / b) for ints, also symbolic ones under torch.compile. Same numbers as
    ``triton.cdiv``, whose host call (a JIT function) costs microseconds."""
    return (a + b - 1) // b


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1), as ``triton.next_power_of_2``."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def register_op(name: str):
    """Decorator: register ``fn`` as the custom op ``name`` with ``fn`` as its body.

    ``torch.library.triton_op`` where kernels compile (torch.compile sees and schedules
    the Triton launches inside); under the Triton interpreter an opaque
    ``torch.library.custom_op`` instead, since tracing cannot capture interpreted
    launches. The body is also the fake implementation either way.
    """
    import torch
    from torch.library import triton_op

    from foldops.device import triton_interpret

    def register(fn):
        if triton_interpret():
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fn)
            return op
        return triton_op(name, mutates_args=())(fn)

    return register


def use_registered_ops(t) -> bool:
    """Whether a call on ``t`` must go through the registered custom ops rather than the
    eager autograd.Function with direct launches: under torch.compile, on fake or meta
    tensors, inside a dispatch mode (FakeTensorMode, FlopCounterMode, ...) or a
    torch.func transform."""
    import torch
    from torch._subclasses.fake_tensor import is_fake
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode

    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode() or torch._C._are_functorch_transforms_active():
        return True
    if t.is_meta:
        return True
    # A plain tensor that is not a functional wrapper cannot be fake: skips is_fake's
    # few microseconds on every eager call.
    kind = type(t)
    if (kind is torch.Tensor or kind is torch.nn.Parameter) and not torch._is_functional_tensor(t):
        return False
    return is_fake(t)


def mask_bytes(mask):
    """A keep-mask as uint8 for a kernel argument: a free view of a real bool tensor's
    0/1 bytes; a conversion while tracing (Inductor cannot lower a bool -> uint8 view)
    and for other dtypes."""
    import torch

    if mask.dtype == torch.bool and not use_registered_ops(mask):
        return mask.view(torch.uint8)
    return mask.to(torch.uint8)
