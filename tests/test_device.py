"""foldops.device: resolution, autocast, kernel support, memory helpers, import hygiene.

Availability of CUDA/XPU/MPS is monkeypatched, so every branch runs on a CPU-only box.
"""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from foldops import device as fdevice


@pytest.fixture
def fake_devices(monkeypatch):
    """Set which accelerators 'exist': fake_devices(cuda=True, mps=True, ...)."""

    def set_available(cuda=False, xpu=False, mps=False, capability=(9, 0)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        fdevice._capability.cache_clear()  # kernel_support reads the cached capability
        if hasattr(torch, "xpu"):
            monkeypatch.setattr(torch.xpu, "is_available", lambda: xpu)
        else:  # pragma: no cover - torch without the xpu module
            monkeypatch.setattr(fdevice, "_xpu_available", lambda: xpu)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    yield set_available
    fdevice._capability.cache_clear()


# Resolution -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "available, expected",
    [
        (dict(cuda=True, xpu=True, mps=True), "cuda"),
        (dict(cuda=False, xpu=True, mps=True), "xpu"),
        (dict(cuda=False, xpu=False, mps=True), "mps"),
        (dict(cuda=False, xpu=False, mps=False), "cpu"),
        (dict(cuda=True, xpu=False, mps=False), "cuda"),
    ],
)
@pytest.mark.parametrize("request_", ["auto", None])
def test_auto_prefers_cuda_then_xpu_then_mps_then_cpu(fake_devices, available, expected, request_):
    fake_devices(**available)
    assert fdevice.resolve_device(request_) == torch.device(expected)


@pytest.mark.parametrize("name", ["cuda", "xpu", "mps"])
def test_explicit_accelerator_when_available(fake_devices, name):
    fake_devices(**{name: True})
    assert fdevice.resolve_device(name) == torch.device(name)
    assert fdevice.resolve_device(torch.device(name)) == torch.device(name)


@pytest.mark.parametrize("name", ["cuda", "xpu", "mps", "cuda:1"])
def test_explicit_unavailable_device_raises_value_error(fake_devices, name):
    fake_devices()  # nothing but the CPU
    with pytest.raises(ValueError, match=r"device: .* not available"):
        fdevice.resolve_device(name)
    with pytest.raises(ValueError, match="not available"):
        fdevice.resolve_device(torch.device(name))


def test_explicit_device_keeps_its_index(fake_devices):
    fake_devices(cuda=True)
    assert fdevice.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_cpu_and_meta_always_resolve(fake_devices):
    fake_devices()
    assert fdevice.resolve_device("cpu") == torch.device("cpu")
    assert fdevice.resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert fdevice.resolve_device("meta") == torch.device("meta")


def test_unsupported_device_type_raises_value_error(fake_devices):
    fake_devices()
    with pytest.raises(ValueError, match="unsupported device type 'hpu'"):
        fdevice.resolve_device("hpu")


def test_non_device_argument_raises_type_error():
    with pytest.raises(TypeError, match="device: expected 'auto', a device string or torch.device, got int"):
        fdevice.resolve_device(0)


def test_misspelled_device_string_raises_value_error():
    with pytest.raises(ValueError, match="device"):
        fdevice.resolve_device("gpu")


def test_device_type_of():
    assert fdevice.device_type_of(torch.zeros(1)) == "cpu"
    assert fdevice.device_type_of(torch.device("cpu")) == "cpu"
    assert fdevice.device_type_of("meta") == "meta"


def test_device_type_of_auto(fake_devices):
    fake_devices(mps=True)
    assert fdevice.device_type_of("auto") == "mps"
    assert fdevice.device_type_of(None) == "mps"


# Autocast ---------------------------------------------------------------------------------

def _matmul_dtype():
    a = torch.randn(4, 4)
    return (a @ a).dtype


def test_autocast_on_cpu_runs_matmul_in_bf16():
    assert _matmul_dtype() == torch.float32
    with fdevice.autocast("cpu"):
        assert _matmul_dtype() == torch.bfloat16
        assert fdevice.autocast_dtype_in_effect("cpu") == torch.bfloat16
        assert fdevice.autocast_dtype_in_effect(torch.zeros(1)) == torch.bfloat16
    assert fdevice.autocast_dtype_in_effect("cpu") is None


