"""The compiled triangle attention kernels keep their wgmma pipeline asynchronous.

ptxas silently serialises every wgmma of a kernel (warning C7515) when the IR gives it
a pipeline stage it cannot prove well formed: dK/dV always did, and the forward and dQ
with a key mask, until ``_retire_mma`` ended each loop's stage inside the loop. The
product still comes out right, so only the compiled code shows the regression. This
compiles every kernel of one forward + backward for sm_90 offline (no GPU) with
``benchmarks/triangle_attention_sass.py`` and reads ptxas's verdict.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "benchmarks", "triangle_attention_sass.py")
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@pytest.mark.skipif(not all(os.path.exists(os.path.join(BIN, tool)) for tool in ("ptxas", "cuobjdump")),
                    reason="this Triton ships no ptxas / cuobjdump")
@pytest.mark.parametrize("args", [["--n", "512"], ["--n", "512", "--mask"]], ids=["no-mask", "mask"])
def test_no_kernel_serialises_its_wgmma(args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "src"), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith("_")]
    verdicts = {row[0]: row[7] for row in rows}  # kernel, tile, warps, stages, regs, spill, smem, wgmma
    assert {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_bwd_dbias_kernel"} <= set(verdicts)
    assert {k for k, v in verdicts.items() if v not in ("ok", "-")} == set(), run.stdout
