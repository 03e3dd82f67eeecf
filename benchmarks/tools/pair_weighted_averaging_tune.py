"""Tile sweep of the pair-weighted averaging weighted-sum kernel on the GPU.

For each candidate ``configs.CONFIGS["wx"]`` (BLOCK_I, BLOCK_J, BLOCK_SC, num_warps,
num_stages), the op forward (bf16, gated, pair mask, B = 1, H = 8, C = 32, Boltz-2's
MSA sizes) is timed with ``triton.testing.do_bench`` at each N; the default row comes
first. Prints one line per (candidate, N) with the median and the ratio to the default.

    PYTHONPATH=src python benchmarks/tools/pair_weighted_averaging_tune.py [--n 512 768] [--rows 1024]
"""

from __future__ import annotations

import argparse

import torch

CANDIDATES = [
    (128, 64, 128, 8, 3),
    (128, 64, 256, 8, 3),
    (128, 128, 128, 8, 3),
    (256, 64, 128, 8, 3),
    (64, 64, 256, 4, 4),
    (128, 64, 128, 4, 4),
    (128, 32, 256, 8, 4),
    (256, 64, 128, 8, 4),
    (256, 32, 128, 8, 4),
    (256, 64, 64, 8, 3),
    (256, 128, 128, 8, 2),
]


def main() -> None:
    from triton.testing import do_bench

    from foldops.kernels.pair_weighted_averaging import configs, launch
    from foldops.ops import pair_weighted_averaging

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[512, 768])
    ap.add_argument("--rows", type=int, default=1024)
    args = ap.parse_args()
    heads, dim = 8, 32
    default = configs.CONFIGS["wx"]
    cands = [default] + [c for c in CANDIDATES if c != default]
    for n in args.n:
        g = torch.Generator(device="cuda").manual_seed(0)
        v, gate = (torch.randn(1, args.rows, n, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(2))
        logits = torch.randn(1, heads, n, n, device="cuda", dtype=torch.bfloat16, generator=g)
        mask = torch.ones(1, n, n, device="cuda", dtype=torch.bool)
        mask[:, :, -n // 16:] = False
        base = None
        ref = None
        for cand in cands:
            configs.CONFIGS["wx"] = cand
            launch.clear_caches()
            try:
                with torch.no_grad():
                    fn = lambda: pair_weighted_averaging(v, logits, mask, gate=gate, backend="triton")  # noqa: E731
                    out = fn()
                    if ref is None:
                        ref = out
                    err = (out.float() - ref.float()).abs().max().item()
                    ms = do_bench(fn, warmup=10, rep=60, return_mode="median")
            except Exception as exc:  # a tile that does not fit (shared memory) is a result too
                print(f"wx {str(cand):24s} N={n:5d} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            base = base or ms
            print(f"wx {str(cand):24s} N={n:5d} S={args.rows} fwd {ms:.3f} ms  x{ms / base:.2f}  "
                  f"max|diff| {err:.2g}", flush=True)
        configs.CONFIGS["wx"] = default
        launch.clear_caches()


if __name__ == "__main__":
    main()
