"""The compiled triangle attention kernels keep their wgmma pipeline asynchronous.

ptxas silently serialises every wgmma of a kernel (warning C7515) when the IR gives it
a pipeline stage it cannot prove well formed: dK/dV always did, and the forward and dQ
with a key mask, until ``_retire_mma`` ended each loop's stage inside the loop. The
product still comes out right, so only the compiled code shows the regression. This
compiles every kernel of one forward + backward for sm_90 offline (no GPU) with
``benchmarks/tools/triangle_attention_sass.py`` and reads ptxas's verdict.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "benchmarks", "tools", "triangle_attention_sass.py")
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@pytest.mark.skipif(not all(os.path.exists(os.path.join(BIN, tool)) for tool in ("ptxas", "cuobjdump")),
                    reason="this Triton ships no ptxas / cuobjdump")
@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_no_kernel_serialises_its_wgmma(d, mask):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "src"), env.get("PYTHONPATH")]))
    args = ["--n", "512", "--d", str(d)] + (["--mask"] if mask else [])
    run = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    # kernel, tile, warps, stages, regs, spill, smem, wgmma, ...
    rows = [(line.split()[0], line.split()[7]) for line in run.stdout.splitlines() if line.startswith("_")]
    looped = [(kernel, verdict) for kernel, verdict in rows
              if kernel in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")]
    assert len(looped) == 3, run.stdout
    # "-": no wgmma at all (mma.sync tiles, e.g. dK/dV at D=128); never "serial" or "?".
    assert all(verdict in ("ok", "-") for _, verdict in rows), run.stdout
    if d <= 64:  # these tiles do use wgmma: a "-" here would mean the check saw nothing
        assert all(verdict == "ok" for _, verdict in looped), run.stdout
