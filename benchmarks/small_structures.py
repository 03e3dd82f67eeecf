"""Small structures on a GPU: host time per call, PairformerLayer latency/throughput
(eager, CUDA graphs, kernel-time sum) beside Boltz, and the size rules of ``auto``.

Default run (about 3 minutes on an H100):

    python benchmarks/small_structures.py            # -> benchmarks/results/<gpu>/small_structures.csv

1. Host time per call at N = 128 (bf16) of every op with a Triton backend, for
   ``triton`` and ``auto``: 50 calls without a sync (``time.perf_counter`` around the
   loop), forward and forward+backward. Target: 0.06 / 0.2 ms.
2. PairformerLayer (Boltz-2 sizes: token_s 384, token_z 128, 16 heads, pairwise 4 x 32;
   bf16 autocast, B = 1, no padding) at N = 256 and 384: inference (eval, no_grad)
   and a training step (train, forward + backward of a scalar loss). ``latency``: median
   of 20 calls each timed by CUDA events; ``throughput``: 50 calls then one sync, per
   call. Inference also replayed from a CUDA graph (``graph``), and ``kernel_sum``:
   the sum of the GPU time of one call's kernels (torch.profiler) -- the 1.2x target
   compares ``graph`` with it. Boltz's PairformerLayer beside it, plain and with
   ``use_kernels=True`` when cuequivariance_torch imports, same weights. ``--compile``
   adds ``foldops+compile``: ``torch.compile(dynamic=False)`` of the same layer, compiled
   afresh per N (training at small N is bound by the host's hundreds of small ops and
   autograd nodes, which compile fuses); latency, throughput and host time only.

``--host-profile`` runs the host-time section and prints a cProfile (own time) and a
torch.profiler CPU table of each op's 50 calls with ``triton``, the backward on the
calling thread (``host_one_thread``: the fwd+bwd host time that way, without autograd's
hand-off to its CUDA device thread), then the same for foldops's PairformerLayer training
step at N = 256: where the host time goes.

``--rules`` instead times each op's auto-eligible backends at N = 64 ... 1024, forward
(inference, no_grad) and forward+backward (training), bf16 and fp32 (throughput, 20
calls per sync), and prints the thresholds for ``foldops.backend_rules`` (largest N up
to which ``torch`` is no slower than the kernels at every measured N up to it, in both
dtypes). Writes ``small_structures_rules.csv``, rewritten after each size (a run cut
short keeps what it measured); ``--ops`` restricts it to some ops and keeps the other
ops' rows already in the CSV; ``--rules-from CSV`` prints the thresholds of such a CSV,
also of a cut run (no GPU needed). About 2.4 s a row on an H100, 280 rows for every op: about 11
minutes, so split it by ``--ops`` to fit a 10-minute limit per command.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from foldops import backends  # noqa: E402
from foldops.bench.cases import get_cases  # noqa: E402

ROWS: List[Dict[str, object]] = []


def record(section: str, name: str, impl: str, n: int, mode: str, metric: str, ms: Optional[float], note: str = ""):
    row = dict(section=section, name=name, impl=impl, N=n, mode=mode, metric=metric,
               ms=None if ms is None else round(ms, 4), device=torch.cuda.get_device_name(), note=note)
    ROWS.append(row)
    value = "-" if ms is None else f"{ms:9.3f}"
    print(f"{section:8s} {name:22s} {impl:18s} N={n:<5d} {mode:10s} {metric:11s} {value} ms {note}", flush=True)


def sync():
    torch.cuda.synchronize()


def throughput_ms(fn: Callable[[], object], calls: int = 50) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e3


def latency_ms(fn: Callable[[], object], reps: int = 20) -> float:
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def host_ms(fn: Callable[[], object], calls: int = 50) -> float:
    """Host time per call of ``calls`` unsynced calls (the GPU may lag behind)."""
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e3
    sync()
    return host


def kernel_sum_ms(fn: Callable[[], object], calls: int = 5) -> float:
    """Sum of the GPU time of the kernels (and copies) of one call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync()
    from torch.autograd import DeviceType

    total_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return total_us / 1e3 / calls


