"""Triangle multiplicative update: foldops (triton, torch) against cuEquivariance and
Boltz-2's PyTorch module, in one process on the same inputs.

B=1, C=128, bf16 (inputs and weights), outgoing and incoming, N = 256 ... 4096;
forward and forward+backward; median time (triton.testing.do_bench: device events)
and peak memory above the inputs; the FLOP and byte counts and the floor per size.
Also an accuracy table (error against float64, ratio to PyTorch's own bf16 error).
Writes a tidy CSV and a PNG drawn from the CSV.

    python benchmarks/triangle_multiplication.py --out benchmarks/results/h100
    python benchmarks/triangle_multiplication.py --plot-only --out benchmarks/results/h100

``--gpumode``: the GPU MODE trimul competition's benchmark shapes instead (forward
only, bf16, outgoing; B 1-2, N 256-1024, pair width D = C 128 / 384, hidden width H 128,
with the competition's masked / unmasked choice per shape), foldops triton and torch
and cuEquivariance (it takes H != D: its hidden width is ``p_in_weight.shape[0] // 2``,
a multiple of 32), with the geometric mean of each backend's times. The competition's
H100 winner: 1.37 ms geometric mean. The arithmetic differs slightly: GPU MODE gates the
product's H channels before the output projection (``to_out(LayerNorm(t) * sigmoid(
out_gate(h)))``, out_gate D -> H), while foldops (as OpenFold, Boltz-2 and cuEquivariance)
gates the D output channels after it (``p_out(LayerNorm(t)) * sigmoid(g_out(h))``, g_out
D -> D): 2 P D^2 FLOPs for the gate where GPU MODE has 2 P D H (the same at D = 128,
3x at D = 384), a [P, D] gate tensor where it has [P, H]. The competition's inputs
(normal or Cauchy values, random masks) are not reproduced; the times do not depend on
them. ``--tiny`` scales every shape down (N / 32, D and H / 16) for a CPU smoke run
(the Triton kernels under TRITON_INTERPRET=1; the times mean nothing there).

    python benchmarks/triangle_multiplication.py --gpumode --out benchmarks/results/h100
    TRITON_INTERPRET=1 python benchmarks/triangle_multiplication.py --gpumode --tiny --device cpu --out /tmp/t
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from foldops import device as fdevice  # noqa: E402
from foldops.ops import triangle_multiplication as tm_fn  # noqa: E402
from foldops.reference.triangle_multiplication import triangle_multiplication as reference  # noqa: E402

WEIGHTS = ("norm_in_weight", "norm_in_bias", "p_in_weight", "g_in_weight",
           "norm_out_weight", "norm_out_bias", "p_out_weight", "g_out_weight")


def counts(batch: int, n: int, c: int, elem: int = 2, hidden: Optional[int] = None) -> Dict[str, float]:
    """FLOPs (projections 2*P*C*(4H + C) in, 2*P*H*C out: 2*P*C*6C for H = C; product
    2*H*N^3 per item) and the fewest bytes: forward reads x and mask, writes out; fwd+bwd
    also reads dout and writes dx."""
    h = c if hidden is None else hidden
    p = batch * n * n
    proj = 2.0 * p * c * (4 * h + c) + 2.0 * p * h * c
    prod = 2.0 * batch * h * n ** 3
    fwd_bytes = 2.0 * p * c * elem + p
    return {"fwd_flop": proj + prod, "fwdbwd_flop": 3 * (proj + prod),
            "fwd_bytes": fwd_bytes, "fwdbwd_bytes": 2 * fwd_bytes}


def weights(c: int, dtype, device, seed=0, hidden: Optional[int] = None) -> Dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = c if hidden is None else hidden

    def r(*s):
        return torch.randn(*s, generator=g)

    w = {"norm_in_weight": 1 + 0.1 * r(c), "norm_in_bias": 0.1 * r(c),
         "p_in_weight": r(2 * h, c) / c ** 0.5, "g_in_weight": r(2 * h, c) / c ** 0.5,
         "norm_out_weight": 1 + 0.1 * r(h), "norm_out_bias": 0.1 * r(h),
         "p_out_weight": r(c, h) / h ** 0.5, "g_out_weight": r(c, c) / c ** 0.5}
    return {k: v.to(device=device, dtype=dtype) for k, v in w.items()}


def make_fn(backend: str, direction: str, w: Dict[str, torch.Tensor], c: int):
    if backend in ("triton", "torch"):
        return lambda x, mask: tm_fn(x, mask, direction=direction, backend=backend, **w)
    if backend == "torch-unchunked":  # all channels in one chunk: fewer launches, more memory
        return lambda x, mask: tm_fn(x, mask, direction=direction, backend="torch", chunk_size=c, **w)
    if backend == "cuequivariance":
        try:
            from cuequivariance_torch import triangle_multiplicative_update as cueq_update
        except ImportError:
            from cuequivariance_torch.primitives.triangle import triangle_multiplicative_update as cueq_update
        return lambda x, mask: cueq_update(x, direction=direction, mask=None if mask is None else mask.to(x.dtype),
                                           **w)
    if backend == "boltz":
        from boltz.model.layers import triangular_mult as bt
        cls = bt.TriangleMultiplicationOutgoing if direction == "outgoing" else bt.TriangleMultiplicationIncoming
        # Boltz runs its module with fp32 weights under autocast: with 16-bit weights its
        # fp32 product meets a 16-bit LayerNorm_out and fails.
        dtype = w["p_in_weight"].dtype
        mod = cls(c).to(device=w["p_in_weight"].device)
        names = {"norm_in": "norm_in", "p_in": "p_in", "g_in": "g_in", "norm_out": "norm_out",
                 "p_out": "p_out", "g_out": "g_out"}
        with torch.no_grad():
            for m in names:
                getattr(mod, m).weight.copy_(w[f"{m}_weight"])
                if m.startswith("norm"):
                    getattr(mod, m).bias.copy_(w[f"{m}_bias"])
        params = list(mod.parameters())

        def f(x, mask):
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
                return mod(x, mask.float(), use_kernels=False)
        f.params = params
        return f
    raise ValueError(backend)


def bench(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def inputs(batch, n, c, dtype, device, hidden: Optional[int] = None, masked: bool = True):
    """(weights, x, mask) of one case, seeded; the mask (if ``masked``) drops the last
    N / 16 rows and columns (at least one)."""
    torch.manual_seed(0)
    w = weights(c, dtype, device, hidden=hidden)
    x = torch.randn(batch, n, n, c, device=device, dtype=dtype)
    mask = None
    if masked:
        mask = torch.ones(batch, n, n, device=device, dtype=torch.bool)
        mask[:, -max(1, n // 16):, :] = False
        mask[:, :, -max(1, n // 16):] = False
    return w, x, mask


def floor_ms(cnt: Dict[str, float], key: str, mm_flops: float, bandwidth: float) -> float:
    """The larger of the arithmetic and memory floors of ``counts``' ``key`` ("fwd" / "fwdbwd")."""
    return max(cnt[f"{key}_flop"] / mm_flops, cnt[f"{key}_bytes"] / bandwidth) * 1e3


