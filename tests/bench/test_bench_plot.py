"""Plots are drawn from the CSV alone."""

import csv

import pytest

from foldops.bench import CSV_COLUMNS
from foldops.bench.plot import (
    NotABenchCsv,
    auto_resolved,
    figure_title,
    log_ticks,
    not_drawn,
    oom_sizes,
    plot_csv,
    read_csv,
    series,
    size_of,
)

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(op, backend, n, mode, metric, value, status="ok", dtype="fp32", note="", resolved=""):
    row = dict.fromkeys(CSV_COLUMNS, "")
    row.update(op=op, backend=backend, shape=f"B=1,N={n},H=4,D=32", dtype=dtype, mode=mode, metric=metric,
               value="" if value is None else str(value), status=status, device="cpu (test)", note=note,
               resolved=resolved)
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


def test_title_gives_dtype_and_fixed_dims(csv_path):
    rows = read_csv(csv_path)
    assert figure_title(rows, "op_a", "cpu (test)") == "op_a: fp32; B=1, H=4, D=32, N varies (cpu (test))"


def test_backends_not_drawn_are_named_with_the_reason(tmp_path):
    rows = [_row("op", "torch", n, "fwd", "time_ms", 1.0) for n in (32, 64)]
    rows += [_row("op", "triton", n, "fwd", "time_ms", None, "unavailable", note="needs a CUDA device") for n in (32, 64)]
    rows += [_row("op", "flaky", 32, "fwd", "time_ms", 1.0), _row("op", "flaky", 64, "fwd", "time_ms", None, "error",
                                                                    note="RuntimeError: boom")]
    rows += [_row("op", "big", 32, "fwd", "time_ms", 1.0), _row("op", "big", 64, "fwd", "time_ms", None, "oom")]
    assert not_drawn(rows, "op") == [
        "triton not drawn (unavailable: needs a CUDA device)",
        "flaky missing at N=64 (error: RuntimeError: boom)",
    ]  # big's OOM is drawn as an x


def test_log_ticks_label_enough_values():
    assert log_ticks(0.9, 120) == [1, 2, 5, 10, 20, 50, 100]
    assert len(log_ticks(600, 1100)) >= 3 and all(600 <= t <= 1100 for t in log_ticks(600, 1100))
    assert log_ticks(0.3, 0.45) == [0.3, 0.4]  # under a factor of 2: ends of the range
    assert len(log_ticks(1e-3, 1e6)) <= 12
    assert log_ticks(0, 1) == []


def test_a_file_that_is_not_a_bench_csv(tmp_path):
    junk = tmp_path / "junk.csv"
    junk.write_text("x,y\n1,2\n")
    with pytest.raises(NotABenchCsv, match="is not a foldops bench CSV"):
        plot_csv(junk)


def test_auto_is_a_line_of_its_own_with_the_backend_it_ran(tmp_path):
    rows = []
    for n, torch_ms, triton_ms in ((128, 1.0, 2.0), (256, 3.0, 3.5), (512, 9.0, 6.0)):
        for mode in ("fwd", "fwd+bwd"):
            rows += [_row("op", "torch", n, mode, "time_ms", torch_ms), _row("op", "triton", n, mode, "time_ms", triton_ms)]
            # fwd: the kernel always; fwd+bwd: torch up to N = 256 (a training size rule).
            ran = "triton" if mode == "fwd" or n > 256 else "torch"
            rows.append(_row("op", "auto", n, mode, "time_ms", triton_ms if ran == "triton" else torch_ms, resolved=ran))
    path = tmp_path / "bench.csv"
    _write(path, rows)
    read = read_csv(path)
    assert series(read, "op", "fwd+bwd", "time_ms")["auto"] == [(128, 1.0), (256, 3.0), (512, 6.0)]
    assert auto_resolved(read, "op", "fwd+bwd") == {"auto": {128: "torch", 256: "torch", 512: "triton"}}
    assert auto_resolved(read, "op", "fwd") == {"auto": {128: "triton", 256: "triton", 512: "triton"}}
    written = plot_csv(path, tmp_path / "plots")
    assert [p.name for p in written] == ["op.png"] and written[0].read_bytes()[:8] == PNG_MAGIC


def test_a_csv_from_before_the_resolved_column_still_plots(tmp_path):
    old_columns = [c for c in CSV_COLUMNS if c != "resolved"]
    path = tmp_path / "old.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([_row("op", "torch", 32, "fwd", "time_ms", 1.0), _row("op", "torch", 64, "fwd", "time_ms", 2.0)])
    assert [p.name for p in plot_csv(path, tmp_path / "plots")] == ["op.png"]
