"""Benchmark harness and the ``foldops bench`` command.

For each op, each backend that can run here and a sweep of sizes: median time, peak
memory where measurable, and error against the float64 reference, forward and
forward+backward. Results are tidy CSV rows (see :data:`CSV_COLUMNS` and
``docs/bench.md``); :mod:`foldops.bench.plot` draws PNGs from the CSV alone.

    from foldops.bench import BenchConfig, run_bench
    from foldops.device import resolve_device
    rows = run_bench(BenchConfig(device=resolve_device("cpu"), ops=["triangle_attention"],
                                 sizes=[32, 64]), csv_path="bench.csv")

Importing this touches no device and imports neither Triton nor matplotlib.
"""

from foldops.bench.cases import CASES, BenchCase, BenchInputs, CaseUnavailable, get_cases, register_case
from foldops.bench.harness import (
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
from foldops.bench.probe import BackendStatus, backend_statuses, capture_context
from foldops.bench.report import ProgressLine, format_table, write_summary

__all__ = [
    "CASES", "BenchCase", "BenchInputs", "CaseUnavailable", "get_cases", "register_case",
    "CSV_COLUMNS", "DTYPES", "METRICS", "MODES", "STATUSES", "BenchConfig", "Timer",
    "dtype_name", "measure_memory", "parse_dtype", "run_bench",
    "BackendStatus", "backend_statuses", "capture_context",
    "ProgressLine", "format_table", "write_summary",
]