def measure(backend, direction, batch, n, c, dtype, modes, device, hidden: Optional[int] = None) -> List[dict]:
    rows = []
    w, x, mask = inputs(batch, n, c, dtype, device, hidden)
    try:
        fn = make_fn(backend, direction, w, c)
    except Exception as exc:  # not installed
        return [dict(status="unavailable", note=f"{type(exc).__name__}: {exc}"[:200])]
    params = getattr(fn, "params", None) or [t.requires_grad_() for t in w.values()]
    xg = x.clone().requires_grad_()
    dout = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            return fn(x, mask)

    def both():
        out = fn(xg, mask)
        torch.autograd.backward(out, dout, inputs=[xg, *params])

    for mode, f in (("fwd", fwd), ("fwd+bwd", both)):
        if mode not in modes:
            continue
        gc.collect()
        torch.cuda.empty_cache()
        try:
            f()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            f()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            ms = bench(f)
            rows.append(dict(mode=mode, status="ok", ms=ms, peak_mib=peak))
        except torch.OutOfMemoryError:
            rows.append(dict(mode=mode, status="oom"))
        except Exception as exc:
            rows.append(dict(mode=mode, status="error", note=f"{type(exc).__name__}: {exc}"[:200]))
        for p_ in params:
            p_.grad = None
        xg.grad = None
    return rows


