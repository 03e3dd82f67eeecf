"""Train a small Pairformer on a synthetic pair-structure task, on CPU, in under a minute.

The task: random protein-like chains (3.8 Å steps, random turns) of 8 to 16 residues.
The model sees residue types and *noisy* pairwise distances (plus relative positions)
and predicts a distogram of the true distances. Triangle updates and triangle attention
are what let it denoise one distance from the others (triangle inequality), so the loss
drops well below what a per-pair model could reach.

It shows, with foldops only (no Lightning, no FairScale):

- a plain ``nn.Module`` with ``training_step`` / ``validation_step`` / ``predict_step`` /
  ``configure_optimizers`` and ``foldops.train.log``;
- the Trainer with EMA, gradient clipping, a warm-up schedule, validation, top-k and
  periodic checkpoints (written atomically);
- stopping, then resuming with ``resume="last"`` exactly where it stopped;
- prediction with a writer, with the EMA weights.

    python examples/train_pairformer.py                 # 200 steps, ~20-30 s on a laptop CPU
    python examples/train_pairformer.py --steps 40 --out /tmp/run   # quicker
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from foldops.nn import PairformerStack
from foldops.train import Trainer, TrainerConfig, log

NUM_TYPES = 20
NUM_BINS = 16
MAX_DIST = 24.0  # Å: the last bin collects everything beyond
RBF = 16
MAX_REL = 8


class Chains(Dataset):
    """Random chains, padded to ``n_max`` residues, made once from a seed (deterministic)."""

    def __init__(self, size: int, n_max: int = 16, noise: float = 3.0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(size):
            n = int(torch.randint(8, n_max + 1, (), generator=g))
            steps = torch.randn(n, 3, generator=g)
            # persistence: each step leans on the previous one, as a backbone does
            for i in range(1, n):
                steps[i] = 0.6 * steps[i - 1] + 0.4 * steps[i]
            steps = 3.8 * steps / steps.norm(dim=-1, keepdim=True)
            coords = torch.cumsum(steps, 0)
            dist = torch.cdist(coords, coords)
            noisy = (dist + noise * torch.randn(n, n, generator=g)).clamp_min(0)
            noisy = 0.5 * (noisy + noisy.T)
            pad = n_max - n
            self.items.append({
                "types": nn.functional.pad(torch.randint(0, NUM_TYPES, (n,), generator=g), (0, pad)),
                "noisy": nn.functional.pad(noisy, (0, pad, 0, pad)),
                "dist": nn.functional.pad(dist, (0, pad, 0, pad)),
                "mask": nn.functional.pad(torch.ones(n), (0, pad)),
                "length": n,
            })

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def distance_bins(d: torch.Tensor) -> torch.Tensor:
    return (d / MAX_DIST * (NUM_BINS - 1)).floor().clamp(0, NUM_BINS - 1).long()


class TinyFold(nn.Module):
    """Embeddings -> foldops Pairformer -> distogram head."""

    def __init__(self, token_s: int = 32, token_z: int = 32, blocks: int = 2, lr: float = 2e-3,
                 total_steps: int = 200) -> None:
        super().__init__()
        self.hparams = {"token_s": token_s, "token_z": token_z, "blocks": blocks, "lr": lr}
        self.lr, self.total_steps = lr, total_steps
        self.s_embed = nn.Embedding(NUM_TYPES, token_s)
        self.z_embed = nn.Linear(RBF + 2 * MAX_REL + 1, token_z)
        self.trunk = PairformerStack(token_s, token_z, blocks, num_heads=4, dropout=0.1,
                                     pairwise_head_width=16, pairwise_num_heads=2)
        self.distogram = nn.Linear(token_z, NUM_BINS)
        self.register_buffer("centers", torch.linspace(0, MAX_DIST, RBF), persistent=False)

    def forward(self, batch: dict) -> torch.Tensor:
        mask = batch["mask"]
        pair_mask = mask[:, :, None] * mask[:, None, :]
        rbf = torch.exp(-((batch["noisy"][..., None] - self.centers) / 1.5) ** 2)
        n = mask.shape[1]
        idx = torch.arange(n, device=mask.device)
        rel = (idx[None, :] - idx[:, None]).clamp(-MAX_REL, MAX_REL) + MAX_REL
        rel = nn.functional.one_hot(rel, 2 * MAX_REL + 1).to(rbf.dtype).expand(mask.shape[0], n, n, -1)
        s = self.s_embed(batch["types"])
        z = self.z_embed(torch.cat([rbf, rel], dim=-1))
        s, z = self.trunk(s, z, mask, pair_mask)
        z = 0.5 * (z + z.transpose(1, 2))  # distances are symmetric
        return self.distogram(z)

    def _loss(self, batch: dict) -> torch.Tensor:
        logits = self(batch)
        mask = batch["mask"]
        pair_mask = mask[:, :, None] * mask[:, None, :]
        ce = nn.functional.cross_entropy(logits.flatten(0, 2), distance_bins(batch["dist"]).flatten(),
                                         reduction="none")
        return (ce * pair_mask.flatten()).sum() / pair_mask.sum()

    def training_step(self, batch: dict, step: int) -> torch.Tensor:
        loss = self._loss(batch)
        log("train/distogram_ce", loss)
        return loss

    def validation_step(self, batch: dict, index: int) -> torch.Tensor:
        loss = self._loss(batch)
        # expected distance from the distogram vs the truth, on real pairs
        mask = batch["mask"]
        pair_mask = (mask[:, :, None] * mask[:, None, :]).bool()
        expected = self.predict_distances(batch)
        err = (expected - batch["dist"].clamp(max=MAX_DIST))[pair_mask].abs().mean()
        log("val/distance_mae", err, batch_size=len(mask))
        return loss

    def predict_distances(self, batch: dict) -> torch.Tensor:
        probs = self(batch).softmax(-1)
        mids = (torch.arange(NUM_BINS, device=probs.device) + 0.5) * MAX_DIST / (NUM_BINS - 1)
        return (probs * mids).sum(-1)

    def predict_step(self, batch: dict, index: int) -> torch.Tensor:
        return self.predict_distances(batch)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        warmup = max(1, self.total_steps // 10)

        def schedule(step: int) -> float:  # linear warm-up, cosine decay to 10%
            if step < warmup:
                return (step + 1) / warmup
            t = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class MAEWriter:
    """A prediction writer: ``write(prediction, batch)`` per batch."""

    def __init__(self) -> None:
        self.errors = []

    def write(self, prediction: torch.Tensor, batch: dict) -> None:
        mask = batch["mask"]
        pair_mask = (mask[:, :, None] * mask[:, None, :]).bool()
        self.errors.append((prediction - batch["dist"].clamp(max=MAX_DIST))[pair_mask].abs().mean().item())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="total optimizer steps")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: with tensors this small more threads mostly add "
                             "synchronisation, and on a shared machine they contend)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or tempfile.mkdtemp(prefix="foldops-example-")
    train = DataLoader(Chains(args.train_size, seed=0), batch_size=8, shuffle=True)
    val = DataLoader(Chains(64, seed=1), batch_size=16)

    def config(max_steps: int) -> TrainerConfig:
        return TrainerConfig(
            max_steps=max_steps,
            gradient_clip_val=1.0,
            ema_decay=0.99,
            val_every_n_steps=max(1, args.steps // 4),
            checkpoint_dir=out,
            checkpoint_every_n_steps=max(1, args.steps // 4),
            keep_step_checkpoints=2,
            monitor="val/distance_mae",
            save_top_k=1,
            log_every_n_steps=max(1, args.steps // 20),
            progress_bar=not args.quiet,
            seed=0,
        )

    torch.manual_seed(0)
    t0 = time.perf_counter()
    # Part 1: train half-way and stop (as a preempted job would).
    first = Trainer(config(args.steps // 2))
    first.fit(TinyFold(total_steps=args.steps), train, val)
    rows = _loss_rows(out)
    print(f"part 1: trained steps 1-{first.global_step}, stopped. train loss {rows[-1][2]:.3f} "
          f"(mean of steps {rows[-1][0]}-{rows[-1][1]}), val loss {first.callback_metrics['val/loss']:.3f}")

    # Part 2: a new process would do exactly this: build the model, resume from `last`.
    model = TinyFold(total_steps=args.steps)
    second = Trainer(config(args.steps))
    second.fit(model, train, val, resume="last")
    writer = MAEWriter()
    second.predict(model, val, writer=writer)  # with the EMA weights
    elapsed = time.perf_counter() - t0
    logged = _loss_rows(out)
    rows = {
        "first_loss": logged[0][2],
        "final_loss": second.callback_metrics["train/loss"],
        "val_loss": second.callback_metrics["val/loss"],
        "val_distance_mae": sum(writer.errors) / len(writer.errors),
        "best": str(second.best_model_path),
        "seconds": elapsed,
        "out": out,
    }
    (a, b, _), (c, d, _) = logged[0], logged[-1]
    print(f"part 2: resumed from last.ckpt at step {first.global_step}, trained to step {second.global_step}. "
          f"train loss {rows['final_loss']:.3f} (mean of steps {c}-{d}; it was {rows['first_loss']:.3f} over "
          f"steps {a}-{b}), val distance MAE (EMA weights) {rows['val_distance_mae']:.2f} Å, {elapsed:.1f} s")
    print(f"checkpoints in {out}: last.ckpt, best {second.best_model_path.name if second.best_model_path else '-'}")
    return rows


def _loss_rows(out: str) -> list:
    """``[(first step, last step, mean train loss)]`` of each train/loss row in metrics.jsonl."""
    import json
    from pathlib import Path

    rows, previous = [], 0
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            rows.append((previous + 1, row["step"], row["train/loss"]))
            previous = row["step"]
    return rows


if __name__ == "__main__":
    main()
