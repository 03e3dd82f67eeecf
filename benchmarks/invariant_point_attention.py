"""Invariant point attention layer: foldops vs the OpenFold form, time and peak memory.

    # H100 (the issue's Performance section): bf16 autocast, fwd+bwd at N = 256..2048 for
    # both, then foldops alone at N = 4096 (fwd+bwd) and 8192 (fwd)
    python benchmarks/invariant_point_attention.py --device cuda
    # CPU, 2 cores: the torch backend at N = 256 vs the OpenFold form, fp32
    python benchmarks/invariant_point_attention.py --device cpu

Layer: c_s 256, c_z 128, c_hidden 16, 12 heads, 4 query/key points, 8 value points
(``foldops.nn.InvariantPointAttention`` and ``OpenFoldFormIPA`` below, a transcription
of OpenFold's forward: the [N, N, H, P, 3] displacements, the [H, N, N] logits, the
fp32 weighted sum for the point output). Both hold the same random weights. Inputs:
s [1, N, 256] and z [1, N, N, 128] in fp32 (requiring grad for fwd+bwd), random
frames, all residues real. ``fwd+bwd`` is forward then ``backward`` of a fixed
gradient of the output, under ``torch.autocast(bf16)`` on CUDA (none on CPU).

Per (implementation, N, mode): time = median of device-event-timed runs after warm-up
(host timers on CPU); ``throughput_ms`` = wall time of ``--burst`` back-to-back calls
and one sync, per call; ``peak_mib`` = peak allocated during one call above what was
allocated before it (inputs, weights excluded; outputs, temporaries, saved tensors
and gradients included), CPU from the profiler's allocation events. Out-of-memory is
recorded as ``status=oom``. ``floor_ms`` is max(FLOPs / 780 TFLOP/s, bytes / 3.0
TB/s), the H100's bf16 matmul and copy ceilings (DESIGN.md), for the layer's minimum
work: its matmuls and attention products, and reading z (its gradient written, fwd+bwd).

Writes a tidy CSV (op, backend, shape, dtype, mode, metric, value, status, note,
device, torch_version, foldops_version) to ``--out`` (default
benchmarks/results/<device>/invariant_point_attention.csv) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import foldops  # noqa: E402
from foldops import device as fdevice  # noqa: E402
from foldops.bench.harness import measure_memory  # noqa: E402
from foldops.nn import InvariantPointAttention  # noqa: E402

C_S, C_Z, C_HIDDEN, HEADS, PQ, PV = 256, 128, 16, 12, 4, 8
PEAK_FLOPS, PEAK_BYTES = 780e12, 3.0e12  # H100 bf16 matmul, copy (read + write)
COLUMNS = ("op", "backend", "shape", "dtype", "mode", "metric", "value", "status", "note",
           "device", "torch_version", "foldops_version")


class OpenFoldFormIPA(nn.Module):
    """OpenFold's IPA forward, term by term (for timing beside foldops), on the same
    parameters (``load_state_dict`` from the foldops layer)."""

    def __init__(self, c_s, c_z, c_hidden, heads, pq, pv, inf=1e5, eps=1e-8):
        super().__init__()
        self.c_hidden, self.heads, self.pq, self.pv, self.inf, self.eps = c_hidden, heads, pq, pv, inf, eps
        hc = heads * c_hidden
        self.linear_q = nn.Linear(c_s, hc)
        self.linear_kv = nn.Linear(c_s, 2 * hc)
        self.linear_q_points = nn.Linear(c_s, heads * pq * 3)
        self.linear_kv_points = nn.Linear(c_s, heads * (pq + pv) * 3)
        self.linear_b = nn.Linear(c_z, heads)
        self.head_weights = nn.Parameter(torch.zeros(heads))
        self.linear_out = nn.Linear(heads * (c_z + c_hidden + pv * 4), c_s)

    def _points(self, s, linear, rots, trans, count):
        pts = linear(s)
        pts = torch.stack(torch.split(pts, pts.shape[-1] // 3, dim=-1), dim=-1)  # x|y|z blocks
        pts = (rots[:, :, None] * pts[..., None, :]).sum(-1) + trans[:, :, None]  # elementwise, as rot_vec_mul
        return pts.view(*pts.shape[:-2], self.heads, count, 3)

    def forward(self, s, z, rots, trans, mask):
        batch, n = s.shape[:2]
        q = self.linear_q(s).view(batch, n, self.heads, -1)
        k, v = self.linear_kv(s).view(batch, n, self.heads, -1).split(self.c_hidden, dim=-1)
        q_pts = self._points(s, self.linear_q_points, rots, trans, self.pq)
        k_pts, v_pts = self._points(s, self.linear_kv_points, rots, trans, self.pq + self.pv).split(
            [self.pq, self.pv], dim=-2)
        b = self.linear_b(z)
        a = torch.matmul(q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1)) * math.sqrt(1.0 / (3 * self.c_hidden))
        a = a + math.sqrt(1.0 / 3) * b.permute(0, 3, 1, 2)
        pt_att = (q_pts.unsqueeze(-4) - k_pts.unsqueeze(-5)) ** 2  # [B, N, N, H, P, 3]
        pt_att = sum(torch.unbind(pt_att, dim=-1))
        hw = nn.functional.softplus(self.head_weights).view(1, 1, 1, -1, 1) * math.sqrt(1.0 / (3 * (self.pq * 9.0 / 2)))
        pt_att = (pt_att * hw).sum(-1) * (-0.5)
        square = mask.unsqueeze(-1) * mask.unsqueeze(-2)
        a = a + pt_att.permute(0, 3, 1, 2) + (self.inf * (square - 1)).unsqueeze(-3)
        a = torch.softmax(a, dim=-1)
        o = torch.matmul(a, v.transpose(-2, -3).to(a.dtype)).transpose(-2, -3).flatten(-2)
        o_pt = (a[..., None, :, :, None] * v_pts.permute(0, 2, 4, 1, 3)[..., None, :, :]).sum(-2)  # fp32 sum
        o_pt = o_pt.permute(0, 3, 1, 4, 2)  # [B, N, H, Pv, 3]
        rt = rots.transpose(-1, -2)[:, :, None, None]
        o_pt = (rt * (o_pt - trans[:, :, None, None])[..., None, :]).sum(-1)
        o_pt_norm = torch.sqrt((o_pt ** 2).sum(-1) + self.eps).flatten(-2)
        o_pt = o_pt.reshape(batch, n, -1, 3)
        o_pair = torch.matmul(a.transpose(-2, -3), z.to(a.dtype)).flatten(-2)
        feats = torch.cat((o, *torch.unbind(o_pt, dim=-1), o_pt_norm, o_pair), dim=-1)
        return self.linear_out(feats.to(z.dtype))


def random_frames(n, device):
    q, r = torch.linalg.qr(torch.randn(1, n, 3, 3, device=device))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]
    q = q * torch.where(torch.linalg.det(q) < 0, -1.0, 1.0)[..., None, None]
    return q.contiguous(), 10 * torch.randn(1, n, 3, device=device)


def floor_ms(n: int, mode: str) -> float:
    """Minimum time at the H100 ceilings for the layer's work (see the module doc)."""
    hc = HEADS * C_HIDDEN
    proj = 2 * n * C_S * (3 * hc + HEADS * (2 * PQ + PV) * 3)  # q, kv and point projections
    out = 2 * n * HEADS * (C_Z + C_HIDDEN + 4 * PV) * C_S
    pair_bias = 2 * n * n * C_Z * HEADS
    attention = 2 * n * n * HEADS * (C_HIDDEN + 3 * PQ + C_HIDDEN + 3 * PV + C_Z)
    flops = proj + out + pair_bias + attention
    z_bytes = n * n * C_Z * 4  # fp32 z read
    if mode == "fwd+bwd":
        flops *= 3
        z_bytes *= 3  # read twice, its gradient written once
    return max(flops / PEAK_FLOPS, z_bytes / PEAK_BYTES) * 1e3


