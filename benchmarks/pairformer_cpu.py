"""Boltz-2 PairformerLayer inference on CPU: foldops vs Boltz, time and peak memory.

    python benchmarks/pairformer_cpu.py                      # N = 128 192 256, 5 timed runs, 3 rounds
    python benchmarks/pairformer_cpu.py --sizes 128 --repeats 3 --rounds 1
    python benchmarks/pairformer_cpu.py --threads 1 --tag _1thread

Layer: token_s 384, token_z 128, 16 heads, triangle attention 4 heads x 32, fp32,
eval, torch.no_grad, no padding, ``layer(s, z, mask, pair_mask)`` with the layers'
default chunking (Boltz's layer: none). Both layers hold the same random weights.

Each (implementation, N) runs in a fresh subprocess: peak memory is ``ru_maxrss`` at
the end minus ``ru_maxrss`` right after the imports (so it counts weights, inputs and
the forward's temporaries alike for both); time is the median of ``--repeats`` runs
after one warm-up. ``--rounds`` repeats everything, alternating the two, and keeps the
least disturbed round (a shared machine only ever adds time). Writes
``benchmarks/results/cpu/pairformer_layer<tag>.csv`` and ``.md``.
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

    times, cpu_times = [], []
    with torch.no_grad():
        for i in range(repeats + 1):
            start, cpu_start = time.perf_counter(), time.process_time()
            out_s, out_z = layer(s, z, mask, pair_mask)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if i > 0:
                times.append(elapsed)
                cpu_times.append(cpu)
            del out_s, out_z
    peak_after = _rss_mib()
    return {
        "impl": impl,
        "n": n,
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "cpu_ms": 1e3 * statistics.median(cpu_times),
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


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 192, 256])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (>= 3)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh-process rounds, Boltz and foldops alternating")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--tag", default="", help="suffix of the result files, e.g. '_1thread'")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, n, repeats, threads = args.child
        print(json.dumps(_child(impl, int(n), int(repeats), int(threads))))
        return
    if args.repeats < 3:
        parser.error("--repeats: at least 3")

    load_before = _load()
    runs = {}  # (impl, n) -> [row per round]
    for round_ in range(args.rounds):
        for n in args.sizes:
            for impl in IMPLS:
                row = run_case(impl, n, args.repeats, args.threads)
                runs.setdefault((impl, n), []).append(row)
                print(
                    f"round {round_ + 1} {impl:8s} N={n:4d}  {row['median_ms']:9.1f} ms  peak {row['peak_mib']:8.1f} MiB  "
                    f"forward peak {row['forward_peak_mib']:8.1f} MiB",
                    flush=True,
                )
    load_after = _load()

    # A shared machine only ever adds time: the least disturbed round is the best estimate.
    summary = {}
    for key, rows in runs.items():
        summary[key] = {
            "time_ms_median": min(r["median_ms"] for r in rows),
            "time_ms_median_worst_round": max(r["median_ms"] for r in rows),
            "cpu_ms_median": min(r["cpu_ms"] for r in rows),
            "peak_mib_above_import": statistics.median(r["peak_mib"] for r in rows),
            "forward_peak_mib_above_steady": statistics.median(r["forward_peak_mib"] for r in rows),
        }
    torch_version = next(iter(runs.values()))[0]["torch"]

    os.makedirs(args.out, exist_ok=True)
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads"
    stem = f"pairformer_layer{args.tag}"
    csv_path = os.path.join(args.out, stem + ".csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["op", "backend", "shape", "dtype", "mode", "metric", "value", "device", "version"])
        for (impl, n), metrics in summary.items():
            shape = f"N={n},token_s={TOKEN_S},token_z={TOKEN_Z},heads={HEADS},pair={PAIR_HEADS}x{PAIR_HEAD_WIDTH}"
            for metric, value in metrics.items():
                writer.writerow(
                    ["PairformerLayer", impl, shape, "float32", "inference", metric, f"{value:.2f}", f"cpu ({cpu})", f"torch {torch_version}"]
                )

    command = (
        f"python benchmarks/pairformer_cpu.py --sizes {' '.join(map(str, args.sizes))} --repeats {args.repeats} "
        f"--rounds {args.rounds} --threads {args.threads}" + (f" --tag {args.tag}" if args.tag else "")
    )
    lines = [
        "# Boltz-2 PairformerLayer inference on CPU: foldops vs Boltz",
        "",
        f"Made by `{command}` on {cpu}, torch {torch_version}; load average (1/5/15 min) {load_before} "
        f"before, {load_after} after. fp32, eval, no_grad, token_s {TOKEN_S}, token_z {TOKEN_Z}, {HEADS} heads, "
        f"triangle attention {PAIR_HEADS} x {PAIR_HEAD_WIDTH}, no padding, each layer's default chunking, the "
        "same random weights for both.",
        "",
        f"Time: median of {args.repeats} runs after one warm-up in a fresh process; {args.rounds} rounds alternate "
        "Boltz and foldops; the table gives the best round's median (worst round in brackets). CPU ms: "
        "the process's CPU time per forward (all threads; median, best round), which other tenants of a "
        "shared machine disturb far less than wall time. "
        "Peak: `ru_maxrss` minus the `ru_maxrss` right after the imports (weights, inputs, construction and "
        "forward; median over rounds). Fwd peak: the forward's own peak RSS above the RSS just before it "
        "(peak mark reset through /proc/self/clear_refs after construction).",
        "",
        "| N | Boltz ms | foldops ms | time ratio | Boltz CPU ms | foldops CPU ms | CPU ratio "
        "| Boltz peak MiB | foldops peak MiB | memory ratio | Boltz fwd peak MiB | foldops fwd peak MiB | fwd ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in args.sizes:
        b, f = summary[("boltz", n)], summary[("foldops", n)]
        lines.append(
            f"| {n} | {b['time_ms_median']:.0f} ({b['time_ms_median_worst_round']:.0f}) | "
            f"{f['time_ms_median']:.0f} ({f['time_ms_median_worst_round']:.0f}) | "
            f"{f['time_ms_median'] / b['time_ms_median']:.2f} | "
            f"{b['cpu_ms_median']:.0f} | {f['cpu_ms_median']:.0f} | {f['cpu_ms_median'] / b['cpu_ms_median']:.2f} | "
            f"{b['peak_mib_above_import']:.0f} | {f['peak_mib_above_import']:.0f} | "
            f"{f['peak_mib_above_import'] / b['peak_mib_above_import']:.2f} | "
            f"{b['forward_peak_mib_above_steady']:.0f} | {f['forward_peak_mib_above_steady']:.0f} | "
            f"{f['forward_peak_mib_above_steady'] / b['forward_peak_mib_above_steady']:.2f} |"
        )
    lines += ["", "Ratios are foldops / Boltz (lower is better). Target: time ratio <= 1, memory ratio <= 0.5 at N = 256."]
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {csv_path} and {stem}.md")


if __name__ == "__main__":
    main()
