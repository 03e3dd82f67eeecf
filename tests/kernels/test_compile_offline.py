"""``benchmarks/tools/compile_offline.py`` compiles a kernel for sm_90 without a GPU.

The script is how compile errors of the Triton kernels are found before a GPU run (the
interpreter accepts what the compiler rejects); this keeps its machinery working: the
launcher is called, the recorder compiles instead of launching, ptxas reports
registers and the wgmma verdict, and the CSV holds the row. One kernel only (a few
seconds); the whole sweep is run by hand.
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


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton ships no ptxas (no NVIDIA backend)")
def test_compiles_one_kernel_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "src"), env.get("PYTHONPATH")]))
    out = tmp_path / "compile.csv"
    args = ["--op", "triangle_attention", "--quick", "--variant", "bf16 N=512 D=32 mask=1 bias=fp32",
            "--kernel", "_fwd_kernel", "--csv", str(out)]
    run = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["kernel"] for r in rows] == ["_fwd_kernel"], rows
    row = rows[0]
    assert row["status"] == "ok" and int(row["regs"]) > 0 and int(row["smem"]) > 0, row
    assert row["mma"] == "wgmma", row  # a 64x64 bf16 tile with 4 warps: one warpgroup's wgmma
