"""Host cost of a Triton launch on this GPU machine, and where one op call's host time goes.

Part 1 times one real kernel (triangle multiplication's ``_product_kernel`` at a tiny
size, so the GPU never holds the host back) issued three ways, many calls and one sync:

- ``wrap_triton``: ``wrap_triton(kernel)[grid](...)``, as every foldops launcher issues it;
- ``jit``: ``kernel[grid](...)``, Triton's own launch path (binder, cache key, launch);
- ``direct``: the cached ``CompiledKernel``'s launcher called with the stream and the
  arguments only (what a launch costs at the least from Python).

and checks that the three give the same result. Part 2 prints a cProfile of the public
triangle multiplication (``backend="triton"``, N = 128, C = 128, bf16) forward and
forward+backward, sorted by own time, so the host time can be attributed. Part 3 (``--layer-n``,
default 256) profiles a PairformerLayer inference call the same way.

    PYTHONPATH=src python benchmarks/tools/launch_overhead.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch


def _time(fn, calls: int) -> float:
    """Median-free throughput timing: microseconds per call over ``calls`` unsynced calls."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def launch_paths(calls: int) -> None:
    from torch.library import wrap_triton
    from triton.runtime import driver

    from foldops.kernels.triangle_multiplication.forward import _product_kernel

    n, c = 32, 4
    a = torch.randn(1, c, n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(1, c, n, n, device="cuda", dtype=torch.bfloat16)
    outs = [torch.empty(1, c, n, n, device="cuda", dtype=torch.float32) for _ in range(3)]
    strides = (c * n * n, n * n, n, 1)
    consts = dict(SPLIT_A=False, PRECISION="ieee", BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8)
    grid = (1, c)

    def args(out):
        return (a, b, out, c, n, n, n, *strides, 0, *strides, *strides)  # 0: stride_a_lo (no split)

    def via_wrap():
        wrap_triton(_product_kernel)[grid](*args(outs[0]), **consts, num_warps=4, num_stages=2)

    def via_jit():
        _product_kernel[grid](*args(outs[1]), **consts, num_warps=4, num_stages=2)

    compiled = _product_kernel[grid](*args(outs[2]), **consts, num_warps=4, num_stages=2)
    device = torch.cuda.current_device()
    stream = driver.active.get_current_stream(device)
    run, function, packed = compiled.run, compiled.function, compiled.packed_metadata
    const_values = tuple(consts.values())

    def via_direct():
        run(grid[0], grid[1], 1, stream, function, packed, None, None, None, *args(outs[2]), *const_values)

    for name, fn in (("wrap_triton", via_wrap), ("jit", via_jit), ("direct", via_direct)):
        try:
            print(f"{name:12s} {_time(fn, calls):8.2f} us/launch")
        except Exception as exc:  # the direct call's signature is Triton-version specific
            print(f"{name:12s} failed: {exc!r}")
    torch.cuda.synchronize()
    ref = torch.einsum("bcik,bckj->bcij", a.float(), b.float())
    for name, out in zip(("wrap_triton", "jit", "direct"), outs):
        print(f"{name:12s} max |err| {(out - ref).abs().max().item():.3g}")


def op_profile(calls: int) -> None:
    from foldops.ops import triangle_multiplication

    n, c = 128, 128
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(1, n, n, c, device=dev, dtype=dt, requires_grad=True)
    mask = torch.ones(1, n, n, device=dev, dtype=torch.bool)
    w = dict(norm_in_weight=torch.ones(c), norm_in_bias=torch.zeros(c), p_in_weight=torch.randn(2 * c, c) * 0.05,
             g_in_weight=torch.randn(2 * c, c) * 0.05, norm_out_weight=torch.ones(c), norm_out_bias=torch.zeros(c),
             p_out_weight=torch.randn(c, c) * 0.05, g_out_weight=torch.randn(c, c) * 0.05)
    w = {k: v.to(dev, dt).requires_grad_() for k, v in w.items()}

    def fwd():
        with torch.no_grad():
            triangle_multiplication(x, mask, direction="outgoing", backend="triton", **w)

    def fwd_bwd():
        triangle_multiplication(x, mask, direction="outgoing", backend="triton", **w).sum().backward()

    for name, fn, k in (("fwd", fwd, calls), ("fwd+bwd", fwd_bwd, calls // 4)):
        print(f"\n== trimul {name}: {_time(fn, k):.1f} us/call (N={n}, C={c}, bf16, {k} calls, one sync)")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(k):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)


def layer_profile(n: int, calls: int) -> None:
    """cProfile of PairformerLayer inference (Boltz-2 sizes, bf16 autocast) at N = n,
    by cumulative and own time: where a layer call's host time goes."""
    from foldops.nn import PairformerLayer

    layer = PairformerLayer(384, 128, num_heads=16, pairwise_head_width=32, pairwise_num_heads=4).cuda().eval()
    s = torch.randn(1, n, 384, device="cuda")
    z = torch.randn(1, n, n, 128, device="cuda")
    mask = torch.ones(1, n, device="cuda", dtype=torch.bool)
    pair_mask = mask[:, :, None] & mask[:, None, :]

    def call():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            layer(s, z, mask, pair_mask)

    print(f"\n== PairformerLayer inference N={n}: {_time(call, calls):.1f} us/call ({calls} calls, one sync)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        call()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--layer-n", type=int, default=256, help="PairformerLayer profile at this N (0: skip)")
    args = ap.parse_args()
    launch_paths(args.calls)
    op_profile(args.calls // 4)
    if args.layer_n:
        layer_profile(args.layer_n, max(10, args.calls // 40))


if __name__ == "__main__":
    main()
