"""Variable-length attention: foldops against PyTorch's ways of attending over a batch of
proteins of mixed lengths, in one process on the same tokens.

GPU case (issue 15's Performance section): 64 sequences, lengths 50-1022 drawn with a
fixed seed, H = 16, D = 64, bf16, forward and forward+backward:

- ``foldops_triton``: foldops.ops.varlen_attention(backend="triton") on the packed tensors;
- ``foldops_torch``: backend="torch" (torch.nn.attention.varlen on cc >= 8.0 fp16/bf16);
- ``foldops_torch_buckets`` / ``..._efficient``: the torch backend's bucketed SDPA path
  (what V100-class GPUs, XPU, MPS and CPU run), SDPA free to choose / forced to the
  memory-efficient kernel;
- ``torch_varlen``: torch.nn.attention.varlen.varlen_attn called directly;
- ``sdpa_padded`` / ``sdpa_padded_efficient`` / ``sdpa_padded_cudnn``: SDPA on the batch
  padded to the longest with a key mask (default choice / memory-efficient / cuDNN);
- ``sdpa_padded_flash_nomask``: the flash kernel on the padded batch without the mask (a
  wrong answer: a speed reference only, flash takes no mask);
- ``sdpa_equal``: SDPA (flash) on 64 equal-length sequences holding the same tokens (the
  flash-attention-class bound);
- ``loop``: one matmul-softmax-matmul per sequence (the usual flash_attn replacement).

CPU case: 64 sequences of lengths 20-200, H = 16, D = 64, fp32: foldops torch backend
(buckets), the per-sequence loop and SDPA on the padded batch.

Times: median of device-event timings after warm-up (host timers on CPU), and
throughput (many calls, one sync: ms per call); peak memory above the inputs. FLOPs,
bytes and, on CUDA, the floor from --tflops / --tbps (H100 defaults from DESIGN.md) are
printed beside each measurement. Writes ``varlen_attention.csv`` (tidy: one row per
measurement) into --out.

    python benchmarks/varlen_attention.py --out benchmarks/results/h100      # GPU case (+CPU)
    python benchmarks/varlen_attention.py --case cpu --out /tmp/varlen       # CPU only
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from foldops.bench.harness import Timer, measure_memory  # noqa: E402
from foldops.ops import varlen_attention  # noqa: E402

OP = "varlen_attention"


def lengths(count: int, low: int, high: int, seed: int) -> List[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (count,), generator=g).tolist()


def counts(lens: List[int], heads: int, dim: int, elem: int) -> Dict[str, float]:
    """Matmul FLOPs, exponentials and the fewest bytes of forward and backward."""
    pairs = sum(n * n for n in lens) * heads
    tokens = sum(lens) * heads * dim
    return {"fwd_flop": 4.0 * pairs * dim, "bwd_flop": 10.0 * pairs * dim, "exp": float(pairs),
            "fwd_bytes": 4.0 * tokens * elem, "bwd_bytes": 8.0 * tokens * elem}


# Peers ---------------------------------------------------------------------------------------


def packed_inputs(lens, heads, dim, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    total = sum(lens)
    q, k, v = (torch.randn(total, heads, dim, device=device, generator=g).to(dtype) for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return q, k, v, cu


def padded(t: torch.Tensor, lens: List[int]) -> torch.Tensor:
    """[total, H, D] -> [B, H, Lmax, D] zero-padded (outside the timed region)."""
    out = t.new_zeros(len(lens), max(lens), t.shape[1], t.shape[2])
    start = 0
    for b, n in enumerate(lens):
        out[b, :n] = t[start:start + n]
        start += n
    return out.transpose(1, 2).contiguous()


def build(name: str, lens, heads, dim, dtype, device):
    """(leaves, fn(*leaves) -> output tensor) for backend ``name``; raises if unavailable."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, cu = packed_inputs(lens, heads, dim, dtype, device)
    lmax = max(lens)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if name in ("foldops_triton", "foldops_torch"):
        backend = name.split("_")[1]
        return (q, k, v), lambda q, k, v: varlen_attention(q, k, v, cu, cu, lmax, lmax, backend=backend)
    if name.startswith("foldops_torch_buckets"):
        from foldops.ops._varlen_torch import torch_buckets
        lens_t = torch.tensor(lens)
        # SDPBackend is not iterable on every torch: without a forced kernel, no context.
        forced = name.endswith("efficient")

        def buckets(q, k, v):
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]) if forced else contextlib.nullcontext():
                return torch_buckets(q, k, v, lens_t, lens_t, False, dim ** -0.5, 0.0, None, False)[0]

        return (q, k, v), buckets
    if name == "torch_varlen":
        from torch.nn.attention.varlen import varlen_attn

        return (q, k, v), lambda q, k, v: varlen_attn(q, k, v, cu, cu, lmax, lmax)
    if name.startswith("sdpa_padded"):
        qp, kp, vp = (padded(t, lens) for t in (q, k, v))
        keep = torch.arange(lmax, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
        mask = keep[:, None, None, :]
        kind = {"sdpa_padded": None, "sdpa_padded_efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa_padded_cudnn": SDPBackend.CUDNN_ATTENTION,
                "sdpa_padded_flash_nomask": SDPBackend.FLASH_ATTENTION}[name]
        use_mask = None if name.endswith("nomask") else mask

        def run_padded(q, k, v):
            if kind is None:
                return sdpa(q, k, v, attn_mask=use_mask)
            with sdpa_kernel([kind]):
                return sdpa(q, k, v, attn_mask=use_mask)

        return (qp, kp, vp), run_padded
    if name == "sdpa_equal":
        n = sum(lens) // len(lens)
        qe, ke, ve = (t[: n * len(lens)].view(len(lens), n, heads, dim).transpose(1, 2).contiguous()
                      for t in (q, k, v))
        return (qe, ke, ve), lambda q, k, v: sdpa(q, k, v)
    if name == "loop":
        starts = [0] + torch.tensor(lens).cumsum(0).tolist()
        scale = dim ** -0.5

        def loop(q, k, v):
            outs = []
            for b in range(len(lens)):
                qs, ks, vs = (t[starts[b]:starts[b + 1]].transpose(0, 1) for t in (q, k, v))
                weights = torch.softmax(torch.matmul(qs * scale, ks.transpose(-1, -2)).float(), -1)
                outs.append(torch.matmul(weights.to(vs.dtype), vs).transpose(0, 1))
            return torch.cat(outs)

        return (q, k, v), loop
    raise ValueError(f"unknown backend {name}")


# Measurement ---------------------------------------------------------------------------------


def measure(name, lens, heads, dim, dtype, device, modes, repeats) -> List[dict]:
    rows: List[dict] = []
    try:
        inputs, fn = build(name, lens, heads, dim, dtype, device)
        leaves = [t.detach().requires_grad_() for t in inputs]
        with torch.no_grad():
            grad = torch.randn_like(fn(*inputs))
    except Exception as exc:  # not in this torch / not on this device
        status = f"unavailable: {type(exc).__name__}: {exc}"[:200]
        return [dict(backend=name, mode=m, metric="status", value=status) for m in modes]

    def forward():
        with torch.no_grad():
            return fn(*inputs)

    def both():
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, grad)

    timer = Timer(device)
    for mode in modes:
        call = forward if mode == "fwd" else both
        try:
            times = timer.measure(lambda _: call(), warmup=3 if device.type == "cuda" else 1, repeats=repeats,
                                  max_time_s=5.0)
            median = sorted(times)[len(times) // 2]
            calls = max(3, min(50, int(200 / max(median, 1e-3))))
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            _sync(device)
            throughput = (time.perf_counter() - t0) * 1e3 / calls
            mib = measure_memory(device, call)
            rows += [dict(backend=name, mode=mode, metric="time_ms", value=median),
                     dict(backend=name, mode=mode, metric="throughput_ms", value=throughput)]
            if mib is not None:
                rows.append(dict(backend=name, mode=mode, metric="peak_mib", value=mib))
        except Exception as exc:
            oom = "out of memory" in str(exc).lower()
            rows.append(dict(backend=name, mode=mode, metric="status",
                             value="oom" if oom else f"error: {type(exc).__name__}: {exc}"[:200]))
    return rows


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: str, device: torch.device, args, writer, meta) -> None:
    if case == "gpu":
        lens, dtype = lengths(64, 50, 1022, args.seed), torch.bfloat16
        names = ["foldops_triton", "foldops_torch", "foldops_torch_buckets", "foldops_torch_buckets_efficient",
                 "torch_varlen", "sdpa_padded", "sdpa_padded_efficient", "sdpa_padded_cudnn",
                 "sdpa_padded_flash_nomask", "sdpa_equal", "loop"]
    else:
        lens, dtype = lengths(64, 20, 200, args.seed), torch.float32
        names = ["foldops_torch", "loop", "sdpa_padded"]
    heads, dim = args.heads, args.head_dim
    c = counts(lens, heads, dim, torch.tensor([], dtype=dtype).element_size())
    floor = {}
    if device.type == "cuda":
        fwd = max(c["fwd_flop"] / (args.tflops * 1e12), c["fwd_bytes"] / (args.tbps * 1e12)) * 1e3
        bwd = max(c["bwd_flop"] / (args.tflops * 1e12), c["bwd_bytes"] / (args.tbps * 1e12)) * 1e3
        floor = {"fwd": fwd, "fwd+bwd": fwd + bwd}
    shape = f"B={len(lens)} L={min(lens)}-{max(lens)} tokens={sum(lens)} H={heads} D={dim}"
    print(f"\n{case} case on {meta['device']}: {shape} {str(dtype).split('.')[-1]}; "
          f"fwd {c['fwd_flop'] / 1e9:.1f} GFLOP, fwd+bwd {(c['fwd_flop'] + c['bwd_flop']) / 1e9:.1f} GFLOP"
          + (f"; floor fwd {floor['fwd']:.3f} ms, fwd+bwd {floor['fwd+bwd']:.3f} ms" if floor else ""))
    print(f"{'backend':34s} {'mode':8s} {'median ms':>10s} {'thru ms':>9s} {'peak MiB':>9s} {'x floor':>8s}")
    for name in names:
        rows = measure(name, lens, heads, dim, dtype, device, ["fwd", "fwd+bwd"], args.repeats)
        by_mode: Dict[str, Dict[str, object]] = {}
        for row in rows:
            by_mode.setdefault(row["mode"], {})[row["metric"]] = row["value"]
            writer.writerow(dict(meta, op=OP, case=case, shape=shape, dtype=str(dtype).split(".")[-1], **row))
        for mode, values in by_mode.items():
            if "status" in values:
                print(f"{name:34s} {mode:8s} {values['status']}")
                continue
            ratio = values["time_ms"] / floor[mode] if floor else math.nan
            print(f"{name:34s} {mode:8s} {values['time_ms']:10.3f} {values['throughput_ms']:9.3f} "
                  f"{values.get('peak_mib', math.nan):9.1f} {ratio:8.1f}")
    for key, value in list(c.items()) + [(f"floor_ms_{m}", v) for m, v in floor.items()]:
        writer.writerow(dict(meta, op=OP, case=case, shape=shape, dtype=str(dtype).split(".")[-1],
                             backend="counts", mode="", metric=key, value=value))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=["gpu", "cpu", "both"], default=None,
                        help="default: both on a CUDA machine, cpu elsewhere")
    parser.add_argument("--out", default="varlen-bench")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--tflops", type=float, default=780.0, help="matmul ceiling for the floor (TFLOP/s)")
    parser.add_argument("--tbps", type=float, default=3.0, help="copy ceiling for the floor (TB/s)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    case = args.case or ("both" if cuda else "cpu")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "varlen_attention.csv")
    fields = ["op", "backend", "case", "shape", "dtype", "mode", "metric", "value", "device", "torch", "host"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        if case in ("gpu", "both"):
            if not cuda:
                raise SystemExit("--case gpu needs a CUDA device")
            device = torch.device("cuda")
            meta = dict(device=torch.cuda.get_device_name(device), torch=torch.__version__, host=platform.node())
            run_case("gpu", device, args, writer, meta)
        if case in ("cpu", "both"):
            device = torch.device("cpu")
            meta = dict(device=f"cpu ({os.cpu_count()} threads, {torch.get_num_threads()} torch threads)",
                        torch=torch.__version__, host=platform.node())
            run_case("cpu", device, args, writer, meta)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