def accuracy(direction, n, c, device, writer, meta) -> None:
    """Error against float64 of out and every gradient: triton bf16 vs reference bf16."""
    torch.manual_seed(1)
    w64 = weights(c, torch.float64, device, seed=3)
    x = torch.randn(1, n, n, c, device=device, dtype=torch.float64)
    mask = torch.rand(1, n, n, device=device) > 0.1
    g = torch.randn_like(x)

    def grads(backend, dtype):
        leaves = [x.to(dtype).requires_grad_()] + [w64[k].to(dtype).requires_grad_() for k in WEIGHTS]
        if backend == "reference":
            out = reference(leaves[0], mask, direction=direction, **dict(zip(WEIGHTS, leaves[1:])))
        else:
            out = tm_fn(leaves[0], mask, direction=direction, backend=backend, **dict(zip(WEIGHTS, leaves[1:])))
        gs = torch.autograd.grad(out, leaves, g.to(out.dtype))
        return [out.detach()] + list(gs)

    exact = grads("reference", torch.float64)
    base = grads("reference", torch.bfloat16)
    fast = grads("triton", torch.bfloat16)
    for name, e, b, f in zip(("out", "x") + WEIGHTS, exact, base, fast):
        eb = (b.double() - e).abs().max().item()
        ef = (f.double() - e).abs().max().item()
        writer.writerow({**meta, "backend": "triton", "direction": direction, "N": n, "C": c,
                         "mode": f"accuracy:{name}", "metric": "err_ratio_vs_torch_bf16",
                         "value": ef / max(eb, 1e-30), "status": "ok", "note": f"err {ef:.3e} torch {eb:.3e}"})


FIELDS = ["op", "backend", "direction", "B", "N", "C", "dtype", "mode", "metric", "value", "status", "note",
          "device", "torch", "flop", "bytes", "floor_ms"]


def profile(n: int, c: int, direction: str, out_dir: str, hidden: Optional[int] = None) -> None:
    """Device time per kernel of one foldops forward (no_grad) and fwd+bwd
    (torch.profiler, bf16, masked), printed and saved."""
    from torch.profiler import ProfilerActivity, profile as prof

    w, x, mask = inputs(1, n, c, torch.bfloat16, torch.device("cuda"), hidden)
    params = [t.requires_grad_() for t in w.values()]
    x.requires_grad_()
    dout = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            tm_fn(x, mask, direction=direction, backend="triton", **w)

    def fwd_bwd():
        out = tm_fn(x, mask, direction=direction, backend="triton", **w)
        torch.autograd.backward(out, dout, inputs=[x, *params])

    for mode, step in (("fwd", fwd), ("fwdbwd", fwd_bwd)):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        table = p.key_averages().table(sort_by="cuda_time_total", row_limit=20)
        print(f"--- {mode}, N = {n}, C = {c}, H = {hidden or c}, {direction}, 5 calls", flush=True)
        print(table)
        with open(os.path.join(out_dir, f"profile_{direction}_{n}_{c}_{hidden or c}_{mode}.txt"), "w") as fh:
            fh.write(table)


TUNE = {
    "PROLOGUE": [(64, 64, 4, False), (128, 64, 8, True), (64, 64, 4, True), (128, 64, 8, False)],
    # C = 257 ... 512 (GPU MODE's 384): a [BLOCK_P, 512] row tile; more positions need more warps
    "PROLOGUE_WIDE": [(16, 64, 4, False), (32, 64, 4, False), (32, 64, 8, True), (32, 128, 8, False),
                      (64, 64, 8, True), (64, 64, 8, False), (64, 128, 8, False), (64, 64, 16, True),
                      (128, 64, 16, True)],
    "ROW_FWD": [(64, 64, 4), (64, 128, 8), (128, 64, 8), (32, 64, 4), (128, 128, 8)],
    "ROW_BWD": [(64, 32, 8), (32, 32, 4), (64, 64, 8), (128, 32, 8), (32, 64, 8)],
    # the input-side backward at C = 257 ... 512 (its output side runs at H's width)
    "ROW_BWD_WIDE": [(16, 32, 8), (32, 32, 8), (32, 64, 8), (64, 32, 8), (64, 32, 16), (32, 32, 16)],
    "PRODUCT_16BIT": [(128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4), (128, 256, 64, 8, 8, 3),
                      (64, 128, 64, 8, 4, 4), (128, 128, 32, 8, 4, 4)],
    "PRODUCT_SPLIT": [(128, 128, 32, 8, 8, 3), (128, 64, 32, 8, 4, 3), (64, 128, 64, 8, 8, 3),
                      (128, 128, 64, 8, 8, 2)],
}


