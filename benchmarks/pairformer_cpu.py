"""Boltz-2 PairformerLayer inference on CPU: foldops vs Boltz, time and peak memory.

    python benchmarks/pairformer_cpu.py                      # N = 128 192 256, 5 timed runs
    python benchmarks/pairformer_cpu.py --sizes 128 --repeats 3

Layer: token_s 384, token_z 128, 16 heads, triangle attention 4 heads x 32, fp32,
eval, torch.no_grad, no padding, ``layer(s, z, mask, pair_mask)`` with the layers'
default chunking (Boltz's layer: none). Both layers hold the same random weights.

Each (implementation, N) runs in a fresh subprocess: peak memory is ``ru_maxrss`` at
the end minus ``ru_maxrss`` right after the imports (so it counts weights, inputs and
the forward's temporaries alike for both); time is the median of ``--repeats`` runs
after one warm-up. Writes ``benchmarks/results/cpu/pairformer_layer.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "cpu")
TOKEN_S, TOKEN_Z, HEADS, PAIR_HEAD_WIDTH, PAIR_HEADS = 384, 128, 16, 32, 4
IMPLS = ("boltz", "foldops")


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(impl: str, n: int, repeats: int, threads: int) -> dict:
    import torch

    if impl == "boltz":
        from boltz.model.layers.pairformer import PairformerLayer

        def make():
            return PairformerLayer(TOKEN_S, TOKEN_Z, HEADS, 0.25, PAIR_HEAD_WIDTH, PAIR_HEADS, v2=True)
    else:
        import foldops.nn.pairformer  # noqa: F401  (import cost belongs to the baseline)
        from foldops.nn import PairformerLayer

        def make():
            return PairformerLayer(TOKEN_S, TOKEN_Z, HEADS, 0.25, PAIR_HEAD_WIDTH, PAIR_HEADS)

    torch.set_num_threads(threads)
    after_import = _rss_mib()

    torch.manual_seed(0)
    layer = make().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(layer.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 10.0))
    s = torch.randn(1, n, TOKEN_S, generator=gen)
    z = torch.randn(1, n, n, TOKEN_Z, generator=gen)
    mask = torch.ones(1, n)
    pair_mask = torch.ones(1, n, n)

    # Second view: the forward's own peak above the steady state just before it (the
    # construction's transients, e.g. Boltz's float64 initialisers, excluded).
    peak_before = _rss_mib()
    reset = _reset_peak()
    steady = _status_mib("VmRSS")

    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            out_s, out_z = layer(s, z, mask, pair_mask)
            elapsed = time.perf_counter() - start
            if i > 0:
                times.append(elapsed)
            del out_s, out_z
    peak_after = _rss_mib()
    return {
        "impl": impl,
        "n": n,
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "peak_mib": max(peak_before, peak_after) - after_import,
        "forward_peak_mib": (_status_mib("VmHWM") - steady) if reset else float("nan"),
        "repeats": repeats,
        "threads": threads,
        "torch": torch.__version__,
    }


def run_case(impl: str, n: int, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, str(n), str(repeats), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} N={n} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 192, 256])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (>= 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, n, repeats, threads = args.child
        print(json.dumps(_child(impl, int(n), int(repeats), int(threads))))
        return
    if args.repeats < 3:
        parser.error("--repeats: at least 3")

    rows = []
    for n in args.sizes:
        for impl in IMPLS:
            row = run_case(impl, n, args.repeats, args.threads)
            rows.append(row)
            print(
                f"{impl:8s} N={n:4d}  {row['median_ms']:9.1f} ms  peak {row['peak_mib']:8.1f} MiB  "
                f"forward peak {row['forward_peak_mib']:8.1f} MiB",
                flush=True,
            )

    os.makedirs(args.out, exist_ok=True)
    cpu = f"{platform.processor() or platform.machine()}, {args.threads} threads"
    csv_path = os.path.join(args.out, "pairformer_layer.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["op", "backend", "shape", "dtype", "mode", "metric", "value", "device", "version"])
        for r in rows:
            shape = f"N={r['n']},token_s={TOKEN_S},token_z={TOKEN_Z},heads={HEADS},pair={PAIR_HEADS}x{PAIR_HEAD_WIDTH}"
            for metric, key in (
                ("time_ms_median", "median_ms"),
                ("time_ms_min", "min_ms"),
                ("peak_mib_above_import", "peak_mib"),
                ("forward_peak_mib_above_steady", "forward_peak_mib"),
            ):
                writer.writerow(
                    ["PairformerLayer", r["impl"], shape, "float32", "inference", metric, f"{r[key]:.2f}", f"cpu ({cpu})", f"torch {r['torch']}"]
                )

    by = {(r["impl"], r["n"]): r for r in rows}
    lines = [
        "# Boltz-2 PairformerLayer inference on CPU: foldops vs Boltz",
        "",
        f"Made by `python benchmarks/pairformer_cpu.py --sizes {' '.join(map(str, args.sizes))} "
        f"--repeats {args.repeats}` on {cpu}, torch {rows[0]['torch']}, fp32, eval, no_grad, "
        f"token_s {TOKEN_S}, token_z {TOKEN_Z}, {HEADS} heads, triangle attention {PAIR_HEADS} x {PAIR_HEAD_WIDTH}, "
        "no padding, each layer's default chunking. Time: median of the timed runs after one warm-up. "
        "Peak: `ru_maxrss` minus the post-import `ru_maxrss` of a fresh process per case (weights, "
        "inputs, construction and forward). Fwd peak: the forward's own peak RSS above the RSS just "
        "before it (peak mark reset through /proc/self/clear_refs after construction).",
        "",
        "| N | Boltz ms | foldops ms | time ratio | Boltz peak MiB | foldops peak MiB | memory ratio "
        "| Boltz fwd peak MiB | foldops fwd peak MiB | fwd ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in args.sizes:
        b, f = by[("boltz", n)], by[("foldops", n)]
        lines.append(
            f"| {n} | {b['median_ms']:.0f} | {f['median_ms']:.0f} | {f['median_ms'] / b['median_ms']:.2f} | "
            f"{b['peak_mib']:.0f} | {f['peak_mib']:.0f} | {f['peak_mib'] / b['peak_mib']:.2f} | "
            f"{b['forward_peak_mib']:.0f} | {f['forward_peak_mib']:.0f} | "
            f"{f['forward_peak_mib'] / b['forward_peak_mib']:.2f} |"
        )
    lines += ["", "Ratios are foldops / Boltz (lower is better). Target: time ratio <= 1, memory ratio <= 0.5 at N = 256."]
    with open(os.path.join(args.out, "pairformer_layer.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {csv_path} and pairformer_layer.md")


if __name__ == "__main__":
    main()
