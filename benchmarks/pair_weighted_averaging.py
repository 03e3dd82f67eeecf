"""MSA pair-weighted averaging: foldops triton / torch against Boltz-2, op and module.

One process, bf16 autocast, Boltz-2 MSA sizes (c_m 64, c_z 128, 8 heads x 32), B = 1,
S = 1024 and 2048 MSA rows, N = 128, 256, ... until each backend runs out of memory
(or --max-n, or the time budget). Two targets:

- ``op``: ``foldops.ops.pair_weighted_averaging_core(v, b, g, mask)`` on bf16 tensors
  (backends ``triton``, ``torch``, and ``eager``: the plain PyTorch of Boltz's module,
  softmax + einsum + sigmoid gate, i.e. foldops's ``reference`` backend);
- ``module``: ``foldops.nn.PairWeightedAveraging`` (triton / torch) and Boltz's
  ``boltz.model.layers.pair_averaging.PairWeightedAveraging`` (``boltz``), fp32
  parameters under bf16 autocast, the same weights.

Modes: ``fwd`` (inference, no autograd), ``fwd+bwd`` (a training step's forward and
backward of the inputs and parameters), optionally ``bwd`` (backward alone on a kept
graph). Each point: median of device-event-timed runs after warm-up, a throughput
figure (many calls, one sync), and peak memory above the inputs. The CSV has one row
per measurement with the byte and FLOP counts of the op and their floor on this
device (measured copy bandwidth and bf16 matmul rate); plots are drawn from the CSV.

    python benchmarks/pair_weighted_averaging.py --out benchmarks/results/h100          # ~4 min on an H100
    python benchmarks/pair_weighted_averaging.py --plot-only --out benchmarks/results/h100
    python benchmarks/pair_weighted_averaging.py --rows 1024 --max-n 1024 --time-budget-s 60   # quick

Out-of-memory is recorded as ``oom`` and ends that series; points past the time budget
are not run (``skipped`` rows).

``--fit`` instead finds, per module backend, the largest N whose forward+backward runs at
each S (one untimed step per trial: N doubles from ``--fit-start`` until a step runs out
of memory, then bisects to ``--step``), into ``pair_weighted_averaging_fit.csv``:

    python benchmarks/pair_weighted_averaging.py --fit --rows 1024 --backends triton boltz --out OUT
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

HEADS, C_H, C_M, C_Z = 8, 32, 64, 128
FIELDS = ["op", "target", "backend", "n", "rows", "dtype", "mode", "status", "ms", "ms_throughput",
          "peak_mib", "op_bytes", "op_flop", "floor_ms", "device", "torch"]


# Counts and floors ------------------------------------------------------------------------


def op_counts(n: int, rows: int, e: int = 2) -> Dict[str, float]:
    """Fewest bytes and the matmul FLOPs of the op (B = 1, H x C = 8 x 32).

    fwd reads v, g ([S, N, H, C]) and the bias ([N, N, H]), writes out; bwd reads v, g,
    dO and the bias, writes dv, dg and dbias. FLOPs: fwd one product W @ V per head
    (2 S N^2 H C); bwd three (the recomputed W @ V for dg, W^T dO', dO' V^T).
    """
    snhc = rows * n * HEADS * C_H
    bias = n * n * HEADS
    fwd = 3 * snhc * e + bias * e + n * n
    bwd = 5 * snhc * e + 2 * bias * e + n * n
    flop = 2.0 * rows * n * n * HEADS * C_H
    return {"fwd": float(fwd), "bwd": float(bwd), "fwd+bwd": float(fwd + bwd),
            "flop_fwd": flop, "flop_bwd": 3 * flop, "flop_fwd+bwd": 4 * flop}


def measure_ceilings(device) -> Dict[str, float]:
    """Copy bandwidth (read + write bytes per second) and bf16 matmul FLOP/s, measured."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), 200.0)
    bandwidth = 2 * src.numel() / (ms * 1e-3)
    src = dst = None  # free before the matmul
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm = 2 * 8192**3 / (_median_ms(lambda: x @ y, 300.0) * 1e-3)
    return {"bandwidth": bandwidth, "mm_flops": mm}


def floor_ms(n, rows, mode, ceilings) -> float:
    c = op_counts(n, rows)
    key = "fwd+bwd" if mode == "fwd+bwd" else mode
    return 1e3 * max(c[key] / ceilings["bandwidth"], c["flop_" + key] / ceilings["mm_flops"])


# Timing -----------------------------------------------------------------------------------