def tune(args) -> None:
    """One table entry at a time (others at their defaults): fwd and fwd+bwd medians.
    Tables keyed by padded width are set at the widths this shape uses (the prologue's
    C, the epilogue's H, both for the backward row kernels)."""
    from foldops.kernels.triangle_multiplication import configs
    from foldops.kernels.triangle_multiplication.launch import _padded

    device = torch.device("cuda")
    hidden = args.hidden or args.c
    keys = {"PROLOGUE": {_padded(args.c)}, "PROLOGUE_WIDE": {_padded(args.c)}, "ROW_FWD": {_padded(hidden)},
            "ROW_BWD": {_padded(args.c), _padded(hidden)}, "ROW_BWD_WIDE": {_padded(args.c)}}
    for name, cands in TUNE.items():
        if args.tune_tables and name not in args.tune_tables:
            continue
        table = {"PROLOGUE_WIDE": "PROLOGUE", "ROW_BWD_WIDE": "ROW_BWD"}.get(name, name)
        default = getattr(configs, table)
        for cand in cands:
            if isinstance(default, dict):
                setattr(configs, table, {**default, **{k: cand for k in keys[name]}})
            else:
                setattr(configs, table, cand)
            for n in args.n:
                res = {r["mode"]: r for r in measure("triton", args.directions[0], 1, n, args.c, torch.bfloat16,
                                                     args.modes, device, hidden=args.hidden) if "mode" in r}
                cells = " ".join(f"{m} {r['ms']:.3f}" if r["status"] == "ok" else f"{m} {r['status']}"
                                 for m, r in res.items())
                print(f"tune {name:14s} {str(cand):28s} N={n:5d} {cells}", flush=True)
        setattr(configs, table, default)


