"""Static resource report of the triangle attention kernels, compiled for a GPU offline.

Needs no GPU: Triton compiles every kernel of one forward + backward exactly as the
launchers would launch it (same arguments, specialisations and tile configs), for the
chosen target (sm_90 = H100 by default), with the ptxas bundled in the Triton wheel.
For each kernel it prints registers, spills, shared memory and, for each loop, the SASS
instructions per logit and per thread, whether ptxas serialised the wgmma pipeline
(warning C7515: each product waits for the previous one), the MUFU count and the global loads issued
inside the loop (LDG: not pipelined through shared memory), and how many of those are
read in the same iteration (their latency exposed every step; a load prefetched a step
ahead is read only in the next one).

This is the proxy used to tune between GPU runs: the kernels are issue- or
latency-bound (docs/kernels/triangle_attention.md), so instructions per logit,
in-loop LDGs and registers (occupancy) predict most of a change. Timings still come
only from ``benchmarks/triangle_attention.py`` on the GPU. The local Triton may differ
from the GPU machine's (3.9 here, 3.6 there): registers differ by a few percent.

    python benchmarks/tools/triangle_attention_sass.py --n 512 --mask
    python benchmarks/tools/triangle_attention_sass.py --n 512 --config dbias=64,64,8,3 --sass /tmp/sass
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, even from a test shell

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_offline import OfflineDriver  # noqa: E402  (this folder)

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
_INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)")


class _Recorder:
    """Stands in for ``launcher``: compiles (warmup) instead of launching."""

    launches: List[Tuple[str, tuple, dict, object]] = []

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled = self.fn.warmup(*args, grid=grid, **kwargs)
            _Recorder.launches.append((self.fn.__name__, grid, kwargs, compiled))

        return launch


def _sass(cubin: bytes) -> Tuple[str, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return usage, sass


def _ptxas(capability: int) -> str:
    """The ptxas Triton itself uses for this target (3.4+), else the one it bundles."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(capability).path
    except (ImportError, TypeError, AttributeError):
        return PTXAS


def _wgmma_serialized(ptx: str, capability: int) -> str:
    """ptxas's verdict on the kernel's wgmma pipeline: "serial" when it prints C7515
    (every wgmma waits for the previous one), "ok", or "-" when the kernel issues no
    wgmma (mma.sync tiles). A ptxas older than the PTX version Triton writes gets the
    header lowered to the version it names (the instructions used are older than both)."""
    if "wgmma.mma_async" not in ptx:
        return "-"
    ptxas = _ptxas(capability)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        for _ in range(2):
            with open(src, "w") as f:
                f.write(ptx)
            log = subprocess.run([ptxas, f"-arch=sm_{capability}a", "-v", src, "-o", out],
                                 capture_output=True, text=True)
            text = log.stdout + log.stderr
            newest = re.search(r"Unsupported \.version \S+; current version is '([\d.]+)'", text)
            if log.returncode == 0 or not newest:
                break
            ptx = re.sub(r"^\.version \S+", f".version {newest.group(1)}", ptx, count=1, flags=re.M)
    if log.returncode != 0:
        return "?"
    return "serial" if "C7515" in text else "ok"


