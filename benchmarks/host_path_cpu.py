"""Host time of the Triton triangle attention's launchers, on CPU, without the kernels.

The launches are replaced by no-ops, so what is timed is everything the launchers do
per call around them: checks, config choice, dBias splits, mask-bias construction,
allocations. Sizes are tiny (the allocations are then negligible too). Prints the
median microseconds per call of the forward and backward launchers and the top
entries of a cProfile of the forward.

    PYTHONPATH=src python benchmarks/host_path_cpu.py [--calls 2000] [--mask]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--mask", action="store_true", help="with a key mask (mask-bias construction)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the forward")
    parser.add_argument("--public", action="store_true",
                        help="time the public op (foldops.ops.triangle_attention, backend='triton') "
                             "forward and forward+backward instead of the launchers")
    args = parser.parse_args()

    from foldops.kernels.triangle_attention import launch

    launch.wrap_triton = lambda fn: _NoLaunch()
    launch._interpreting = lambda: False  # GPU-style config choice and switches
    n, heads, d = args.n, 4, 32
    q, k, v, go = (torch.randn(1, n, n, heads, d) for _ in range(4))
    bias = torch.randn(1, heads, n, n)
    mask = torch.ones(1, n, n, dtype=torch.bool) if args.mask else None
    out, _ = launch.triangle_attention_forward(q, k, v, bias, mask, 0.2)
    lse = torch.zeros(1, n, heads, n, dtype=torch.float64)

    def fwd():
        launch.triangle_attention_forward(q, k, v, bias, mask, 0.2)

    def bwd():
        launch.triangle_attention_backward(go, q, k, v, bias, mask, out, lse, 0.2)

    if args.public:
        from foldops.ops import triangle_attention

        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]

        def fwd():  # noqa: F811
            with torch.no_grad():
                triangle_attention(q, k, v, bias, mask, scale=0.2, backend="triton")

        def bwd():  # noqa: F811  (forward + backward)
            o = triangle_attention(*leaves, mask, scale=0.2, backend="triton")
            torch.autograd.grad(o, leaves, go)

    for name, fn in (("forward", fwd), ("fwd+bwd" if args.public else "backward", bwd)):
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(f"{name:8s} {'public op' if args.public else 'launcher'} host time: {statistics.median(times) * 1e6:7.1f} us/call (median of {args.calls})")
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            fwd()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


if __name__ == "__main__":
    main()
