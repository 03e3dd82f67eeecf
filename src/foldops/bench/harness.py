"""The benchmark harness: time, peak memory and error against fp64, per op, backend, size.

Timing is the median of up to ``repeats`` runs after at least ``warmup`` runs, stopping
early once ``max_time_s`` has been spent (at least 3 runs). First calls can be 100x
slower than later ones (lazy initialisation, cold caches, a new size), so the warm-up
goes on until the last runs agree, within bounds (:data:`WARMUP_EXTRA_RUNS` more runs and
``max_time_s``), and timed runs that still drift downwards are taken again (at most
:data:`REMEASURE_ATTEMPTS` times); ``warmup=0`` means no warm-up at all. On devices that offer timing events
(``torch.Event``) each run is bracketed by events; elsewhere by host timers with
``foldops.device.synchronize`` on both sides. Peak memory (``peak_mib``) is measured on
one more run: the most memory allocated during it above what was allocated before it
(inputs excluded; outputs, temporaries and saved activations included), from the device
allocator's peak counter, or on CPU from the profiler's allocation events. Errors are
the max abs and relative error against the op's ``reference`` backend run in float64
on the same (rounded) inputs.

Every failure becomes a row with ``status`` ``error``/``oom``/``unavailable``/``skipped``
and a ``note``; nothing here raises for one backend's sake.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import foldops
from foldops import backends
from foldops import device as fdevice
from foldops.bench.cases import BenchCase, BenchInputs, CaseUnavailable, get_cases, reference_bytes
from foldops.bench.probe import BackendStatus, auto_choice, backend_statuses, capture_context
from foldops.testing import max_abs_error

CSV_COLUMNS = (
    "op", "backend", "resolved", "shape", "dtype", "mode", "metric", "value", "status", "note",
    "device", "torch_version", "foldops_version",
)
MODES = ("fwd", "fwd+bwd", "bwd")
DEFAULT_MODES = ("fwd", "fwd+bwd")
METRICS = ("time_ms", "peak_mib", "max_abs_err", "rel_err")
STATUSES = ("ok", "error", "oom", "unavailable", "skipped")

DTYPES: Dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
_DTYPE_ALIASES = {
    "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
    "float64": "fp64", "double": "fp64",
}
_NOTE_MAX = 300
AUTO = "auto"
"""The ``backend`` of the rows that say what ``backend="auto"`` gives (what a user gets);
their ``resolved`` column names the backend it ran."""

Row = Dict[str, str]

# Defaults per device profile ("cpu", or "gpu" for every accelerator). The command's
# --help and docs/bench.md quote these.
PROFILE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "cpu": {"dtypes": (torch.float32,), "warmup": 2, "repeats": 10, "max_time_s": 0.5, "ref_budget_gib": 2.0},
    "gpu": {"dtypes": (torch.bfloat16,), "warmup": 5, "repeats": 30, "max_time_s": 2.0, "ref_budget_gib": 16.0},
}

# Warm-up: runs agree when each of the last WARMUP_WINDOW is within WARMUP_TOLERANCE of
# their median, or within WARMUP_FLOOR_MS of it (host-timer noise on tiny calls).
WARMUP_WINDOW = 3
WARMUP_TOLERANCE = 0.2
WARMUP_FLOOR_MS = 0.02
WARMUP_EXTRA_RUNS = 50
"""At most this many warm-up runs beyond ``warmup`` while waiting for runs to agree."""
REMEASURE_ATTEMPTS = 2
"""Timed runs whose first half is over 1.3x slower than their second half are retaken."""


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/... -> torch dtype; ValueError naming the choices."""
    key = _DTYPE_ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {name!r}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    for key, value in DTYPES.items():
        if value == dtype:
            return key
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass
class BenchConfig:
    """What to run. ``None`` fields take the defaults of the device's profile."""

    device: torch.device
    ops: Optional[Sequence[str]] = None
    sizes: Optional[Sequence[int]] = None
    dtypes: Optional[Sequence[torch.dtype]] = None
    modes: Sequence[str] = DEFAULT_MODES
    backends: Optional[Sequence[str]] = None
    """Only these backends (named: the interpreter then runs too); default every one.
    The ``auto`` rows come with every backend, or, when backends are named, where
    ``auto`` resolves to one of them, or when ``"auto"`` is named."""
    warmup: Optional[int] = None
    repeats: Optional[int] = None
    max_time_s: Optional[float] = None
    dims: Dict[str, int] = dataclasses.field(default_factory=dict)
    ref_budget_gib: Optional[float] = None
    seed: int = 0

    @property
    def profile(self) -> str:
        return "cpu" if self.device.type == "cpu" else "gpu"

    def resolved(self) -> "BenchConfig":
        """A copy with every ``None`` replaced by the profile default, checked."""
        defaults = PROFILE_DEFAULTS[self.profile]
        cfg = dataclasses.replace(self)
        for field in ("dtypes", "warmup", "repeats", "max_time_s", "ref_budget_gib"):
            if getattr(cfg, field) is None:
                setattr(cfg, field, defaults[field])
        bad_modes = [m for m in cfg.modes if m not in MODES]
        if bad_modes or not cfg.modes:
            raise ValueError(f"modes: expected some of {list(MODES)}, got {list(cfg.modes)}")
        if cfg.sizes is not None and (not cfg.sizes or any(int(s) < 1 for s in cfg.sizes)):
            raise ValueError(f"sizes: expected positive ints, got {list(cfg.sizes)}")
        if cfg.warmup < 0:
            raise ValueError(f"warmup: expected an int >= 0, got {cfg.warmup}")
        if cfg.repeats < 1:
            raise ValueError(f"repeats: expected an int >= 1, got {cfg.repeats}")
        if not cfg.max_time_s > 0:
            raise ValueError(f"max_time_s: expected a positive number, got {cfg.max_time_s}")
        get_cases(cfg.ops)  # ValueError for unknown ops
        return cfg


