"""Triangle attention: foldops's Triton kernels against trifast, cuEquivariance and PyTorch.

One process, the same inputs for every backend (each gets them in its own layout,
copied outside the timed region): B=1, H=4, head dim 32 by default, N = 128 ... 2048,
forward / backward / forward+backward, median time (triton.testing.do_bench, device
events) and peak memory above the inputs, bf16 and fp32. Writes a tidy CSV (one row
per measurement, plus the FLOP and byte counts and the floor of each size) and a PNG
drawn from the CSV alone.

    python benchmarks/triangle_attention.py --out benchmarks/results/h100
    python benchmarks/triangle_attention.py --plot-only --out benchmarks/results/h100
    python benchmarks/triangle_attention.py --tune --n 512 1024   # block-size sweep

Backends that are not installed or cannot run are recorded with status
``unavailable``; out-of-memory is recorded as ``oom``.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gc
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

OP = "triangle_attention"
# Exp throughput of the H100's special-function units: 16 per clock per SM (the
# FlashAttention-3 paper's 3.9 TFLOP/s of exp at 1.83 GHz, 132 SMs).
EXP_PER_CLOCK_PER_SM = 16
CLOCK_HZ = 1.83e9


# Counts and floors ------------------------------------------------------------------------


def counts(n: int, batch: int, heads: int, d: int, dtype: torch.dtype) -> Dict[str, float]:
    """FLOPs (matmul), exponentials and the fewest bytes each mode must move."""
    e = torch.tensor([], dtype=dtype).element_size()
    s = batch * n * n * heads * d  # elements of one of q, k, v, out
    logits = batch * n * n * n * heads
    bias = batch * heads * n * n
    rows = batch * n * heads * n  # lse / delta entries
    fwd_bytes = 4 * s * e + bias * e + batch * n * n + rows * 4
    # backward reads q, k, v, out, dO, bias, mask, lse; writes dq, dk, dv, dbias
    bwd_bytes = 8 * s * e + 2 * bias * e + batch * n * n + rows * 4
    return {
        "fwd_flop": 4.0 * logits * d,
        "bwd_flop": 10.0 * logits * d,
        "exp": float(logits),
        "fwd_bytes": float(fwd_bytes),
        "bwd_bytes": float(bwd_bytes),
    }


def floors_ms(c: Dict[str, float], mm_flops: float, bandwidth: float, exp_rate: float) -> Dict[str, float]:
    fwd = max(c["fwd_flop"] / mm_flops, c["exp"] / exp_rate, c["fwd_bytes"] / bandwidth) * 1e3
    bwd = max(c["bwd_flop"] / mm_flops, c["exp"] / exp_rate, c["bwd_bytes"] / bandwidth) * 1e3
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _copy_bandwidth(device) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second (buffers freed on return)."""
    import triton.testing

    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=200, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def measure_ceilings(device) -> Dict[str, float]:
    """Device-to-device copy bandwidth (read + write) and bf16 matmul rate, measured here."""
    import triton.testing

    bandwidth = _copy_bandwidth(device)
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: x @ y, warmup=50, rep=300, return_mode="median")
    mm = 2 * 8192**3 / (ms * 1e-3)
    props = torch.cuda.get_device_properties(device)
    return {
        "bandwidth": bandwidth,
        "mm_flops": mm,
        "exp_rate": EXP_PER_CLOCK_PER_SM * props.multi_processor_count * CLOCK_HZ,
    }


# Backends ---------------------------------------------------------------------------------
#
# Each maker takes the canonical tensors (q, k, v [B, I, N, H, D]; bias [B, H, N, N];
# keep-mask [B, I, N]) and returns (inputs, fn, canon): inputs are leaf tensors in the
# backend's own layout (copies made here, outside timing), fn(*inputs) -> output, and
# canon(out, dq, dk, dv, dbias) maps results back to the canonical layout.


def _identity(*ts):
    return list(ts)


def _foldops(q, k, v, bias, keep):
    from foldops.kernels.triangle_attention import triangle_attention

    scale = q.shape[-1] ** -0.5
    return [q, k, v, bias], lambda q, k, v, b: triangle_attention(q, k, v, b, keep, scale), _identity


