"""Host time of the Triton triangle attention and triangle multiplication, on CPU,
without the kernels.

The launches are replaced by no-ops, so what is timed is everything the host does per
call around them: checks, config choice, dBias splits, mask conversion, weight casts,
allocations, autograd. Triangle attention runs on tiny CPU tensors (the allocations are
then negligible too). Triangle multiplication (``--op trimul``, public op with
``backend='triton'``, default N = C = 128, bf16) runs on meta tensors: allocations and
the torch ops between launches (weight-gradient GEMMs, reductions) are dispatched as on
a GPU but do no work, as the CUDA caching allocator and asynchronous launches would.
Prints the median microseconds per call and, with ``--profile``, the top entries of a
cProfile of the forward (or of fwd+bwd with ``--profile-bwd``).

    PYTHONPATH=src python benchmarks/host_path_cpu.py [--calls 2000] [--mask]
    PYTHONPATH=src python benchmarks/host_path_cpu.py --op trimul [--n 128] [--c 128]
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
    parser.add_argument("--op", choices=("triattn", "trimul"), default="triattn")
    parser.add_argument("--c", type=int, default=128, help="channels (trimul)")
    parser.add_argument("--profile-bwd", action="store_true", help="profile fwd+bwd instead (trimul)")
    parser.add_argument("--sort", default="tottime", help="cProfile sort key (trimul)")
    args = parser.parse_args()
    if args.op == "trimul":
        return _trimul(args)

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


def _timed(name: str, fn, calls: int) -> None:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    print(f"{name:8s} host time: {statistics.median(times) * 1e6:7.1f} us/call (median of {calls})")


def _trimul(args) -> None:
    import sys

    from foldops.kernels.triangle_multiplication import launch, op
    from foldops.ops import triangle_multiplication

    public = sys.modules["foldops.ops.triangle_multiplication"]  # the module, not the function

    launch.wrap_triton = lambda fn: _NoLaunch()
    launch.triton_interpret = lambda: False  # GPU-style configs; meta tensors are launched
    op._use_registered_ops = lambda t: False  # meta tensors take the eager (CUDA) path
    public.kernel_support = lambda device, explicit=True: None  # meta passes as a GPU
    n, c, dev, dt = args.n if args.n != 32 else 128, args.c, "meta", torch.bfloat16
    x = torch.empty(1, n, n, c, device=dev, dtype=dt)
    go = torch.empty(1, n, n, c, device=dev, dtype=dt)
    mask = torch.ones(1, n, n, dtype=torch.bool, device=dev) if args.mask else None
    shapes = dict(norm_in_weight=(c,), norm_in_bias=(c,), p_in_weight=(2 * c, c), g_in_weight=(2 * c, c),
                  norm_out_weight=(c,), norm_out_bias=(c,), p_out_weight=(c, c), g_out_weight=(c, c))
    w = {k: torch.empty(s, device=dev, dtype=dt) for k, s in shapes.items()}
    wg = {k: v.clone().requires_grad_() for k, v in w.items()}
    xg = x.clone().requires_grad_()
    leaves = [xg, *wg.values()]

    def fwd():
        with torch.no_grad():
            triangle_multiplication(x, mask, direction="outgoing", backend="triton", **w)

    def fwd_bwd():
        o = triangle_multiplication(xg, mask, direction="outgoing", backend="triton", **wg)
        torch.autograd.grad(o, leaves, go)

    print(f"triangle multiplication, public op, backend='triton', launches stubbed, meta tensors, "
          f"N = {n}, C = {c}, bf16, mask = {args.mask}")
    _timed("forward", fwd, args.calls)
    _timed("fwd+bwd", fwd_bwd, args.calls)
    if args.profile or args.profile_bwd:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            (fwd_bwd if args.profile_bwd else fwd)()
        profile.disable()
        pstats.Stats(profile).sort_stats(args.sort).print_stats(25)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


if __name__ == "__main__":
    main()