def graph_ms(fn: Callable[[], object], calls: int = 50) -> float:
    """Throughput of ``fn`` captured into one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return throughput_ms(graph.replay, calls)


# --------------------------------------------------------------------------- host time


def triton_cases():
    out = []
    for case in get_cases():
        try:
            fn = case.load()
        except Exception as exc:  # CaseUnavailable or a broken import
            print(f"skip {case.op}: {exc}")
            continue
        names = [b.name for b in backends.backends_of(case.registry_op)]
        if "triton" in names:
            out.append((case, fn))
    return out


def op_closure(case, fn, n: int, dtype, backend: str, grad: bool):
    inputs = case.make(case.dims_for("gpu", n), dtype, torch.device("cuda"))
    if not grad:
        def fwd():
            with torch.no_grad():
                return case.call(fn, inputs, backend)
        return fwd
    inputs.requires_grad_(True)
    leaves = inputs.grad_inputs()
    go = torch.randn_like(case.call(fn, inputs, backend))

    def step():
        out = case.call(fn, inputs, backend)
        return torch.autograd.grad(out, leaves, go)
    return step


def host_profile(name: str, fn: Callable[[], object], calls: int = 50, top: int = 30) -> None:
    """cProfile of ``calls`` unsynced calls (after a warm-up), by own time: where a call's
    host time goes. The backward runs on the calling thread (autograd's CUDA device
    thread is invisible to cProfile), and a torch.profiler table of the CPU side follows."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    with torch.autograd.set_multithreading_enabled(False):
        for _ in range(3):
            fn()
        sync()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        sync()
        print(f"--- cProfile {name}, {calls} calls", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(top)
        with profile(activities=[ProfilerActivity.CPU]) as tprof:
            for _ in range(calls):
                fn()
            sync()
    print(f"--- torch.profiler {name}, {calls} calls (CPU self time)", flush=True)
    print(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top), flush=True)


def run_host(n: int = 128, profile: bool = False):
    for case, fn in triton_cases():
        for backend in ("triton", "auto"):
            for mode, grad in (("fwd", False), ("fwd+bwd", True)):
                try:
                    step = op_closure(case, fn, n, torch.bfloat16, backend, grad)
                    record("host", case.op, backend, n, mode, "host", host_ms(step))
                    record("host", case.op, backend, n, mode, "throughput", throughput_ms(step))
                except Exception as exc:
                    record("host", case.op, backend, n, mode, "host", None, f"{type(exc).__name__}: {exc}"[:120])
                    continue
                if not (profile and backend == "triton"):
                    continue
                try:
                    if grad:
                        with torch.autograd.set_multithreading_enabled(False):  # backward on this thread
                            record("host", case.op, backend, n, mode, "host_one_thread", host_ms(step))
                    host_profile(f"{case.op} {backend} {mode} N={n}", step)
                except Exception as exc:
                    record("host", case.op, backend, n, mode, "profile", None, f"{type(exc).__name__}: {exc}"[:120])


# --------------------------------------------------------------------------- layers


