"""Plots are drawn from the CSV alone."""

import csv

import pytest

from foldops.bench import CSV_COLUMNS
from foldops.bench.plot import oom_sizes, plot_csv, read_csv, series, size_of

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(op, backend, n, mode, metric, value, status="ok", dtype="fp32"):
    row = dict.fromkeys(CSV_COLUMNS, "")
    row.update(op=op, backend=backend, shape=f"B=1,N={n},H=4,D=32", dtype=dtype, mode=mode, metric=metric,
               value="" if value is None else str(value), status=status, device="cpu (test)")
    return row


def _write(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def csv_path(tmp_path):
    rows = []
    for n, scale in ((32, 1.0), (64, 4.0), (96, 9.0)):
        for mode, factor in (("fwd", 1.0), ("fwd+bwd", 3.0)):
            rows.append(_row("op_a", "torch", n, mode, "time_ms", scale * factor))
            rows.append(_row("op_a", "reference", n, mode, "time_ms", 2 * scale * factor))
            rows.append(_row("op_a", "torch", n, mode, "peak_mib", scale))
            rows.append(_row("op_a", "broken", n, mode, "time_ms", None, status="error"))
    rows.append(_row("op_a", "reference", 128, "fwd+bwd", "time_ms", None, status="oom"))
    rows.append(_row("op_b", "torch", 64, "fwd", "time_ms", 1.5))
    rows.append(_row("op_b", "torch", 32, "fwd", "time_ms", 0.5))
    rows.append(_row("op_c", "torch", 32, "fwd", "time_ms", None, status="oom"))  # nothing to draw
    path = tmp_path / "only-the-csv" / "bench.csv"
    path.parent.mkdir()
    _write(path, rows)
    return path


def test_size_of():
    assert size_of("B=1,N=64,H=4,D=32") == 64
    assert size_of("N=7") == 7
    assert size_of("B=1,NN=3") is None
    assert size_of("") is None


def test_series_keeps_ok_rows_sorted_by_size(csv_path):
    rows = read_csv(csv_path)
    lines = series(rows, "op_a", "fwd", "time_ms")
    assert lines == {"reference": [(32, 2.0), (64, 8.0), (96, 18.0)], "torch": [(32, 1.0), (64, 4.0), (96, 9.0)]}
    assert series(rows, "op_b", "fwd", "time_ms") == {"torch": [(32, 0.5), (64, 1.5)]}
    assert series(rows, "op_c", "fwd", "time_ms") == {}


def test_oom_sizes(csv_path):
    rows = read_csv(csv_path)
    assert oom_sizes(rows, "op_a", "fwd+bwd") == {"reference": [128]}
    assert oom_sizes(rows, "op_a", "fwd") == {}
    assert oom_sizes(rows, "op_c", "fwd") == {"torch": [32]}


def test_series_labels_dtypes_when_several(tmp_path):
    path = tmp_path / "b.csv"
    _write(path, [_row("op", "torch", 32, "fwd", "time_ms", 1.0, dtype="fp32"),
                  _row("op", "torch", 32, "fwd", "time_ms", 0.6, dtype="bf16")])
    assert series(read_csv(path), "op", "fwd", "time_ms") == {"torch bf16": [(32, 0.6)], "torch fp32": [(32, 1.0)]}


def test_one_png_per_op_with_data(csv_path, tmp_path):
    written = plot_csv(csv_path, tmp_path / "plots")
    assert [p.name for p in written] == ["op_a.png", "op_b.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_plots_go_beside_the_csv_by_default(csv_path):
    written = plot_csv(csv_path)
    assert {p.parent for p in written} == {csv_path.parent.resolve()}
