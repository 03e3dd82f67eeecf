"""A/B of the triangle attention kernels: the working tree against those of a git revision.

Both versions run in one process on the same inputs (bf16, B=1, H=4, D=32, the
benchmark's all-kept key mask unless told otherwise): the revision's kernel file is
loaded as a second module (or package) with its custom ops renamed. For each size, --rounds rounds
each time both versions, in alternating order (torch.profiler device time per kernel,
as ``--passes`` of benchmarks/triangle_attention.py), then the median per kernel and the median of the
per-round ratios of the totals. Interleaving spreads the clock drift of a long run
over both versions alike.

    python benchmarks/tools/triangle_attention_ab.py --rev f167275 --n 256 384 512 768 1024
    python benchmarks/tools/triangle_attention_ab.py --rev f167275 --n 512 1024 --mask-fraction 0.05
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import statistics
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
from triangle_attention import _fwd_bwd_steps, _kernel_times  # noqa: E402

KERNEL_PACKAGE = "src/foldops/kernels/triangle_attention"  # the kernels as a package
KERNEL_FILE = KERNEL_PACKAGE + ".py"  # revisions before the package: one file


def _renamed(source: str) -> str:
    """``source`` with its custom ops renamed to ``foldops_ab::...`` and its imports of
    the kernel package pointed at the copy."""
    source = source.replace("foldops::triangle_attention_", "foldops_ab::triangle_attention_")
    source = source.replace("torch.ops.foldops.triangle_attention_", "torch.ops.foldops_ab.triangle_attention_")
    return source.replace("foldops.kernels.triangle_attention", "foldops_ab_kernels")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def load_revision(rev: str):
    """The kernels of ``rev`` (a git revision, or a saved copy of the kernel package or
    of the one-file module where the machine has no git history), imported as
    ``foldops_ab_kernels`` with their ops renamed to ``foldops_ab::...``."""
    if os.path.isfile(rev):
        files = {"foldops_ab_kernels.py": open(rev).read()}
    elif os.path.isdir(rev):
        files = {f"foldops_ab_kernels/{name}": open(os.path.join(rev, name)).read()
                 for name in os.listdir(rev) if name.endswith(".py")}
    else:
        try:
            is_package = _git("cat-file", "-t", f"{rev}:{KERNEL_PACKAGE}").strip() == "tree"
        except subprocess.CalledProcessError:  # no such path at rev: the one-file module
            is_package = False
        if is_package:
            files = {f"foldops_ab_kernels/{name}": _git("show", f"{rev}:{KERNEL_PACKAGE}/{name}")
                     for name in _git("ls-tree", "--name-only", f"{rev}:{KERNEL_PACKAGE}").split()
                     if name.endswith(".py")}
        else:
            files = {"foldops_ab_kernels.py": _git("show", f"{rev}:{KERNEL_FILE}")}
    root = tempfile.mkdtemp()
    for name, source in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        with open(os.path.join(root, name), "w") as fh:
            fh.write(_renamed(source))
    sys.path.insert(0, root)
    return importlib.import_module("foldops_ab_kernels")


def compare(versions, args, n: int) -> None:
    steps, masked = _fwd_bwd_steps(args, n, torch.bfloat16, [module.triangle_attention for _, module in versions])
    order = list(zip(versions, steps))
    times = collections.defaultdict(lambda: collections.defaultdict(list))
    for rnd in range(args.rounds):
        for (name, _), step in order[::-1] if rnd % 2 else order:  # alternate who goes first
            per_kernel = _kernel_times(step, reps=10, warmup=3)
            times[name]["total"].append(sum(per_kernel.values()))
            for kernel, ms in per_kernel.items():
                if kernel.startswith("_"):  # Triton kernels; the small torch ops count in the total
                    times[name][kernel.replace("_bwd_", "").replace("_kernel", "").strip("_")].append(ms)
    label = f"N={n} mask={args.mask_fraction if masked else 'no'}"
    for name, _ in versions:
        cols = "  ".join(f"{kernel} {statistics.median(ms):.3f}" for kernel, ms in times[name].items())
        print(f"{label} {name}: {cols}", flush=True)
    (a, _), (b, _) = versions
    ratios = [y / x for x, y in zip(times[a]["total"], times[b]["total"])]
    print(f"{label} {b}/{a} total: median {statistics.median(ratios):.3f} {['%.3f' % r for r in ratios]}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True,
                        help="git revision whose kernels are the baseline, or a copy of its kernel file")
    parser.add_argument("--n", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--mask-fraction", type=float, default=0.0, help="share of masked keys")
    parser.add_argument("--no-mask", action="store_true")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    from foldops.kernels import triangle_attention as tree

    args.batch, args.heads, args.head_dim = 1, 4, 32  # the benchmark's shape (_kernel_inputs)
    versions = [(args.rev, load_revision(args.rev)), ("tree", tree)]
    for n in args.n:
        compare(versions, args, n)


if __name__ == "__main__":
    main()