def _foldops_layer_layout(q, k, v, bias, keep):
    """foldops on the strides the starting-node layer passes: q/k/v sliced out of one
    [B, N, N, 4, H, D] projection, the bias a permuted view of a [B, N, N, H] Linear output."""
    from foldops.kernels.triangle_attention import triangle_attention

    proj = torch.stack([q, k, v, q], dim=3)
    tri = bias.permute(0, 2, 3, 1).contiguous()
    scale = q.shape[-1] ** -0.5
    inputs = [*proj.unbind(3)[:3], tri.permute(0, 3, 1, 2)]
    return inputs, lambda q, k, v, b: triangle_attention(q, k, v, b, keep, scale), _identity


def _reference(q, k, v, bias, keep):
    from foldops.reference.triangle_attention import triangle_attention

    scale = q.shape[-1] ** -0.5
    return [q, k, v, bias], lambda q, k, v, b: triangle_attention(q, k, v, b, keep, scale), _identity


def _trifast(q, k, v, bias, keep):
    from trifast import triangle_attention

    # trifast: q, k, v [B, H, I, J, D]; bias [B, H, J, K]; mask [B, I, K] True = masked.
    inputs = [t.permute(0, 3, 1, 2, 4).contiguous() for t in (q, k, v)] + [bias.contiguous()]
    masked = (~keep).contiguous()

    def canon(out, dq, dk, dv, db):
        return [t.permute(0, 2, 3, 1, 4) for t in (out, dq, dk, dv)] + [db]

    return inputs, lambda q, k, v, b: triangle_attention(q, k, v, b, masked), canon


def _cueq(q, k, v, bias, keep):
    from cuequivariance_torch import triangle_attention

    # cuEquivariance: q, k, v [B, I, H, J, D]; bias [B, 1, H, J, K]; mask [B, I, 1, 1, K].
    inputs = [t.permute(0, 1, 3, 2, 4).contiguous() for t in (q, k, v)] + [bias[:, None].contiguous()]
    mask = keep[:, :, None, None, :].contiguous()
    scale = q.shape[-1] ** -0.5

    def canon(out, dq, dk, dv, db):
        return [t.permute(0, 1, 3, 2, 4) for t in (out, dq, dk, dv)] + [db[:, 0]]

    return inputs, lambda q, k, v, b: triangle_attention(q, k, v, b, mask, scale), canon


BACKENDS: Dict[str, Callable] = {
    "foldops": _foldops,
    "foldops-layer-layout": _foldops_layer_layout,
    "trifast": _trifast,
    "cuequivariance": _cueq,
    "torch": _reference,
}


