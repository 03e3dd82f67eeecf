"""A Boltz-2 model patched by ``foldops.patch.boltz`` against Boltz, with and without cuEquivariance.

One process, the same weights and inputs for all three: ``boltz`` (plain PyTorch),
``boltz+cueq`` (``use_kernels=True``: cuEquivariance's triangle kernels, needs
``cuequivariance_torch``), ``foldops`` (a copy patched with ``foldops.patch.boltz``,
backend ``auto``). bf16 autocast, Boltz-2 sizes (token_s 384, token_z 128, 16 heads,
triangle attention 4 x 32, MSA 64 channels), random weights, no padding.

1. ``layer``: one ``PairformerLayer``; training step (train mode, dropout 0.25,
   forward + backward of s, z and the parameters) and inference (eval, no_grad, with
   Boltz's triangle-attention chunk rule: 128 rows above 384 tokens, else 512). Median of
   ``--repeats`` calls timed with CUDA events after ``--warmup``; peak memory above the
   inputs. Matmul FLOPs of the layer and the bf16 floor (780 TFLOP/s) beside each.
2. ``trunk``: Boltz-2's trunk (``MSAModule``, 4 blocks, ``--msa-rows`` 1024 rows, then a
   48-block ``PairformerModule``), inference: time at ``--trunk-n`` (1024) and per block.
3. ``fit``: the longest N the trunk's inference fits in memory, by bisection on N (step
   ``--fit-step``), each trial in a fresh subprocess (an out-of-memory error or a crashing
   kernel cannot spoil the next trial). Inference memory does not grow with depth (each
   block's temporaries are freed before the next), so trials run all weights but only
   ``--fit-blocks`` blocks of each module; up from ``--fit-start`` by ``--fit-grow`` (down
   by halves if the start fails), then bisection to ``--fit-step``; a trial slower than
   ``--fit-cap`` seconds ends the search upward. The row's status says why the next size
   failed (oom, crash, timeout). ``--fit-mem-cap GiB`` caps what each trial's caching
   allocator may hold, so that a bigger card answers for a smaller one (the row's status
   says so). The cap leaves out the CUDA context, which on the smaller card also takes
   its share: take the free memory an H100 reports after initialisation
   (``torch.cuda.mem_get_info()``), not its 79.1 GiB total, or expect the bound about
   half a GiB generous.

    PYTHONPATH=src:/tmp/peers python benchmarks/boltz_patch.py --out benchmarks/results/h100
    PYTHONPATH=src:/tmp/peers python benchmarks/boltz_patch.py --quick      # about 2 minutes
    python benchmarks/boltz_patch.py --parts layer --layer-n 512 --impls foldops boltz

Writes ``<out>/boltz_patch.csv`` (one row per measurement: part, impl, mode, n, metric,
value, unit, status, device, versions) and prints a table. Unavailable implementations
are recorded as ``unavailable``, out-of-memory as ``oom``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

TOKEN_S, TOKEN_Z, MSA_S, HEADS, PW, PH = 384, 128, 64, 16, 32, 4
IMPLS = ("foldops", "boltz+cueq", "boltz")
BF16_PEAK = 780e12  # H100 SXM dense bf16 matmul, FLOP/s (DESIGN.md)


# --- models -------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(module, seed=0):
    """Generic random weights (Boltz zero-initialises some projections)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, device="cpu").to(p.device)  # also under a default device
        if p.dim() >= 2:
            p.copy_(noise / p.shape[-1] ** 0.5)
        else:
            p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
    return module


def cueq_available() -> str:
    try:
        import cuequivariance_torch  # noqa: F401

        return ""
    except Exception as exc:  # noqa: BLE001
        return f"cuequivariance_torch not importable: {exc}"


def as_impl(module, impl):
    """(module for impl, use_kernels); ``module`` is the Boltz original, left as it is."""
    if impl == "foldops":
        import foldops

        patched = copy.deepcopy(module)
        foldops.patch.boltz(patched, backend="auto", strict=True)
        return patched, False
    return module, impl == "boltz+cueq"


def build_layer(device):
    from boltz.model.layers.pairformer import PairformerLayer

    with torch.device(device):
        return randomize_(PairformerLayer(TOKEN_S, TOKEN_Z, HEADS, 0.25, PW, PH, v2=True))


def build_trunk(device, msa_blocks=4, pairformer_blocks=48):
    from boltz.model.layers.pairformer import PairformerModule
    from boltz.model.modules.trunkv2 import MSAModule

    with torch.device(device):
        trunk = torch.nn.ModuleDict(
            {
                "msa_module": MSAModule(MSA_S, TOKEN_Z, TOKEN_S, msa_blocks, 0.15, 0.25, PW, PH),
                "pairformer_module": PairformerModule(TOKEN_S, TOKEN_Z, pairformer_blocks, HEADS, 0.25, PW, PH, v2=True),
            }
        )
    return randomize_(trunk).eval()