def _loops(sass: str) -> List[List[str]]:
    """Instruction lists of the loop bodies (backward branches), outermost last."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTRUCTION.match, sass.splitlines()) if m]
    index = {addr: n for n, (addr, _) in enumerate(ins)}
    bodies = []
    for n, (addr, text) in enumerate(ins):
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in index:
            bodies.append([t for _, t in ins[index[int(m.group(1), 16)]: n + 1]])
    return bodies


def _exposed_loads(body: List[str]) -> int:
    """LDGs whose result is read later in the same iteration (latency not hidden)."""
    exposed = 0
    for n, text in enumerate(body):
        if _opcode(text) != "LDG":
            continue
        m = re.search(r"LDG\S*\s+R(\d+)", text)
        width = 2 if ".64" in text else (4 if ".128" in text else 1)
        regs = {f"R{int(m.group(1)) + w}" for w in range(width)}
        for later in body[n + 1:]:
            sources = later.split(",", 1)[1] if "," in later else ""
            if any(re.search(rf"\b{r}\b", sources) for r in regs):
                exposed += 1
                break
    return exposed


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def _usage(text: str) -> Dict[str, int]:
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}


def _inputs(n: int, d: int, dtype: torch.dtype, layout: str):
    """q, k, v, bias as the layers lay them out (see tests/kernels for the same layouts)."""
    gen = torch.Generator().manual_seed(0)
    heads = 4
    if layout == "contiguous":
        q, k, v = (torch.randn(1, n, n, heads, d, generator=gen).to(dtype) for _ in range(3))
        return q, k, v, torch.randn(1, heads, n, n, generator=gen).to(dtype)
    proj = torch.randn(1, n, n, 4, heads, d, generator=gen).to(dtype)  # q, k, v, gate of one Linear
    tri = torch.randn(1, n, n, heads, generator=gen).to(dtype)  # the bias Linear's output
    if layout == "start":
        q, k, v = proj.unbind(3)[:3]
        return q, k, v, tri.permute(0, 3, 1, 2)
    q, k, v = (t.transpose(1, 2) for t in proj.unbind(3)[:3])
    return q, k, v, tri.permute(0, 3, 2, 1)


def report(n: int, d: int, dtype: torch.dtype, mask: bool, capability: int, sass_dir: str = "",
           layout: str = "contiguous") -> List[dict]:
    from foldops.kernels import triangle_attention as K
    from foldops.kernels.triangle_attention import configs, dbias_splits, launch

    driver.set_active(OfflineDriver(capability))
    launch.launcher = _Recorder
    dbias_splits.num_sms = lambda device: 132
    launch._mma_wait = lambda kind, t, has_mask, d: (  # the launcher's rule, for CPU tensors
        configs.MMA_WAIT[kind] and (kind, has_mask, d) not in configs.MMA_WAIT_SKIP and capability // 10 == 9)
    launch._register_cap = lambda kind, t, has_mask, d, warps, even: (  # the launcher's rule, for CPU tensors
        {"maxnreg": configs.MASKED_MAXNREG[(kind, d, warps, even)]}
        if has_mask and t.dtype != torch.float32 and (kind, d, warps, even) in configs.MASKED_MAXNREG else {})
    _Recorder.launches.clear()

    q, k, v, bias = _inputs(n, d, dtype, layout)
    keep = torch.ones(1, n, n, dtype=torch.bool) if mask else None
    out, lse = K.triangle_attention_forward(q, k, v, bias, keep, d**-0.5)
    K.triangle_attention_backward(torch.randn_like(out), q, k, v, bias, keep, out, lse, d**-0.5)

    rows = []
    for name, grid, kwargs, compiled in _Recorder.launches:
        usage_text, sass = _sass(compiled.asm["cubin"])
        if sass_dir:
            os.makedirs(sass_dir, exist_ok=True)
            with open(os.path.join(sass_dir, f"{name}.sass"), "w") as f:
                f.write(sass)
        usage = _usage(usage_text)
        warps = kwargs.get("num_warps", 4)
        # logits of the loop's tile, per thread and iteration
        logits = kwargs.get("BLOCK_J", 1) * kwargs.get("BLOCK_K", 1) / (32 * warps)
        loops = []
        for body in _loops(sass):
            ops = collections.Counter(_opcode(t) for t in body)
            if ops["MUFU"] == 0 and ops["HGMMA"] + ops["HMMA"] == 0:
                continue  # a bookkeeping loop (the all-kept check), not a logit loop
            loops.append({
                "instructions": len(body),
                "per_logit": len(body) / logits,
                "mufu": ops["MUFU"],
                "ldg_in_loop": ops["LDG"],
                "ldg_exposed": _exposed_loads(body),
                "mma": ops["HGMMA"] + ops["HMMA"],
            })
        rows.append({
            "kernel": name,
            "grid": grid,
            "tile": f"{kwargs.get('BLOCK_J', '-')}x{kwargs.get('BLOCK_K', '-')}"
                    f" w{warps} s{kwargs.get('num_stages', '-')}",
            "regs": usage["REG"],
            "local": usage["LOCAL"],
            "shared": compiled.metadata.shared,
            "loops": loops,
            "wgmma": _wgmma_serialized(compiled.asm["ptx"], capability),
        })
    return rows


def _set_configs(specs: List[str]) -> None:
    from foldops.kernels.triangle_attention import configs

    for spec in specs:
        kind, values = spec.split("=")
        bj, bk, warps, stages = (int(x) for x in values.split(","))
        for key in list(configs.CONFIGS):
            if key[0] == kind:
                configs.CONFIGS[key] = (bj, bk, warps, stages)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--mask", action="store_true", help="pass an (all-kept) key mask")
    parser.add_argument("--layout", choices=["contiguous", "start", "end"], default="contiguous",
                        help="q/k/v/bias as the benchmark (contiguous) or the layers (start, end) pass them")
    parser.add_argument("--sm", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--config", action="append", default=[],
                        help="override a kernel's tiles: KIND=BLOCK_J,BLOCK_K,WARPS,STAGES "
                             "(KIND in fwd, dq, dkdv, dbias)")
    parser.add_argument("--sass", default="", help="write each kernel's SASS into this folder")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    _set_configs(args.config)
    rows = report(args.n, args.d, dtype, args.mask, args.sm, args.sass, args.layout)
    print(f"# sm_{args.sm}, triton {triton.__version__}, N={args.n} D={args.d} {args.dtype} "
          f"mask={'yes' if args.mask else 'no'} layout={args.layout}")
    print(f"{'kernel':<20} {'tile':<16} {'regs':>4} {'spill':>5} {'smem':>6} {'wgmma':>6}  "
          "loops: instr/logit (instr, MUFU, LDG exposed/all)")
    for r in rows:
        loops = "; ".join(f"{x['per_logit']:.1f} ({x['instructions']}, {x['mufu']}, {x['ldg_exposed']}/{x['ldg_in_loop']})"
                          for x in r["loops"])
        print(f"{r['kernel']:<20} {r['tile']:<16} {r['regs']:>4} {r['local']:>5} {r['shared']:>6} {r['wgmma']:>6}  {loops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
