"""Compile every Triton kernel of foldops for a GPU target offline (no GPU needed) and
report, per kernel and launch configuration: whether it compiles, registers, spills,
shared memory, and whether its tl.dot products became wgmma (sm_90), mma.sync or neither.

Why: the CPU test suite runs the kernels under the Triton interpreter, which accepts
what the compiler rejects (tl.dot below 16, non-power-of-2 aranges, dtype mismatches,
constexpr misuse, API names a given Triton lacks). This script compiles exactly what the
launchers would launch, so such errors show up without a GPU round-trip.

How: each op's real launchers (``foldops/kernels/<op>/launch.py``) are called on small
CPU tensors whose shapes select the production tile tables (sequence lengths, channel
and head widths, dtypes, masks, gates, causal/dropout, ...). ``launcher`` in each
launch module is replaced by a recorder that calls ``JITFunction.warmup`` (Triton's own
argument specialisation: dtypes, 16-byte alignment, ints equal to 1 or divisible by 16)
under an offline driver for the target, instead of launching. Launcher switches that ask
the CUDA device (SM count, the sm_90 wgmma wait, the fp32 key-mask precision) are set as
they are on that GPU. The PTX of every distinct compiled kernel then goes through the
target's ptxas with ``-v`` (registers, spill bytes, and warning C7515: wgmma
serialised); shared memory is Triton's (``metadata.shared``, dynamic).

Meant for the GPU machine's Triton (3.6), in a separate environment that has it, e.g.

    python -m venv /work/venv36 && /work/venv36/bin/pip install triton==3.6.0 numpy torch==2.13.0
    PYTHONPATH=src /work/venv36/bin/python benchmarks/tools/compile_offline.py --csv /tmp/compile.csv
    PYTHONPATH=src /work/venv36/bin/python benchmarks/tools/compile_offline.py --op triangle_attention --quick

Columns: op, kernel, variant (the launcher inputs), tile (constexpr block sizes), w/s
(num_warps/num_stages), status (ok or the compile error's first line), regs, spill
(ptxas spill store bytes), smem (bytes), mma ("wgmma", "wgmma-serial" when ptxas
serialised it, "wgmma-rs-race" when the SASS overwrites a register A operand of a
wgmma still in flight, see below, "mma" for mma.sync, "-" without tensor-core
products), rs_loops (loops whose last wgmma has its A operand in registers and is
still in flight at the back-edge, from the TTGIR). Exit status 1 if any launch failed
to compile or has a register race.

Register races (triton-lang/triton#9433, Triton 3.6): a wgmma reads a register A
operand asynchronously until a wgmma.wait_group covers it; Triton leaves the loop's last
register-A wgmma in flight across the back-edge, and ptxas may then give its registers
to the next step's loads. The SASS check (cuobjdump) flags a loop whose in-flight
register-A HGMMA has one of its A registers written before the next WARPGROUP.DEPBAR.
rs_loops counts the TTGIR pattern that makes this possible, raced or not. Runs in a few minutes on 2 CPU cores (one compile per
distinct specialisation; Triton's disk cache makes reruns fast).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import os
import re
import subprocess
import sys
import tempfile
import traceback
from typing import Callable, Dict, Iterator, List, Optional, Tuple

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, even from a test shell

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

OPS = ("triangle_attention", "triangle_multiplication", "varlen_attention", "invariant_point_attention",
       "pair_weighted_averaging")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TILE_KEYS = ("BLOCK_J", "BLOCK_K", "BLOCK_M", "BLOCK_N", "BLOCK_I", "BLOCK_P", "BLOCK_SC", "BLOCK_H",
             "BLOCK_D", "BLOCK", "GROUP_M", "CP", "HP", "DP", "EP", "CZP", "D", "C")
FLAG_KEYS = ("HAS_MASK", "EVEN_N", "MMA_WAIT", "PRECISION", "MASK_PRECISION", "PRECISE", "STORE_LSE", "FMA_CHAIN",
             "CAUSAL", "DROPOUT", "EVEN_D", "GROUP", "SPLIT_A", "SPLIT_DY", "SPLIT_P", "MODE", "HAS_GATE",
             "HAS_KEEP", "KEEP_PER_ROW")


class OfflineDriver:
    """Just enough of a Triton driver to compile for ``target`` without a GPU."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


