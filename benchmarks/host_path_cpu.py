"""Host time of the Triton ops, on CPU, without the kernels.

The Triton launches are replaced by a recorder that launches nothing, and the launchers
choose tiles as on a GPU, so what is timed is everything the host does per call around
the launches: checks, config choice, splits, mask conversion, weight casts, allocations,
autograd. Per op (``--op``):

- ``triattn``: the triangle attention launchers (or with ``--public`` the public op,
  fwd and fwd+bwd) on tiny CPU tensors, where the allocations are negligible too;
- ``trimul``: the public triangle multiplication (default N = C = 128, bf16) on meta
  tensors: allocations and the torch ops between launches (weight-gradient GEMMs,
  reductions) are dispatched as on a GPU but do no work, as the CUDA caching allocator
  and asynchronous launches would;
- ``pwa``: the public pair-weighted averaging at Boltz-2's MSA sizes (N = 128, S = 64,
  8 heads x 32, bf16, a gate; with ``--mask`` a pair mask and an MSA mask as the layer
  passes them) on
  CPU tensors: its small PyTorch ops on [B, H, N, N] (softmax) run for real, tens of
  microseconds here, a few on a GPU.

- ``layer``: a Pairformer layer step (inference, and training: forward + backward) under
  bf16 autocast, its Triton ops launching nothing and ``auto`` choosing backends as on
  an H100 for ``--as-n`` tokens (the ``cuda-sm90`` size rules), with Boltz's layer beside
  it when ``boltz`` is importable. The channels are tiny (s 32, z 16, 4 heads of 4) so
  that the arithmetic is negligible and what is timed is the host's share of a step at
  any N: module calls, checks, dispatch of every aten op, autocast casts, autograd. A
  pair mask with one padded token keeps the masked paths a padded batch takes (an
  all-ones mask is dropped on CPU). Also prints the aten ops (all and non-view) and the
  autograd nodes per step.

Prints the median microseconds per call, the launches per call and, with ``--profile``,
the top entries of a cProfile of each timed call. Compare before / after on the same
machine only.

    PYTHONPATH=src python benchmarks/host_path_cpu.py [--calls 2000] [--mask] [--public]
    PYTHONPATH=src python benchmarks/host_path_cpu.py --op trimul [--n 128] [--c 128]
    PYTHONPATH=src python benchmarks/host_path_cpu.py --op pwa --mask [--n 128] [--rows 64]
    PYTHONPATH=src python benchmarks/host_path_cpu.py --op layer [--n 8] [--as-n 256] [--calls 200]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import os
import pstats
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # importable without a GPU

import torch  # noqa: E402


class _Recorder:
    """Stands in for ``launcher``: ``recorder(kernel)[grid](*args, **meta)`` records
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


def _report(calls_fns, args, recorder: _Recorder) -> None:
    """Median host time per call (after a warm-up) and launches per call of each
    ``(name, fn)``; cProfiles with ``--profile``."""
    for name, fn in calls_fns:
        for _ in range(10):
            fn()
        recorder.launches.clear()
        fn()
        launches = len(recorder.launches)
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(f"{name:8s} host time: {statistics.median(times) * 1e6:7.1f} us/call "
              f"(median of {args.calls}); {launches} launches")
    if args.profile:
        for name, fn in calls_fns:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(args.calls):
                fn()
            profile.disable()
            print(f"--- cProfile, {name}, {args.calls} calls")
            pstats.Stats(profile).sort_stats(args.sort).print_stats(25)