def _pair_inputs(n: int, token_s=384, token_z=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(1, n, token_s, generator=gen).cuda()
    z = torch.randn(1, n, n, token_z, generator=gen).cuda()
    mask = torch.ones(1, n, device="cuda")
    return s, z, mask, mask[:, :, None] * mask[:, None, :]


def _boltz_layers():
    try:
        module = importlib.import_module("boltz.model.layers.pairformer")
    except Exception as exc:
        print(f"Boltz not importable ({type(exc).__name__}: {exc}): no Boltz rows")
        return None
    return module.PairformerLayer


def _layer_steps(layer, inputs, training: bool, kwargs):
    s, z, mask, pair_mask = inputs

    def infer():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return layer(s, z, mask, pair_mask, **kwargs)

    s_leaf = s.clone().requires_grad_(True)

    def train():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            out_s, out_z = layer(s_leaf, z, mask, pair_mask, **kwargs)
            loss = out_s.float().square().mean() + out_z.float().square().mean()
        loss.backward()
        return loss

    return train if training else infer


def _foldops_layer():
    """foldops's PairformerLayer at Boltz-2 sizes, on the GPU."""
    from foldops.nn import PairformerLayer

    return PairformerLayer(384, 128, num_heads=16, dropout=0.25, pairwise_head_width=32,
                           pairwise_num_heads=4).cuda()


def _bool_masks(inputs):
    # foldops gets bool masks, as its stacks pass them to their layers (a float mask is
    # checked for 0/1 values: one host sync per layer call); Boltz gets floats.
    s, z, mask, pair_mask = inputs
    return s, z, mask.bool(), pair_mask.bool()


def run_layers(sizes, compiled: bool = False):
    """PairformerLayer rows per N; ``compiled`` adds ``foldops+compile`` (the same layer
    under ``torch.compile``, which fuses the small ops whose launches and autograd nodes
    bind a training step at small N to the host)."""
    boltz_cls = _boltz_layers()
    cueq = importlib.util.find_spec("cuequivariance_torch") is not None
    for n in sizes:
        inputs = _pair_inputs(n)
        ours = _foldops_layer()
        bool_inputs = _bool_masks(inputs)
        impls = [("foldops", ours, {})]
        if compiled:
            torch._dynamo.reset()  # a static graph per N, not a dynamic one from the second N on
            impls.append(("foldops+compile", torch.compile(ours, dynamic=False), {}))
        if boltz_cls is not None:
            try:
                theirs = boltz_cls(384, 128, 16, dropout=0.25, pairwise_head_width=32, pairwise_num_heads=4,
                                   v2=True).cuda()
            except TypeError:
                theirs = boltz_cls(384, 128, 16, dropout=0.25).cuda()
            theirs.load_state_dict(ours.state_dict(), strict=False)
            impls.append(("boltz", theirs, {}))
            if cueq:
                impls.append(("boltz+cueq", theirs, {"use_kernels": True}))
        for name, layer, kwargs in impls:
            for mode in ("inference", "training"):
                layer.train(mode == "training")
                try:
                    step = _layer_steps(layer, bool_inputs if name.startswith("foldops") else inputs,
                                        mode == "training", kwargs)
                    if name.endswith("+compile"):
                        step()  # compiles (once per mode) outside the timed calls
                    record("layer", "PairformerLayer", name, n, mode, "latency", latency_ms(step))
                    record("layer", "PairformerLayer", name, n, mode, "throughput", throughput_ms(step))
                    record("layer", "PairformerLayer", name, n, mode, "host", host_ms(step))
                    if mode == "inference" and not name.endswith("+compile"):
                        record("layer", "PairformerLayer", name, n, mode, "kernel_sum", kernel_sum_ms(step))
                        try:
                            record("layer", "PairformerLayer", name, n, mode, "graph", graph_ms(step))
                        except Exception as exc:
                            record("layer", "PairformerLayer", name, n, mode, "graph", None,
                                   f"{type(exc).__name__}: {exc}"[:120])
                except torch.cuda.OutOfMemoryError:
                    record("layer", "PairformerLayer", name, n, mode, "latency", None, "OOM")
                except Exception as exc:
                    record("layer", "PairformerLayer", name, n, mode, "latency", None,
                           f"{type(exc).__name__}: {exc}"[:120])
                torch.cuda.empty_cache()


def profile_layer(n: int = 256) -> None:
    """Host time and profiles of foldops's PairformerLayer training step at ``n``."""
    step = _layer_steps(_foldops_layer().train(), _bool_masks(_pair_inputs(n)), True, {})
    record("layer", "PairformerLayer", "foldops", n, "training", "host", host_ms(step, calls=20))
    record("layer", "PairformerLayer", "foldops", n, "training", "throughput", throughput_ms(step, calls=20))
    with torch.autograd.set_multithreading_enabled(False):
        record("layer", "PairformerLayer", "foldops", n, "training", "host_one_thread", host_ms(step, calls=20))
    host_profile(f"PairformerLayer training N={n}", step, calls=20, top=45)


# --------------------------------------------------------------------------- rules


def save(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(ROWS[0]) if ROWS else ["section"])
        writer.writeheader()
        writer.writerows(ROWS)


def _ms(value) -> Optional[float]:
    """A CSV or in-memory time: None when missing."""
    if value in (None, "", "None"):
        return None
    return float(value)


def threshold_lines(rows) -> List[str]:
    """Rule lines for ``foldops.backend_rules`` from ``rules`` rows (in memory or read back
    from the CSV): per op and mode, the largest N up to which ``torch`` is no slower than
    every other backend at all measured N up to it, the smaller over bf16 and fp32. An
    (op, mode) without both dtypes measured says so instead."""
    times: Dict[tuple, Dict[int, Dict[str, Optional[float]]]] = {}
    for row in rows:
        if row["section"] != "rules":
            continue
        key = (row["name"], row["mode"], row["metric"][len("tput_"):])
        times.setdefault(key, {}).setdefault(int(row["N"]), {})[row["impl"]] = _ms(row["ms"])
    lines = []
    for op, mode in sorted({(k[0], k[1]) for k in times}):
        wins = {}
        for dtype in ("bfloat16", "float32"):
            per_n = times.get((op, mode, dtype))
            if not per_n:
                continue
            best = 0
            for n in sorted(per_n):
                t = per_n[n].get("torch")
                others = [v for k, v in per_n[n].items() if k != "torch" and v is not None]
                if t is None or any(t > v for v in others):
                    break
                best = n
            wins[dtype] = (best, max(per_n))
        if len(wins) < 2:
            lines.append(f'"{op}" / "{mode}": only {sorted(wins)} measured {wins}')
            continue
        at_most = min(w[0] for w in wins.values())
        lines.append(f'"{op}" / "{mode}": Rule({at_most}, MEASURE, "<device>: torch no slower at N <= {at_most} '
                     f'(bf16 {wins["bfloat16"][0]}, fp32 {wins["float32"][0]}; measured up to '
                     f'{min(w[1] for w in wins.values())})")')
    return lines


def run_rules(sizes, path: str, ops: Optional[List[str]] = None) -> None:
    """Per op (all with a Triton backend, or ``ops``): times per backend, N, mode and
    dtype. The CSV is rewritten after each size so that a run cut short keeps what it
    measured. With ``ops``, rows of other ops already in the CSV are kept (a run split
    by op adds up)."""
    cases = triton_cases()
    if ops:
        unknown = sorted(set(ops) - {case.op for case, _ in cases})
        if unknown:
            raise SystemExit(f"--ops: unknown or without a Triton backend here: {unknown}")
        if os.path.exists(path):
            with open(path, newline="") as fh:
                ROWS.extend(row for row in csv.DictReader(fh) if row.get("name") not in ops)
    for case, fn in cases:
        if ops and case.op not in ops:
            continue
        runnable = [b.name for b in backends.backends_of(case.registry_op) if b.auto]
        for mode, grad in (("inference", False), ("training", True)):
            for dtype in (torch.bfloat16, torch.float32):
                for n in sizes:
                    for backend in runnable:
                        try:
                            step = op_closure(case, fn, n, dtype, backend, grad)
                            ms = throughput_ms(step, calls=20)
                        except torch.cuda.OutOfMemoryError:
                            ms = None
                        except Exception as exc:  # cannot run here
                            print(f"  {case.op} {backend} N={n}: {type(exc).__name__}: {exc}"[:160])
                            ms = None
                        torch.cuda.empty_cache()
                        record("rules", case.op, backend, n, mode, f"tput_{str(dtype)[6:]}", ms)
                    save(path)  # a run cut short keeps every size it measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", action="store_true", help="time backends per N and print rule thresholds")
    parser.add_argument("--sizes", type=int, nargs="*", help="layer sizes (default 256 384) or rule sizes")
    parser.add_argument("--ops", nargs="*", help="with --rules: only these ops (bench case names)")
    parser.add_argument("--host-n", type=int, default=128)
    parser.add_argument("--compile", action="store_true",
                        help="layers: also time torch.compile of foldops's layer (compiled per N and mode)")
    parser.add_argument("--host-profile", action="store_true",
                        help="the host-time section with profiles of each Triton op's calls, then of the "
                        "PairformerLayer training step")
    parser.add_argument("--rules-from", metavar="CSV", help="print the thresholds of a rules CSV (no GPU)")
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/results/<gpu>/...)")
    args = parser.parse_args()
    if args.rules_from:
        with open(args.rules_from, newline="") as fh:
            print("\n".join(threshold_lines(list(csv.DictReader(fh)))))
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = torch.cuda.get_device_name().split()[1].lower() if " " in torch.cuda.get_device_name() else "gpu"
    default_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", gpu)
    start = time.perf_counter()
    if args.rules:
        path = args.out or os.path.join(default_dir, "small_structures_rules.csv")
        run_rules(args.sizes or [64, 128, 256, 384, 512, 768, 1024], path, args.ops)
        print("\nThresholds for foldops/backend_rules.py (device class "
              f"{__import__('foldops.backend_rules', fromlist=['x']).device_class(torch.device('cuda'))}):")
        print("\n".join(threshold_lines(ROWS)))
    elif args.host_profile:
        run_host(args.host_n, profile=True)
        try:
            profile_layer()
        except Exception as exc:  # the op rows above still get saved
            print(f"layer profile failed: {type(exc).__name__}: {exc}")
        path = args.out or os.path.join(default_dir, "small_structures_host.csv")
    else:
        run_host(args.host_n)
        run_layers(args.sizes or [256, 384], compiled=args.compile)
        path = args.out or os.path.join(default_dir, "small_structures.csv")
    save(path)
    print(f"\nwrote {path} ({len(ROWS)} rows) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
