"""Host (CPU) time per call of the triangle attention op and of its layers, on a GPU.

At small N the Triton op is bound by the host: the GPU finishes each kernel before the
next is launched. This times, at a size whose device time is negligible, the public
fwd+bwd (custom op + autograd), each launcher alone, one bare Triton launch, and prints
a cProfile of the public fwd+bwd, to show where the host time goes.

``--breakdown`` times, inside the public fwd+bwd, each launcher helper and each Triton
launch (wall clock, inclusive; cProfile misattributes the time under dynamo's disable
wrapper of the custom ops). ``--timeline N`` lists the kernels of one fwd+bwd at size N
from torch.profiler: when each was launched, when it ran, and the GPU's idle gaps.

    python benchmarks/tools/triangle_attention_host.py --n 64 --calls 300 --breakdown --timeline 512
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import pstats
import statistics
import time

from typing import Dict, List, Optional, Tuple

import torch
from torch._library.triton import set_wrap_triton_enabled


def _inputs(n: int, heads: int, d: int):
    """(q, k, v, bias, all-kept mask, dO, leaves requiring grad): bf16, B=1, I=N."""
    device = torch.device("cuda")
    shape = (1, n, n, heads, d)
    q, k, v, go = (torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(4))
    bias = torch.randn(1, heads, n, n, device=device, dtype=torch.bfloat16)
    keep = torch.ones(1, n, n, device=device, dtype=torch.bool)
    return q, k, v, bias, keep, go, [t.detach().requires_grad_() for t in (q, k, v, bias)]


def _public_fwd_bwd(K, n: int, heads: int, d: int):
    """One public fwd+bwd at size n on fixed random inputs (``_inputs``), as a closure."""
    q, k, v, bias, keep, go, leaves = _inputs(n, heads, d)

    def step():
        o = K.triangle_attention(*leaves, keep, d**-0.5)
        torch.autograd.grad(o, leaves, go)

    return step


def _through_registered_ops(K, fn):
    """``fn`` with the kernels' entry point sent through the custom ops' dispatch and
    autograd (as torch.compile traces them) instead of the eager path."""
    op = K.op  # the kernel package's module of the entry point

    def call():
        use_registered_ops = op._use_registered_ops
        op._use_registered_ops = lambda _q: True
        try:
            fn()
        finally:
            op._use_registered_ops = use_registered_ops
    return call


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
    parser.add_argument("--breakdown", action="store_true", help="time launcher helpers and launches")
    parser.add_argument("--timeline", type=int, nargs="*", default=[], metavar="N",
                        help="kernel launch/run timeline of one fwd+bwd at these sizes")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the per-call timings")
    parser.add_argument("--steady", type=int, nargs="*", default=[], metavar="N",
                        help="back-to-back calls as do_bench runs them: issue time, GPU idle time per call")
    parser.add_argument("--e2e", type=int, nargs="*", default=[], metavar="N",
                        help="fwd+bwd time as the benchmark measures it (do_bench), eager path against "
                        "the registered custom ops, at these sizes")
    args = parser.parse_args()

    import triton

    from foldops.kernels import triangle_attention as K

    device = torch.device("cuda")
    n, heads, d = args.n, 4, 32
    q, k, v, bias, keep, go, leaves = _inputs(n, heads, d)
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
        K.backward._bwd_delta_kernel[(triton.cdiv(n, 64), n, 1)](
            out, go, delta, *out.stride(), *go.stride(), n, n, heads, D=d, BLOCK_J=64, BLOCK_H=heads,
            FMA_CHAIN=False, num_warps=4)

    registered = _through_registered_ops(K, public)

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
        ("public fwd+bwd (eager: autograd.Function over the launchers)", public),
        ("public fwd+bwd through the registered custom ops", registered),
        ("public forward (no_grad: no lse)", public_fwd),
        ("forward launcher", unwrapped(lambda: K.triangle_attention_forward(q, k, v, bias, keep, scale))),
        ("backward launcher", unwrapped(lambda: K.triangle_attention_backward(go, q, k, v, bias, keep, out, lse,
                                                                              scale))),
        ("backward launcher, no mask", unwrapped(lambda: K.triangle_attention_backward(go, q, k, v, bias, None, out,
                                                                                       lse, scale))),
        ("one bare Triton launch (delta kernel)", launch_one),
        ("custom ops with autograd, empty bodies, fwd+bwd", noop),
        ("torch.empty_like(q)", lambda: torch.empty_like(q)),
    ]
    # Interleaved rounds, medians: the host's speed drifts within a run (the same path
    # once read 1.46 and 2.0 ms per call in two runs).
    times: Dict[str, List[float]] = collections.defaultdict(list)
    for _ in range(args.rounds):
        for name, fn in rows:
            times[name].append(_per_call_us(fn, args.calls))
    print(f"N={n} B=1 H={heads} D={d} bf16, host time per call (us), median (min-max) of {args.rounds} "
          f"interleaved rounds of {args.calls} calls")
    for name, _ in rows:
        ts = sorted(times[name])
        print(f"  {statistics.median(ts):9.1f}  ({ts[0]:.1f}-{ts[-1]:.1f})  {name}")
    for n_e2e in args.e2e:
        end_to_end(K, n_e2e, heads, d, args.rounds)

    if args.breakdown:
        breakdown(K, public, args.calls)
    for n_timeline in args.timeline:
        timeline(K, n_timeline, heads, d)
    for n_steady in args.steady:
        steady(K, n_steady, heads, d)
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


# Launcher helpers timed by --breakdown (module globals, so the launchers call the wrapper).
_HELPERS = ("triangle_attention_forward", "triangle_attention_backward", "_check", "_empty_in_order",
            "_empty_buffer", "_scratch", "_aligned_bias", "_config", "_key_mask_bias", "_mask_args",
            "_mask_precision", "_mma_wait", "_register_cap", "_precision", "_precise", "_bias_splits",
            "_tracing_under_interpreter")


def breakdown(K, public, calls: int) -> None:
    """Inclusive wall time per fwd+bwd of each helper and of each kernel's Triton launch."""
    from triton.runtime.jit import JITFunction

    totals: Dict[str, float] = collections.defaultdict(float)

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                totals[name] += time.perf_counter() - start
        return wrapper

    saved = {name: getattr(K, name) for name in _HELPERS}
    run = JITFunction.run
    for name, fn in saved.items():
        setattr(K, name, timed(name, fn))

    def run_timed(self, *a, **kw):
        start = time.perf_counter()
        try:
            return run(self, *a, **kw)
        finally:
            totals["launch " + self.fn.__name__] += time.perf_counter() - start

    JITFunction.run = run_timed
    try:
        for _ in range(20):
            public()
        torch.cuda.synchronize()
        totals.clear()
        start = time.perf_counter()
        for _ in range(calls):
            public()
        torch.cuda.synchronize()
        whole = time.perf_counter() - start
    finally:
        JITFunction.run = run
        for name, fn in saved.items():
            setattr(K, name, fn)
    print(f"breakdown: public fwd+bwd {whole / calls * 1e6:.1f} us per call; inclusive us per call:")
    for name, total in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {total / calls * 1e6:9.1f}  {name}")
    inside = totals["triangle_attention_forward"] + totals["triangle_attention_backward"]
    print(f"  {(whole - inside) / calls * 1e6:9.1f}  outside the launchers (custom ops, autograd, the call)")


