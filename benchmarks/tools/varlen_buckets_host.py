"""Host time of the torch backend's bucketed varlen path (``_varlen_torch.torch_buckets``).

On an accelerator without ``torch.nn.attention.varlen`` (V100, XPU, MPS) the bucketed
path plans its padded buckets on the host each call. This times that host work without
any device: the tensors live on the ``meta`` device, so every op is dispatched (shapes,
allocations, autograd) but no kernel runs and no data moves. The plan is the GPU's:
padding waste 1.25 (``meta`` is not ``cpu``), SDPA counted as fused (no score bytes),
an unbounded chunk budget. Inputs: ``benchmarks/varlen_attention.py``'s GPU case,
64 proteins of 50-1022 tokens (``lengths(64, 50, 1022, 0)``), H = 16, D = 64, bf16; SDPA is the memory-efficient
kernel (``aten._scaled_dot_product_efficient_attention``: the V100 path).

Columns: ``plan``, the call up to its first gather (bucket planning, the host-built
plan and its copy to the device; masks built per bucket after that are not in it);
``fwd`` (one call, no grad); ``fwd+bwd`` (the call and ``backward``): medians of
``--calls`` after warm-up, in microseconds; then, over one fwd+bwd, the ops dispatched on
device tensors (views included) and the copies from host to device (on CUDA a
``.to(device)`` of pageable host memory waits for the stream to drain). ``--device cpu`` runs on
real CPU tensors instead (the kernels' time included: use small ``--heads`` / ``--dim``).
Compare versions by pointing PYTHONPATH at each one's src.

    PYTHONPATH=src python benchmarks/tools/varlen_buckets_host.py [--calls 200] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import foldops.ops._varlen_torch as _vt  # first: PYTHONPATH picks the foldops under test

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from varlen_attention import lengths  # noqa: E402


class _StopAfterPlan(Exception):
    pass


def _efficient_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, scale=None, is_causal=False):
    """SDPA as the memory-efficient kernel (the V100 path) for ``meta`` tensors, whose
    ``scaled_dot_product_attention`` is a slow Python decomposition."""
    if attn_mask is not None:
        attn_mask = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, attn_mask, q.requires_grad, dropout_p, is_causal, scale=scale)[0]


class _CountOps(TorchDispatchMode):
    """Counts the ops on the device tensors and the copies from the host to the device."""

    def __init__(self, device):
        super().__init__()
        self.device, self.ops, self.copies = device, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.device == self.device for t in tensors):
            self.ops += 1
            if any(t.device.type == "cpu" for t in tensors) and self.device.type != "cpu":
                self.copies += 1
        return out


def _median_us(fn, calls: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--device", default="meta")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: no spin-waits on a busy host)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("FOLDOPS_CHUNK_BUDGET_MB", str(1 << 20))
    _vt.sdpa_has_fused_kernels = lambda device: True
    if args.device == "meta":
        torch.nn.functional.scaled_dot_product_attention = _efficient_sdpa
    lens = lengths(64, 50, 1022, 0)
    lens_t = torch.tensor(lens)
    device = torch.device(args.device)
    total, heads, dim = sum(lens), args.heads, args.dim
    make = lambda: torch.randn(total, heads, dim, device=device, dtype=torch.bfloat16)  # noqa: E731
    q, k, v, go = make(), make(), make(), make()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def stop(*_):
        raise _StopAfterPlan

    print(f"torch_buckets host time, {len(lens)} sequences of {min(lens)}-{max(lens)} tokens "
          f"({total}), H={heads}, D={dim}, bf16, device {device}, {_vt.__file__}")
    for causal in (False, True):
        for return_lse in (False, True):
            def call(tensors, causal=causal, return_lse=return_lse):
                return _vt.torch_buckets(*tensors, lens_t, lens_t, causal, dim ** -0.5, 0.0, None, return_lse)[0]

            def fwd_bwd():
                torch.autograd.backward(call(leaves), go)

            def plan():
                try:
                    call((q, k, v))
                except _StopAfterPlan:
                    pass

            with torch.no_grad():
                fwd = _median_us(lambda: call((q, k, v)), args.calls)
            both = _median_us(fwd_bwd, args.calls)
            _vt._GatherRows.apply = stop  # the call ends where the plan is on the device
            try:
                planned = _median_us(plan, args.calls)
            finally:
                del _vt._GatherRows.apply  # back to Function.apply
            with _CountOps(device) as counted:
                fwd_bwd()
            print(f"causal={causal!s:5} return_lse={return_lse!s:5}  plan {planned:7.0f} us   "
                  f"fwd {fwd:7.0f} us   fwd+bwd {both:7.0f} us   fwd+bwd device ops {counted.ops:4d}, "
                  f"host-to-device copies {counted.copies}")


if __name__ == "__main__":
    main()
