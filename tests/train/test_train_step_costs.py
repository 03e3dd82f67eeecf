"""The cheap per-step paths: one foreach gradient norm, device loss sums, buffered loggers."""

import json

import pytest
import torch
from torch import nn

from foldops.train import Trainer, TrainerConfig, log
from foldops.train.loggers import CSVLogger, JSONLLogger
from foldops.train.metrics import MetricStore

from train_helpers import TinyRegressor, make_loader


def cfg(**kw):
    base = dict(max_steps=4, progress_bar=False, loggers=(), device="cpu")
    base.update(kw)
    return TrainerConfig(**base)


class SGDRegressor(TinyRegressor):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # weights fixed: every step sees the same model


class MixedDtype(SGDRegressor):
    """Parameters in two dtypes: the norm takes torch's grouped path."""

    def __init__(self):
        super().__init__(dtype=torch.float64)
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float32))

    def training_step(self, batch, step):
        x, y = batch
        loss = (self(x) * self.scale.double() - y).pow(2).mean()
        return loss


def _reference_norm(model, batch, with_scale=False):
    x, y = batch
    out = model(x) * model.scale.double() if with_scale else model(x)
    loss = (out - y).pow(2).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads])).item()


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_grad_norm_logged_with_and_without_the_nonfinite_check(skip_nonfinite):
    torch.manual_seed(0)
    model = SGDRegressor(dtype=torch.float64)
    loader = make_loader(8, 8, shuffle=False, dtype=torch.float64)
    trainer = Trainer(cfg(max_steps=3, log_every_n_steps=3, skip_nonfinite=skip_nonfinite))
    trainer.fit(model, loader)
    assert trainer._fast_norm
    # Without the check (and without clipping) the norm is computed on logging steps only.
    norm = _reference_norm(model, next(iter(loader)))
    assert trainer.callback_metrics["train/grad_norm"] == pytest.approx(norm, rel=1e-12)


def test_grad_norm_with_mixed_dtypes_takes_the_grouped_path():
    torch.manual_seed(0)
    model = MixedDtype()
    loader = make_loader(8, 8, shuffle=False, dtype=torch.float64)
    trainer = Trainer(cfg(max_steps=1, log_every_n_steps=1))
    trainer.fit(model, loader)
    assert not trainer._fast_norm
    norm = _reference_norm(model, next(iter(loader)), with_scale=True)
    assert trainer.callback_metrics["train/grad_norm"] == pytest.approx(norm, rel=1e-6)


class Scripted(nn.Module):
    """Loss = a given number per call (through a parameter, so backward runs)."""

    def __init__(self, losses):
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.losses = list(losses)
        self.n = 0

    def training_step(self, batch, step):
        value = self.losses[self.n]
        self.n += 1
        return self.w * 0 + value

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_interval_and_epoch_loss_means_from_the_device_sums(tmp_path):
    losses = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    data = [torch.zeros(1)] * 4  # 4 batches per epoch; accumulation 2 -> 2 steps per epoch
    trainer = Trainer(cfg(max_steps=4, accumulate_grad_batches=2, log_every_n_steps=3,
                          log_dir=str(tmp_path), loggers=("jsonl",)))
    trainer.fit(Scripted(losses), data)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step_rows = {r["step"]: r for r in rows if "train/loss" in r}
    epoch_rows = [r for r in rows if "train/loss_epoch" in r]
    # window means 1.5, 3.5 | 5.5, 7.5; rows at step 3 (an interval across the epoch end) and 4 (the last)
    assert step_rows[3]["train/loss"] == pytest.approx((1.5 + 3.5 + 5.5) / 3)
    assert step_rows[4]["train/loss"] == pytest.approx(7.5)
    assert [r["train/loss_epoch"] for r in epoch_rows] == pytest.approx([2.5, 6.5])


def test_logged_cpu_tensors_of_any_dtype_reduce_to_floats():
    store = MetricStore()
    with store.active("train"):
        log("a", torch.tensor(True))
        log("a", torch.tensor(3))
        log("b", torch.tensor(2.5, dtype=torch.float64), reduce_fx="max")
    out = store.take_step()
    assert out["a"] == (4.0, 2.0, "mean") and all(isinstance(v, float) for v in out["a"][:2])
    assert out["b"] == (2.5, 1.0, "max")
    with store.active("train"), pytest.raises(TypeError, match="name"):
        log("", torch.tensor(1.0))


def test_loggers_buffer_rows_and_flush_on_close(tmp_path):
    jl, cl = JSONLLogger(tmp_path, flush_s=3600.0), CSVLogger(tmp_path, flush_s=3600.0)
    for step in range(3):
        jl.log_metrics({"x": float(step)}, step)
        cl.log_metrics({"x": float(step)}, step)
    cl.log_metrics({"x": 3.0, "y": 1.0}, 3)  # a new column: the file is rewritten, rows kept
    jl.close()
    cl.close()
    assert [json.loads(line)["x"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,x,y" and lines[1:] == ["0,0.0,", "1,1.0,", "2,2.0,", "3,3.0,1.0"]


def test_loggers_with_zero_flush_interval_are_readable_after_each_row(tmp_path):
    jl, cl = JSONLLogger(tmp_path, flush_s=0.0), CSVLogger(tmp_path, flush_s=0.0)
    for step in range(2):
        jl.log_metrics({"x": float(step)}, step)
        cl.log_metrics({"x": float(step)}, step)
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == step + 1
        assert len((tmp_path / "metrics.csv").read_text().splitlines()) == step + 2
    jl.close()
    cl.close()


def test_training_step_is_called_directly_and_sees_the_batch_unchanged():
    seen = []

    class Probe(SGDRegressor):
        def training_step(self, batch, step):
            seen.append(batch)
            return super().training_step(batch, step)

    x = torch.randn(4, 6)
    batch = (x, torch.randn(4))
    Trainer(cfg(max_steps=1)).fit(Probe(), [batch])
    assert seen[0] is batch  # already on the device: no copy, no new container