def end_to_end(K, n: int, heads: int, d: int, rounds: int) -> None:
    """fwd+bwd ms per call at size n as the benchmark times it (triton.testing.do_bench,
    median), the eager path against the registered custom ops, interleaved rounds."""
    import triton.testing

    eager = _public_fwd_bwd(K, n, heads, d)

    times: Dict[str, List[float]] = collections.defaultdict(list)
    for _ in range(rounds):
        for name, step in (("eager", eager), ("registered ops", _through_registered_ops(K, eager))):
            times[name].append(triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median"))
    print(f"end to end N={n}: " + ", ".join(
        f"{name} {statistics.median(ts):.3f} ms ({min(ts):.3f}-{max(ts):.3f})" for name, ts in times.items()))


def timeline(K, n: int, heads: int, d: int, reps: int = 3) -> None:
    """Kernels of one public fwd+bwd at size n: launch time on the host, start and length
    on the GPU (us from the first launch), and the GPU idle time before each."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step = _public_fwd_bwd(K, n, heads, d)

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            torch.cuda.synchronize()
            step()
            torch.cuda.synchronize()
    events = prof.events()
    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    launches = sorted((e for e in events if e.device_type == DeviceType.CPU and e.name in
                       ("cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernel", "cudaLaunchKernelExC")),
                      key=lambda e: e.time_range.start)
    per = len(kernels) // reps
    first, last = kernels[-per:], launches[-per:] if len(launches) >= per else []
    t0 = min([e.time_range.start for e in first] + [e.time_range.start for e in last])
    print(f"timeline N={n} (last of {reps} fwd+bwd, us from the first launch; {per} kernels)")
    print("   launch    start   length  idle before  kernel")
    busy, prev_end = 0.0, None
    for i, e in enumerate(first):
        launch = last[i].time_range.start - t0 if i < len(last) else float("nan")
        start = e.time_range.start - t0
        idle = 0.0 if prev_end is None else max(0.0, e.time_range.start - prev_end)
        busy += e.time_range.elapsed_us()
        prev_end = e.time_range.end
        print(f"  {launch:7.1f}  {start:7.1f}  {e.time_range.elapsed_us():7.1f}  {idle:11.1f}  {e.name[:60]}")
    span = first[-1].time_range.end - first[0].time_range.start
    print(f"  GPU busy {busy:.1f} us of a {span:.1f} us span from first kernel start to last kernel end")


def steady(K, n: int, heads: int, d: int, reps: int = 10) -> None:
    """Back-to-back fwd+bwd at size n as do_bench runs them (an L2-clearing fill before
    each, no synchronisation between calls): the host time to issue them against the
    time to run them, and per call the GPU span from its first kernel to its last
    against the sum of its kernels, with the kernels that the idle time precedes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step = _public_fwd_bwd(K, n, heads, d)
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        cache.zero_()
        step()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    print(f"steady N={n}: {reps} calls issued in {(issued - start) * 1e3:.2f} ms, run in {(done - start) * 1e3:.2f} ms "
          f"({(done - start) / reps * 1e3:.3f} ms per call with the fill)")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            cache.zero_()
            step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    calls: List[list] = []
    for e in kernels:
        if "FillFunctor" in e.name or not calls:  # the fill opens each call
            calls.append([])
        calls[-1].append(e)
    gaps: Dict[str, List[float]] = collections.defaultdict(list)
    for call in calls[1:]:
        work = [e for e in call if "FillFunctor" not in e.name]
        span = work[-1].time_range.end - work[0].time_range.start
        busy = sum(e.time_range.elapsed_us() for e in work)
        for prev, e in zip(work, work[1:]):
            gaps[e.name[:50]].append(e.time_range.start - prev.time_range.end)
        print(f"  call: span {span:8.1f} us, kernels {busy:8.1f} us, idle {span - busy:6.1f} us")
    for name, g in gaps.items():
        print(f"  idle before {name}: median {statistics.median(g):6.1f} us, max {max(g):6.1f}")


if __name__ == "__main__":
    main()