def trunk_inputs(n, rows, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    feats = {
        "msa": torch.randint(0, 33, (1, rows, n), generator=g),
        "has_deletion": (torch.rand(1, rows, n, generator=g) > 0.8).float(),
        "deletion_value": torch.rand(1, rows, n, generator=g),
        "msa_paired": (torch.rand(1, rows, n, generator=g) > 0.5).float(),
        "msa_mask": torch.ones(1, rows, n),
        "token_pad_mask": torch.ones(1, n),
    }
    feats = {k: v.to(device) for k, v in feats.items()}
    s = torch.randn(1, n, TOKEN_S, generator=g).to(device)
    z = torch.randn(1, n, n, TOKEN_Z, generator=g).to(device)
    return s, z, feats


def run_trunk(trunk, s, z, feats, use_kernels):
    mask = feats["token_pad_mask"]
    pair_mask = mask[:, :, None] * mask[:, None, :]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        z = z + trunk["msa_module"](z, s, feats, use_kernels=use_kernels)
        s, z = trunk["pairformer_module"](s, z, mask, pair_mask, use_kernels=use_kernels)
    return s, z


# --- measuring ----------------------------------------------------------------------------


def layer_flops(n: int) -> float:
    """Matmul FLOPs of one PairformerLayer forward (the pair track; the single track's
    O(N^2 H) share is left out)."""
    c, hd = TOKEN_Z, PW * PH
    n2, n3 = n * n, n ** 3
    tri_mul = 2 * n2 * c * (4 * c + 2 * c) + 2 * n3 * c
    tri_att = 2 * n2 * c * (4 * hd + PH) + 2 * n2 * hd * c + 2 * 2 * n3 * hd
    transition = 2 * n2 * c * (4 * c) * 3
    return 2 * tri_mul + 2 * tri_att + transition


def timed(fn, warmup, repeats):
    """Median ms of ``repeats`` calls (CUDA events), and peak MiB above the start."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak


class Rows:
    def __init__(self, device_name, versions):
        self.rows, self.device, self.versions = [], device_name, versions

    def add(self, part, impl, mode, n, metric, value, unit, status="ok"):
        self.rows.append(dict(part=part, impl=impl, mode=mode, n=n, metric=metric, value=value, unit=unit,
                              status=status, device=self.device, versions=self.versions))
        shown = f"{value:.4g} {unit}" if isinstance(value, (int, float)) and value == value else status
        print(f"{part:6s} {impl:11s} {mode:9s} N={n:<5d} {metric:14s} {shown}", flush=True)


def bench_layer(args, rows, device):
    base = build_layer(device)
    for n in sorted(set(args.layer_n_train) | set(args.layer_n_infer)):
        g = torch.Generator(device="cpu").manual_seed(n)
        s0 = torch.randn(1, n, TOKEN_S, generator=g).to(device)
        z0 = torch.randn(1, n, n, TOKEN_Z, generator=g).to(device)
        mask = torch.ones(1, n, device=device)
        pair_mask = torch.ones(1, n, n, device=device)
        chunk = 128 if n > 384 else 512
        flops = layer_flops(n)
        for impl in args.impls:
            why = cueq_available() if impl == "boltz+cueq" else ""
            modes = [m for m, sizes in (("train", args.layer_n_train), ("inference", args.layer_n_infer)) if n in sizes]
            if why:
                for mode in modes:
                    rows.add("layer", impl, mode, n, "time", float("nan"), "ms", "unavailable")
                continue
            layer, use_kernels = as_impl(base, impl)
            for mode in modes:
                if mode == "train":
                    layer.train()
                    s, z = s0.clone().requires_grad_(True), z0.clone().requires_grad_(True)

                    def step():
                        with torch.autocast("cuda", dtype=torch.bfloat16):
                            out_s, out_z = layer(s, z, mask, pair_mask, None, use_kernels)
                        (out_s.float().square().mean() + out_z.float().square().mean()).backward()
                        layer.zero_grad(set_to_none=True)
                        s.grad = z.grad = None
                else:
                    layer.eval()

                    def step():
                        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                            layer(s0, z0, mask, pair_mask, chunk, use_kernels)

                try:
                    ms, peak = timed(step, args.warmup, args.repeats)
                except torch.cuda.OutOfMemoryError:
                    rows.add("layer", impl, mode, n, "time", float("nan"), "ms", "oom")
                    torch.cuda.empty_cache()
                    continue
                fl = flops * (3 if mode == "train" else 1)
                rows.add("layer", impl, mode, n, "time", ms, "ms")
                rows.add("layer", impl, mode, n, "peak_memory", peak / 1024, "GiB")
                rows.add("layer", impl, mode, n, "floor", fl / BF16_PEAK * 1e3, "ms")
            layer = None  # noqa: F841 (frees the copy before the next implementation)
            gc.collect()
            torch.cuda.empty_cache()


def bench_trunk(args, rows, device):
    base = build_trunk(device)
    n = args.trunk_n
    s, z, feats = trunk_inputs(n, args.msa_rows, device)
    for impl in args.impls:
        why = cueq_available() if impl == "boltz+cueq" else ""
        if why:
            rows.add("trunk", impl, "inference", n, "time", float("nan"), "ms", "unavailable")
            continue
        trunk, use_kernels = as_impl(base, impl)
        try:
            ms, peak = timed(lambda: run_trunk(trunk, s, z, feats, use_kernels), 1, args.trunk_repeats)
        except torch.cuda.OutOfMemoryError:
            rows.add("trunk", impl, "inference", n, "time", float("nan"), "ms", "oom")
        else:
            rows.add("trunk", impl, "inference", n, "time", ms, "ms")
            rows.add("trunk", impl, "inference", n, "time_per_block", ms / (4 + 48), "ms")
            rows.add("trunk", impl, "inference", n, "peak_memory", peak / 1024, "GiB")
        trunk = None  # noqa: F841
        gc.collect()
        torch.cuda.empty_cache()


def trial(impl, n, rows_msa, blocks, mem_cap_gib=0.0):
    """One fit trial (in its own process): prints a JSON line."""
    device = torch.device("cuda")
    if mem_cap_gib:  # a bigger card standing in for a smaller one
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, mem_cap_gib * 2**30 / total), device)
    base = build_trunk(device)
    trunk, use_kernels = as_impl(base, impl)
    del base
    resident = [list(trunk[key].layers) for key in ("msa_module", "pairformer_module")]  # all weights stay
    for key in ("msa_module", "pairformer_module"):
        trunk[key].layers = torch.nn.ModuleList(list(trunk[key].layers)[:blocks])
        if hasattr(trunk[key], "msa_blocks"):
            trunk[key].msa_blocks = min(trunk[key].msa_blocks, blocks)
    gc.collect()
    torch.cuda.empty_cache()
    try:
        s, z, feats = trunk_inputs(n, rows_msa, device)
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run_trunk(trunk, s, z, feats, use_kernels)
        torch.cuda.synchronize()
        out = {"status": "ok", "seconds": time.perf_counter() - start,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    except torch.cuda.OutOfMemoryError:
        out = {"status": "oom"}
    print("TRIAL " + json.dumps(out), flush=True)
    del resident


def run_trial(args, impl, n):
    cmd = [sys.executable, os.path.abspath(__file__), "--_trial", impl, str(n), "--msa-rows", str(args.msa_rows),
           "--fit-blocks", str(args.fit_blocks), "--fit-mem-cap", str(args.fit_mem_cap)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.fit_cap + 120)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    for line in proc.stdout.splitlines():
        if line.startswith("TRIAL "):
            return json.loads(line[6:])
    tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
    return {"status": "crash", "error": tail[0][:200]}


def bench_fit(args, rows):
    for impl in args.fit_impls:
        if impl == "boltz+cueq" and cueq_available():
            rows.add("fit", impl, "inference", 0, "longest_n", float("nan"), "tokens", "unavailable")
            continue
        lo, hi, note, failure = None, None, "ok", ""

        def attempt(n):
            result = run_trial(args, impl, n)
            print(f"  fit {impl} N={n}: {result}", flush=True)
            return result

        n = args.fit_start
        while n <= args.fit_max:  # upward until a trial fails or is too slow
            r = attempt(n)
            if r["status"] != "ok":
                hi, failure = n, r["status"]
                break
            lo = n
            if r["seconds"] > args.fit_cap:
                note = "time cap"
                break
            n += args.fit_grow
        n = args.fit_start // 2
        while lo is None and n >= args.fit_step:  # the start failed: downward by halves
            r = attempt(n)
            if r["status"] == "ok":
                lo = n
            else:
                hi, failure = n, r["status"]
            n //= 2
        while note == "ok" and lo is not None and hi is not None and hi - lo > args.fit_step:
            mid = (lo + hi) // 2 // args.fit_step * args.fit_step
            if mid <= lo:
                break
            r = attempt(mid)
            if r["status"] == "ok":
                lo = mid
            else:
                hi, failure = mid, r["status"]
        value = float("nan") if lo is None else float(lo)
        status = note if note != "ok" else (f"next fails: {failure}" if hi is not None else "fit_max reached")
        if args.fit_mem_cap:
            status += f"; allocator capped at {args.fit_mem_cap} GiB"
        rows.add("fit", impl, "inference", int(hi or 0), "longest_n", value, "tokens", status)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["layer", "trunk", "fit"], choices=["layer", "trunk", "fit"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--layer-n-train", nargs="*", type=int, default=[512, 768])
    p.add_argument("--layer-n-infer", nargs="*", type=int, default=[512, 768, 1024])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--trunk-n", type=int, default=1024)
    p.add_argument("--trunk-repeats", type=int, default=3)
    p.add_argument("--msa-rows", type=int, default=1024)
    p.add_argument("--fit-impls", nargs="+", default=["foldops", "boltz+cueq"], choices=IMPLS)
    p.add_argument("--fit-start", type=int, default=4096)
    p.add_argument("--fit-grow", type=int, default=2048, help="step of the upward search before bisection")
    p.add_argument("--fit-step", type=int, default=256, help="resolution of the bisection")
    p.add_argument("--fit-max", type=int, default=12288)
    p.add_argument("--fit-blocks", type=int, default=1, help="blocks of each module run per trial")
    p.add_argument("--fit-cap", type=float, default=60.0, help="seconds; a slower trial ends the search")
    p.add_argument("--fit-mem-cap", type=float, default=0.0,
                   help="GiB the caching allocator may hold per trial (0: the whole card), so that a bigger "
                   "card answers for a smaller one: e.g. an H100's free memory after initialisation, on an H200")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (about 2 minutes)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "h100"))
    p.add_argument("--_trial", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fit_mem_cap < 0:
        p.error(f"--fit-mem-cap: expected GiB >= 0 (0: the whole card), got {args.fit_mem_cap}")
    if args._trial:
        trial(args._trial[0], int(args._trial[1]), args.msa_rows, args.fit_blocks, args.fit_mem_cap)
        return
    if not torch.cuda.is_available():
        sys.exit("boltz_patch.py measures on a CUDA GPU; none is available here")
    if args.quick:
        args.layer_n_train, args.layer_n_infer = [512], [512, 1024]
        args.repeats, args.warmup, args.trunk_repeats = 5, 2, 1
        args.fit_grow, args.fit_step, args.fit_cap = 4096, 1024, 30.0
    import boltz  # noqa: F401

    from importlib.metadata import version

    import foldops

    versions = f"torch {torch.__version__}; boltz {version('boltz')}; foldops {foldops.__version__}"
    try:
        versions += f"; cuequivariance_torch {version('cuequivariance_torch')}"
    except Exception:  # noqa: BLE001
        pass
    rows = Rows(torch.cuda.get_device_name(), versions)
    device = torch.device("cuda")
    print(f"{rows.device}; {versions}", flush=True)
    if "layer" in args.parts:
        bench_layer(args, rows, device)
    if "trunk" in args.parts:
        bench_trunk(args, rows, device)
    if "fit" in args.parts:
        bench_fit(args, rows)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "boltz_patch.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows.rows[0]))
        writer.writeheader()
        writer.writerows(rows.rows)
    print_table(rows.rows)
    print(f"wrote {path}")


def print_table(rows):
    """time (peak) per (part, mode, N), one column per implementation, and foldops's ratio
    to boltz+cueq."""
    keys = sorted({(r["part"], r["mode"], r["n"]) for r in rows if r["part"] != "fit"})
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    print("\n| part | mode | N | " + " | ".join(impls) + " | foldops / boltz+cueq | floor |")
    print("|---" * (len(impls) + 5) + "|")
    get = lambda part, mode, n, impl, metric: next(  # noqa: E731
        (r for r in rows if (r["part"], r["mode"], r["n"], r["impl"], r["metric"]) == (part, mode, n, impl, metric)), None)
    for part, mode, n in keys:
        cells, times = [], {}
        for impl in impls:
            t, m = get(part, mode, n, impl, "time"), get(part, mode, n, impl, "peak_memory")
            if t is None or t["status"] != "ok":
                cells.append(t["status"] if t else "-")
                continue
            times[impl] = t["value"]
            cells.append(f"{t['value']:.1f} ms ({m['value']:.1f} GiB)" if m else f"{t['value']:.1f} ms")
        ratio = f"{times['foldops'] / times['boltz+cueq']:.2f}" if {"foldops", "boltz+cueq"} <= set(times) else "-"
        floor = get(part, mode, n, "foldops", "floor")
        print(f"| {part} | {mode} | {n} | " + " | ".join(cells) + f" | {ratio} | {floor['value']:.1f} ms |" if floor
              else f"| {part} | {mode} | {n} | " + " | ".join(cells) + f" | {ratio} | - |")
    for r in rows:
        if r["part"] == "fit":
            print(f"longest N that fits ({r['impl']}): {r['value']:.0f} ({r['status']}; first failing N {r['n']})")


if __name__ == "__main__":
    main()