def run(args) -> None:
    device = torch.device("cuda")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "triangle_multiplication.csv")
    meta = {"op": "triangle_multiplication", "dtype": "bf16", "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "B": 1}
    bw, mm = args.bandwidth * 1e12, args.mm_tflops * 1e12
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for direction in args.directions:
            for n in args.n:
                for backend in args.backends:
                    if backend in ("boltz", "torch", "torch-unchunked") and n > args.max_torch_n:
                        continue
                    cnt = counts(1, n, args.c)
                    for r in measure(backend, direction, 1, n, args.c, torch.bfloat16, args.modes, device):
                        key = "fwd" if r.get("mode") == "fwd" else "fwdbwd"
                        floor = floor_ms(cnt, key, mm, bw)
                        base = {**meta, "backend": backend, "direction": direction, "N": n, "C": args.c,
                                "mode": r.get("mode", ""), "status": r["status"], "note": r.get("note", ""),
                                "flop": f"{cnt[f'{key}_flop']:.4g}", "bytes": f"{cnt[f'{key}_bytes']:.4g}",
                                "floor_ms": f"{floor:.4f}"}
                        if r["status"] != "ok":
                            writer.writerow({**base, "metric": "ms", "value": ""})
                            print(f"{direction:8s} N={n:5d} {backend:15s} {r.get('mode', ''):8s} {r['status']} {r.get('note', '')}")
                            continue
                        writer.writerow({**base, "metric": "ms", "value": f"{r['ms']:.4f}"})
                        writer.writerow({**base, "metric": "peak_mib", "value": f"{r['peak_mib']:.1f}"})
                        print(f"{direction:8s} N={n:5d} {backend:15s} {r['mode']:8s} {r['ms']:8.3f} ms "
                              f"{r['peak_mib']:9.1f} MiB  floor {floor:.3f} ms", flush=True)
                    fh.flush()
        if args.accuracy:
            for direction in args.directions:
                accuracy(direction, args.accuracy, args.c, device, writer, meta)
    print("wrote", path)
    plot(args.out)


# The GPU MODE trimul competition's benchmark shapes, as its task lists them:
# (B, N, D = dim, H = hiddendim, masked = not nomask).
GPUMODE_SHAPES: Tuple[Tuple[int, int, int, int, bool], ...] = (
    (2, 256, 128, 128, False),
    (1, 768, 128, 128, False),
    (2, 256, 384, 128, True),
    (1, 512, 128, 128, False),
    (1, 1024, 128, 128, False),
    (1, 768, 384, 128, True),
    (1, 1024, 384, 128, False),
)
GPUMODE_H100_WINNER_MS = 1.37  # the competition's H100 winner, geometric mean over these shapes
GPUMODE_BACKENDS = ("triton", "torch", "cuequivariance")


def tiny(shapes):
    """Every shape scaled down for a CPU smoke run: N / 32, D and H / 16."""
    return tuple((b, max(2, n // 32), max(1, d // 16), max(1, h // 16), m) for b, n, d, h, m in shapes)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median milliseconds: device events (do_bench, with its warm-up) on a GPU; on CPU
    a host timer over ``repeats`` calls (the caller has made the warm-up call)."""
    if device.type != "cpu":
        return bench(fn)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def gpumode(device: torch.device, out_dir: str, shapes=GPUMODE_SHAPES, backends=GPUMODE_BACKENDS,
            bandwidth: float = 3.0e12, mm_flops: float = 780e12, repeats: int = 3) -> Dict[str, Optional[float]]:
    """Forward times of each backend on the GPU MODE shapes (bf16, outgoing); writes
    ``triangle_multiplication_gpumode.csv`` in ``out_dir`` and returns each backend's
    geometric mean (None where a shape did not run)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "triangle_multiplication_gpumode.csv")
    meta = {"op": "triangle_multiplication", "dtype": "bf16", "device": fdevice.device_name(device),
            "torch": torch.__version__, "direction": "outgoing", "mode": "gpumode_fwd"}
    times: Dict[str, List[float]] = {b: [] for b in backends}
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS + ["H", "masked"], extrasaction="ignore")
        writer.writeheader()
        for batch, n, d, h, masked in shapes:
            w, x, mask = inputs(batch, n, d, torch.bfloat16, device, h, masked)
            cnt = counts(batch, n, d, hidden=h)
            floor = floor_ms(cnt, "fwd", mm_flops, bandwidth)
            row = {**meta, "B": batch, "N": n, "C": d, "H": h, "masked": int(masked), "metric": "ms",
                   "flop": f"{cnt['fwd_flop']:.4g}", "bytes": f"{cnt['fwd_bytes']:.4g}", "floor_ms": f"{floor:.4f}"}
            for backend in backends:
                label = f"gpumode B={batch} N={n:4d} D={d:3d} H={h:3d} mask={int(masked)} {backend:15s}"
                try:
                    fn = make_fn(backend, "outgoing", w, d)
                    with torch.no_grad():
                        fn(x, mask)  # also the warm-up (compiles the kernels)
                except Exception as exc:  # not installed, not supported here
                    note = f"{type(exc).__name__}: {exc}"[:200]
                    print(f"{label} skipped ({note})")
                    writer.writerow({**row, "backend": backend, "status": "unavailable", "note": note})
                    continue

                def fwd(fn=fn, x=x, mask=mask):
                    with torch.no_grad():
                        return fn(x, mask)

                try:
                    ms = time_ms(fwd, device, repeats)
                except Exception as exc:
                    status = "oom" if fdevice.is_out_of_memory(exc) else "error"
                    print(f"{label} {status} {type(exc).__name__}: {exc}"[:200])
                    writer.writerow({**row, "backend": backend, "status": status, "note": str(exc)[:200]})
                    continue
                times[backend].append(ms)
                writer.writerow({**row, "backend": backend, "status": "ok", "value": f"{ms:.4f}"})
                print(f"{label} {ms:8.3f} ms  floor {floor:.3f} ms", flush=True)
            del x, mask, w
            gc.collect()
            fdevice.empty_cache(device)
        means: Dict[str, Optional[float]] = {}
        for backend in backends:
            ok = len(times[backend]) == len(shapes)
            means[backend] = geomean(times[backend]) if ok else None
            writer.writerow({**meta, "backend": backend, "mode": "gpumode_geomean", "metric": "ms",
                             "value": f"{means[backend]:.4f}" if ok else "", "status": "ok" if ok else "incomplete",
                             "note": f"geometric mean over {len(shapes)} shapes"})
    for backend, m in means.items():
        name = "foldops triton" if backend == "triton" else ("foldops torch" if backend == "torch" else backend)
        line = f"geometric mean {name:16s} " + (f"{m:.3f} ms" if m is not None else "(not every shape ran)")
        if m is not None and backend == "triton":
            line += f"  ({m / GPUMODE_H100_WINNER_MS:.2f}x the GPU MODE H100 winner's {GPUMODE_H100_WINNER_MS} ms)"
        print(line)
    print("wrote", path)
    return means


def plot(out_dir: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    rows = list(csv.DictReader(open(os.path.join(out_dir, "triangle_multiplication.csv"))))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for backend in ("triton", "cuequivariance", "boltz", "torch"):
            pts = sorted((int(r["N"]), float(r["value"])) for r in rows
                         if r["backend"] == backend and r["mode"] == mode and r["metric"] == "ms"
                         and r["status"] == "ok" and r["direction"] == "outgoing")
            if pts:
                ax.plot(*zip(*pts), marker="o", label="foldops" if backend == "triton" else backend)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"triangle multiplication outgoing, C=128 bf16, {mode}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "triangle_multiplication.png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/h100")
    ap.add_argument("--n", type=int, nargs="+", default=[256, 512, 768, 1024, 2048, 4096])
    ap.add_argument("--c", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=None, help="with --tune / --profile: hidden width H (default C)")
    ap.add_argument("--backends", nargs="+", default=["triton", "cuequivariance", "boltz", "torch"])
    ap.add_argument("--directions", nargs="+", default=["outgoing", "incoming"])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--max-torch-n", type=int, default=1024)
    ap.add_argument("--gpumode", action="store_true",
                    help="the GPU MODE trimul shapes instead (forward, bf16, hidden 128): times and geometric means")
    ap.add_argument("--tiny", action="store_true", help="with --gpumode: shapes scaled down (CPU smoke run)")
    ap.add_argument("--device", default="auto", help="with --gpumode: device (auto, cuda, cpu, ...)")
    ap.add_argument("--accuracy", type=int, default=0, help="N of the accuracy table (0: none)")
    ap.add_argument("--bandwidth", type=float, default=3.0, help="copy ceiling, TB/s (read+write)")
    ap.add_argument("--mm-tflops", type=float, default=780.0)
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--tune", action="store_true", help="sweep the tile tables (TUNE) at --n")
    ap.add_argument("--tune-tables", nargs="*", default=None, help=f"with --tune: only these of {list(TUNE)}")
    ap.add_argument("--profile", type=int, default=0, help="N of a per-kernel profile of foldops fwd+bwd")
    args = ap.parse_args()
    if args.plot_only:
        plot(args.out)
    elif args.gpumode:
        device = fdevice.resolve_device(args.device)
        print(platform.node(), fdevice.device_name(device), torch.__version__)
        gpumode(device, args.out, tiny(GPUMODE_SHAPES) if args.tiny else GPUMODE_SHAPES,
                bandwidth=args.bandwidth * 1e12, mm_flops=args.mm_tflops * 1e12)
    elif args.tune:
        tune(args)
    elif args.profile:
        os.makedirs(args.out, exist_ok=True)
        profile(args.profile, args.c, args.directions[0], args.out, args.hidden)
    else:
        print(platform.node(), torch.cuda.get_device_name(), torch.__version__)
        run(args)


if __name__ == "__main__":
    main()