def _median_ms(fn: Callable[[], object], budget_ms: float) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate = max(1e-3, (time.perf_counter() - start) * 1e3)
    for _ in range(min(10, int(50 / estimate))):  # warm-up
        fn()
    reps = int(max(5, min(200, budget_ms / estimate)))
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def _throughput_ms(fn: Callable[[], object], reps: int) -> float:
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / reps


def _peak_mib(fn: Callable[[], object], device) -> float:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak / 2**20


# Targets ----------------------------------------------------------------------------------


def _op_inputs(n, rows, device):
    g = torch.Generator(device=device).manual_seed(0)
    shape = (1, rows, n, HEADS, C_H)
    v = torch.randn(shape, device=device, generator=g, dtype=torch.bfloat16)
    gate = torch.randn(shape, device=device, generator=g, dtype=torch.bfloat16)
    bias = torch.randn(1, n, n, HEADS, device=device, generator=g, dtype=torch.bfloat16)
    residues = torch.ones(1, n, dtype=torch.bool, device=device)
    residues[:, n - n // 16:] = False  # some padding, as in a real batch
    mask = residues[:, :, None] & residues[:, None, :]
    return [v, bias, gate], mask


def make_op(backend, n, rows, device):
    from foldops.ops import pair_weighted_averaging_core

    tensors, mask = _op_inputs(n, rows, device)
    name = "reference" if backend == "eager" else backend

    def run(grad: bool):
        leaves = [t.requires_grad_(grad) for t in tensors]
        return pair_weighted_averaging_core(*leaves, mask, backend=name)

    return run, tensors


def make_module(backend, n, rows, device):
    from foldops.nn import PairWeightedAveraging

    torch.manual_seed(0)
    if backend == "boltz":
        from boltz.model.layers.pair_averaging import PairWeightedAveraging as Boltz

        layer = Boltz(C_M, C_Z, C_H, HEADS).to(device)
    else:
        layer = PairWeightedAveraging(C_M, C_Z, C_H, HEADS, backend=backend, device=device)
    torch.nn.init.normal_(layer.proj_o.weight, std=0.02)
    g = torch.Generator(device=device).manual_seed(0)
    m = torch.randn(1, rows, n, C_M, device=device, generator=g)
    z = torch.randn(1, n, n, C_Z, device=device, generator=g)
    token = torch.ones(1, n, device=device)
    token[:, n - n // 16:] = 0
    mask = token[:, :, None] * token[:, None, :]

    def run(grad: bool):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return layer(m.requires_grad_(grad), z.requires_grad_(grad), mask)

    return run, [m, z]


def measure(target, backend, n, rows, mode, args, device) -> Dict[str, object]:
    maker = make_op if target == "op" else make_module
    run, _ = maker(backend, n, rows, device)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return run(False)
    elif mode == "fwd+bwd":
        def step():
            out = run(True)
            out.backward(torch.ones_like(out))
            return None
    else:  # bwd on a kept graph
        out = run(True)
        grad = torch.ones_like(out)

        def step():
            out.backward(grad, retain_graph=True)
    ms = _median_ms(step, args.budget_ms)
    thr = _throughput_ms(step, max(3, min(50, int(args.budget_ms / max(ms, 1e-3)))))
    if mode == "bwd":
        peak = float("nan")  # the kept graph is not counted against the inputs
    else:
        peak = _peak_mib(step, device)
    return {"ms": ms, "ms_throughput": thr, "peak_mib": peak}


BACKENDS = {"op": ["triton", "torch", "eager"], "module": ["triton", "torch", "boltz"]}


def largest_fitting(fits, start: int, step: int, max_n: int):
    """(largest N that ``fits``, smallest N seen to fail or None), N multiples of ``step``.

    Doubles from ``start`` while trials pass (halves while they fail), then bisects the
    gap to ``step``: O(log) trials, each assumed monotone in N."""
    cap = max_n // step * step
    start = max(step, min(start, max_n) // step * step)
    lo, hi = 0, None
    n = start
    if fits(n):
        lo = n
        while hi is None and n < cap:
            n = min(2 * n, cap)
            if fits(n):
                lo = n
            else:
                hi = n
    else:
        hi = n
        while lo == 0 and n > step:
            n = max(step, n // 2 // step * step)
            if fits(n):
                lo = n
            else:
                hi = n
    while hi is not None and hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def fit(args) -> None:
    """Largest N of a module forward+backward per backend and S (see the module doc)."""
    import gc

    device = torch.device("cuda")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "pair_weighted_averaging_fit.csv")
    name = torch.cuda.get_device_name(device)
    print("# " + " ".join(sys.argv))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["backend", "rows", "largest_n", "first_failing_n", "step",
                                               "device", "torch"])
        writer.writeheader()
        for rows in args.rows:
            for backend in [b for b in args.backends if b in BACKENDS["module"]]:
                def fits(n):
                    ok = True
                    try:
                        run, _ = make_module(backend, n, rows, device)
                        out = run(True)
                        out.backward(torch.ones_like(out))
                        torch.cuda.synchronize()
                    except torch.OutOfMemoryError:
                        ok = False
                    run = out = None  # noqa: F841 (free before the next trial)
                    gc.collect()
                    torch.cuda.empty_cache()
                    print(f"  fit {backend} S={rows} N={n}: {'ok' if ok else 'oom'}", flush=True)
                    return ok

                lo, hi = largest_fitting(fits, args.fit_start, args.step, args.max_n)
                writer.writerow({"backend": backend, "rows": rows, "largest_n": lo, "first_failing_n": hi or "",
                                 "step": args.step, "device": name, "torch": torch.__version__})
                print(f"fit {backend} S={rows}: largest N {lo} (fails at {hi})", flush=True)
    print(f"wrote {path}")


def run(args) -> None:
    device = torch.device("cuda")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "pair_weighted_averaging.csv")
    ceilings = measure_ceilings(device)
    name = torch.cuda.get_device_name(device)
    print(f"# {name}: copy {ceilings['bandwidth'] / 1e12:.2f} TB/s, bf16 matmul {ceilings['mm_flops'] / 1e12:.0f} TFLOP/s")
    print("# " + " ".join(sys.argv))
    deadline = time.perf_counter() + args.time_budget_s
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for rows in args.rows:
            # Each S gets an equal share of what is left of the budget.
            share_end = time.perf_counter() + (deadline - time.perf_counter()) / (len(args.rows) - args.rows.index(rows))
            dead = set()  # (target, backend, mode) that ran out of memory
            sizes = [n for n in range(args.step, args.max_n + 1, args.step)
                     if n <= args.fine_max_n or n % args.coarse_step == 0]
            for n in sizes:
                c = op_counts(n, rows)
                print(f"N={n} S={rows}: op bytes fwd {c['fwd'] / 2**20:.0f} MiB, fwd+bwd {c['fwd+bwd'] / 2**20:.0f} MiB; "
                      f"floor fwd {floor_ms(n, rows, 'fwd', ceilings):.3f} ms, "
                      f"fwd+bwd {floor_ms(n, rows, 'fwd+bwd', ceilings):.3f} ms")
                live = 0
                for target in args.targets:
                    for backend in args.backends:
                        if backend not in BACKENDS[target]:
                            continue
                        for mode in args.modes:
                            key = (target, backend, mode)
                            row = {"op": "pair_weighted_averaging", "target": target, "backend": backend, "n": n,
                                   "rows": rows, "dtype": "bfloat16", "mode": mode, "op_bytes": c.get(mode, c["fwd+bwd"]),
                                   "op_flop": c["flop_" + mode], "floor_ms": round(floor_ms(n, rows, mode, ceilings), 4),
                                   "device": name, "torch": torch.__version__}
                            if key in dead:
                                continue
                            if time.perf_counter() > share_end or (backend != "triton" and n > args.peer_max_n):
                                row["status"] = "skipped"
                                writer.writerow(row)
                                continue
                            live += 1
                            try:
                                row.update(measure(target, backend, n, rows, mode, args, device))
                                row["status"] = "ok"
                                print(f"  {target:6s} {backend:6s} {mode:7s} {row['ms']:9.3f} ms "
                                      f"(x{row['ms'] / row['floor_ms']:.1f} floor)  {row['peak_mib']:9.0f} MiB")
                            except torch.OutOfMemoryError:
                                row["status"] = "oom"
                                dead.add(key)
                                print(f"  {target:6s} {backend:6s} {mode:7s} out of memory")
                            except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
                                row["status"] = "error: " + str(exc).splitlines()[0][:120]
                                dead.add(key)
                                print(f"  {target:6s} {backend:6s} {mode:7s} {row['status']}")
                            writer.writerow(row)
                            f.flush()
                            gc.collect()
                            torch.cuda.empty_cache()
                if live == 0:
                    break
    print(f"wrote {path}")
    summary(path)
    plot(args.out)


def _read(path):
    with open(path) as f:
        return [r for r in csv.DictReader(f)]


def summary(path) -> None:
    """The issue's targets, read from the CSV."""
    rows = [r for r in _read(path) if r["status"] == "ok"]

    def get(target, backend, n, s, mode, field="ms"):
        for r in rows:
            if (r["target"], r["backend"], int(r["n"]), int(r["rows"]), r["mode"]) == (target, backend, n, s, mode):
                return float(r[field])
        return None

    for n, s in ((512, 1024), (768, 2048)):
        for mode in ("fwd+bwd", "fwd"):
            t, b = get("module", "triton", n, s, mode), get("module", "boltz", n, s, mode)
            mt, mb = get("module", "triton", n, s, mode, "peak_mib"), get("module", "boltz", n, s, mode, "peak_mib")
            if t and b:
                print(f"module {mode} N={n} S={s}: triton {t:.2f} ms / boltz {b:.2f} ms = {t / b:.2f}x; "
                      f"peak {mt:.0f} / {mb:.0f} MiB = {mt / mb:.2f}x")
    for mode in ("fwd", "fwd+bwd"):
        t = get("op", "triton", 768, 2048, mode)
        f = get("op", "triton", 768, 2048, mode, "floor_ms")
        if t:
            print(f"op {mode} N=768 S=2048: {t:.3f} ms = {t / f:.2f}x its floor ({f:.3f} ms)")
    for backend in ("triton", "torch", "boltz"):
        ok = [int(r["n"]) for r in rows if (r["target"], r["backend"], r["rows"], r["mode"])
              == ("module", backend, "1024", "fwd+bwd")]
        if ok:
            print(f"module fwd+bwd S=1024: largest N that ran, {backend}: {max(ok)}")


def plot(out_dir: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots")
        return
    data = [r for r in _read(os.path.join(out_dir, "pair_weighted_averaging.csv")) if r["status"] == "ok"]
    for zoom in (None, 768):
        for s in sorted({int(r["rows"]) for r in data}):
            fig, axes = plt.subplots(2, 4, figsize=(20, 9))
            for col, (target, mode) in enumerate([(t, m) for t in ("op", "module") for m in ("fwd", "fwd+bwd")]):
                for backend in sorted({r["backend"] for r in data}):
                    pts = sorted((int(r["n"]), float(r["ms"]), float(r["peak_mib"]), float(r["floor_ms"]))
                                 for r in data if (r["target"], r["backend"], r["mode"], int(r["rows"]))
                                 == (target, backend, mode, s) and (zoom is None or int(r["n"]) <= zoom))
                    if not pts:
                        continue
                    ns = [p[0] for p in pts]
                    axes[0, col].plot(ns, [p[1] for p in pts], "o-", label=backend)
                    axes[1, col].plot(ns, [p[2] / 1024 for p in pts], "o-", label=backend)
                    if backend == "triton" and target == "op":
                        axes[0, col].plot(ns, [p[3] for p in pts], "k--", label="byte/FLOP floor")
                axes[0, col].set_title(f"{target} {mode}, S={s}: time")
                axes[1, col].set_title(f"{target} {mode}, S={s}: peak memory above inputs")
                axes[0, col].set_ylabel("ms")
                axes[1, col].set_ylabel("GiB")
                for ax in axes[:, col]:
                    ax.set_xlabel("N")
                    ax.grid(alpha=0.3)
                    ax.legend()
            fig.tight_layout()
            name = f"pair_weighted_averaging_s{s}{'_small_n' if zoom else ''}.png"
            fig.savefig(os.path.join(out_dir, name), dpi=90)
            plt.close(fig)
            print(f"wrote {os.path.join(out_dir, name)}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/h100")
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 2048], help="MSA rows S")
    parser.add_argument("--step", type=int, default=128)
    parser.add_argument("--max-n", type=int, default=8192)
    parser.add_argument("--fine-max-n", type=int, default=1024, help="every --step up to here, then --coarse-step")
    parser.add_argument("--coarse-step", type=int, default=512)
    parser.add_argument("--peer-max-n", type=int, default=100000, help="torch/eager/boltz only up to this N")
    parser.add_argument("--targets", nargs="+", default=["op", "module"])
    parser.add_argument("--backends", nargs="+", default=["triton", "torch", "eager", "boltz"])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], help="fwd, fwd+bwd, bwd")
    parser.add_argument("--budget-ms", type=float, default=100.0, help="timed repetitions per point, ms")
    parser.add_argument("--time-budget-s", type=float, default=200.0, help="whole sweep; later points are skipped")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--fit", action="store_true", help="largest N of module fwd+bwd per backend (see above)")
    parser.add_argument("--fit-start", type=int, default=1024, help="with --fit: the first N tried")
    args = parser.parse_args(argv)
    if args.plot_only:
        summary(os.path.join(args.out, "pair_weighted_averaging.csv"))
        plot(args.out)
        return
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    print(f"# python {platform.python_version()}, torch {torch.__version__}")
    if args.fit:
        fit(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
