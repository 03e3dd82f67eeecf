"""Where a layer's GPU time goes: the torch profiler's kernels of one warm call, by total time.

One table per (target, mode), the kernels sorted by device time with their share of the
call, so a speed gap can be attributed before anything is tuned. Targets, at the sizes
of their issue's targets (bf16 autocast):

- ``pwa``: ``foldops.nn.PairWeightedAveraging`` at Boltz-2's MSA sizes (c_m 64, c_z 128,
  8 x 32), ``--n`` tokens and ``--rows`` MSA rows (default 512 x 1024), beside Boltz's
  module when ``boltz`` is importable;
- ``ipa``: ``foldops.nn.InvariantPointAttention`` (c_s 256, c_z 128, 12 heads x 16,
  4 / 8 points) at ``--n`` (default 1024), beside the OpenFold-form implementation of
  ``benchmarks/invariant_point_attention.py``;
- ``varlen``: the torch backend's bucketed path (what V100, XPU, MPS run) beside SDPA on
  the padded batch, on ``benchmarks/varlen_attention.py``'s GPU case (64 proteins of
  50-1022 tokens, 16 heads x 64, bf16).

    PYTHONPATH=src python benchmarks/tools/kernel_breakdown.py --target pwa [--n 512 --rows 1024]
    PYTHONPATH=src python benchmarks/tools/kernel_breakdown.py --target ipa [--n 1024]
    PYTHONPATH=src python benchmarks/tools/kernel_breakdown.py --target varlen

``--device cpu`` runs the same code on CPU (a smoke test: CPU op times, tiny sizes).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _pwa_impls(n: int, rows: int, device) -> List[Tuple[str, Callable[[bool], torch.Tensor]]]:
    import pair_weighted_averaging as bench

    impls = []
    for backend in ("auto", "boltz"):
        try:
            run, _ = bench.make_module(backend, n, rows, device)
        except ImportError as exc:
            print(f"{backend}: not importable ({exc})")
            continue
        impls.append((f"pwa {backend}", run))
    return impls


def _ipa_impls(n: int, device) -> List[Tuple[str, Callable[[bool], torch.Tensor]]]:
    import invariant_point_attention as bench
    from foldops.nn import InvariantPointAttention

    torch.manual_seed(0)
    ours = InvariantPointAttention(bench.C_S, bench.C_Z, bench.C_HIDDEN, bench.HEADS, bench.PQ, bench.PV).to(device)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.05)
    openfold = bench.OpenFoldFormIPA(bench.C_S, bench.C_Z, bench.C_HIDDEN, bench.HEADS, bench.PQ, bench.PV).to(device)
    openfold.load_state_dict(ours.state_dict())
    s = torch.randn(1, n, bench.C_S, device=device)
    z = torch.randn(1, n, n, bench.C_Z, device=device)
    rots, trans = bench.random_frames(n, device)
    mask = torch.ones(1, n, device=device)

    def make(layer, frames):
        def run(grad: bool):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                return layer(s.requires_grad_(grad), z.requires_grad_(grad), *frames, mask)
        return run

    return [("ipa foldops", make(ours, ((rots, trans),))), ("ipa openfold", make(openfold, (rots, trans)))]


def _varlen_impls(device) -> List[Tuple[str, Callable[[bool], torch.Tensor]]]:
    import varlen_attention as bench

    lens = bench.lengths(64, 50, 1022, 0)  # the benchmark's default --seed
    impls = []
    for name in ("foldops_torch_buckets", "sdpa_padded"):
        leaves, fn = bench.build(name, lens, 16, 64, torch.bfloat16, device)

        def run(grad: bool, leaves=leaves, fn=fn):
            return fn(*(t.detach().requires_grad_(grad) for t in leaves))

        impls.append((f"varlen {name}", run))
    return impls


def breakdown(name: str, run: Callable[[bool], torch.Tensor], mode: str, device, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    grad = mode == "fwd+bwd"

    def step():
        with torch.set_grad_enabled(grad):
            out = run(grad)
            if grad:
                out.backward(torch.ones_like(out))

    for _ in range(2):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    print(f"--- {name}, {mode}: {total / 1e3:.3f} ms of {'kernel' if cuda else 'CPU op'} time, "
          f"{sum(e.count for e in events)} entries", flush=True)
    for e in events[:top]:
        t = getattr(e, key)
        print(f"{t / 1e3:9.3f} ms {100 * t / total:5.1f}% x{e.count:<4d} {e.key[:110]}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("pwa", "ipa", "varlen"), required=True)
    parser.add_argument("--n", type=int, default=None, help="tokens (pwa 512, ipa 1024)")
    parser.add_argument("--rows", type=int, default=1024, help="MSA rows (pwa)")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.target == "pwa":
        impls = _pwa_impls(args.n or 512, args.rows, device)
    elif args.target == "ipa":
        impls = _ipa_impls(args.n or 1024, device)
    else:
        impls = _varlen_impls(device)
    for name, run in impls:
        for mode in args.modes:
            breakdown(name, run, mode, device, args.top)


if __name__ == "__main__":
    main()