def test_autocast_fp16_and_disabled_on_cpu():
    with fdevice.autocast(torch.zeros(1), dtype=torch.float16):
        assert _matmul_dtype() == torch.float16
    with fdevice.autocast("cpu", enabled=False):
        assert _matmul_dtype() == torch.float32
        assert fdevice.autocast_dtype_in_effect("cpu") is None


def test_autocast_rejects_fp32():
    with pytest.raises(ValueError, match="dtype: autocast dtype must be torch.bfloat16 or torch.float16, got torch.float32"):
        fdevice.autocast("cpu", dtype=torch.float32)


def test_fp32_region_disables_cpu_autocast():
    x = torch.randn(4, 4)
    with fdevice.autocast("cpu"):
        with fdevice.fp32_region(x):
            assert _matmul_dtype() == torch.float32
            assert fdevice.autocast_dtype_in_effect(x) is None
        assert _matmul_dtype() == torch.bfloat16  # restored on exit


def test_cuda_keyed_guard_does_not_disable_cpu_autocast():
    # The bug foldops fixes: an fp32 guard written for CUDA leaves CPU autocast on.
    with fdevice.autocast("cpu"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "CUDA is not available" on CPU-only builds
            with torch.autocast("cuda", enabled=False):
                assert _matmul_dtype() == torch.bfloat16


def test_autocast_device_type():
    assert fdevice.autocast_device_type(torch.zeros(1)) == "cpu"
    assert fdevice.autocast_device_type("cpu") == "cpu"
    assert fdevice.autocast_device_type("meta") == "cpu"  # no autocast of its own


def test_default_autocast_dtype(monkeypatch):
    assert fdevice.default_autocast_dtype("cpu") == torch.bfloat16
    assert fdevice.default_autocast_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(fdevice, "_mps_supports_bf16", lambda: False)
    assert fdevice.default_autocast_dtype("mps") == torch.float16
    monkeypatch.setattr(fdevice, "_mps_supports_bf16", lambda: True)
    assert fdevice.default_autocast_dtype("mps") == torch.bfloat16


# Triton kernel support ------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (None, False), ("", False), ("0", False), ("false", False), ("False", False), ("1", True), ("true", True),
])
def test_triton_interpret_flag(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert fdevice.triton_interpret() is expected


def test_kernel_support_without_triton(monkeypatch, fake_devices):
    fake_devices(cuda=True, capability=(9, 0))
    reason = "triton is not importable (ImportError: no)"
    monkeypatch.setattr(fdevice, "triton_import_error", lambda: reason)
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        assert fdevice.kernel_support("cuda") == reason
        if interpret == "1":
            assert fdevice.kernel_support("cpu", explicit=True) == reason
        else:  # decided by the device, without importing Triton
            assert "need a CUDA device" in fdevice.kernel_support("cpu", explicit=True)


def test_triton_import_error_reports_a_failed_import(monkeypatch):
    fdevice.triton_import_error.cache_clear()
    try:
        monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
        reason = fdevice.triton_import_error()
        assert reason is not None and reason.startswith("triton is not importable (")
    finally:
        monkeypatch.undo()
        fdevice.triton_import_error.cache_clear()


def test_triton_import_error_none_when_importable():
    pytest.importorskip("triton")
    fdevice.triton_import_error.cache_clear()
    assert fdevice.triton_import_error() is None


@pytest.fixture
def with_triton(monkeypatch):
    monkeypatch.setattr(fdevice, "triton_import_error", lambda: None)


def test_kernel_support_interpreter_runs_cpu_only_when_named(monkeypatch, with_triton):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fdevice.kernel_support("cpu", explicit=True) is None
    assert fdevice.kernel_support(torch.zeros(1)) is None
    reason = fdevice.kernel_support("cpu", explicit=False)
    assert reason is not None and "only when named" in reason


def test_kernel_support_interpreter_rejects_accelerators(monkeypatch, fake_devices, with_triton):
    fake_devices(cuda=True, capability=(9, 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for explicit in (True, False):
        reason = fdevice.kernel_support("cuda", explicit=explicit)
        assert reason is not None and "CPU tensors only, got cuda" in reason
    assert "got meta" in fdevice.kernel_support("meta")


def test_kernel_support_needs_cuda_without_interpreter(monkeypatch, fake_devices, with_triton):
    fake_devices(mps=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for name in ("cpu", "mps"):
        for explicit in (True, False):
            assert fdevice.kernel_support(name, explicit=explicit) == f"Triton kernels need a CUDA device, got {name}"


@pytest.mark.parametrize("capability, ok", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
@pytest.mark.parametrize("explicit", [True, False])
def test_kernel_support_compute_capability(monkeypatch, fake_devices, with_triton, capability, ok, explicit):
    fake_devices(cuda=True, capability=capability)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = fdevice.kernel_support("cuda", explicit=explicit)
    if ok:
        assert reason is None
    else:
        assert reason == f"compute capability {capability[0]}.{capability[1]} < 8.0"


def test_kernel_support_auto_device(monkeypatch, fake_devices, with_triton):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fake_devices(cuda=True, capability=(8, 6))
    assert fdevice.kernel_support("auto") is None
    fake_devices()
    assert fdevice.kernel_support("auto") == "Triton kernels need a CUDA device, got cpu"


# Memory, synchronisation, OOM -----------------------------------------------------------------

def test_memory_helpers_on_cpu():
    cpu = torch.device("cpu")
    assert fdevice.reset_peak_memory(cpu) is False
    assert fdevice.peak_memory_bytes(cpu) is None
    assert fdevice.memory_allocated_bytes("cpu") is None
    assert fdevice.empty_cache("cpu") is None
    assert fdevice.synchronize("cpu") is None
    assert fdevice.device_name("cpu").startswith("cpu (")
    with fdevice.device_guard(cpu):
        assert torch.ones(1).sum().item() == 1.0


def test_memory_helpers_reject_unavailable_devices(fake_devices):
    fake_devices()
    with pytest.raises(ValueError, match="not available"):
        fdevice.peak_memory_bytes("cuda")
    with pytest.raises(ValueError, match="not available"):
        fdevice.synchronize("xpu")


@pytest.mark.parametrize("exc, expected", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), True),
    (RuntimeError("XPU out of memory."), True),
    (RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"), False),
    (ValueError("out of memory"), False),
    (KeyError("x"), False),
])
def test_is_out_of_memory(exc, expected):
    assert fdevice.is_out_of_memory(exc) is expected


def test_is_out_of_memory_recognises_a_failed_cpu_allocation():
    try:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: refused at once
    except RuntimeError as exc:
        assert fdevice.is_out_of_memory(exc)
    else:  # pragma: no cover - a machine with a petabyte
        pytest.skip("the allocation succeeded")


# Import hygiene -------------------------------------------------------------------------------

def test_import_touches_no_device_and_no_triton():
    code = textwrap.dedent(
        """
        import sys
        import torch
        import foldops
        import foldops.ops
        import foldops.nn
        import foldops.bench
        import foldops.cli
        print(torch.cuda.is_initialized(), "triton" in sys.modules, "matplotlib" in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "False"]


def test_capability_and_sm_count_are_cached_per_device_index(monkeypatch):
    """The launchers' per-call device queries ask the driver once per device index."""
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: calls.append(("cc", index)) or (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: calls.append(("sm", index)) or SimpleNamespace(multi_processor_count=132))
    fdevice._capability.cache_clear()
    fdevice._multiprocessors.cache_clear()
    try:
        for device in (torch.device("cuda", 1), "cuda:1", 1):
            assert fdevice.compute_capability(device) == (9, 0)
            assert fdevice.multiprocessor_count(device) == 132
        assert calls == [("cc", 1), ("sm", 1)]
        assert fdevice.is_rocm() == (torch.version.hip is not None)
    finally:
        fdevice._capability.cache_clear()
        fdevice._multiprocessors.cache_clear()


def test_host_to_device_off_cuda_is_a_plain_copy():
    """Off CUDA ``host_to_device`` is ``.to(device)`` (no pinned memory: CPU-only builds
    have none). The CUDA path (pinned, non_blocking) runs in the GPU tests of the bucketed
    varlen path (tests/ops/test_varlen_attention.py::test_torch_backend_gpu, fp32)."""
    t = torch.arange(5)
    assert fdevice.host_to_device(t, torch.device("cpu")) is t
    moved = fdevice.host_to_device(t, torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == t.shape
