"""Small models and data shared by the trainer tests and their subprocess workers."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from foldops.train import log


class TinyRegressor(nn.Module):
    """An MLP regressor with the Trainer's step methods.

    ``val_rng`` makes validation draw from the global RNG (as a sampling model would),
    so that resume tests see whether validation perturbs the training stream.
    """

    def __init__(self, d_in=6, hidden=16, dropout=0.0, dtype=torch.float32, lr=1e-2,
                 scheduler="step", val_rng=False, weight_decay=0.01):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden, dtype=dtype), nn.SiLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden, dtype=dtype), nn.SiLU(), nn.Linear(hidden, 1, dtype=dtype),
        )
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.lr = lr
        self.scheduler = scheduler
        self.val_rng = val_rng
        self.weight_decay = weight_decay

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, step):
        x, y = batch
        loss = (self(x) - y).pow(2).mean()
        log("train/mse", loss)
        self.calls += 1
        return {"loss": loss, "other": 1}

    def validation_step(self, batch, index):
        x, y = batch
        loss = (self(x) - y).pow(2).mean()
        if self.val_rng:
            log("val/noise", torch.rand(()))
        return loss

    def predict_step(self, batch, index):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch["x"]
        return self(x)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.scheduler is None:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.scheduler}}


def make_dataset(n=30, d_in=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    w = torch.randn(d_in, generator=g, dtype=dtype)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, generator=g, dtype=dtype)
    return TensorDataset(x, y)


def make_loader(n=30, batch_size=4, shuffle=True, seed=0, dtype=torch.float32, drop_last=False):
    return DataLoader(make_dataset(n, seed=seed, dtype=dtype), batch_size=batch_size, shuffle=shuffle,
                      drop_last=drop_last)


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
