"""Static resource report of the varlen attention kernels, compiled offline (no GPU).

Compiles every kernel of one forward + backward as the launchers would launch them (same
arguments, specialisations and tiles from ``configs.py``) for the chosen target with the
ptxas bundled in the Triton wheel, and prints registers, spilled bytes and ptxas's wgmma
verdict (sm_90) per kernel. A proxy between GPU sessions: spills and registers predict
occupancy; times come only from ``benchmarks/varlen_attention.py``.

    python benchmarks/varlen_attention_sass.py --d 64 128 --dtype bfloat16 --capability 90
    python benchmarks/varlen_attention_sass.py --d 64 --config dkdv=64,64,4,3 --dropout 0.1
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, even from a test shell
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402
from triton.runtime import driver  # noqa: E402

import triangle_attention_sass as T  # noqa: E402  (its offline driver, launch recorder, SASS readers)


def report(d: int, dtype: torch.dtype, causal: bool, dropout: float, capability: int):
    import foldops.kernels.varlen_attention.launch as L

    L.wrap_triton = T._Recorder
    T._Recorder.launches.clear()
    lens = [50, 300, 1022]
    total = sum(lens)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(total, 16, d, generator=gen).to(dtype)
    k, v = (torch.randn(total, 4, d, generator=gen).to(dtype) for _ in range(2))
    cu = torch.tensor([0, 50, 350, total], dtype=torch.int32)
    seed = torch.tensor([3]) if dropout else None
    out, lse = L.varlen_attention_forward(q, k, v, cu, cu, 1022, 1022, causal, d ** -0.5, dropout, seed)
    L.varlen_attention_backward(torch.randn_like(out), q, k, v, out, lse, cu, cu, 1022, 1022, causal, d ** -0.5,
                                dropout, seed)
    for name, _grid, kwargs, compiled in T._Recorder.launches:
        usage = T._usage(T._sass(compiled.asm["cubin"])[0])
        wgmma = T._wgmma_serialized(compiled.asm["ptx"], capability) if capability // 10 == 9 else "-"
        tile = (kwargs.get("BLOCK_M"), kwargs.get("BLOCK_N"), kwargs.get("num_warps"), kwargs.get("num_stages"))
        print(f"{name:18s} D={d:<4d} {str(dtype).split('.')[-1]:9s} causal={int(causal)} dropout={dropout:<4} "
              f"tile={tile} regs={usage.get('REG')} spill={usage.get('STACK', 0)} wgmma={wgmma}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--capability", type=int, default=90)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--config", action="append", default=[],
                        help="kind=BLOCK_M,BLOCK_N,warps,stages overriding configs.py (kind: fwd, dkdv, dq, delta)")
    args = parser.parse_args()
    from foldops.kernels.varlen_attention import configs

    driver.set_active(T._OfflineDriver(args.capability))
    dtype = getattr(torch, args.dtype)
    for d in args.d:
        for spec in args.config:
            kind, values = spec.split("=")
            configs.CONFIGS[(kind, max(16, 1 << (d - 1).bit_length()), dtype == torch.float32)] = tuple(
                int(x) for x in values.split(","))
        report(d, dtype, args.causal, args.dropout, args.capability)


if __name__ == "__main__":
    main()