def _triattn(args, recorder):
    from foldops.kernels.triangle_attention import launch

    launch.launcher = recorder
    launch._interpreting = lambda: False  # GPU-style config choice and switches
    n, heads, d = args.n or 32, 4, 32
    q, k, v, go = (torch.randn(1, n, n, heads, d) for _ in range(4))
    bias = torch.randn(1, heads, n, n)
    mask = torch.ones(1, n, n, dtype=torch.bool) if args.mask else None
    print(f"triangle attention, {'public op' if args.public else 'launchers'}, N = {n}, H = {heads}, D = {d}, "
          f"fp32, mask = {mask is not None}")
    if not args.public:
        out, _ = launch.triangle_attention_forward(q, k, v, bias, mask, 0.2)
        lse = torch.zeros(1, n, heads, n, dtype=torch.float64)
        return [("forward", lambda: launch.triangle_attention_forward(q, k, v, bias, mask, 0.2)),
                ("backward", lambda: launch.triangle_attention_backward(go, q, k, v, bias, mask, out, lse, 0.2))]

    from foldops.ops import triangle_attention

    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]

    def fwd():
        with torch.no_grad():
            triangle_attention(q, k, v, bias, mask, scale=0.2, backend="triton")

    def fwd_bwd():
        o = triangle_attention(*leaves, mask, scale=0.2, backend="triton")
        torch.autograd.grad(o, leaves, go)

    return [("forward", fwd), ("fwd+bwd", fwd_bwd)]


def _trimul(args, recorder):
    from foldops.kernels.triangle_multiplication import launch, op
    from foldops.ops import triangle_multiplication

    public = sys.modules["foldops.ops.triangle_multiplication"]  # the module, not the function
    launch.launcher = recorder
    launch.triton_interpret = lambda: False  # GPU-style configs; meta tensors are launched
    op._use_registered_ops = lambda t: False  # meta tensors take the eager (CUDA) path
    public.kernel_support = lambda device, explicit=True: None  # meta passes as a GPU
    n, c, dev, dt = args.n or 128, args.c, "meta", torch.bfloat16
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

    print(f"triangle multiplication, public op, meta tensors, N = {n}, C = {c}, bf16, mask = {mask is not None}")
    return [("forward", fwd), ("fwd+bwd", fwd_bwd)]


def _pwa(args, recorder):
    from foldops.kernels.pair_weighted_averaging import launch
    from foldops.ops import pair_weighted_averaging

    launch.launcher = recorder
    launch._interpreting = lambda: False
    launch._num_sms = lambda device: 132  # an H100's SMs: the dW split count as there
    torch.set_num_threads(1)
    b, s, n, h, c = 1, args.rows, args.n or 128, 8, 32
    dtype = torch.bfloat16
    v, g, go = (torch.randn(b, s, n, h, c, dtype=dtype) for _ in range(3))
    logits = torch.randn(b, n, n, h, dtype=dtype).permute(0, 3, 1, 2)  # the layer's view
    mask = torch.ones(b, n, n, dtype=torch.bool) if args.mask else None
    msa_mask = torch.ones(b, s, n, dtype=torch.bool) if args.mask else None
    leaves = [t.clone().requires_grad_() for t in (v, logits, g)]

    def fwd():
        with torch.no_grad():
            pair_weighted_averaging(v, logits, mask, gate=g, msa_mask=msa_mask, backend="triton")

    def fwd_bwd():
        out = pair_weighted_averaging(leaves[0], leaves[1], mask, gate=leaves[2], msa_mask=msa_mask,
                                      backend="triton")
        torch.autograd.grad(out, leaves, go)

    print(f"pair-weighted averaging, public op, B={b} S={s} N={n} H={h} C={c} bf16, masks = {mask is not None}, "
          f"1 thread")
    return [("forward", fwd), ("fwd+bwd", fwd_bwd)]


_VIEWS = ("view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "alias",
          "detach", "slice", "select", "unbind", "as_strided", "split", "split_with_sizes", "reshape")


