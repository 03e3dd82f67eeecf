"""``benchmarks/triangle_multiplication.py --gpumode`` (the GPU MODE trimul shapes,
hidden width 128): the shape table, and a CPU smoke run at tiny sizes (the Triton
kernels under the interpreter; times are not checked)."""

import csv
import math

import pytest
import torch

from benchmark_scripts import load_benchmark


def test_gpumode_shapes_are_the_competitions():
    """Forward only, B 1-2, N 256-1024, D 128 / 384, hidden 128 (seven shapes); --tiny
    keeps B, the mask and D != H where the shape has it."""
    bench = load_benchmark("triangle_multiplication")
    shapes = bench.GPUMODE_SHAPES
    assert len(shapes) == 7
    assert {b for b, *_ in shapes} == {1, 2} and {n for _, n, *_ in shapes} == {256, 512, 768, 1024}
    assert {d for _, _, d, _, _ in shapes} == {128, 384} and {h for *_, h, _ in shapes} == {128}
    small = bench.tiny(shapes)
    assert [(b, m) for b, _, _, _, m in small] == [(b, m) for b, _, _, _, m in shapes]
    assert all((d != h) == (sd != sh) for (_, _, d, h, _), (_, _, sd, sh, _) in zip(shapes, small))
    assert bench.geomean([1.0, 4.0]) == pytest.approx(2.0)
    # H != C FLOPs: projections 2 P C (4H + C) + 2 P H C, product 2 H N^3.
    assert bench.counts(1, 4, 6, hidden=2)["fwd_flop"] == 2 * 16 * 6 * (8 + 6) + 2 * 16 * 2 * 6 + 2 * 2 * 64


def test_gpumode_smoke_on_cpu(tmp_path):
    pytest.importorskip("triton")
    bench = load_benchmark("triangle_multiplication")
    shapes = ((2, 5, 8, 4, True), (1, 6, 12, 16, False))  # H < D with a mask, H > D without
    means = bench.gpumode(torch.device("cpu"), str(tmp_path), shapes=shapes, repeats=1)
    assert means["triton"] > 0 and means["torch"] > 0
    assert means["cuequivariance"] is None  # not importable here, or H not a multiple of 32
    rows = list(csv.DictReader(open(tmp_path / "triangle_multiplication_gpumode.csv")))
    fwd = [r for r in rows if r["mode"] == "gpumode_fwd"]
    assert [(r["B"], r["N"], r["C"], r["H"], r["masked"]) for r in fwd if r["backend"] == "triton"] == [
        ("2", "5", "8", "4", "1"), ("1", "6", "12", "16", "0")]
    assert all(r["status"] == "unavailable" and r["note"] for r in fwd if r["backend"] == "cuequivariance")
    means_rows = {r["backend"]: r for r in rows if r["mode"] == "gpumode_geomean"}
    times = [float(r["value"]) for r in fwd if r["backend"] == "triton"]
    assert float(means_rows["triton"]["value"]) == pytest.approx(math.sqrt(times[0] * times[1]), rel=1e-3)
