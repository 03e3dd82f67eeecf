"""Triangle multiplicative update: foldops (triton, torch) against cuEquivariance and
Boltz-2's PyTorch module, in one process on the same inputs.

B=1, C=128, bf16 (inputs and weights), outgoing and incoming, N = 256 ... 4096;
forward and forward+backward; median time (triton.testing.do_bench: device events)
and peak memory above the inputs; the FLOP and byte counts and the floor per size;
the GPU MODE trimul shapes (forward; there the hidden width equals C, as in Boltz).
Also an accuracy table (error against float64, ratio to PyTorch's own bf16 error).
Writes a tidy CSV and a PNG drawn from the CSV.

    python benchmarks/triangle_multiplication.py --out benchmarks/results/h100
    python benchmarks/triangle_multiplication.py --plot-only --out benchmarks/results/h100
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import sys
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from foldops.ops import triangle_multiplication as tm_fn  # noqa: E402
from foldops.reference.triangle_multiplication import triangle_multiplication as reference  # noqa: E402

WEIGHTS = ("norm_in_weight", "norm_in_bias", "p_in_weight", "g_in_weight",
           "norm_out_weight", "norm_out_bias", "p_out_weight", "g_out_weight")


def counts(batch: int, n: int, c: int, elem: int = 2) -> Dict[str, float]:
    """FLOPs (projections 2*P*C*(4C + 2C) fwd, product 2*C*N^3) and the fewest bytes:
    forward reads x and mask, writes out; fwd+bwd also reads dout and writes dx."""
    p = batch * n * n
    proj = 2.0 * p * c * (4 * c + 2 * c)
    prod = 2.0 * batch * c * n ** 3
    fwd_bytes = 2.0 * p * c * elem + p
    return {"fwd_flop": proj + prod, "fwdbwd_flop": 3 * (proj + prod),
            "fwd_bytes": fwd_bytes, "fwdbwd_bytes": 2 * fwd_bytes}


def weights(c: int, dtype, device, seed=0) -> Dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g)

    w = {"norm_in_weight": 1 + 0.1 * r(c), "norm_in_bias": 0.1 * r(c),
         "p_in_weight": r(2 * c, c) / c ** 0.5, "g_in_weight": r(2 * c, c) / c ** 0.5,
         "norm_out_weight": 1 + 0.1 * r(c), "norm_out_bias": 0.1 * r(c),
         "p_out_weight": r(c, c) / c ** 0.5, "g_out_weight": r(c, c) / c ** 0.5}
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
        return lambda x, mask: cueq_update(x, direction=direction, mask=mask.to(x.dtype), **w)
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


def measure(backend, direction, batch, n, c, dtype, modes, device) -> List[dict]:
    rows = []
    torch.manual_seed(0)
    w = weights(c, dtype, device)
    x = torch.randn(batch, n, n, c, device=device, dtype=dtype)
    mask = torch.ones(batch, n, n, device=device, dtype=torch.bool)
    mask[:, -n // 16:, :] = False
    mask[:, :, -n // 16:] = False
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


def profile(n: int, c: int, direction: str, out_dir: str) -> None:
    """Device time per kernel of one foldops fwd+bwd (torch.profiler), printed and saved."""
    from torch.profiler import ProfilerActivity, profile as prof

    device = torch.device("cuda")
    w = weights(c, torch.bfloat16, device)
    params = [t.requires_grad_() for t in w.values()]
    x = torch.randn(1, n, n, c, device=device, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(1, n, n, device=device, dtype=torch.bool)
    dout = torch.randn_like(x)

    def step():
        out = tm_fn(x, mask, direction=direction, backend="triton", **w)
        torch.autograd.backward(out, dout, inputs=[x, *params])

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = p.key_averages().table(sort_by="cuda_time_total", row_limit=20)
    print(table)
    with open(os.path.join(out_dir, f"profile_{direction}_{n}.txt"), "w") as fh:
        fh.write(table)


TUNE = {
    "PROLOGUE": [(64, 64, 4, False), (128, 64, 8, True), (64, 64, 4, True), (128, 64, 8, False)],
    "ROW_FWD": [(64, 64, 4), (64, 128, 8), (128, 64, 8), (32, 64, 4), (128, 128, 8)],
    "ROW_BWD": [(64, 32, 8), (32, 32, 4), (64, 64, 8), (128, 32, 8), (32, 64, 8)],
    "PRODUCT_16BIT": [(128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4), (128, 256, 64, 8, 8, 3),
                      (64, 128, 64, 8, 4, 4), (128, 128, 32, 8, 4, 4)],
    "PRODUCT_SPLIT": [(128, 128, 32, 8, 8, 3), (128, 64, 32, 8, 4, 3), (64, 128, 64, 8, 8, 3),
                      (128, 128, 64, 8, 8, 2)],
}


def tune(args) -> None:
    """One table entry at a time (others at their defaults): fwd and fwd+bwd medians."""
    from foldops.kernels.triangle_multiplication import configs

    device = torch.device("cuda")
    for table, cands in TUNE.items():
        if args.tune_tables and table not in args.tune_tables:
            continue
        default = getattr(configs, table)
        for cand in cands:
            if isinstance(default, dict):
                setattr(configs, table, {**default, args.c: cand})
            else:
                setattr(configs, table, cand)
            for n in args.n:
                res = {r["mode"]: r for r in measure("triton", args.directions[0], 1, n, args.c, torch.bfloat16,
                                                     args.modes, device) if "mode" in r}
                cells = " ".join(f"{m} {r['ms']:.3f}" if r["status"] == "ok" else f"{m} {r['status']}"
                                 for m, r in res.items())
                print(f"tune {table:14s} {str(cand):28s} N={n:5d} {cells}", flush=True)
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
                        floor = max(cnt[f"{key}_flop"] / mm, cnt[f"{key}_bytes"] / bw) * 1e3
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
        if args.gpumode:
            for batch, n, c in ((1, 256, 128), (1, 512, 128), (1, 1024, 128), (2, 256, 384), (2, 512, 384),
                                (1, 768, 384), (2, 1024, 384)):
                for backend in ("triton", "cuequivariance"):
                    for r in measure(backend, "outgoing", batch, n, c, torch.bfloat16, ("fwd",), device):
                        writer.writerow({**meta, "B": batch, "backend": backend, "direction": "outgoing", "N": n,
                                         "C": c, "mode": "gpumode_fwd", "metric": "ms",
                                         "value": f"{r['ms']:.4f}" if r["status"] == "ok" else "",
                                         "status": r["status"], "note": r.get("note", "")})
                        if r["status"] == "ok":
                            print(f"gpumode B={batch} N={n} C={c} {backend:15s} {r['ms']:.3f} ms", flush=True)
        if args.accuracy:
            for direction in args.directions:
                accuracy(direction, args.accuracy, args.c, device, writer, meta)
    print("wrote", path)
    plot(args.out)


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
    ap.add_argument("--backends", nargs="+", default=["triton", "cuequivariance", "boltz", "torch"])
    ap.add_argument("--directions", nargs="+", default=["outgoing", "incoming"])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--max-torch-n", type=int, default=1024)
    ap.add_argument("--gpumode", action="store_true")
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
    elif args.tune:
        tune(args)
    elif args.profile:
        os.makedirs(args.out, exist_ok=True)
        profile(args.profile, args.c, args.directions[0], args.out)
    else:
        print(platform.node(), torch.cuda.get_device_name(), torch.__version__)
        run(args)


if __name__ == "__main__":
    main()