class Recorder:
    """Stands in for ``foldops.kernels._launch.launcher``: ``Recorder(kernel)[grid](*args, **kw)``
    compiles (``warmup``) instead of launching, and records the result or the error."""

    variant = ""
    launches: List[dict] = []
    kernels: Optional[List[str]] = None  # compile only these kernel names (None: all)

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if Recorder.kernels is not None and self.fn.__name__ not in Recorder.kernels:
                return
            row = {"kernel": self.fn.__name__, "variant": Recorder.variant, "kwargs": kwargs, "compiled": None,
                   "error": None}
            try:
                row["compiled"] = self.fn.warmup(*args, grid=grid, **kwargs)
            except Exception as exc:  # noqa: BLE001 - every compile error is a finding
                row["error"] = _first_error_line(exc)
                row["traceback"] = traceback.format_exc()
            Recorder.launches.append(row)

        return launch


# Opt-in shared memory per block (bytes) by compute capability: more fails at launch
# (Triton's OutOfResources when the kernel is loaded), not at compile time.
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def _first_error_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Triton's CompilationError: "at L:C:" then the source, then the message last.
    for line in reversed(lines):
        if not line.startswith("^") and not line.startswith("at "):
            return f"{type(exc).__name__}: {line}"[:300]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_HGMMA_REG_A = re.compile(r"HGMMA\.\S+\s+R\d+,\s+R(\d+),")
_DEST_REG = re.compile(r"^(?:@!?U?P\w+\s+)?[A-Z][\w.]*\s+R(\d+)\b")


def sass_register_races(sass: str) -> List[str]:
    """Instructions that write an A register of a register-A HGMMA still in flight at a
    loop's back-edge (after the loop's last WARPGROUP.DEPBAR) before the next one."""
    ins = [(int(a, 16), t.strip()) for a, t in _SASS.findall(sass)]
    where = {a: i for i, (a, _) in enumerate(ins)}
    races = []
    for i, (addr, text) in enumerate(ins):
        m = re.search(r"\bBRA\s+`?\(?0x([0-9a-f]+)", text)
        if not m or int(m.group(1), 16) >= addr or int(m.group(1), 16) not in where:
            continue
        body = ins[where[int(m.group(1), 16)]:i + 1]
        last_wait = max([k for k, (_, t) in enumerate(body) if "WARPGROUP.DEPBAR" in t] + [-1])
        live, first = set(), None
        for k, (_, t) in enumerate(body[last_wait + 1:], start=last_wait + 1):
            h = _HGMMA_REG_A.search(t)
            if h:
                live |= set(range(int(h.group(1)), int(h.group(1)) + 4))
                first = k if first is None else first
        if not live:
            continue
        for _, t in body[first + 1:] + body:  # to the back-edge, then from the loop top
            if "WARPGROUP.DEPBAR" in t:
                break
            d = _DEST_REG.match(t)
            if d and not t.startswith(("ST", "HGMMA", "WARPGROUP")) and int(d.group(1)) in live:
                races.append(t)
                break
    return races


def ttgir_register_a_loops(ttgir: str) -> int:
    """Loops whose last async warp_group_dot takes A from registers and is not waited for
    before the loop's end (the pattern of triton-lang/triton#9433)."""
    count, stack = 0, []
    for line in ttgir.splitlines():
        text = line.strip()
        if re.search(r"\bscf\.for\b", text):
            stack.append([False, True])  # [last async dot has register A, waited since]
        elif stack and "ttng.warp_group_dot_wait" in text:
            stack[-1][1] = True
        elif stack and "ttng.warp_group_dot " in text and "isAsync = true" in text:
            stack[-1] = ["tensor<" in text.split(" : ", 1)[-1].split("*")[0], False]
        elif stack and text.startswith("}") and "scf.for" not in text:
            rs, waited = stack.pop()
            count += rs and not waited
    return count