def _version(backend: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    names = {"foldops": "foldops", "foldops-layer-layout": "foldops", "trifast": "trifast",
             "cuequivariance": "cuequivariance_torch", "torch": "torch"}
    try:
        return version(names[backend].replace("_", "-"))
    except PackageNotFoundError:
        if names[backend] == "foldops":  # run from a source tree (PYTHONPATH=src)
            import foldops

            return foldops.__version__
        return "?"


# Timing -----------------------------------------------------------------------------------


def _bench(fn: Callable[[], object], budget_ms: float) -> float:
    import triton.testing

    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate = (time.perf_counter() - start) * 1e3
    rep = max(50.0, min(budget_ms, 30 * estimate))
    return triton.testing.do_bench(fn, warmup=max(10.0, min(100.0, 3 * estimate)), rep=rep, return_mode="median")


def _peak_mib(fn: Callable[[], object], device) -> float:
    # Collect cycles first: tensors of an earlier mode freed by the collector during fn
    # would lower the peak below fn's own live set (seen once: fwd+bwd at N=256 read
    # 18 MiB, below its three 16 MiB gradients).
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


def run_one(backend, n, dtype, modes, args, device) -> List[dict]:
    """All modes of one backend at one size: rows of (mode, metric, value)."""
    rows: List[dict] = []
    gen = torch.Generator(device=device).manual_seed(n)
    shape = (args.batch, n, n, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, generator=gen).to(dtype) for _ in range(3))
    bias = torch.randn(args.batch, args.heads, n, n, device=device, generator=gen).to(dtype)
    keep = torch.rand(args.batch, n, n, device=device, generator=gen) > args.mask_fraction
    grad_out = torch.randn(shape, device=device, generator=gen).to(dtype)
    try:
        inputs, fn, _ = BACKENDS[backend](q, k, v, bias, keep)
    except Exception as exc:  # not installed, unsupported
        return [dict(mode=m, metric="status", value=f"unavailable: {type(exc).__name__}: {exc}"[:200]) for m in modes]
    del q, k, v, bias
    leaves = [t.detach().requires_grad_() for t in inputs]
    out_shape_grad = None

    def forward():
        with torch.no_grad():
            return fn(*inputs)

    def both():
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, grad_like(out))

    def grad_like(out):
        nonlocal out_shape_grad
        if out_shape_grad is None or out_shape_grad.shape != out.shape:
            out_shape_grad = grad_out.reshape(out.shape) if grad_out.numel() == out.numel() else torch.randn_like(out)
        return out_shape_grad

    for mode in modes:
        try:
            if mode == "fwd":
                ms = _bench(forward, args.budget_ms)
                mib = _peak_mib(forward, device)
            elif mode == "fwd+bwd":
                ms = _bench(both, args.budget_ms)
                mib = _peak_mib(both, device)
            else:  # bwd alone: the graph is built once, outside the timed region
                out = fn(*leaves)
                g = grad_like(out)

                def backward():
                    return torch.autograd.grad(out, leaves, g, retain_graph=True)

                ms = _bench(backward, args.budget_ms)
                mib = _peak_mib(backward, device)
                del out
            rows += [dict(mode=mode, metric="time_ms", value=ms), dict(mode=mode, metric="peak_mib", value=mib)]
        except Exception as exc:
            oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
            status = "oom" if oom else f"error: {type(exc).__name__}: {exc}"[:200]
            rows.append(dict(mode=mode, metric="status", value=status))
            if not oom:
                print(f"{backend} N={n} {mode}: {status}", file=sys.stderr)
        torch.cuda.empty_cache()
    return rows


def accuracy(args, device, writer, name) -> None:
    """Max error against fp64 of the output and every gradient, per backend (bf16 by
    default), and its ratio to plain PyTorch's error in the same dtype (the target: <= 2)."""
    from foldops.reference.triangle_attention import triangle_attention as reference

    names = ("out", "dq", "dk", "dv", "dbias")
    for dtype_name in args.acc_dtypes:
        dtype = getattr(torch, dtype_name)
        for n in args.acc_n:
            gen = torch.Generator(device=device).manual_seed(1000 + n)
            shape = (args.batch, n, n, args.heads, args.head_dim)
            q, k, v = (torch.randn(shape, device=device, generator=gen).to(dtype) for _ in range(3))
            bias = torch.randn(args.batch, args.heads, n, n, device=device, generator=gen).to(dtype)
            keep = torch.rand(args.batch, n, n, device=device, generator=gen) > 0.1
            keep[:, 0] = False  # one fully masked row
            grad_out = torch.randn(shape, device=device, generator=gen).to(dtype)
            scale = args.head_dim**-0.5
            exact_in = [t.double().requires_grad_() for t in (q, k, v, bias)]
            exact = reference(*exact_in, keep, scale)
            exact = [exact.detach()] + [g.detach() for g in torch.autograd.grad(exact, exact_in, grad_out.double())]
            del exact_in
            torch.cuda.empty_cache()
            errors = {}
            for backend in args.backends:
                try:
                    inputs, fn, canon = BACKENDS[backend](q, k, v, bias, keep)
                    leaves = [t.detach().requires_grad_() for t in inputs]
                    out = fn(*leaves)
                    g_backend = _to_backend_layout(backend, grad_out)
                    grads = torch.autograd.grad(out, leaves, g_backend)
                    got = canon(out.detach(), *[g.detach() for g in grads])
                    errors[backend] = [
                        (a.double() - e).abs().nan_to_num(nan=float("inf")).max().item() for a, e in zip(got, exact)
                    ]
                    del out, grads, got, leaves, inputs
                except Exception as exc:
                    print(f"accuracy {backend} N={n}: {type(exc).__name__}: {str(exc)[:160]}", file=sys.stderr)
                torch.cuda.empty_cache()
            base = errors.get("torch")
            for backend, errs in errors.items():
                for tensor_name, err, ref_err in zip(names, errs, base or [None] * 5):
                    row = dict(op=OP, backend=backend, n=n, batch=args.batch, heads=args.heads,
                               head_dim=args.head_dim, dtype=dtype_name, mode=tensor_name, device=name,
                               version=_version(backend))
                    writer.writerow(dict(row, metric="max_abs_err_vs_fp64", value=err))
                    if ref_err:
                        writer.writerow(dict(row, metric="err_ratio_vs_torch", value=err / ref_err))
                ratios = "" if not base else "  ratio vs torch " + " ".join(
                    f"{t}={e / b:.2f}" for t, e, b in zip(names, errs, base))
                print(f"accuracy {dtype_name} N={n} {backend:15s} " + " ".join(
                    f"{t}={e:.2e}" for t, e in zip(names, errs)) + ratios, flush=True)


