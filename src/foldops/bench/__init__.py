"""Benchmark harness and the ``foldops bench`` command.

For each op, each backend that can run here and a sweep of sizes: median time, peak
memory where measurable, and error against the float64 reference, forward and
forward+backward, and an ``auto`` row per op, size, dtype and mode: what
``backend="auto"`` gives (the mode's own choice; the ``resolved`` column names the
backend, whose measurement it repeats). Results are tidy CSV rows (see :data:`CSV_COLUMNS` and
``docs/bench.md``); :mod:`foldops.bench.plot` draws PNGs from the CSV alone.

    from foldops.bench import BenchConfig, run_bench
    from foldops.device import resolve_device
    rows = run_bench(BenchConfig(device=resolve_device("cpu"), ops=["triangle_attention"],
                                 sizes=[32, 64]), csv_path="bench.csv")

Importing this touches no device and imports neither Triton nor matplotlib.
"""

from foldops.bench.cases import CASES, BenchCase, BenchInputs, CaseUnavailable, get_cases, register_case
from foldops.bench.harness import (
    AUTO,
    CSV_COLUMNS,
    DTYPES,
    METRICS,
    MODES,
    STATUSES,
    BenchConfig,
    Timer,
    dtype_name,
    measure_memory,
    parse_dtype,
    run_bench,
)
from foldops.bench.probe import BackendStatus, auto_choice, backend_statuses, capture_context
from foldops.bench.report import ProgressLine, format_table, write_summary

__all__ = [
    "CASES", "BenchCase", "BenchInputs", "CaseUnavailable", "get_cases", "register_case",
    "AUTO", "CSV_COLUMNS", "DTYPES", "METRICS", "MODES", "STATUSES", "BenchConfig", "Timer",
    "dtype_name", "measure_memory", "parse_dtype", "run_bench",
    "BackendStatus", "auto_choice", "backend_statuses", "capture_context",
    "ProgressLine", "format_table", "write_summary",
]
