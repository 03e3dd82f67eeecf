"""Activation memory of an 8-block PairformerStack training step, with and without
``foldops.compat.checkpoint_wrapper`` on each block; gradients compared.

    python benchmarks/checkpoint_wrapper_memory.py                  # CPU -> benchmarks/results/cpu/
    python benchmarks/checkpoint_wrapper_memory.py --device auto --n 256 --out /tmp/gpu   # on a GPU

Two measures of activation memory:

- ``peak_step``: peak bytes held by the allocator during forward + backward above what was
  held before the forward (CPU: the running sum of the profiler's allocation events; GPU:
  ``max_memory_allocated``). Includes the parameter gradients, which are the same in
  every variant (listed as ``grad_bytes``).
- ``saved_for_backward``: bytes of the tensors handed to autograd's saved-tensor hooks
  outside checkpointed regions, summed per save (a tensor saved by two ops counts twice,
  so for ``plain`` this exceeds the true footprint; it shows what checkpointing removes).

Variants: ``plain`` (no checkpointing), ``checkpoint_wrapper`` (each block wrapped, as
Boltz wraps its layers with fairscale's), and ``builtin`` (``activation_checkpointing=True``
of ``PairformerStack``) for reference. Dropout is on (Boltz's 0.25): gradients equal only
if the recomputation replays the same masks.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import sys
from pathlib import Path

import torch

from foldops import device as fdevice
from foldops.bench.harness import measure_memory
from foldops.compat import checkpoint_wrapper
from foldops.nn import PairformerStack

ROOT = Path(__file__).resolve().parents[1]


def build(args, dev):
    torch.manual_seed(0)
    return PairformerStack(args.token_s, args.token_z, args.blocks, num_heads=args.heads, dropout=0.25,
                           pairwise_head_width=32, pairwise_num_heads=4, device=dev)


def inputs(args, dev):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(1, args.n, args.token_s, generator=g)
    z = torch.randn(1, args.n, args.n, args.token_z, generator=g)
    mask = torch.ones(1, args.n)
    mask[:, -args.n // 8:] = 0  # padding, as in a batch
    pair = mask[:, :, None] * mask[:, None, :]
    return [t.to(dev) for t in (s, z, mask, pair)]


def step(stack, s, z, mask, pair, saved=None):
    def pack(t):
        if saved is not None:
            saved.append(t.numel() * t.element_size())
        return t

    s = s.clone().requires_grad_()
    z = z.clone().requires_grad_()
    torch.manual_seed(2)  # the same dropout masks in every variant
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s_out, z_out = stack(s, z, mask, pair)
    (s_out.float().pow(2).mean() + z_out.float().pow(2).mean()).backward()
    return s, z


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=96, help="tokens")
    parser.add_argument("--token-s", type=int, default=128)
    parser.add_argument("--token-z", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = fdevice.resolve_device(args.device)
    template = build(args, dev)
    data = inputs(args, dev)
    variants = {}
    plain = copy.deepcopy(template)
    variants["plain"] = plain
    wrapped = copy.deepcopy(template)
    for layer in wrapped.layers:
        checkpoint_wrapper(layer)
    variants["checkpoint_wrapper"] = wrapped
    builtin = copy.deepcopy(template)
    builtin.activation_checkpointing = True
    variants["builtin"] = builtin

    results, grads = {}, {}
    for name, stack in variants.items():
        stack.train()
        step(stack, *data)  # warm-up (backend selection, allocator)
        stack.zero_grad(set_to_none=True)
        grad_bytes = sum(p.numel() * p.element_size() for p in stack.parameters())
        peak = measure_memory(dev, lambda: step(stack, *data))
        stack.zero_grad(set_to_none=True)
        saved = []
        s, z = step(stack, *data, saved=saved)
        grads[name] = [s.grad, z.grad] + [p.grad for p in stack.parameters()]
        results[name] = {"peak_step_mib": peak, "saved_for_backward_mib": sum(saved) / 2**20,
                         "grad_mib": grad_bytes / 2**20}
        stack.zero_grad(set_to_none=True)

    def max_diff(a, b):
        return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))

    diffs = {name: max_diff(grads["plain"], grads[name]) for name in variants}
    shape = f"B=1 N={args.n} token_s={args.token_s} token_z={args.token_z} blocks={args.blocks}"
    name_dev = fdevice.device_name(dev)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, r in results.items():
        for metric, value in r.items():
            rows.append({"benchmark": "checkpoint_wrapper_memory", "variant": name, "shape": shape, "dtype": "fp32",
                         "metric": metric, "value": value, "device": name_dev, "torch": torch.__version__})
        rows.append({"benchmark": "checkpoint_wrapper_memory", "variant": name, "shape": shape, "dtype": "fp32",
                     "metric": "max_abs_grad_diff_vs_plain", "value": diffs[name], "device": name_dev,
                     "torch": torch.__version__})
    with open(out / "train_checkpoint_wrapper_memory.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    command = "python benchmarks/checkpoint_wrapper_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    p = results["plain"]
    lines = [
        "# checkpoint_wrapper: activation memory of an 8-block PairformerStack training step",
        "",
        f"Command: `{command.strip()}`  ",
        f"Device: {name_dev}, torch {torch.__version__}, {shape}, fp32, dropout 0.25. "
        f"Peak = allocator peak during forward+backward above the level before it "
        f"({'profiler allocation events' if dev.type == 'cpu' else 'max_memory_allocated'}); it includes "
        f"{p['grad_mib']:.1f} MiB of parameter gradients in every variant.",
        "",
        "| variant | peak MiB (fwd+bwd) | vs plain | peak minus grads, MiB | vs plain | saved for backward, MiB | "
        "max abs grad diff vs plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        pk = r["peak_step_mib"]
        act = None if pk is None else pk - r["grad_mib"]
        pact = None if p["peak_step_mib"] is None else p["peak_step_mib"] - p["grad_mib"]
        ratio = "-" if pk is None else f"{pk / p['peak_step_mib']:.3f}"
        ratio_act = "-" if act is None else f"{act / pact:.3f}"
        lines.append(
            f"| {name} | {'-' if pk is None else f'{pk:.1f}'} | {ratio} | {'-' if act is None else f'{act:.1f}'} | "
            f"{ratio_act} | {r['saved_for_backward_mib']:.1f} | {diffs[name]:.3g} |")
    lines += ["", "Saved for backward: bytes passed to autograd's saved-tensor hooks outside checkpointed regions, "
              "summed per save (shared tensors count once per save).",
              "", "Target: checkpoint_wrapper peak activation memory at most 1/3 of plain, gradients equal.",
              f"Machine: {platform.machine()}, {os.cpu_count()} cores."]
    (out / "train_checkpoint_wrapper_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