def _to_backend_layout(backend: str, t: torch.Tensor) -> torch.Tensor:
    if backend == "trifast":
        return t.permute(0, 3, 1, 2, 4).contiguous()
    if backend == "cuequivariance":
        return t.permute(0, 1, 3, 2, 4).contiguous()
    return t


def run(args) -> None:
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    import triton

    ceilings = measure_ceilings(device)
    print(
        f"device {name}; torch {torch.__version__}, triton {triton.__version__}; copy "
        f"{ceilings['bandwidth'] / 1e12:.2f} TB/s, bf16 matmul {ceilings['mm_flops'] / 1e12:.0f} TFLOP/s, "
        f"exp {ceilings['exp_rate'] / 1e12:.2f} T/s (nominal)",
        flush=True,
    )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "triangle_attention.csv")
    fields = ["op", "backend", "n", "batch", "heads", "head_dim", "dtype", "mode", "metric", "value", "device", "version"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for key, value in ceilings.items():
            writer.writerow(dict(op=OP, backend="device", metric=key, value=value, device=name,
                                 version=f"torch {torch.__version__}, triton {triton.__version__}"))
        if args.acc_n:
            accuracy(args, device, writer, name)
            fh.flush()
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for n in args.n:
                base = dict(op=OP, n=n, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                            dtype=dtype_name, device=name)
                c = counts(n, args.batch, args.heads, args.head_dim, dtype)
                # fp32 runs with IEEE products (the default precision): the FMA units' rate
                mm = ceilings["mm_flops"] if dtype != torch.float32 else 2 * 128 * _sms() * CLOCK_HZ
                fl = floors_ms(c, mm, ceilings["bandwidth"], ceilings["exp_rate"])
                for key, value in c.items():
                    writer.writerow(dict(base, backend="count", mode="", metric=key, value=value, version=""))
                for mode, value in fl.items():
                    writer.writerow(dict(base, backend="floor", mode=mode, metric="time_ms", value=value, version=""))
                for backend in args.backends:
                    if dtype == torch.float32 and n > args.fp32_max_n:
                        rows = [dict(mode=m, metric="status", value="skipped (fp32 above --fp32-max-n)") for m in args.modes]
                    elif backend == "torch" and n > args.torch_max_n:
                        rows = [dict(mode=m, metric="status", value="skipped (too slow / too large)") for m in args.modes]
                    else:
                        rows = run_one(backend, n, dtype, args.modes, args, device)
                    for row in rows:
                        writer.writerow(dict(base, backend=backend, version=_version(backend), **row))
                    fh.flush()
                    summary = {(r["mode"], r["metric"]): r["value"] for r in rows}
                    print(
                        f"{dtype_name:8s} N={n:5d} {backend:15s} "
                        + "  ".join(
                            f"{m}: {_fmt(summary.get((m, 'time_ms')), summary.get((m, 'status')))} ms"
                            f" / {_fmt(summary.get((m, 'peak_mib')), None)} MiB"
                            for m in args.modes
                        )
                        + f"   floor {fl['fwd']:.3f} / {fl['fwd+bwd']:.3f}",
                        flush=True,
                    )
    print(f"wrote {path}")
    plot(args.out)


def _fmt(value, status) -> str:
    if value is None:
        return (status or "-").split(":")[0]
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


# Plot (from the CSV only) -------------------------------------------------------------------


def plot(out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, "triangle_attention.csv")
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    dtypes = sorted({r["dtype"] for r in rows if r["dtype"]}, key=lambda d: d != "bfloat16")
    panels = [("fwd", "time_ms"), ("fwd+bwd", "time_ms"), ("fwd+bwd", "peak_mib")]
    fig, axes = plt.subplots(len(dtypes), len(panels), figsize=(5 * len(panels), 4 * len(dtypes)), squeeze=False)
    device = next((r["device"] for r in rows if r["device"]), "")
    for row_i, dtype in enumerate(dtypes):
        for col, (mode, metric) in enumerate(panels):
            ax = axes[row_i][col]
            backends = sorted({r["backend"] for r in rows if r["dtype"] == dtype and r["backend"] not in ("count", "device")})
            for backend in backends:
                pts = sorted(
                    (int(r["n"]), float(r["value"]))
                    for r in rows
                    if r["dtype"] == dtype and r["backend"] == backend and r["mode"] == mode and r["metric"] == metric
                )
                if pts:
                    colors = {"foldops": "tab:orange", "trifast": "tab:red", "cuequivariance": "tab:blue",
                              "torch": "tab:green", "floor": "gray", "foldops-layer-layout": "tab:brown"}
                    style = dict(linestyle="--") if backend == "floor" else dict(marker="o")
                    style["color"] = colors.get(backend)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=backend, **style)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N")
            ax.set_ylabel("ms" if metric == "time_ms" else "peak MiB above inputs")
            ax.set_title(f"{dtype} {mode} {'time' if metric == 'time_ms' else 'memory'}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"triangle attention, B=1 H=4 D=32, {device}")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "triangle_attention.png"), dpi=110)
    print(f"wrote {os.path.join(out_dir, 'triangle_attention.png')}")


# Block-size sweep -------------------------------------------------------------------------

TUNE_CANDIDATES = {
    "fwd": [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3),
            (64, 64, 4, 4), (128, 64, 8, 2), (64, 128, 4, 2)],
    "dq": [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3),
           (64, 64, 4, 4), (128, 64, 8, 2), (64, 128, 4, 2)],
    "dkdv": [(32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 8, 3), (32, 128, 8, 3),
             (32, 64, 4, 4), (64, 64, 4, 4), (16, 64, 4, 3)],
    "dbias": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 4, 4), (32, 64, 4, 3),
              (128, 64, 8, 2), (64, 32, 4, 3), (128, 128, 8, 2)],
}
# fp32 products run on the FMA units (no tensor cores unless TF32 is allowed): two warps
# tuned best for the backward kernels, and 128x64 with 4 warps for the forward (H100,
# N = 512 / 1024); the larger tiles are here so a tune can find such a shape.
TUNE_CANDIDATES_FP32 = {
    kind: [(64, 32, 2, 2), (32, 64, 2, 2), (128, 64, 4, 2), (64, 128, 4, 2), (64, 64, 4, 2), (128, 64, 4, 3),
           (128, 128, 8, 2), (256, 64, 8, 2), (64, 256, 8, 2), (128, 32, 4, 3), (32, 128, 4, 2), (128, 128, 4, 2)]
    for kind in ("fwd", "dq", "dkdv", "dbias")
}
# The kernels whose device time is each kind's (dBias: also the sum of its row splits).
TUNE_KERNELS = {"fwd": ("_fwd_kernel",), "dq": ("_bwd_dq_kernel",), "dkdv": ("_bwd_dkdv_kernel",),
                "dbias": ("_bwd_dbias_kernel", "_sum_splits_kernel")}


