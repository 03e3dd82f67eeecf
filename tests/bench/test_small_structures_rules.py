"""The size-rule thresholds that benchmarks/small_structures.py prints (and reads back
from a CSV with ``--rules-from``): torch wins up to the largest N at which it is no
slower than every other backend at all measured N up to it, the smaller over bf16 and
fp32; a torch time that could not be measured breaks the run of wins (a kernel that
could not run leaves torch alone in the comparison)."""

from benchmark_scripts import load_benchmark


def _rows(op, mode, dtype, table):
    return [dict(section="rules", name=op, impl=impl, N=str(n), mode=mode, metric=f"tput_{dtype}",
                 ms="" if ms is None else str(ms))
            for n, per_impl in table.items() for impl, ms in per_impl.items()]


def test_threshold_is_the_smaller_of_the_dtypes_and_stops_at_the_first_loss():
    bench = load_benchmark("small_structures")
    rows = _rows("op_a", "training", "bfloat16", {
        64: {"torch": 1.0, "triton": 2.0},
        128: {"torch": 1.0, "triton": 1.0},  # a tie counts as a win
        256: {"torch": 2.0, "triton": 1.0},
        384: {"torch": 1.0, "triton": 2.0},  # a later win does not count
    }) + _rows("op_a", "training", "float32", {
        64: {"torch": 1.0, "triton": 2.0},
        128: {"torch": None, "triton": 1.0},  # torch could not run
        256: {"torch": 1.0, "triton": 2.0},
    })
    (line,) = bench.threshold_lines(rows)
    assert line.startswith('"op_a" / "training": Rule(64, MEASURE,')
    assert "(bf16 128, fp32 64; measured up to 256)" in line


def test_one_dtype_only_gives_no_rule():
    bench = load_benchmark("small_structures")
    rows = _rows("op_b", "inference", "bfloat16", {64: {"torch": 1.0, "triton": 2.0}})
    rows.append(dict(section="host", name="op_b", impl="torch", N="64", mode="fwd", metric="host", ms="1"))
    (line,) = bench.threshold_lines(rows)
    assert "Rule(" not in line and "only ['bfloat16'] measured" in line