def ptxas_report(ptx: str, capability: int) -> Dict[str, object]:
    """Registers, spill-store bytes and the wgmma verdict from the target's ptxas -v
    (and, on sm_90, the SASS register-race check)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(capability).path
    except TypeError:  # older signature
        ptxas = get_ptxas().path
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    races: List[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, f"-arch={arch}", "-v", src, "-o", out], capture_output=True, text=True)
        cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
        if "wgmma.mma_async" in ptx and log.returncode == 0 and os.path.exists(cuobjdump):
            dump = subprocess.run([cuobjdump, "-sass", out], capture_output=True, text=True)
            races = sass_register_races(dump.stdout)
    text = log.stdout + log.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    if "wgmma.mma_async" in ptx:
        mma = "wgmma-rs-race" if races else "wgmma-serial" if "C7515" in text else "wgmma"
    elif re.search(r"\bmma\.sync", ptx):
        mma = "mma"
    else:
        mma = "-"
    return {"regs": int(regs.group(1)) if regs else None, "spill": int(spill.group(1)) if spill else None,
            "mma": mma, "ptxas_ok": log.returncode == 0, "ptxas_log": text, "races": races}


# ----------------------------------------------------------------------------- scenarios
# Each yields (variant label, thunk calling the real launchers on CPU tensors).

def _randn(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype)


def triangle_attention_cases(quick: bool, capability: int) -> Iterator[Tuple[str, Callable]]:
    from foldops.kernels.triangle_attention import configs, dbias_splits, launch

    launch.launcher = Recorder
    dbias_splits.num_sms = lambda device: 132
    # The launcher's rules for a CUDA device of this capability, on CPU tensors.
    launch._mma_wait = lambda kind, t, has_mask, d: (
        configs.MMA_WAIT[kind] and (kind, has_mask, d) not in configs.MMA_WAIT_SKIP and capability // 10 == 9)
    launch._mask_precision = lambda t: "tf32" if t.dtype == torch.float32 and capability >= 80 else "ieee"

    # N selects the tile table: < 256 caps tiles (and is not a block multiple), <= 512
    # the small-N table, larger the general one; 777 is not a multiple of any block.
    ns = (512, 777) if quick else (100, 512, 1024, 777)
    heads, rows = 4, 2  # rows i only multiply the grid; tiles depend on N
    dims = (32,) if quick else configs.HEAD_DIMS
    for dname, n, d, mask in itertools.product(DTYPES, ns, dims, (False, True)):
        dtype = DTYPES[dname]
        tf32s = (False, True) if dtype == torch.float32 else (False,)
        for tf32 in tf32s:
            def run(dtype=dtype, n=n, d=d, mask=mask, tf32=tf32):
                gen = torch.Generator().manual_seed(0)
                q, k, v = (_randn(1, rows, n, heads, d, dtype=dtype, gen=gen) for _ in range(3))
                bias = _randn(1, heads, n, n, dtype=dtype, gen=gen)
                keep = torch.ones(1, rows, n, dtype=torch.bool) if mask else None
                out, lse = launch.triangle_attention_forward(q, k, v, bias, keep, d ** -0.5, allow_tf32=tf32)
                launch.triangle_attention_backward(torch.randn_like(out), q, k, v, bias, keep, out, lse, d ** -0.5,
                                                   allow_tf32=tf32)
                if not quick:  # inference forward without lse
                    launch.triangle_attention_forward(q, k, v, bias, keep, d ** -0.5, allow_tf32=tf32,
                                                      need_lse=False)
            yield f"{dname} N={n} D={d} mask={int(mask)}" + (" tf32" if tf32 else ""), run
    # fp32 bias with 16-bit inputs (the layers under autocast), and the layers' strided layouts.
    for dname in ("bf16",) if quick else ("bf16", "fp16"):
        def run_f32_bias(dtype=DTYPES[dname]):
            gen = torch.Generator().manual_seed(0)
            n, d = 512, 32
            q, k, v = (_randn(1, rows, n, heads, d, dtype=dtype, gen=gen) for _ in range(3))
            bias = _randn(1, heads, n, n, gen=gen)
            keep = torch.ones(1, rows, n, dtype=torch.bool)
            out, lse = launch.triangle_attention_forward(q, k, v, bias, keep, d ** -0.5)
            launch.triangle_attention_backward(torch.randn_like(out), q, k, v, bias, keep, out, lse, d ** -0.5)
        yield f"{dname} N=512 D=32 mask=1 bias=fp32", run_f32_bias

        def run_layout(dtype=DTYPES[dname]):
            gen = torch.Generator().manual_seed(0)
            n, d = 512, 32
            proj = _randn(1, rows, n, 4, heads, d, dtype=dtype, gen=gen)  # q, k, v, gate of one Linear
            q, k, v = proj.unbind(3)[:3]
            bias = _randn(1, n, n, heads, dtype=dtype, gen=gen).permute(0, 3, 1, 2)  # the bias Linear's output
            keep = torch.ones(1, rows, n, dtype=torch.bool)
            out, lse = launch.triangle_attention_forward(q, k, v, bias, keep, d ** -0.5)
            launch.triangle_attention_backward(torch.randn_like(out), q, k, v, bias, keep, out, lse, d ** -0.5)
        yield f"{dname} N=512 D=32 mask=1 layout=start", run_layout


def triangle_multiplication_cases(quick: bool, capability: int) -> Iterator[Tuple[str, Callable]]:
    from foldops.kernels.triangle_multiplication import launch

    launch.launcher = Recorder
    n = 48  # positions P = N^2; the row tiles depend on C (and H) only, the product on the dtype
    widths = (128,) if quick else (16, 32, 64, 128, 256, 384)
    # (C, H): the pair width and the hidden width; H = C but for GPU MODE's C = 384, H = 128
    # and a hidden width above C.
    pairs = [(c, c) for c in widths] + ([] if quick else [(384, 128), (128, 256)])
    for dname, (c, h), mask, outgoing in itertools.product(DTYPES, pairs, (False, True), (True, False)):
        if quick and not outgoing:
            continue
        dtype = DTYPES[dname]
        for prec in (("ieee", "tf32x3", "tf32") if dtype == torch.float32 else ("ieee",)):
            def run(dtype=dtype, c=c, h=h, mask=mask, outgoing=outgoing, prec=prec):
                gen = torch.Generator().manual_seed(0)
                x = _randn(1, n, n, c, dtype=dtype, gen=gen)
                keep = torch.ones(1, n, n, dtype=torch.bool) if mask else None
                ln = [_randn(c, gen=gen), _randn(c, gen=gen), _randn(h, gen=gen), _randn(h, gen=gen)]  # fp32
                mats = [_randn(2 * h, c, dtype=dtype, gen=gen) for _ in range(2)] + \
                       [_randn(c, h, dtype=dtype, gen=gen), _randn(c, c, dtype=dtype, gen=gen)]
                weights = (ln[0], ln[1], mats[0], mats[1], ln[2], ln[3], mats[2], mats[3])
                out, ab, go, t = launch.triangle_multiplication_forward(x, keep, *weights, outgoing, 1e-5, prec)
                launch.triangle_multiplication_backward(torch.randn_like(out), x, keep, *weights, ab, go, t,
                                                        outgoing, 1e-5, prec)
                launch.triangle_multiplication_forward(x, keep, *weights, outgoing, 1e-5, prec, save=False)
            label = f"{dname} C={c}" + (f" H={h}" if h != c else "")
            yield (f"{label} mask={int(mask)} {'out' if outgoing else 'in'}"
                   + (f" {prec}" if prec != "ieee" else "")), run


def varlen_attention_cases(quick: bool, capability: int) -> Iterator[Tuple[str, Callable]]:
    from foldops.kernels.varlen_attention import launch

    launch.launcher = Recorder
    dims = (64,) if quick else (16, 32, 64, 80, 128)
    lens = [50, 300, 137]
    total = sum(lens)
    cu = torch.tensor([0, 50, 350, total], dtype=torch.int32)
    for dname, d, causal, dropout, kv_heads in itertools.product(DTYPES, dims, (False, True), (0.0, 0.1), (4, 2)):
        if quick and (dropout or kv_heads == 2):
            continue
        if kv_heads == 2 and (dropout or not causal):
            continue  # grouped-query heads: one combination is enough

        def run(dtype=DTYPES[dname], d=d, causal=causal, dropout=dropout, kv_heads=kv_heads):
            gen = torch.Generator().manual_seed(0)
            q = _randn(total, 4, d, dtype=dtype, gen=gen)
            k, v = (_randn(total, kv_heads, d, dtype=dtype, gen=gen) for _ in range(2))
            seed = torch.tensor([3]) if dropout else None
            out, lse = launch.varlen_attention_forward(q, k, v, cu, cu, 300, 300, causal, d ** -0.5, dropout, seed)
            launch.varlen_attention_backward(torch.randn_like(out), q, k, v, out, lse, cu, cu, 300, 300, causal,
                                             d ** -0.5, dropout, seed)
        yield f"{dname} D={d} causal={int(causal)} dropout={dropout} kv_heads={kv_heads}", run


def invariant_point_attention_cases(quick: bool, capability: int) -> Iterator[Tuple[str, Callable]]:
    from foldops.kernels.invariant_point_attention import launch

    launch.launcher = Recorder
    n = 40
    # (C, heads, Pq, Pv, Cz): OpenFold / AF2 structure module; FrameFlow / Multiflow; small.
    shapes = ((16, 12, 4, 8, 128),) if quick else ((16, 12, 4, 8, 128), (256, 8, 8, 12, 128), (32, 4, 4, 8, 32))
    for dname, shape, mask in itertools.product(DTYPES, shapes, (False, True)):
        if shape[0] > 128 and (dname != "bf16" or not mask):
            continue  # wide rows spill tens of KB: ptxas takes minutes per kernel; one variant
        dtype = DTYPES[dname]
        precisions = ("highest", "high") if dtype == torch.float32 else ("highest",)
        for prec, f32_pair in itertools.product(precisions, (False, True) if dtype != torch.float32 else (False,)):
            if (quick or shape[0] > 128) and f32_pair:
                continue

            def run(dtype=dtype, shape=shape, mask=mask, prec=prec, f32_pair=f32_pair):
                c, h, pq, pv, cz = shape
                gen = torch.Generator().manual_seed(0)
                q, k, v = (_randn(1, n, h, c, dtype=dtype, gen=gen) for _ in range(3))
                qp, kp = (_randn(1, n, h, 3 * pq, gen=gen) for _ in range(2))
                vp = _randn(1, n, h, 3 * pv, gen=gen)
                w = _randn(h, gen=gen)
                pair_dtype = torch.float32 if f32_pair else dtype
                bias = _randn(1, h, n, n, dtype=pair_dtype, gen=gen)
                z = _randn(1, n, n, cz, dtype=pair_dtype, gen=gen)
                keep = torch.ones(1, n, dtype=torch.bool) if mask else None
                old = torch.get_float32_matmul_precision()
                torch.set_float32_matmul_precision(prec)
                try:
                    o, op, oz, lse, op_rel = launch.ipa_forward(q, k, v, qp, kp, vp, w, bias, z, keep, c ** -0.5)
                    launch.ipa_backward(torch.randn_like(o), torch.randn_like(op), torch.randn_like(oz), q, k, v,
                                        qp, kp, vp, w, bias, z, keep, o, op_rel, oz, lse, c ** -0.5)
                finally:
                    torch.set_float32_matmul_precision(old)
            label = f"{dname} C={shape[0]} H={shape[1]} Pq={shape[2]} Pv={shape[3]} Cz={shape[4]} mask={int(mask)}"
            yield label + (" pair=fp32" if f32_pair else "") + (" tf32" if prec != "highest" else ""), run


def pair_weighted_averaging_cases(quick: bool, capability: int) -> Iterator[Tuple[str, Callable]]:
    from foldops.kernels.pair_weighted_averaging import launch

    launch.launcher = Recorder
    launch._num_sms = lambda device: 132
    n, s, heads = 96, 24, 8
    dims = (32,) if quick else (8, 16, 32, 64, 24)
    for dname, c, gate, mask, msa in itertools.product(DTYPES, dims, (False, True), (False, True), (False, True)):
        if quick and (mask != msa):
            continue
        dtype = DTYPES[dname]
        for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
            def run(dtype=dtype, c=c, gate=gate, mask=mask, msa=msa, tf32=tf32):
                gen = torch.Generator().manual_seed(0)
                v = _randn(1, s, n, heads, c, dtype=dtype, gen=gen)
                g = _randn(1, s, n, heads, c, dtype=dtype, gen=gen) if gate else None
                logits = _randn(1, heads, n, n, gen=gen)
                pmask = torch.ones(1, n, n, dtype=torch.bool) if mask else None
                mmask = torch.ones(1, s, n, dtype=torch.bool) if msa else None
                out, w = launch.pair_weighted_averaging_forward(v, logits, g, pmask, mmask, tf32)
                launch.pair_weighted_averaging_backward(torch.randn_like(out), v, logits, g, pmask, mmask, w, tf32)
            yield f"{dname} C={c} gate={int(gate)} mask={int(mask)} msa_mask={int(msa)}" + (" tf32" if tf32 else ""), run


CASES = {
    "triangle_attention": triangle_attention_cases,
    "triangle_multiplication": triangle_multiplication_cases,
    "varlen_attention": varlen_attention_cases,
    "invariant_point_attention": invariant_point_attention_cases,
    "pair_weighted_averaging": pair_weighted_averaging_cases,
}


# ----------------------------------------------------------------------------- report

def _describe(kwargs: dict) -> Tuple[str, str, str]:
    tile = ",".join(f"{k}={kwargs[k]}" for k in TILE_KEYS if k in kwargs)
    flags = ",".join(f"{k}={kwargs[k]}" for k in FLAG_KEYS if k in kwargs)
    ws = f"{kwargs.get('num_warps', 4)}/{kwargs.get('num_stages', '-')}"
    return tile, flags, ws


def run_op(op: str, quick: bool, capability: int, verbose: bool, match: str = "") -> List[dict]:
    rows: List[dict] = []
    seen: Dict[int, dict] = {}
    for variant, thunk in CASES[op](quick, capability):
        if match and match not in variant:
            continue
        Recorder.variant = variant
        Recorder.launches = []
        try:
            thunk()
        except Exception as exc:  # noqa: BLE001 - a launcher failing on these inputs is a finding too
            Recorder.launches.append({"kernel": "(launcher)", "variant": variant, "kwargs": {}, "compiled": None,
                                      "error": _first_error_line(exc), "traceback": traceback.format_exc()})
        for launch in Recorder.launches:
            tile, flags, ws = _describe(launch["kwargs"])
            row = {"op": op, "kernel": launch["kernel"], "variant": variant, "tile": tile, "flags": flags, "w/s": ws,
                   "status": "ok", "regs": "", "spill": "", "smem": "", "mma": "", "rs_loops": ""}
            compiled = launch["compiled"]
            if compiled is None:
                row["status"] = launch["error"]
                if verbose:
                    print(launch.get("traceback", ""), file=sys.stderr)
            elif id(compiled) in seen:  # the same specialisation as an earlier launch
                prev = seen[id(compiled)]
                row.update({k: prev[k] for k in ("status", "regs", "spill", "smem", "mma", "rs_loops")})
                row["dup"] = True
            else:
                info = ptxas_report(compiled.asm["ptx"], capability)
                row.update(regs=info["regs"], spill=info["spill"], smem=compiled.metadata.shared, mma=info["mma"],
                           rs_loops=ttgir_register_a_loops(compiled.asm.get("ttgir", "")))
                if not info["ptxas_ok"]:
                    row["status"] = "ptxas: " + info["ptxas_log"].strip().splitlines()[-1][:200]
                elif info["races"]:
                    row["status"] = "register race: " + info["races"][0][:120]
                elif compiled.metadata.shared > SMEM_LIMIT.get(capability, 232448):
                    row["status"] = f"shared memory {compiled.metadata.shared} B > the device's limit: fails at launch"
                seen[id(compiled)] = row
            rows.append(row)
            if not row.get("dup"):
                _print_row(row)
    return rows


_FORMAT = "{kernel:<24} {variant:<46} {tile:<44} {w/s:<5} {regs:>4} {spill:>5} {smem:>6} {mma:<13} {rs_loops:>2} {status}"


def _print_row(row: dict) -> None:
    print(_FORMAT.format(**{k: ("" if row.get(k) is None else row.get(k)) for k in
                            ("kernel", "variant", "tile", "w/s", "regs", "spill", "smem", "mma", "rs_loops",
                             "status")}),
          flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", action="append", choices=OPS, help="only these ops (default: all)")
    parser.add_argument("--sm", type=int, default=90, help="compute capability of the target, e.g. 80 or 90")
    parser.add_argument("--quick", action="store_true", help="one or two variants per op")
    parser.add_argument("--csv", default="", help="write every launch (also repeated specialisations) here")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of each failure")
    parser.add_argument("--variant", default="", help="only variants whose label contains this text")
    parser.add_argument("--kernel", action="append", help="compile only these kernels (names, repeatable)")
    args = parser.parse_args(argv)
    Recorder.kernels = args.kernel

    driver.set_active(OfflineDriver(args.sm))
    print(f"# target sm_{args.sm}, triton {triton.__version__}, torch {torch.__version__}; "
          "rows are distinct compiled specialisations (variant: the first launch that needed it)")
    print(_FORMAT.format(kernel="kernel", variant="variant", tile="tile", **{"w/s": "w/s"}, regs="regs",
                         spill="spill", smem="smem", mma="mma", rs_loops="rs", status="status"))
    rows: List[dict] = []
    for op in args.op or OPS:
        print(f"## {op}", flush=True)
        rows += run_op(op, args.quick, args.sm, args.verbose, args.variant)
    failed = [r for r in rows if r["status"] != "ok"]
    spilled = {(r["op"], r["kernel"], r["tile"], r["flags"]) for r in rows if r["spill"]}
    print(f"# {len(rows)} launches, {sum(1 for r in rows if not r.get('dup'))} distinct compiles, "
          f"{len(failed)} failed, {len(spilled)} spilling specialisations")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            fields = ["op", "kernel", "variant", "tile", "flags", "w/s", "status", "regs", "spill", "smem", "mma",
                      "rs_loops"]
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
