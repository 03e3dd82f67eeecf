"""Trainer overhead per step against a hand-written loop, same model, data and optimizer.

    python benchmarks/train_overhead.py                       # writes benchmarks/results/cpu/train_overhead.{csv,md}
    python benchmarks/train_overhead.py --steps 200 --repeats 7 --threads 1

Both loops run ``training_step`` -> backward -> AdamW step -> scheduler step -> zero_grad
over the same DataLoader. The Trainer does what it always does on top: the resumable
sampler, device transfer, the gradient-norm / non-finite check, logging (JSONL + CSV
every 10 steps, ``foldops.train.log`` calls recorded) and the progress bar. Runs
alternate (hand, trainer, hand, ...) and the median per-step time of each is compared.

Models: ``pair`` is the example's Pairformer (2 blocks, c_z 32, 16 tokens, batch 8);
``mlp`` is a small MLP whose step takes about a millisecond, where fixed per-step
costs show the most.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from foldops.train import Trainer, TrainerConfig, log

ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    spec = importlib.util.spec_from_file_location("train_pairformer_example", ROOT / "examples" / "train_pairformer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class MLP(nn.Module):
    def __init__(self, width=256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 1))

    def training_step(self, batch, step):
        x, y = batch
        loss = (self.net(x).squeeze(-1) - y).pow(2).mean()
        log("train/mse", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_case(name, total_steps):
    if name == "pair":
        ex = _load_example()
        model = ex.TinyFold(total_steps=total_steps)
        loader = DataLoader(ex.Chains(256, seed=0), batch_size=8, shuffle=True)
        return model, loader
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g)
    y = x[:, :8].sum(-1)
    return MLP(), DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)


def hand_loop(model, loader, steps):
    model.train()
    cfg = model.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    step = 0
    t0 = time.perf_counter()
    while step < steps:
        for batch in loader:
            loss = model.training_step(batch, step)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == steps:
                break
    return time.perf_counter() - t0


def trainer_loop(model, loader, steps, log_dir, skip_nonfinite=True):
    cfg = TrainerConfig(max_steps=steps, log_every_n_steps=10, log_dir=log_dir, loggers=("jsonl", "csv"),
                        progress_bar=True, seed=None, skip_nonfinite=skip_nonfinite)
    t0 = time.perf_counter()
    Trainer(cfg).fit(model, loader)
    return time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="pair,mlp")
    parser.add_argument("--steps", type=int, default=150, help="steps per run for the pair model")
    parser.add_argument("--mlp-steps", type=int, default=1000, help="steps per run for the MLP")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device_name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s))"
    rows, summary = [], []
    for name in args.models.split(","):
        steps = args.mlp_steps if name == "mlp" else args.steps
        torch.manual_seed(0)
        template, loader = make_case(name, steps)
        # warm-up of both paths (allocator, first-call costs)
        hand_loop(copy.deepcopy(template), loader, 10)
        with tempfile.TemporaryDirectory() as d:
            trainer_loop(copy.deepcopy(template), loader, 10, d)
        times = {"hand": [], "trainer": [], "trainer_no_norm": []}
        stderr = sys.stderr
        for _ in range(args.repeats):
            for variant in times:
                model = copy.deepcopy(template)
                with tempfile.TemporaryDirectory() as d:
                    if variant == "hand":
                        t = hand_loop(model, loader, steps)
                    else:
                        sys.stderr = io.StringIO()  # the bar's text, not its cost, is dropped
                        try:
                            t = trainer_loop(model, loader, steps, d, skip_nonfinite=variant == "trainer")
                        finally:
                            sys.stderr = stderr
                times[variant].append(1e3 * t / steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        for variant, values in times.items():
            for i, v in enumerate(values):
                rows.append({"benchmark": "train_overhead", "model": name, "variant": variant, "repeat": i,
                             "metric": "ms_per_step", "value": round(v, 5), "steps": steps,
                             "device": device_name, "torch": torch.__version__})
        overhead = 100.0 * (med["trainer"] / med["hand"] - 1.0)
        overhead_nn = 100.0 * (med["trainer_no_norm"] / med["hand"] - 1.0)
        summary.append((name, steps, med["hand"], med["trainer"], overhead, med["trainer_no_norm"], overhead_nn))
        print(f"{name}: hand {med['hand']:.3f} ms/step, trainer {med['trainer']:.3f} ms/step ({overhead:+.2f}%), "
              f"trainer without the per-step norm check {med['trainer_no_norm']:.3f} ({overhead_nn:+.2f}%)")
    with open(out / "train_overhead.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    command = "python benchmarks/train_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Trainer overhead per step vs a hand-written loop",
        "",
        f"Command: `{command.strip()}`  ",
        f"Device: {device_name}; torch {torch.__version__}; median of {args.repeats} alternating runs "
        f"(whole-loop wall time / steps, Trainer set-up included).",
        "",
        "| model | steps/run | hand loop ms/step | Trainer ms/step | overhead | Trainer, skip_nonfinite=False | overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, steps, hand, tr, ov, trn, ovn in summary:
        lines.append(f"| {name} | {steps} | {hand:.3f} | {tr:.3f} | {ov:+.2f}% | {trn:.3f} | {ovn:+.2f}% |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += ["", f"Load average at the end: {load:.2f} on {os.cpu_count()} cores (other jobs inflate Python-side "
              "costs, so the small-model row is sensitive to it).",
              "", "Target: at most 3% on a small CPU model. Raw rows: train_overhead.csv."]
    (out / "train_overhead.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
