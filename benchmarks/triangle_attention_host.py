"""Host (CPU) time per call of the triangle attention op and of its layers, on a GPU.

At small N the Triton op is bound by the host: the GPU finishes each kernel before the
next is launched. This times, at a size whose device time is negligible, the public
fwd+bwd (custom op + autograd), each launcher alone, one bare Triton launch, and prints
a cProfile of the public fwd+bwd, to show where the host time goes.

    python benchmarks/triangle_attention_host.py --n 64 --calls 300
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from typing import Optional, Tuple

import torch
from torch._library.triton import set_wrap_triton_enabled


def _per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--profile-top", type=int, default=30)
    args = parser.parse_args()

    import triton

    from foldops.kernels import triangle_attention as K

    device = torch.device("cuda")
    n, heads, d = args.n, 4, 32
    shape = (1, n, n, heads, d)
    q, k, v, go = (torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(4))
    bias = torch.randn(1, heads, n, n, device=device, dtype=torch.bfloat16)
    keep = torch.ones(1, n, n, device=device, dtype=torch.bool)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
    scale = d**-0.5
    out, lse = K.triangle_attention_forward(q, k, v, bias, keep, scale)
    delta = torch.empty(1, n, heads, n, device=device, dtype=torch.float32)

    def public():
        o = K.triangle_attention(*leaves, keep, scale)
        torch.autograd.grad(o, leaves, go)

    def public_fwd():
        with torch.no_grad():
            K.triangle_attention(q, k, v, bias, keep, scale)

    def launch_one():  # the smallest kernel, as the backward launcher launches it
        K._bwd_delta_kernel[(triton.cdiv(n, 128), n, heads)](
            out, go, delta, *out.stride(), *go.stride(), n, n, heads, D=d, BLOCK_J=128, num_warps=4)

    class Direct(torch.autograd.Function):
        """The launchers under a plain autograd.Function, Triton launched directly."""

        @staticmethod
        def forward(ctx, q, k, v, bias):
            with set_wrap_triton_enabled(False):
                o, lse_ = K.triangle_attention_forward(q, k, v, bias, keep, scale)
            ctx.save_for_backward(q, k, v, bias, o, lse_)
            return o

        @staticmethod
        def backward(ctx, g):
            q_, k_, v_, b_, o, lse_ = ctx.saved_tensors
            with set_wrap_triton_enabled(False):
                return K.triangle_attention_backward(g, q_, k_, v_, b_, keep, o, lse_, scale)

    def direct():
        o = Direct.apply(*leaves)
        torch.autograd.grad(o, leaves, go)

    def unwrapped(fn):
        def call():
            with set_wrap_triton_enabled(False):
                fn()
        return call

    @torch.library.custom_op("foldops_host::noop_fwd", mutates_args=())
    def noop_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                 mask: Optional[torch.Tensor], scale: float, allow_tf32: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.empty_like(q), torch.empty(1, device=q.device)

    @torch.library.custom_op("foldops_host::noop_bwd", mutates_args=())
    def noop_bwd(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                 mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, scale: float,
                 allow_tf32: bool, need_dbias: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(bias)

    def noop_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:5], *output)

    def noop_backward(ctx, g, _):
        q_, k_, v_, b_, m_, o, l_ = ctx.saved_tensors
        grads = torch.ops.foldops_host.noop_bwd(g, q_, k_, v_, b_, m_, o, l_, scale, False, True)
        return (*grads, None, None, None)

    noop_fwd.register_autograd(noop_backward, setup_context=noop_setup)

    def noop():
        o, _ = torch.ops.foldops_host.noop_fwd(*leaves, keep, scale, False)
        torch.autograd.grad(o, leaves, go)

    rows = [
        ("public fwd+bwd (custom op, autograd)", public),
        ("public forward (no_grad)", public_fwd),
        ("autograd.Function over the launchers, fwd+bwd", direct),
        ("forward launcher", unwrapped(lambda: K.triangle_attention_forward(q, k, v, bias, keep, scale))),
        ("backward launcher", unwrapped(lambda: K.triangle_attention_backward(go, q, k, v, bias, keep, out, lse,
                                                                              scale))),
        ("backward launcher, no mask", unwrapped(lambda: K.triangle_attention_backward(go, q, k, v, bias, None, out,
                                                                                       lse, scale))),
        ("one bare Triton launch (delta kernel)", launch_one),
        ("custom ops with autograd, empty bodies, fwd+bwd", noop),
        ("torch.empty_like(q)", lambda: torch.empty_like(q)),
    ]
    print(f"N={n} B=1 H={heads} D={d} bf16, host time per call (us), {args.calls} calls")
    for name, fn in rows:
        print(f"  {_per_call_us(fn, args.calls):9.1f}  {name}")

    if not args.profile_top:
        return
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        public()
    torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(args.profile_top)
    stats.sort_stats("cumulative").print_stats(args.profile_top)


if __name__ == "__main__":
    main()