def _kernel_inputs(args, n: int, dtype: torch.dtype):
    """Random (q, k, v, dO, bias, keep-mask) on the GPU for the --tune / --passes modes."""
    device = torch.device("cuda")
    shape = (args.batch, n, n, args.heads, args.head_dim)
    q, k, v, go = (torch.randn(shape, device=device, dtype=dtype) for _ in range(4))
    bias = torch.randn(args.batch, args.heads, n, n, device=device, dtype=dtype)
    keep = torch.rand(args.batch, n, n, device=device) > args.mask_fraction
    return q, k, v, go, bias, keep


def _set_config(kind: str, head_dim: int, cfg: Tuple[int, int, int, int], fp32: bool = False) -> None:
    """Make ``cfg`` the tile of ``kind`` at ``head_dim`` for every N (of fp32 inputs
    only, with ``fp32``)."""
    from foldops.kernels.triangle_attention import configs

    key = (kind, head_dim, fp32)
    configs.CONFIGS[key] = tuple(cfg)
    if key in configs.CONFIGS_SMALL_N:
        configs.CONFIGS_SMALL_N[key] = tuple(cfg)


def _fwd_bwd_steps(args, n: int, dtype: torch.dtype, ops: List[Callable]) -> Tuple[List[Callable[[], None]], bool]:
    """(for each of ``ops``, one forward + backward on the same fixed random inputs;
    whether a mask is passed). ``ops``: differentiable triangle_attention(q, k, v, bias,
    mask, scale) functions, foldops's and, for A/B runs, other versions of it."""
    q, k, v, go, bias, keep = _kernel_inputs(args, n, dtype)
    keep = None if args.no_mask else keep
    leaves = [t.requires_grad_() for t in (q, k, v, bias)]

    def make(op):
        def step():
            out = op(*leaves, keep, args.head_dim**-0.5)
            torch.autograd.grad(out, leaves, go)
        return step

    return [make(op) for op in ops], keep is not None


