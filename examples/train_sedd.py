"""Train a small SEDD (score-entropy discrete diffusion) on synthetic protein-like sequences.

The data: sequences of 20 amino acids drawn from a three-state hidden Markov model
(helix-like, strand-like and loop-like segments, each with its own residue preferences
and a tendency to persist), of mixed lengths. The model is ``foldops.models.SEDD`` with
the absorbing ("mask") graph and the log-linear noise schedule, trained with the
absorbing-state score-entropy loss of Lou et al. (2024) on *variable-length* batches: each
batch is padded to its longest sequence and ``seqlens`` tells the model where each row
ends, so padding costs no attention work and never changes a result.

It shows, with foldops only (no flash_attn, no Lightning):

- a plain ``nn.Module`` with ``training_step`` / ``validation_step`` / ``predict_step`` /
  ``configure_optimizers`` trained by ``foldops.train.Trainer`` (EMA, clipping, warm-up);
- stopping half-way, then resuming from ``last.ckpt`` exactly where it stopped;
- sampling a few sequences of chosen lengths with the EMA weights (Euler steps of the
  reverse absorbing process, then a final denoising step).

    python examples/train_sedd.py                    # ~1 minute on a laptop CPU
    python examples/train_sedd.py --steps 40 --out /tmp/sedd   # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from foldops.models import SEDD
from foldops.train import Trainer, TrainerConfig, log

AMINO = "ACDEFGHIKLMNPQRSTVWY"
TOKENS = len(AMINO)
MASK = TOKENS  # the absorbing state is the last vocabulary entry
EPS = 1e-3  # log-linear schedule: sigma(t) = -log(1 - (1 - EPS) t)

# Three segment types and the residues each prefers (weights over AMINO).
_PREFERS = {"helix": "AELKMQR", "strand": "VIYFWT", "loop": "GPNDS"}


def _emissions() -> torch.Tensor:
    rows = []
    for favoured in _PREFERS.values():
        w = torch.full((TOKENS,), 0.2)
        for aa in favoured:
            w[AMINO.index(aa)] = 3.0
        rows.append(w / w.sum())
    return torch.stack(rows)  # [3, 20]


class ProteinLike(Dataset):
    """Sequences from a sticky three-state HMM, lengths uniform in [min_len, max_len]; fixed by ``seed``."""

    def __init__(self, size: int, min_len: int = 16, max_len: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        emit = _emissions()
        stay = 0.9
        self.items = []
        for _ in range(size):
            n = int(torch.randint(min_len, max_len + 1, (), generator=g))
            state = int(torch.randint(0, 3, (), generator=g))
            seq = [AMINO.index("M")]
            for _ in range(n - 1):
                if torch.rand((), generator=g) > stay:
                    state = int(torch.randint(0, 3, (), generator=g))
                seq.append(int(torch.multinomial(emit[state], 1, generator=g)))
            self.items.append(torch.tensor(seq))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.items[i]


def collate(seqs) -> dict:
    """Pad to the longest sequence of the batch; ``seqlens`` says where each row ends."""
    lengths = torch.tensor([len(s) for s in seqs])
    tokens = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)  # pad value never read
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    return {"tokens": tokens, "seqlens": lengths}


# Absorbing-state diffusion -------------------------------------------------------------

def noise(t: torch.Tensor):
    """Log-linear schedule: total noise sigma(t) and its rate dsigma/dt."""
    return -torch.log1p(-(1 - EPS) * t), (1 - EPS) / (1 - (1 - EPS) * t)


def score_entropy(log_score: torch.Tensor, sigma: torch.Tensor, perturbed: torch.Tensor,
                  clean: torch.Tensor) -> torch.Tensor:
    """Absorbing-graph score entropy per position (zero where the token was not masked).

    log_score [B, L, V] (V = 20 + mask), sigma [B], perturbed/clean [B, L].
    """
    masked = perturbed == MASK
    esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), torch.exp(sigma) - 1)[:, None].expand_as(perturbed)
    ratio = 1 / esigm1
    neg = ratio * log_score.gather(-1, clean[..., None])[..., 0]
    pos = log_score[..., :-1].exp().sum(-1)
    const = ratio * (ratio.log() - 1)
    return torch.where(masked, pos - neg + const, torch.zeros_like(pos))


class DiffusionLM(nn.Module):
    """SEDD plus its loss and sampler, in the Trainer's protocol."""

    def __init__(self, hidden: int = 64, heads: int = 4, blocks: int = 2, cond: int = 32, lr: float = 3e-3,
                 total_steps: int = 300) -> None:
        super().__init__()
        self.hparams = {"hidden": hidden, "heads": heads, "blocks": blocks, "cond": cond, "lr": lr}
        self.lr, self.total_steps = lr, total_steps
        self.sample_steps = 64
        self.sedd = SEDD({
            "tokens": TOKENS,
            "graph": {"type": "absorb"},
            "model": {"hidden_size": hidden, "n_heads": heads, "n_blocks": blocks, "cond_dim": cond,
                      "dropout": 0.0, "scale_by_sigma": True},
        })

    def loss(self, batch: dict) -> torch.Tensor:
        tokens, seqlens = batch["tokens"], batch["seqlens"]
        t = (1 - EPS) * torch.rand(tokens.shape[0], device=tokens.device) + EPS
        sigma, dsigma = noise(t)
        move = torch.rand(tokens.shape, device=tokens.device) < -torch.expm1(-sigma)[:, None]
        perturbed = torch.where(move, torch.full_like(tokens, MASK), tokens)
        log_score = self.sedd(perturbed, sigma, seqlens=seqlens).float()
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < seqlens[:, None]
        entropy = score_entropy(log_score, sigma, perturbed, tokens) * valid
        return (dsigma[:, None] * entropy).sum() / valid.sum()  # per real token

    def training_step(self, batch: dict, step: int) -> torch.Tensor:
        loss = self.loss(batch)
        log("train/score_entropy", loss)
        return loss

    def validation_step(self, batch: dict, index: int) -> torch.Tensor:
        torch.manual_seed(index)  # the same noise every validation, so values compare
        loss = self.loss(batch)
        log("val/score_entropy", loss, batch_size=len(batch["seqlens"]))
        return loss

    @torch.no_grad()
    def sample(self, seqlens: torch.Tensor, steps: int = 64) -> torch.Tensor:
        """Reverse the absorbing process from all-mask rows of the given lengths (Euler steps)."""
        n, length = len(seqlens), int(seqlens.max())
        device = seqlens.device
        x = torch.full((n, length), MASK, dtype=torch.long, device=device)
        times = torch.linspace(1, EPS, steps + 1, device=device)
        dt = (1 - EPS) / steps
        for i in range(steps):
            sigma, dsigma = noise(times[i].expand(n))
            score = self.sedd(x, sigma, seqlens=seqlens).float().exp()[..., :-1]  # [n, L, 20]
            # from the mask state, token j appears at rate dsigma * score_j
            p_tok = (dt * dsigma[:, None, None] * score)
            p_stay = (1 - p_tok.sum(-1, keepdim=True)).clamp_min(0)
            draw = _categorical(torch.cat([p_tok, p_stay], -1))
            x = torch.where(x == MASK, draw, x)
        sigma, _ = noise(times[-1].expand(n))
        score = self.sedd(x, sigma, seqlens=seqlens).float().exp()[..., :-1]
        return torch.where(x == MASK, _categorical(score), x)  # final denoising: no mask left

    def predict_step(self, batch: dict, index: int) -> list:
        torch.manual_seed(index)
        x = self.sample(batch["seqlens"], self.sample_steps)
        return ["".join(AMINO[int(t)] for t in row[:n]) for row, n in zip(x, batch["seqlens"])]

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)
        warmup = max(1, self.total_steps // 10)

        def schedule(step: int) -> float:  # linear warm-up, cosine decay to 10%
            if step < warmup:
                return (step + 1) / warmup
            t = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _categorical(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row of unnormalised probabilities (Gumbel-max)."""
    gumbel = -torch.log(-torch.log(torch.rand_like(probs).clamp_min(1e-20)))
    return (probs.clamp_min(1e-30).log() + gumbel).argmax(-1)


def residue_mix(seqs) -> dict:
    """Fraction of helix / strand / loop residues: samples should echo the training data."""
    counts = {k: 0 for k in _PREFERS}
    total = 0
    for s in seqs:
        for aa in s:
            total += 1
            for k, favoured in _PREFERS.items():
                counts[k] += aa in favoured
    return {k: round(v / max(1, total), 3) for k, v in counts.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="total optimizer steps")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=64, help="longest sequence (shortest is a quarter)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--sample-steps", type=int, default=64)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: small tensors gain little from more, and they contend "
                             "on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or tempfile.mkdtemp(prefix="foldops-sedd-")
    min_len = max(2, args.max_len // 4)
    train = DataLoader(ProteinLike(args.train_size, min_len, args.max_len, seed=0), batch_size=args.batch_size,
                       shuffle=True, collate_fn=collate)
    val = DataLoader(ProteinLike(64, min_len, args.max_len, seed=1), batch_size=32, collate_fn=collate)

    def config(max_steps: int) -> TrainerConfig:
        return TrainerConfig(
            max_steps=max_steps,
            gradient_clip_val=1.0,
            ema_decay=0.99,
            val_every_n_steps=max(1, args.steps // 4),
            checkpoint_dir=out,
            checkpoint_every_n_steps=max(1, args.steps // 4),
            keep_step_checkpoints=2,
            monitor="val/score_entropy",
            save_top_k=1,
            log_every_n_steps=max(1, args.steps // 20),
            progress_bar=not args.quiet,
            seed=0,
        )

    def build() -> DiffusionLM:
        return DiffusionLM(hidden=args.hidden, blocks=args.blocks, total_steps=args.steps)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    # Part 1: train half-way and stop (as a preempted job would).
    first = Trainer(config(args.steps // 2))
    first.fit(build(), train, val)
    print(f"stopped at step {first.global_step}: train loss {first.callback_metrics['train/loss']:.3f}")

    # Part 2: what a new process does: build the model, resume from `last`, finish.
    model = build()
    second = Trainer(config(args.steps))
    second.fit(model, train, val, resume="last")
    train_seconds = time.perf_counter() - t0

    # Part 3: sample a few sequences of chosen lengths with the EMA weights.
    requests = [{"tokens": torch.zeros(4, 1, dtype=torch.long),
                 "seqlens": torch.tensor([min_len, args.max_len // 2, 3 * args.max_len // 4, args.max_len])}]
    model.sample_steps = args.sample_steps
    samples = [s for batch in second.predict(model, requests) for s in batch]
    rows = {
        "first_loss": _first_logged(out, "train/loss"),
        "final_loss": second.callback_metrics["train/loss"],
        "first_val": _first_logged(out, "val/score_entropy"),
        "final_val": second.callback_metrics["val/score_entropy"],
        "best": str(second.best_model_path),
        "samples": samples,
        "seconds": train_seconds,
        "out": out,
    }
    print(f"resumed to step {second.global_step}: train loss {rows['first_loss']:.3f} -> {rows['final_loss']:.3f}, "
          f"val score entropy {rows['first_val']:.3f} -> {rows['final_val']:.3f}, {train_seconds:.1f} s")
    for s in samples:
        print(f"  sample ({len(s):3d} aa): {s}")
    print(f"residue mix, samples {residue_mix(samples)} vs data {residue_mix(_decode(val.dataset.items))}")
    print(f"checkpoints in {out}: last.ckpt, best {second.best_model_path.name if second.best_model_path else '-'}")
    return rows


def _decode(items) -> list:
    return ["".join(AMINO[int(t)] for t in s) for s in items]


def _first_logged(out: str, key: str) -> float:
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            return row[key]
    return float("nan")


if __name__ == "__main__":
    main()