def _count_aten(fn):
    """(aten ops, non-view aten ops) that one call of ``fn`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Count() as counter:
        fn()
    return len(counter.names), sum(name not in _VIEWS for name in counter.names)


def _autograd_nodes(outputs) -> int:
    seen, todo = set(), [t.grad_fn for t in outputs if t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def _patch_all_kernels(recorder, as_n: int) -> None:
    """Every Triton op of a Pairformer layer launches through ``recorder``, takes the
    GPU's code path on CPU tensors, and ``auto`` applies the H100's rules for ``as_n``."""
    from foldops import backend_rules
    from foldops.kernels.pair_weighted_averaging import launch as pwa_launch
    from foldops.kernels.triangle_attention import launch as ta_launch
    from foldops.kernels.triangle_multiplication import launch as tm_launch

    import foldops.ops  # noqa: F401 (registers the backends)

    for launch_module in (ta_launch, tm_launch, pwa_launch):
        launch_module.launcher = recorder
    ta_launch._interpreting = pwa_launch._interpreting = lambda: False
    tm_launch.triton_interpret = lambda: False
    pwa_launch._num_sms = lambda device: 132
    for name in ("triangle_attention", "triangle_multiplication", "pair_weighted_averaging"):
        sys.modules[f"foldops.kernels.{name}.op"]._use_registered_ops = lambda t: False
        sys.modules[f"foldops.ops.{name}"].kernel_support = lambda device, explicit=True: None
    preferred = backend_rules.preferred
    backend_rules.device_class = lambda device: "cuda-sm90"
    backend_rules.preferred = lambda op, device=None, training=None, n=None, **ctx: preferred(
        op, device=device, training=training, n=None if n is None else as_n, **ctx)


def _layer(args, recorder):
    _patch_all_kernels(recorder, args.as_n)
    from foldops.nn import PairformerLayer

    torch.set_num_threads(1)
    torch.autograd.set_multithreading_enabled(False)  # the backward on this thread, timed and profiled
    n, s_dim, z_dim, heads = args.n or 8, 32, 16, 4
    sizes = dict(num_heads=heads, dropout=0.25, pairwise_head_width=4, pairwise_num_heads=4)
    gen = torch.Generator().manual_seed(0)
    s, z = torch.randn(1, n, s_dim, generator=gen), torch.randn(1, n, n, z_dim, generator=gen)
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[:, -1] = False  # one padded token
    pair_mask = mask[:, :, None] & mask[:, None, :]
    layers = [("foldops", PairformerLayer(s_dim, z_dim, **sizes), (s, z, mask, pair_mask))]
    try:
        from boltz.model.layers.pairformer import PairformerLayer as BoltzPairformerLayer
    except ImportError:
        print("boltz not importable: foldops only")
    else:
        boltz = BoltzPairformerLayer(s_dim, z_dim, v2=True, **sizes)
        layers.append(("boltz", boltz, (s, z, mask.float(), pair_mask.float())))

    def step_fn(layer, inputs, training):
        layer = copy.deepcopy(layer).train(training)  # train() per call would be timed too

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if not training:
                    with torch.no_grad():
                        return layer(*inputs)
                outputs = layer(*inputs)
                torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
                return outputs
        return step

    print(f"Pairformer layer, CPU, N = {n}, s {s_dim}, z {z_dim}, bf16 autocast, backends as auto picks them "
          f"on an H100 at N = {args.as_n}, 1 thread")
    calls_fns = []
    for name, layer, inputs in layers:
        for training in (False, True):
            step = step_fn(layer, inputs, training)
            label = f"{name} {'train' if training else 'infer'}"
            aten, non_view = _count_aten(step)
            nodes = _autograd_nodes(step()) if training else 0
            print(f"{label:14s} {aten} aten ops ({non_view} not views), {nodes} autograd nodes")
            calls_fns.append((label, step))
    return calls_fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=("triattn", "trimul", "pwa", "layer"), default="triattn")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--n", type=int, default=None, help="N (default: 32 triattn, 128 trimul and pwa, 8 layer)")
    parser.add_argument("--as-n", type=int, default=256,
                        help="layer: auto picks backends as on an H100 for this many tokens")
    parser.add_argument("--c", type=int, default=128, help="channels (trimul)")
    parser.add_argument("--rows", type=int, default=64, help="MSA rows S (pwa)")
    parser.add_argument("--mask", action="store_true",
                        help="with masks (pwa: a pair mask and an MSA mask, as the layer passes them)")
    parser.add_argument("--public", action="store_true",
                        help="triattn: time the public op (fwd, fwd+bwd) instead of the launchers")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of each timed call")
    parser.add_argument("--sort", default="tottime", help="cProfile sort key")
    args = parser.parse_args()
    recorder = _Recorder()
    calls_fns = {"triattn": _triattn, "trimul": _trimul, "pwa": _pwa, "layer": _layer}[args.op](args, recorder)
    _report(calls_fns, args, recorder)


if __name__ == "__main__":
    main()