def _fwd_bwd_step(args, n: int, dtype: torch.dtype) -> Tuple[Callable[[], None], bool]:
    """(one public forward + backward of foldops's kernels, whether a mask is passed)."""
    from foldops.kernels.triangle_attention import triangle_attention

    (step,), masked = _fwd_bwd_steps(args, n, dtype, [triangle_attention])
    return step, masked


def _kernel_times(step: Callable[[], None], reps: int = 20, warmup: int = 5) -> Dict[str, float]:
    """Device ms per call of ``step`` for each kernel it launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / reps / 1000 for e in prof.key_averages() if e.device_time_total > 0}


def tune(args) -> None:
    """Device time of each kernel for each candidate tile, from torch.profiler.

    All four kernels change tile together (candidate c of every kind), since each is
    timed on its own. A first round only compiles; then ``--rounds`` rounds go through
    every candidate (and every ``--variant``) in turn, so that clock drift spreads over
    all of them alike; the median per candidate is reported. The best per kind, summed
    over the sizes, goes to ``--out``/tuned.json. (Timing whole launches with do_bench
    right after each compile, as before, measured the GPU's clock ramp after the idle
    compile: one backward read 4.69 ms at N=512 and 10.0 ms at N=1024, not 8x.)
    """
    import json
    import statistics

    from foldops.kernels.triangle_attention import configs

    kinds = args.kinds or list(TUNE_CANDIDATES)
    variants = args.variant or [""]
    d = args.head_dim
    defaults = (dict(configs.CONFIGS), dict(configs.CONFIGS_SMALL_N))
    totals: Dict[tuple, List[float]] = collections.defaultdict(list)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        fp32 = dtype == torch.float32
        candidates = TUNE_CANDIDATES_FP32 if fp32 else TUNE_CANDIDATES
        width = max(len(candidates[kind]) for kind in kinds)
        for n in args.n:
            step, masked = _fwd_bwd_step(args, n, dtype)
            times: Dict[tuple, List[float]] = collections.defaultdict(list)
            for rnd in range(args.rounds + 1):
                for spec in variants:
                    name = _apply_variant(spec, d)
                    for c in range(width):
                        cfgs = {kind: candidates[kind][c % len(candidates[kind])] for kind in kinds}
                        for kind, cfg in cfgs.items():
                            _set_config(kind, d, cfg, fp32)
                        try:
                            ms = _kernel_times(step, reps=10, warmup=2) if rnd else (step(), {})[1]
                        except Exception as exc:  # a tile that does not fit, say
                            print(f"  {name} {cfgs}: {type(exc).__name__}: {str(exc)[:120]}")
                            ms = None
                        for kind, cfg in cfgs.items():
                            # A kernel missing from the profile is not counted as 0 ms.
                            if rnd and ms is not None and TUNE_KERNELS[kind][0] in ms:
                                times[(name, kind, cfg)].append(sum(ms.get(k, 0.0) for k in TUNE_KERNELS[kind]))
            configs.CONFIGS.clear()
            configs.CONFIGS.update(defaults[0])
            configs.CONFIGS_SMALL_N.update(defaults[1])
            _apply_variant("")
            for spec in variants:
                name = spec.partition(":")[0] or "default"
                for kind in kinds:
                    rows = sorted((statistics.median(t), cfg) for (v, k_, cfg), t in times.items()
                                  if v == name and k_ == kind)
                    for ms, cfg in rows:
                        totals[(name, kind, cfg)].append(ms)
                    line = "  ".join(f"{cfg}:{ms:.3f}" for ms, cfg in rows)
                    print(f"tune {dtype_name} N={n} D={d} mask={'yes' if masked else 'no'} variant={name} "
                          f"{kind}: {line}", flush=True)
    # Only candidates timed at every size compete (a tile that failed at one size, or
    # shared a candidate index with one that failed, would otherwise sum fewer terms).
    sizes = len(args.dtypes) * len(args.n)
    best = {}
    for (name, kind, cfg), ms in sorted(totals.items(), key=lambda item: sum(item[1])):
        if len(ms) == sizes:
            best.setdefault(name, {}).setdefault(kind, list(cfg))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tuned.json"), "w") as fh:
        json.dump({"head_dim": d, "best": best}, fh)
    print("best (summed over sizes):", best)


_KNOB_DEFAULTS: Dict[str, object] = {}


def _apply_variant(spec: str, head_dim: int = 32) -> str:
    """Set the kernel knobs named in
    ``NAME:mma=fwd+dq+dkdv|none,splits=auto|INT,KIND=BJxBKxWARPSxSTAGES``
    (unnamed knobs at their defaults; splits: the dBias row splits; KIND (fwd, dq, dkdv,
    dbias): that kernel's tile at ``head_dim`` for every N); returns NAME."""
    from foldops.kernels.triangle_attention import configs, dbias_splits

    name, _, settings = spec.partition(":")
    _KNOB_DEFAULTS.setdefault("mma", dict(configs.MMA_WAIT))
    _KNOB_DEFAULTS.setdefault("splits", dbias_splits.bias_splits)
    _KNOB_DEFAULTS.setdefault("configs", (dict(configs.CONFIGS), dict(configs.CONFIGS_SMALL_N)))
    configs.CONFIGS.update(_KNOB_DEFAULTS["configs"][0])
    configs.CONFIGS_SMALL_N.update(_KNOB_DEFAULTS["configs"][1])
    configs.MMA_WAIT = dict(_KNOB_DEFAULTS["mma"])
    dbias_splits.bias_splits = _KNOB_DEFAULTS["splits"]
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if key == "mma":
            kinds = set(value.split("+")) - {"none"}
            if not kinds <= set(configs.MMA_WAIT):
                raise ValueError(f"--variant: mma takes {'+'.join(configs.MMA_WAIT)} or none, not {value!r}")
            configs.MMA_WAIT = {kind: kind in kinds for kind in configs.MMA_WAIT}
        elif key == "splits" and value != "auto":
            dbias_splits.bias_splits = lambda *a, count=int(value): count
        elif key in TUNE_CANDIDATES:
            tile = tuple(int(x) for x in value.split("x") if x.isdigit())
            if len(tile) != 4 or value.count("x") != 3:
                raise ValueError(f"--variant: {key} takes BJxBKxWARPSxSTAGES, not {value!r}")
            _set_config(key, head_dim, tile)
        elif key != "splits":
            raise ValueError(f"--variant: unknown setting {key!r} in {spec!r}")
    return name or "default"


def passes(args) -> None:
    """Time each kernel of one forward + backward (torch.profiler, device time per call),
    to show which pass the fwd+bwd total goes to. With --variant, each variant in turn,
    --rounds times round, in this one process."""
    d = args.head_dim
    variants = args.variant or [""]
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for n in args.n:
            step, masked = _fwd_bwd_step(args, n, dtype)
            for spec in variants * (args.rounds if args.variant else 1):
                name = _apply_variant(spec, d)
                rows = sorted(((ms, key) for key, ms in _kernel_times(step, reps=args.reps).items()), reverse=True)
                total = sum(ms for ms, _ in rows)
                print(f"passes {dtype_name} N={n} D={d} mask={'yes' if masked else 'no'} "
                      f"variant={name}: total {total:.3f} ms per fwd+bwd")
                for ms, kname in rows:
                    print(f"  {ms:8.3f} ms  {kname[:90]}")


def apply_configs(path: str) -> None:
    import json

    with open(path) as fh:
        data = json.load(fh)
    best = data.get("best", {})  # {variant: {kind: config}}, or {kind: config} in files of the older format
    if all(isinstance(cfg, list) for cfg in best.values()):
        chosen = best
    elif len(best) == 1 or "default" in best:
        chosen = best.get("default", next(iter(best.values())))
    else:
        raise ValueError(f"{path}: tuned for variants {sorted(best)}; keep one (its knobs are not applied)")
    for kind, cfg in chosen.items():
        _set_config(kind, data["head_dim"], tuple(cfg))
    print("configs from", path, data)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/h100")
    parser.add_argument("--n", type=int, nargs="+", default=[128, 256, 384, 512, 768, 1024, 1536, 2048])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--modes", nargs="+", default=["fwd", "bwd", "fwd+bwd"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--mask-fraction", type=float, default=0.0,
                        help="fraction of keys masked at random (default 0: a mask of all True)")
    parser.add_argument("--torch-max-n", type=int, default=1024)
    parser.add_argument("--fp32-max-n", type=int, default=1024)
    parser.add_argument("--budget-ms", type=float, default=400.0, help="timed repetitions per point, ms")
    parser.add_argument("--acc-n", type=int, nargs="*", default=[256, 512], help="sizes of the accuracy check")
    parser.add_argument("--acc-dtypes", nargs="+", default=["bfloat16"])
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--kinds", nargs="+", default=None, help="with --tune: fwd dq dkdv dbias")
    parser.add_argument("--rounds", type=int, default=3,
                        help="with --tune or --passes --variant: timed rounds over the candidates or variants")
    parser.add_argument("--reps", type=int, default=20, help="with --passes: fwd+bwd calls per timing")
    parser.add_argument("--configs", default=None, help="tuned.json from --tune to apply first")
    parser.add_argument("--passes", action="store_true", help="device time of each kernel of fwd+bwd")
    parser.add_argument("--variant", action="append", default=[],
                        help="with --passes or --tune, repeatable: "
                        "NAME:mma=fwd+dq+dkdv|none,splits=auto|INT,KIND=BJxBKxWARPSxSTAGES (KIND: fwd dq dkdv dbias)")
    parser.add_argument("--no-mask", action="store_true", help="with --passes or --tune: no key mask at all")
    args = parser.parse_args(argv)
    if args.configs:
        apply_configs(args.configs)
    if args.plot_only:
        plot(args.out)
    elif args.tune:
        tune(args)
    elif args.passes:
        passes(args)
    else:
        print(f"python {' '.join(sys.argv)}  ({platform.node()})")
        run(args)


if __name__ == "__main__":
    main()
