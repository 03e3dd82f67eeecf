"""The shared kernel launcher (``foldops.kernels._launch``): its cache key is at least
as fine as Triton's specialisation, its argument order is the kernel's, and on the GPU
its direct launches give what Triton's own launch gives."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from torch._library.triton import set_wrap_triton_enabled  # noqa: E402

from foldops.kernels import _launch  # noqa: E402


def _affine(x_ptr, out_ptr, n, scale, SHIFT: tl.constexpr, BLOCK: tl.constexpr = 64):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    x = tl.load(x_ptr + offs, mask=keep)
    tl.store(out_ptr + offs, x * scale + SHIFT, mask=keep)


_affine_kernel = triton.jit(_affine)


def test_int_keys_separate_what_triton_specialises():
    # Triton compiles ints equal to 1, divisible by 16 and past int32 differently.
    keys = {_launch._arg_key(v) for v in (1, 16, 17, 2**31, 32)}
    assert len(keys) == 4  # 16 and 32 share a specialisation; the rest differ
    assert _launch._arg_key(16) == _launch._arg_key(32)
    assert _launch._arg_key(True) != _launch._arg_key(1)  # bool is its own type


def test_tensor_keys_separate_dtype_and_alignment():
    x = torch.zeros(64, dtype=torch.float32)
    assert _launch._arg_key(x) != _launch._arg_key(x[1:])  # 4-byte offset: not 16-aligned
    assert _launch._arg_key(x) == _launch._arg_key(x[4:])  # 16-byte offset: aligned
    assert _launch._arg_key(x) != _launch._arg_key(x.to(torch.float16))
    assert _launch._arg_key(2.0) == _launch._arg_key(3.0)  # float values are not specialised


def test_tail_follows_the_signature():
    from triton.runtime.jit import JITFunction

    kernel = JITFunction(_affine)  # the compiled-kernel object even under the interpreter
    assert _launch._tail(kernel, 4, {"BLOCK": 32, "SHIFT": 1, "num_warps": 4}) == (1, 32)
    assert _launch._tail(kernel, 4, {"SHIFT": 2}) == (2, 64)  # BLOCK's default
    with pytest.raises(TypeError, match="SHIFT"):
        _launch._tail(kernel, 4, {"num_warps": 4})


def test_positional_constexprs_key_the_cache():
    # A constexpr passed positionally (the IPA kernels pass C and D so) is baked into
    # the binary: two values must never share a compiled kernel.
    from triton.runtime.jit import JITFunction

    kernel = JITFunction(_affine)
    x, out = torch.zeros(64), torch.zeros(64)
    keys = {_launch._key(kernel, 0, (x, out, 64, 0.5, shift), {"BLOCK": 32}) for shift in (9, 12, 15)}
    assert len(keys) == 3
    assert _launch._key(kernel, 0, (x, out, 64, 0.5, 12), {}) == _launch._key(kernel, 0, (x, out, 64, 0.5, 12), {})


def test_no_hooks_by_default():
    # An empty hook chain (what Triton holds when nothing is installed) is no hook.
    assert not _launch._hooks_installed()


@pytest.mark.gpu
def test_direct_launch_matches_triton(monkeypatch):
    if _launch._version() not in _launch._VERIFIED:
        pytest.skip(f"direct launches are not checked for Triton {triton.__version__} ({_launch._VERIFIED})")
    monkeypatch.setattr(_launch, "_DIRECT", True)  # whatever FOLDOPS_DIRECT_LAUNCH says
    x = torch.randn(1000, device="cuda")
    n_before = len(_launch._CACHE)
    with set_wrap_triton_enabled(False):
        for view in (x, x[1:], x, x[1:], x[4:]):  # misses then hits, aligned and not
            n = view.numel()
            out = torch.empty_like(view)
            _launch.launcher(_affine_kernel)[(triton.cdiv(n, 64),)](view, out, n, 0.5, SHIFT=3)
            torch.testing.assert_close(out, view * 0.5 + 3, rtol=0, atol=0)
            wide = torch.empty_like(view)
            _launch.launcher(_affine_kernel)[(triton.cdiv(n, 128),)](view, wide, n, 0.5, SHIFT=3, BLOCK=128)
            torch.testing.assert_close(wide, view * 0.5 + 3, rtol=0, atol=0)
    # x and x[4:] share a key (aligned; neither length is 1 or divisible by 16), x[1:]
    # is misaligned: two keys per BLOCK
    assert len(_launch._CACHE) - n_before == 4