# Rows -------------------------------------------------------------------------------------

class RowSink:
    """Collects rows, fills the provenance columns, and appends them to a CSV as they come."""

    def __init__(self, device: torch.device, csv_path: Optional[os.PathLike] = None):
        self.rows: List[Row] = []
        self._common = {
            "device": fdevice.device_name(device),
            "torch_version": torch.__version__,
            "foldops_version": foldops.__version__,
        }
        self._file = None
        self._writer = None
        if csv_path is not None:
            import csv

            self._file = open(csv_path, "w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=CSV_COLUMNS)
            self._writer.writeheader()
            self._file.flush()

    def add(self, op: str, backend: str, shape: str, dtype: str, mode: str, metric: str,
            value: Optional[float] = None, status: str = "ok", note: str = "", resolved: str = "") -> Row:
        row = {
            "op": op, "backend": backend, "resolved": resolved, "shape": shape, "dtype": dtype, "mode": mode,
            "metric": metric, "value": "" if value is None else format(float(value), ".6g"),
            "status": status, "note": _one_line(note), **self._common,
        }
        self.rows.append(row)
        if self._writer is not None:
            self._writer.writerow(row)
            self._file.flush()
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _NOTE_MAX else text[: _NOTE_MAX - 3] + "..."


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _failure_status(exc: BaseException) -> str:
    if isinstance(exc, backends.BackendUnavailableError):
        return "unavailable"
    return "oom" if fdevice.is_out_of_memory(exc) else "error"


# Timing and memory --------------------------------------------------------------------------

class Timer:
    """Median-of-runs timing with device events where offered, host timers otherwise."""

    def __init__(self, device: torch.device):
        self.device = device
        self.events = device.type != "cpu" and self._events_work(device)

    @staticmethod
    def _events_work(device: torch.device) -> bool:
        try:
            start = torch.Event(device=device, enable_timing=True)
            end = torch.Event(device=device, enable_timing=True)
            start.record()
            end.record()
            end.synchronize()
            start.elapsed_time(end)
            return True
        except Exception:  # no timing events on this device (or this torch)
            return False

    def measure(
        self,
        timed: Callable[[Any], Any],
        setup: Callable[[], Any] = lambda: None,
        warmup: int = 1,
        repeats: int = 5,
        max_time_s: float = 1.0,
        min_repeats: int = 3,
    ) -> List[float]:
        """Milliseconds of ``timed(setup())`` per run; ``setup`` is not timed.

        At least ``warmup`` untimed runs, more until the last runs agree (bounded); then
        up to ``repeats`` timed runs, retaken if they still drift downwards.
        """
        if warmup > 0:
            self.warm_up(timed, setup, warmup, max_time_s)
        times: List[float] = []
        for _ in range(REMEASURE_ATTEMPTS + 1):
            times = self._timed_runs(timed, setup, repeats, max_time_s, min_repeats)
            if warmup == 0 or not drifts_down(times):
                break
        return times

    def _host_time(self, timed: Callable[[Any], Any], setup: Callable[[], Any]) -> float:
        state = setup()
        fdevice.synchronize(self.device)
        t0 = time.perf_counter()
        timed(state)
        fdevice.synchronize(self.device)
        return (time.perf_counter() - t0) * 1e3

    def warm_up(self, timed: Callable[[Any], Any], setup: Callable[[], Any], warmup: int,
                max_time_s: float) -> List[float]:
        """Untimed runs (host-timed here) until the last ones agree; their milliseconds.

        At least ``warmup`` runs; stops once :func:`runs_agree`, or after
        ``warmup + WARMUP_EXTRA_RUNS`` runs, or once ``max_time_s`` has passed.
        """
        seen: List[float] = []
        began = time.perf_counter()
        while True:
            seen.append(self._host_time(timed, setup))
            if len(seen) >= warmup and runs_agree(seen):
                break
            if len(seen) >= warmup + WARMUP_EXTRA_RUNS or (
                    len(seen) >= warmup and time.perf_counter() - began > max_time_s):
                break
        return seen

    def _timed_runs(self, timed, setup, repeats, max_time_s, min_repeats) -> List[float]:
        times: List[float] = []
        pairs = []
        began = time.perf_counter()
        for i in range(repeats):
            state = setup()
            if self.events:
                start = torch.Event(device=self.device, enable_timing=True)
                end = torch.Event(device=self.device, enable_timing=True)
                start.record()
                timed(state)
                end.record()
                pairs.append((start, end))
            else:
                fdevice.synchronize(self.device)
                t0 = time.perf_counter()
                timed(state)
                fdevice.synchronize(self.device)
                times.append((time.perf_counter() - t0) * 1e3)
            del state
            if i + 1 >= min_repeats and time.perf_counter() - began > max_time_s:
                break
        if pairs:
            fdevice.synchronize(self.device)
            times = [start.elapsed_time(end) for start, end in pairs]
        return times


def settle_cpu_threads(max_s: float = 5.0, tolerance: float = 1.5) -> Tuple[float, Optional[str]]:
    """Run a small parallel workload until torch's CPU threads are no slower than one thread.

    On a busy machine the first seconds of multi-threaded work can run 100x slower than
    later (worker threads spinning while the cores they need are taken), which would
    land on the first cases measured. The workload's time on one thread is the yardstick:
    returns (seconds spent, None) once the median of the last 5 multi-threaded runs is
    within ``tolerance`` of it, or (seconds spent, why not) after ``max_s``.
    """
    threads = torch.get_num_threads()
    began = time.perf_counter()
    if threads <= 1:
        return 0.0, None
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 64, 32, generator=g), torch.randn(64, 32, 64, generator=g)

    def once() -> float:
        t0 = time.perf_counter()
        torch.bmm(a, b).softmax(-1)
        return (time.perf_counter() - t0) * 1e3

    torch.set_num_threads(1)
    try:
        single = statistics.median(once() for _ in range(7))
    finally:
        torch.set_num_threads(threads)
    recent: List[float] = []
    while True:
        recent = (recent + [once()])[-5:]
        if len(recent) == 5 and statistics.median(recent) <= tolerance * single + WARMUP_FLOOR_MS:
            return time.perf_counter() - began, None
        if time.perf_counter() - began > max_s:
            return time.perf_counter() - began, (
                f"{threads} CPU threads still ran a small workload {statistics.median(recent) / single:.0f}x "
                f"slower than one thread after {max_s:g} s: the machine is oversubscribed and the timings "
                "suffer; OMP_NUM_THREADS=1 or OMP_WAIT_POLICY=PASSIVE may give steadier numbers")


