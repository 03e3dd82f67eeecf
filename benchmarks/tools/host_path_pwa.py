"""Host time per call of the Triton pair-weighted averaging, on CPU, without the kernels.

The Triton launches are replaced by no-ops that record the call, and the launchers
choose tiles as on a GPU, so what is timed is everything the public op
(``foldops.ops.pair_weighted_averaging``, backend ``triton``) does per call around
the launches: validation, backend choice, custom-op or autograd dispatch, softmax
weights and masks (the small PyTorch ops on [B, H, N, N]), allocations. Default size:
Boltz-2's MSA module at N = 128, S = 64 (8 heads x 32 channels), bf16, B = 1, with a
gate, a pair mask and an MSA mask as the layer passes them. Prints the median
microseconds per call of the forward (no_grad) and of forward + backward, the Triton
launches per call, and with ``--profile`` a cProfile of each.

    PYTHONPATH=src python benchmarks/tools/host_path_pwa.py [--calls 300] [--no-masks] [--profile]

The CPU's own PyTorch ops (softmax on [B, H, N, N]) are in the time: at N = 128 they
take tens of microseconds here and a few on a GPU, where only their launch is on the
host. Compare before / after on the same machine only.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # importable without a GPU

import torch  # noqa: E402


class _Recorder:
    """Stands in for ``wrap_triton``: ``recorder(kernel)[grid](*args, **meta)`` records
    the kernel's name and launches nothing."""

    def __init__(self):
        self.launches = []
        self._kernel = None

    def __call__(self, kernel):
        self._kernel = kernel
        return self

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.launches.append(getattr(self._kernel, "__name__", repr(self._kernel)))


def _stub_launches():
    """No-op launches, GPU tile choice (not the interpreter's) in the launchers."""
    from foldops.kernels.pair_weighted_averaging import launch

    recorder = _Recorder()
    launch.wrap_triton = recorder
    launch._interpreting = lambda: False
    launch._num_sms = lambda device: 132  # an H100's SMs: the dW split count as there
    return recorder


def _time(fn, calls: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--rows", type=int, default=64, help="MSA rows S")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--no-masks", action="store_true", help="no pair mask, no MSA mask")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of fwd and fwd+bwd")
    args = parser.parse_args()
    torch.set_num_threads(1)

    recorder = _stub_launches()
    from foldops.ops import pair_weighted_averaging

    b, s, n, h, c = 1, args.rows, args.n, args.heads, args.dim
    dtype = torch.bfloat16
    v, g, go = (torch.randn(b, s, n, h, c, dtype=dtype) for _ in range(3))
    logits = torch.randn(b, n, n, h, dtype=dtype).permute(0, 3, 1, 2)  # the layer's view
    mask = None if args.no_masks else torch.ones(b, n, n, dtype=torch.bool)
    msa_mask = None if args.no_masks else torch.ones(b, s, n, dtype=torch.bool)
    leaves = [t.clone().requires_grad_() for t in (v, logits, g)]

    def fwd():
        with torch.no_grad():
            pair_weighted_averaging(v, logits, mask, gate=g, msa_mask=msa_mask, backend="triton")

    def fwd_bwd():
        out = pair_weighted_averaging(leaves[0], leaves[1], mask, gate=leaves[2], msa_mask=msa_mask,
                                      backend="triton")
        torch.autograd.grad(out, leaves, go)

    print(f"B={b} S={s} N={n} H={h} C={c} bf16, masks: {not args.no_masks}, launches stubbed, "
          f"torch {torch.__version__}, 1 thread")
    for name, fn in (("forward", fwd), ("fwd+bwd", fwd_bwd)):
        recorder.launches.clear()
        fn()
        launches = list(recorder.launches)
        us = _time(fn, args.calls)
        print(f"{name:8s} {us:8.1f} us/call (median of {args.calls}); launches: {', '.join(launches)}")
    if args.profile:
        for name, fn in (("forward", fwd), ("fwd+bwd", fwd_bwd)):
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(args.calls):
                fn()
            profile.disable()
            print(f"--- cProfile, {name}, {args.calls} calls")
            pstats.Stats(profile).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
