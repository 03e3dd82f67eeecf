"""One forward + backward of the Triton triangle attention, for Nsight Compute.

The first call compiles and warms up; only the second runs between
cudaProfilerStart/Stop, so ``ncu --profile-from-start off`` records exactly the kernels
of one fwd+bwd (forward, delta, bias transpose, dBias, dK/dV, dQ):

    ncu --profile-from-start off --clock-control none --set full --import-source yes \\
        -o /tmp/ta512 python benchmarks/tools/triangle_attention_ncu.py --n 512
    ncu -i /tmp/ta512.ncu-rep --page details --csv > details.csv
    ncu -i /tmp/ta512.ncu-rep --page source --csv --print-source sass \\
        -k regex:_bwd_dkdv > dkdv_sass.csv

Inputs are those of benchmarks/triangle_attention.py (B=1, H=4, D=32, random, a key
mask keeping each key with probability 1 - --mask-fraction: all kept by default);
--no-mask passes no mask at all (the kernels compiled without the mask path).
"""

from __future__ import annotations

import argparse

import torch

from foldops.kernels.triangle_attention import triangle_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--mask-fraction", type=float, default=0.0)
    parser.add_argument("--no-mask", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda")
    shape = (1, args.n, args.n, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(shape, device=device, dtype=dtype)
    bias = torch.randn(1, args.heads, args.n, args.n, device=device, dtype=dtype, requires_grad=True)
    mask = None if args.no_mask else torch.rand(1, args.n, args.n, device=device) > args.mask_fraction

    def step() -> None:
        out = triangle_attention(q, k, v, bias, mask, args.head_dim ** -0.5)
        torch.autograd.grad(out, [q, k, v, bias], grad_out)  # no .grad accumulation kernels

    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