def runs_agree(times_ms: Sequence[float]) -> bool:
    """Whether the last :data:`WARMUP_WINDOW` runs are within tolerance of their median."""
    if len(times_ms) < WARMUP_WINDOW:
        return False
    window = times_ms[-WARMUP_WINDOW:]
    middle = statistics.median(window)
    return all(abs(t - middle) <= max(WARMUP_TOLERANCE * middle, WARMUP_FLOOR_MS) for t in window)


def drifts_down(times_ms: Sequence[float]) -> bool:
    """Whether the first half of the runs is clearly slower than the second half."""
    if len(times_ms) < 4:
        return False
    half = len(times_ms) // 2
    first, second = statistics.median(times_ms[:half]), statistics.median(times_ms[half:])
    return first > 1.3 * second + WARMUP_FLOOR_MS


@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    # The profiler's C++ side logs start/stop lines straight to fd 2.
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_peak_bytes(run: Callable[[], Any]) -> Optional[int]:
    """Peak bytes the torch CPU allocator holds during ``run()`` above what it held before.

    Read from the profiler's memory events (their running sum); ``None`` if this torch's
    profiler does not expose them.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr_fd():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
    try:
        events = prof.profiler.kineto_results.events()
        changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except Exception:  # profiler internals moved: report nothing rather than a guess
        return None
    peak = current = 0
    for _, nbytes in changes:
        current += nbytes
        peak = max(peak, current)
    return peak


def measure_memory(device: torch.device, run: Callable[[], Any]) -> Optional[float]:
    """Peak MiB allocated during one call of ``run`` above what was allocated before it,
    or ``None`` where the device offers no peak (MPS)."""
    if device.type == "cpu":
        peak = cpu_peak_bytes(run)
        return None if peak is None else peak / 2**20
    fdevice.synchronize(device)
    fdevice.empty_cache(device)
    before = fdevice.memory_allocated_bytes(device)
    if before is None or not fdevice.reset_peak_memory(device):
        return None  # e.g. MPS: only current allocation, not a peak
    run()
    fdevice.synchronize(device)
    peak = fdevice.peak_memory_bytes(device)
    return None if peak is None else max(0, peak - before) / 2**20


# Errors against fp64 ----------------------------------------------------------------------------

def _to_host64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def compare(results: Sequence[torch.Tensor], exact: Sequence[torch.Tensor]) -> Tuple[float, float]:
    """(max abs error, max relative error) over paired tensors; rel = abs / max|exact|."""
    worst_abs, worst_rel = 0.0, 0.0
    for index, (got, ref) in enumerate(zip(results, exact)):
        if got is None and ref is None:
            continue
        # A missing gradient is a zero gradient: wrong unless the reference's is zero too.
        got = torch.zeros_like(ref) if got is None else _to_host64(got)
        ref = torch.zeros_like(got) if ref is None else ref
        if got.shape != ref.shape:
            raise ValueError(f"result {index}: shape {tuple(got.shape)} != reference shape {tuple(ref.shape)}")
        err = max_abs_error(got, ref)
        scale = ref.abs().max().item() if ref.numel() else 0.0
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / scale if scale > 0 else (0.0 if err == 0 else math.inf))
    return worst_abs, worst_rel


# The run ------------------------------------------------------------------------------------------

ProgressFn = Callable[[int, int, str], None]


class _SizeRun:
    """Everything for one (case, dtype, size): inputs, reference, per-backend measurements."""

    def __init__(self, cfg: BenchConfig, case: BenchCase, fn: Callable[..., Any], inputs: BenchInputs,
                 dims: Dict[str, int], dtype: torch.dtype, sink: RowSink, timer: Timer):
        self.cfg, self.case, self.fn, self.inputs, self.dims = cfg, case, fn, inputs, dims
        self.dtype, self.sink, self.timer = dtype, sink, timer
        self.device = cfg.device
        self.shape = case.shape_string(dims)
        self.dtype_name = dtype_name(dtype)
        self._grad_out: Optional[torch.Tensor] = None
        self._reference: Optional[Tuple[torch.Tensor, List[torch.Tensor]]] = None
        self._reference_failure: Dict[bool, Tuple[str, str]] = {}  # by need_grad
        self._errors: Dict[Tuple[str, str], Tuple[float, float]] = {}
        self.recorded: Dict[Tuple[str, str], List[Row]] = {}
        """The rows written per (backend, mode), for the ``auto`` rows to reuse."""

    def add(self, backend: str, mode: str, metric: str, value=None, status="ok", note="", resolved="") -> None:
        row = self.sink.add(self.case.op, backend, self.shape, self.dtype_name, mode, metric, value, status, note,
                            resolved)
        self.recorded.setdefault((backend, mode), []).append(row)

    # calls
    def forward(self, backend: str) -> torch.Tensor:
        return self.case.call(self.fn, self.inputs, backend)

    def grad_output(self, out: torch.Tensor) -> torch.Tensor:
        if self._grad_out is None or self._grad_out.shape != out.shape:
            g = torch.Generator().manual_seed(self.cfg.seed + 1)
            self._grad_out = torch.randn(tuple(out.shape), generator=g).to(device=out.device, dtype=out.dtype)
        return self._grad_out

    def backward(self, out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        return torch.autograd.grad(out, self.inputs.grad_inputs(), self.grad_output(out), allow_unused=True)

    def mode_fns(self, backend: str, mode: str):
        """(setup, timed) for one run of ``mode``; inputs' requires_grad set to match."""
        self.inputs.requires_grad_(mode != "fwd")
        if mode == "fwd":
            def timed(_):
                with torch.no_grad():
                    return self.forward(backend)
            return (lambda: None), timed
        if mode == "fwd+bwd":
            return (lambda: None), (lambda _: self.backward(self.forward(backend)))
        return (lambda: self.forward(backend)), self.backward  # bwd: forward untimed

    # reference
    def reference(self, need_grad: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if self._reference is not None and (self._reference[1] or not need_grad):
            return self._reference
        if need_grad in self._reference_failure:
            raise _ReferenceUnavailable(*self._reference_failure[need_grad])
        budget = self.cfg.ref_budget_gib * 2**30
        if not need_grad and any(m != "fwd" for m in self.cfg.modes) and True not in self._reference_failure:
            # One fp64 run with gradients serves every mode, if it fits.
            need_grad = reference_bytes(self.case, self.dims, with_grad=True) <= budget
        needed = reference_bytes(self.case, self.dims, with_grad=need_grad)
        if needed > budget:
            self._reference_failure[need_grad] = (
                "skipped",
                f"fp64 reference needs ~{needed / 2**30:.1f} GiB > budget {self.cfg.ref_budget_gib:g} GiB "
                "(--ref-budget-gib)",
            )
            raise _ReferenceUnavailable(*self._reference_failure[need_grad])
        ref_device = torch.device("cpu") if self.device.type == "mps" else self.device  # no fp64 on MPS
        tensors = {}
        for name, t in self.inputs.tensors.items():
            t = t.detach()
            if t.dtype.is_floating_point:
                t = t.to(device=ref_device, dtype=torch.float64)
            else:
                t = t.to(ref_device)
            tensors[name] = t.requires_grad_(need_grad and name in self.inputs.grad_names)
        inputs64 = BenchInputs(tensors=tensors, grad_names=self.inputs.grad_names, extras=self.inputs.extras)
        try:
            with torch.set_grad_enabled(need_grad):
                out = self.case.call(self.fn, inputs64, "reference")
                grads: List[torch.Tensor] = []
                if need_grad:
                    g = torch.Generator().manual_seed(self.cfg.seed + 1)
                    grad_out = torch.randn(tuple(out.shape), generator=g).to(self.dtype).to(
                        device=ref_device, dtype=torch.float64)
                    grads = [None if x is None else _to_host64(x) for x in torch.autograd.grad(
                        out, inputs64.grad_inputs(), grad_out, allow_unused=True)]
            self._reference = (_to_host64(out), grads)
        except Exception as exc:
            self._reference_failure[need_grad] = (_failure_status(exc), f"fp64 reference failed: {_describe(exc)}")
            raise _ReferenceUnavailable(*self._reference_failure[need_grad]) from exc
        finally:
            del inputs64, tensors
            fdevice.empty_cache(self.device)
        return self._reference

    def errors(self, backend: str, kind: str) -> Tuple[float, float]:
        """(abs, rel) error of ``backend``'s output (kind 'fwd') or input gradients ('grad')."""
        key = (backend, kind)
        if key not in self._errors:
            if kind == "fwd":
                self.inputs.requires_grad_(False)
                with torch.no_grad():
                    got = [self.forward(backend)]
                ref_out, _ = self.reference(need_grad=False)
                self._errors[key] = compare(got, [ref_out])
            else:
                self.inputs.requires_grad_(True)
                out = self.forward(backend)
                got = list(self.backward(out))
                del out
                _, ref_grads = self.reference(need_grad=True)
                self._errors[key] = compare(got, ref_grads)
            del got
        return self._errors[key]

    # one backend, one mode
    def measure(self, backend: str, mode: str, resolved: str = "", why: str = "") -> None:
        """Time, memory and errors of ``backend`` in ``mode`` (``why``: a prefix of the notes)."""
        cfg = self.cfg

        def add(metric, value=None, status="ok", note=""):
            self.add(backend, mode, metric, value, status, why + note, resolved)

        try:
            setup, timed = self.mode_fns(backend, mode)
            times = self.timer.measure(timed, setup, cfg.warmup, cfg.repeats, cfg.max_time_s)
        except Exception as exc:
            status = _failure_status(exc)
            add("time_ms", status=status, note=_describe(exc))
            _cleanup(self.device, collect=status == "oom")
            return
        add("time_ms", statistics.median(times),
            note=f"median of {len(times)} (min {min(times):.4g}, max {max(times):.4g})")
        try:
            setup, timed = self.mode_fns(backend, mode)
            memory = measure_memory(self.device, lambda: timed(setup()))
            if memory is not None:
                add("peak_mib", memory, note="peak allocated over one run, above what was allocated before it")
        except Exception as exc:
            status = _failure_status(exc)
            add("peak_mib", status=status, note=_describe(exc))
            _cleanup(self.device, collect=status == "oom")
        kind = "fwd" if mode == "fwd" else "grad"
        try:
            abs_err, rel_err = self.errors(backend, kind)
        except _ReferenceUnavailable as exc:
            for metric in ("max_abs_err", "rel_err"):
                add(metric, status=exc.status, note=exc.note)
            return
        except Exception as exc:
            status = _failure_status(exc)
            for metric in ("max_abs_err", "rel_err"):
                add(metric, status=status, note=_describe(exc))
            _cleanup(self.device, collect=status == "oom")
            return
        what = "output" if kind == "fwd" else f"gradients of {', '.join(self.inputs.grad_names)}"
        add("max_abs_err", abs_err, note=f"{what} vs fp64 reference")
        add("rel_err", rel_err, note=f"{what}: abs error / max|reference|")

    def add_auto(self, mode: str, resolved: Optional[str], why: str) -> None:
        """The ``auto`` rows of ``mode``: the rows of the backend ``auto`` resolves to,
        copied when it was measured in this run, else a measurement of ``backend="auto"``."""
        own = self.recorded.get((resolved, mode)) if resolved else None
        if own and own[0]["status"] not in ("skipped", "unavailable"):  # it ran (maybe failed)
            for row in own:
                self.add(AUTO, mode, row["metric"], None if row["value"] == "" else float(row["value"]),
                         row["status"], f"auto -> {resolved} ({why}); {resolved}'s run: {row['note']}", resolved)
            return
        if resolved:
            prefix = f"auto -> {resolved} ({why}); "
        else:  # unknown: what a call with backend="auto" does (its failure says why)
            prefix = f"auto ({why}); " if why else ""
        self.measure(AUTO, mode, resolved=resolved or "", why=prefix)


class _ReferenceUnavailable(Exception):
    def __init__(self, status: str, note: str):
        super().__init__(note)
        self.status, self.note = status, note


def _cleanup(device: torch.device, collect: bool = False) -> None:
    # gc.collect() costs ~0.5 s with torch loaded: only after an OOM, whose traceback
    # cycles may hold device memory.
    if collect and device.type != "cpu":
        gc.collect()
    try:
        fdevice.empty_cache(device)
    except Exception:  # a device in a bad state must not stop the other backends
        pass


def _backend_plan(op: str, statuses: Optional[List[BackendStatus]], named: Optional[Sequence[str]]):
    """[(backend, status-or-None)] to go through, best first."""
    if op not in backends.ops():
        return []
    names = [b.name for b in backends.backends_of(op)]
    if named is not None:
        names = [n for n in names if n in named]
    by_name = {s.name: s for s in statuses} if statuses is not None else {}
    return [(n, by_name.get(n)) for n in names]


def _plan_steps(op: str, named: Optional[Sequence[str]]) -> int:
    """Progress steps per mode of one size: the backends measured, and ``auto``."""
    return max(1, len(_backend_plan(op, None, named))) + 1


def count_steps(cfg: BenchConfig) -> int:
    """Progress steps (case x dtype x size x (backends + auto) x mode) of the loadable cases."""
    total = 0
    for case in get_cases(cfg.ops):
        try:
            case.load()
        except CaseUnavailable:
            total += 1
            continue
        sizes = cfg.sizes or case.sizes[cfg.profile]
        total += len(cfg.dtypes) * len(sizes) * _plan_steps(case.registry_op, cfg.backends) * len(cfg.modes)
    return max(total, 1)


def run_bench(
    config: BenchConfig,
    csv_path: Optional[os.PathLike] = None,
    progress: Optional[ProgressFn] = None,
    on_skip: Optional[Callable[[str], None]] = None,
) -> List[Row]:
    """Run the benchmark described by ``config``; return the rows (also written to ``csv_path``).

    On CPU, call :func:`settle_cpu_threads` once per process first (``foldops bench`` does).
    """
    cfg = config.resolved()
    sink = RowSink(cfg.device, csv_path)
    timer = Timer(cfg.device)
    total = count_steps(cfg)
    done = 0

    def step(text: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, text)

    try:
        for case in get_cases(cfg.ops):
            try:
                fn = case.load()
            except CaseUnavailable as exc:
                sink.add(case.op, "", "", "", "", "", status="skipped", note=str(exc))
                if on_skip is not None:
                    on_skip(str(exc))
                step(f"{case.op}: skipped")
                continue
            sizes = cfg.sizes or case.sizes[cfg.profile]
            plan_steps = _plan_steps(case.registry_op, cfg.backends)
            for dtype in cfg.dtypes:
                for size in sizes:
                    _run_size(cfg, case, fn, dtype, int(size), sink, timer, step, plan_steps)
    finally:
        sink.close()
    return sink.rows


def _run_size(cfg, case, fn, dtype, size, sink, timer, step, plan_steps) -> None:
    dims = case.dims_for(cfg.profile, size, cfg.dims)
    shape, dname = case.shape_string(dims), dtype_name(dtype)
    steps = plan_steps * len(cfg.modes)

    def fail_all(status: str, note: str) -> None:
        sink.add(case.op, "", shape, dname, "", "", status=status, note=note)
        for _ in range(steps):
            step(f"{case.op} {shape} {dname}: {status}")

    registry_op = case.registry_op
    try:
        inputs = case.make(dims, dtype, cfg.device, cfg.seed)
        # What auto picks, per mode: with gradients for fwd+bwd and bwd (a training call
        # can resolve differently from an inference call, e.g. by a size rule).
        contexts: Dict[str, Optional[Dict[str, Any]]] = {}
        for mode in cfg.modes:
            grad = mode != "fwd"
            if grad not in contexts:
                inputs.requires_grad_(grad)
                contexts[grad] = capture_context(
                    registry_op, functools.partial(case.call, fn, inputs, backends.AUTO), grad=grad)
    except Exception as exc:  # inputs do not fit, or the op rejects them
        fail_all(_failure_status(exc), f"inputs: {_describe(exc)}")
        _cleanup(cfg.device, collect=True)
        return
    if registry_op not in backends.ops():
        fail_all("error", f"no backends registered under {registry_op!r} (registered: {backends.ops()})")
        return
    run = _SizeRun(cfg, case, fn, inputs, dims, dtype, sink, timer)
    statuses = {grad: backend_statuses(registry_op, ctx) if ctx is not None else None
                for grad, ctx in contexts.items()}
    choices = {grad: auto_choice(registry_op, ctx) if ctx is not None
               else (None, "the op does not choose through foldops.backends.select")
               for grad, ctx in contexts.items()}
    for grad, (resolved, _) in choices.items():
        if resolved is None and contexts[grad] is not None:
            choices[grad] = (None, "")  # select fails: the measurement of "auto" records why
    named = list(cfg.backends) if cfg.backends is not None else None
    plan_names = [name for name, _ in _backend_plan(registry_op, None, named)]
    if not plan_names and AUTO not in (named or ()):
        sink.add(case.op, "", shape, dname, "", "", status="skipped",
                 note=f"no backend of {registry_op} among --backends {list(cfg.backends or [])}")
    for name in plan_names:
        for mode in cfg.modes:
            status = next((st for st in statuses[mode != "fwd"] or () if st.name == name), None)
            label = f"{case.op} {name} {shape} {dname} {mode}"
            if status is not None and not status.available:
                run.add(name, mode, "time_ms", status="unavailable", note=status.reason)
            elif status is not None and status.named_only and cfg.backends is None:
                run.add(name, mode, "time_ms", status="skipped",
                        note=f"runs only when named ({status.auto_reason}); use --backends {name}")
            else:
                run.measure(name, mode)
            step(label)
    for mode in cfg.modes:
        resolved, why = choices[mode != "fwd"]
        if named is None or AUTO in named or (resolved is not None and resolved in named):
            run.add_auto(mode, resolved, why)
        step(f"{case.op} auto {shape} {dname} {mode}")
    del run, inputs
    _cleanup(cfg.device)
