"""The 16-bit products of triangle multiplication and pair-weighted averaging keep their
wgmma pipeline asynchronous on sm_90.

ptxas serialises every wgmma of a kernel (warning C7515: each product waits for the
previous one) when non-wgmma instructions define accumulator registers inside a pipeline
stage. A path that skips a runtime-bounded loop carries a zeroed accumulator to the
loop's final wgmma wait and does exactly that; ``tl.assume`` on the trip count removes
the path. The results stay right either way, so only the compiled code shows a
regression. This compiles the kernels for sm_90 offline (no GPU) with
``benchmarks/tools/compile_offline.py`` and reads ptxas's verdict.

Which kernels a given Triton serialises differs by version: the GPU machine's Triton 3.6
serialised all five specialisations checked here, Triton 3.9 the split product and
``_out_bwd_kernel`` only. The full sweep for every launched configuration is
``PYTHONPATH=src <python with triton 3.6> benchmarks/tools/compile_offline.py
--op triangle_multiplication --op pair_weighted_averaging``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "benchmarks", "tools", "compile_offline.py")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

CASES = {
    # the forward product (16-bit), the backward's split products (fp16 inputs: dt as two
    # fp16 planes, hi and lo; two stride specialisations) and the output-side backward at
    # C = 128
    "triangle_multiplication": (["--variant", "fp16 C=128 mask=0 out", "--kernel", "_product_kernel",
                                 "--kernel", "_out_bwd_kernel"],
                                {("_product_kernel", "BLOCK_K=64,BLOCK_M=128,BLOCK_N=128,GROUP_M=8"),
                                 ("_product_kernel", "BLOCK_K=32,BLOCK_M=128,BLOCK_N=128,GROUP_M=8"),
                                 ("_out_bwd_kernel", "BLOCK_N=32,BLOCK_P=64,HP=128")}),
    # dW = dO' v^T with a gate and an MSA mask (Boltz-2's layer), 16-bit
    "pair_weighted_averaging": (["--variant", "fp16 C=32 gate=1 mask=0 msa_mask=1", "--kernel", "_dw_kernel"],
                                {("_dw_kernel", "BLOCK_J=128,BLOCK_K=64,BLOCK_I=128,C=32")}),
}


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton ships no ptxas (no NVIDIA backend)")
@pytest.mark.parametrize("op", sorted(CASES))
def test_16bit_products_keep_wgmma_async(op, tmp_path):
    args, expected = CASES[op]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "src"), env.get("PYTHONPATH")]))
    out = tmp_path / "compile.csv"
    run = subprocess.run([sys.executable, TOOL, "--op", op, *args, "--csv", str(out)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert {(r["kernel"], r["tile"]) for r in rows} == expected, rows  # the production tiles were compiled
    # "wgmma-serial" is the regression; "-" or "mma" would mean these tiles lost wgmma.
    assert all(r["status"] == "ok" and r["mma"] == "wgmma" for r in rows), rows
    # The products take both operands from shared memory: no register-A wgmma left in
    # flight at the back-edge, which Triton 3.6 let race with the next step's loads
    # (triton-lang/triton#9433; the tool's SASS check sees the race only where ptxas
    # reuses the registers, which depends on the Triton version).
    assert all(r["rs_loops"] == "0" for r in rows if r["kernel"] == "_product_kernel"), rows