def run_case(impl, n, mode, device, args, writer_rows):
    torch.manual_seed(0)
    fl = floor_ms(n, mode)
    shape = f"B=1,N={n},c_s={C_S},c_z={C_Z},H={HEADS},C={C_HIDDEN},Pq={PQ},Pv={PV}"
    dtype = "bf16-autocast" if device.type == "cuda" else "fp32"
    backend = args.backend if impl == "foldops" else "openfold_form"
    base = dict(op="invariant_point_attention_layer", backend=backend, shape=shape, dtype=dtype, mode=mode,
                device=fdevice.device_name(device), torch_version=torch.__version__,
                foldops_version=getattr(foldops, "__version__", "?"))

    def emit(metric, value, status="ok", note=""):
        writer_rows.append(dict(base, metric=metric, value="" if value is None else f"{value:.6g}",
                                status=status, note=note))

    try:
        ours = InvariantPointAttention(C_S, C_Z, C_HIDDEN, HEADS, PQ, PV, backend=args.backend).to(device)
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0, 0.05)
        layer = ours
        if impl == "openfold":
            layer = OpenFoldFormIPA(C_S, C_Z, C_HIDDEN, HEADS, PQ, PV).to(device)
            layer.load_state_dict(ours.state_dict())
        del ours
        grad = mode == "fwd+bwd"
        s = torch.randn(1, n, C_S, device=device, requires_grad=grad)
        z = torch.randn(1, n, n, C_Z, device=device, requires_grad=grad)
        rots, trans = random_frames(n, device)
        mask = torch.ones(1, n, device=device)
        g_out = torch.randn(1, n, C_S, device=device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        def call():
            with autocast:
                if impl == "openfold":
                    out = layer(s, z, rots, trans, mask)
                else:
                    out = layer(s, z, (rots, trans), mask)
            if grad:
                out.backward(g_out.to(out.dtype))
                s.grad = z.grad = None
                layer.zero_grad(set_to_none=True)
            return None

        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            for _ in range(args.warmup):
                call()
            fdevice.synchronize(device)
            times = []
            began = time.perf_counter()
            for i in range(args.repeats):
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    call()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    call()
                    times.append((time.perf_counter() - t0) * 1e3)
                if i >= 2 and time.perf_counter() - began > args.max_time:
                    break
            fdevice.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(args.burst):
                call()
            fdevice.synchronize(device)
            burst = (time.perf_counter() - t0) * 1e3 / args.burst
            peak = measure_memory(device, call)
        med = statistics.median(times)
        emit("time_ms", med, note=f"median of {len(times)}")
        emit("throughput_ms", burst, note=f"{args.burst} calls, one sync")
        emit("peak_mib", peak)
        emit("floor_ms", fl)
        print(f"{impl:9s} N={n:5d} {mode:8s} {med:9.3f} ms  burst {burst:9.3f} ms  "
              f"peak {peak if peak is not None else float('nan'):9.1f} MiB  floor {fl:7.3f} ms", flush=True)
    except Exception as exc:  # OOM and failures become rows
        status = "oom" if fdevice.is_out_of_memory(exc) else "error"
        emit("time_ms", None, status=status, note=f"{type(exc).__name__}: {str(exc)[:200]}")
        print(f"{impl:9s} N={n:5d} {mode:8s} {status}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    finally:
        for name in ("layer", "s", "z"):
            locals().pop(name, None)
        gc.collect()
        fdevice.empty_cache(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--sizes", type=int, nargs="*", help="N for both implementations")
    parser.add_argument("--large", type=str, nargs="*", default=None,
                        help="foldops alone: N:mode pairs (default on CUDA 4096:fwd+bwd 8192:fwd)")
    parser.add_argument("--modes", nargs="*", default=None, help="default: fwd+bwd on CUDA, fwd and fwd+bwd on CPU")
    parser.add_argument("--backend", default="auto", help="foldops backend (CPU default: torch)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--max-time", type=float, default=10.0, help="seconds of timed runs per case (>= 3 runs)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if cpu and args.backend == "auto":
        args.backend = "torch"
    sizes = args.sizes if args.sizes is not None else ([256] if cpu else [256, 512, 1024, 2048])
    modes = args.modes or (["fwd", "fwd+bwd"] if cpu else ["fwd+bwd"])
    large = args.large if args.large is not None else ([] if cpu else ["4096:fwd+bwd", "8192:fwd"])
    if cpu:
        args.repeats, args.burst, args.warmup = min(args.repeats, 5), min(args.burst, 3), min(args.warmup, 1)
    rows = []
    for n in sizes:
        for mode in modes:
            for impl in ("openfold", "foldops"):
                run_case(impl, n, mode, device, args, rows)
    for item in large:
        n, mode = item.split(":")
        run_case("foldops", int(n), mode, device, args, rows)
    out = args.out or os.path.join(HERE, "results", "cpu" if cpu else "h100", "invariant_point_attention.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
