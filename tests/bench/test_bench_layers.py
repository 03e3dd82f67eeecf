"""foldops.bench.layers: the layer group runs on CPU at tiny widths and gives tidy rows."""

import torch

from foldops.bench.harness import CSV_COLUMNS
from foldops.bench.layers import run_layers


def test_layer_rows_on_cpu():
    rows = run_layers(torch.device("cpu"), sizes=[5], dtype=torch.float32, layers=("PairformerLayer",),
                      repeats=1, calls=2)
    assert rows and all(tuple(r) == CSV_COLUMNS for r in rows)
    ours = [r for r in rows if r["backend"] == "foldops"]
    assert {(r["op"], r["mode"], r["metric"]) for r in ours} == {
        ("PairformerLayer", mode, metric) for mode in ("inference", "training") for metric in ("time_ms", "throughput_ms")}
    assert all(r["status"] == "ok" and float(r["value"]) > 0 for r in ours)
    for r in rows:  # Boltz's layers, when importable, run too
        assert r["status"] == "ok", r
