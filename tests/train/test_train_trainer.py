"""The Trainer's loop: accumulation, clipping, precision, non-finite steps, OOM, EMA, logging."""

import dataclasses
import io
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from foldops.train import EMA, LogMixin, Trainer, TrainerConfig, log
from foldops.train.progress import ProgressBar

from train_helpers import TinyRegressor, make_dataset, make_loader, params_of


def cfg(**kw):
    base = dict(max_steps=4, progress_bar=False, loggers=(), device="cpu")
    base.update(kw)
    return TrainerConfig(**base)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyRegressor(**kw)


def _assert_params_close(a, b, atol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        if not a[k].is_floating_point():
            continue  # the call counter
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=atol), (k, (a[k] - b[k]).abs().max())


def test_fit_reduces_loss_and_writes_jsonl_and_csv(tmp_path):
    model = _model(lr=3e-2, scheduler=None)
    trainer = Trainer(cfg(max_steps=60, log_every_n_steps=5, val_every_n_steps=20, log_dir=str(tmp_path),
                          loggers=("jsonl", "csv")))
    trainer.fit(model, make_loader(64, 8), make_loader(16, 8, shuffle=False))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(5, 61, 5))
    assert train[-1]["train/loss"] < 0.5 * train[0]["train/loss"]
    for key in ("train/grad_norm", "lr", "epoch", "train/mse", "train/steps_per_s", "train/samples_per_s"):
        assert key in train[0], key
    val = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in val] == [20, 40, 60]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "step" and "train/loss" in header and "val/loss" in header
    assert json.loads((tmp_path / "hparams.json").read_text())["max_steps"] == 60
    assert trainer.callback_metrics["val/loss"] == val[-1]["val/loss"]


def test_gradient_accumulation_matches_the_big_batch():
    # float64: only summation order differs between the two.
    a, b = _model(dtype=torch.float64), _model(dtype=torch.float64)
    Trainer(cfg(max_steps=6, accumulate_grad_batches=2)).fit(a, make_loader(32, 4, dtype=torch.float64))
    Trainer(cfg(max_steps=6)).fit(b, make_loader(32, 8, dtype=torch.float64))
    _assert_params_close(params_of(a), params_of(b))


def test_partial_window_at_epoch_end_is_stepped_and_weighted():
    # 28 samples: 7 batches of 4 -> windows 2, 2, 2, 1; batches of 8 -> 8, 8, 8, 4.
    a, b = _model(dtype=torch.float64), _model(dtype=torch.float64)
    ta = Trainer(cfg(max_steps=None, max_epochs=2, accumulate_grad_batches=2))
    ta.fit(a, make_loader(28, 4, dtype=torch.float64))
    assert ta.global_step == 8 and ta.epoch == 2
    Trainer(cfg(max_steps=None, max_epochs=2)).fit(b, make_loader(28, 8, dtype=torch.float64))
    # the last window holds 4 samples either way, but per-window means differ: [4] vs [4]
    _assert_params_close(params_of(a), params_of(b), atol=1e-12)


class SGDModel(TinyRegressor):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


@pytest.mark.parametrize("algorithm,value", [("norm", 0.05), ("value", 0.01)])
def test_gradient_clipping(algorithm, value):
    torch.manual_seed(0)
    model = SGDModel(dtype=torch.float64)
    reference = SGDModel(dtype=torch.float64)
    reference.load_state_dict(model.state_dict())
    loader = make_loader(8, 8, shuffle=False, dtype=torch.float64)
    trainer = Trainer(cfg(max_steps=1, gradient_clip_val=value, gradient_clip_algorithm=algorithm,
                          log_every_n_steps=1))
    trainer.fit(model, loader)
    x, y = next(iter(loader))
    loss = (reference(x) - y).pow(2).mean()
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    assert trainer.callback_metrics["train/grad_norm"] == pytest.approx(norm.item(), rel=1e-12)
    if algorithm == "norm":
        assert norm > value  # the test must actually clip
        grads = [g * (value / (norm + 1e-6)) for g in grads]
    else:
        assert max(g.abs().max() for g in grads) > value
        grads = [g.clamp(-value, value) for g in grads]
    with torch.no_grad():
        for p, g in zip(reference.parameters(), grads):
            p -= g
    _assert_params_close(params_of(model), params_of(reference))


class Faulty(TinyRegressor):
    """Returns a NaN loss at given calls, or a finite loss with an infinite gradient."""

    def __init__(self, nan_at=(), inf_grad_at=(), oom_at=(), none_at=(), **kw):
        super().__init__(**kw)
        self.nan_at, self.inf_grad_at, self.oom_at, self.none_at = set(nan_at), set(inf_grad_at), set(oom_at), set(none_at)
        self.n = 0

    def training_step(self, batch, step):
        self.n += 1
        if self.n in self.oom_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        if self.n in self.none_at:
            return None
        loss = super().training_step(batch, step)["loss"]
        if self.n in self.nan_at:
            return loss * float("nan")
        if self.n in self.inf_grad_at:
            w = self.net[0].weight
            return loss + torch.sqrt(w - w.detach()).sum()  # value unchanged, gradient inf
        return loss


@pytest.mark.parametrize("fault", ["nan_at", "inf_grad_at"])
def test_nonfinite_step_is_skipped_and_counted(fault):
    model = _model()
    faulty = Faulty(**{fault: [3]})
    faulty.load_state_dict(model.state_dict())
    trainer = Trainer(cfg(max_steps=2, accumulate_grad_batches=2, log_every_n_steps=1))
    # step 1 = calls 1, 2; step 2 = calls 3, 4 (skipped)
    trainer.fit(faulty, make_loader(32, 4, shuffle=False))
    assert trainer.counters["skipped_nonfinite"] == 1
    assert trainer.callback_metrics["train/skipped_nonfinite"] == 1.0
    reference = Trainer(cfg(max_steps=1, accumulate_grad_batches=2))
    reference.fit(model, make_loader(32, 4, shuffle=False))
    for a, b in zip(faulty.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in faulty.parameters())


def test_out_of_memory_batch_is_skipped_counted_and_logged(caplog):
    model = Faulty(oom_at=[2])
    trainer = Trainer(cfg(max_steps=3, log_every_n_steps=1))
    with caplog.at_level("WARNING", logger="foldops.train"):
        trainer.fit(model, make_loader(32, 4, shuffle=False))
    assert trainer.counters["oom_batches"] == 1
    assert trainer.global_step == 3 and model.n == 4  # one extra batch drawn for the skipped one
    assert trainer.callback_metrics["train/oom_batches"] == 1.0
    assert "out of memory" in caplog.text


def test_repeated_out_of_memory_stops_with_a_clear_message():
    model = Faulty(oom_at=[2, 3, 4])
    trainer = Trainer(cfg(max_steps=5, max_consecutive_ooms=3))
    with pytest.raises(RuntimeError, match=r"out of memory in 3 consecutive training batches.*max_consecutive_ooms=3"):
        trainer.fit(model, make_loader(32, 4, shuffle=False))
    assert trainer.counters["oom_batches"] == 3


def test_none_loss_skips_the_batch():
    model = Faulty(none_at=[1])
    trainer = Trainer(cfg(max_steps=2))
    trainer.fit(model, make_loader(32, 4, shuffle=False))
    assert trainer.counters["null_loss_batches"] == 1 and trainer.global_step == 2


class AutocastProbe(TinyRegressor):
    def __init__(self, expect, **kw):
        super().__init__(**kw)
        self.expect = expect
        self.seen = []

    def training_step(self, batch, step):
        x, y = batch
        out = self(x)
        self.seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return (out.float() - y).pow(2).mean()


@pytest.mark.parametrize("precision,dtype", [("bf16-mixed", torch.bfloat16), ("fp16-mixed", torch.float16),
                                             ("32", torch.float32)])
def test_precision(precision, dtype):
    model = AutocastProbe(dtype)
    before = params_of(model)
    trainer = Trainer(cfg(max_steps=3, precision=precision, log_every_n_steps=1))
    trainer.fit(model, make_loader(32, 4))
    assert all(seen == (dtype != torch.float32, dtype) for seen in model.seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert (trainer.scaler is not None) == (precision == "fp16-mixed")
    if precision == "fp16-mixed":
        assert trainer.callback_metrics["train/loss_scale"] > 0
    assert math.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(before[k], v) for k, v in params_of(model).items())


def test_ema_validates_and_predicts_with_averaged_weights():
    model = _model(dropout=0.0)
    trainer = Trainer(cfg(max_steps=5, ema_decay=0.8))
    val = make_loader(16, 8, shuffle=False)
    trainer.fit(model, make_loader(32, 4))
    own = params_of(model)
    averaged = trainer.ema.export()
    assert any(not torch.equal(own[k], averaged[k]) for k in own)
    metrics = trainer.validate(model, val)
    preds = trainer.predict(model, val)
    assert all(torch.equal(own[k], v) for k, v in params_of(model).items())  # swapped back
    twin = _model()
    twin.load_state_dict(averaged)
    twin.eval()
    with torch.no_grad():
        xs = [b for b in val]
        expected = torch.stack([(twin(x) - y).pow(2).mean() for x, y in xs])
        assert metrics["val/loss"] == pytest.approx(expected.mean().item(), rel=1e-6)
        for p, (x, _) in zip(preds, xs):
            assert torch.equal(p, twin(x))


def test_ema_math_and_swap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9, warmup=True)
    shadow = {k: v.detach().double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for n in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3))  # moves the batch-norm buffers and its integer counter
        d = min(0.9, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        for k, v in model.state_dict().items():
            if k in shadow:
                shadow[k] = d * shadow[k] + (1 - d) * v.double()
    exported = ema.export()
    for k, v in shadow.items():
        torch.testing.assert_close(exported[k].double(), v, rtol=1e-6, atol=1e-6)
    assert exported["1.num_batches_tracked"] == 4
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swap(model):
        for k, v in shadow.items():
            torch.testing.assert_close(model.state_dict()[k].double(), v, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(own[k], v) for k, v in model.state_dict().items())
    # state round trip, and Boltz's format
    other = EMA(model, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 4 and all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    boltz = EMA(model, decay=0.9)
    boltz.load_state_dict({"cur_step": 7, "ema_weights": exported})
    assert boltz.num_updates == 7 and torch.equal(boltz.shadow["0.weight"], exported["0.weight"])
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)
    with pytest.raises(ValueError, match="shapes differ"):
        boltz.load_state_dict({"ema_weights": {**exported, "0.weight": torch.zeros(5, 5)}})


@dataclasses.dataclass
class Item:
    x: torch.Tensor
    name: str


class DictData(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"x": torch.full((3,), float(i)), "meta": {"id": f"s{i}", "k": i}}


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def predict_step(self, batch, index):
        assert isinstance(batch["meta"]["id"], list) and isinstance(batch["meta"]["id"][0], str)
        return Item(x=batch["x"] @ self.w, name=batch["meta"]["id"][0])


class ListWriter:
    def __init__(self):
        self.items = []
        self.closed = False

    def write(self, prediction, batch):
        self.items.append((prediction, batch))

    def close(self):
        self.closed = True


class LightningStyleWriter:
    def __init__(self):
        self.calls = []
        self.ended = False

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.calls.append((batch_idx, prediction.name))

    def on_predict_epoch_end(self, trainer, pl_module):
        self.ended = True


def test_predict_with_writers_and_nested_batches():
    loader = DataLoader(DictData(), batch_size=4)
    trainer = Trainer(cfg())
    writer = ListWriter()
    assert trainer.predict(DictModel(), loader, writer=writer) is None
    assert writer.closed and len(writer.items) == 3
    prediction, batch = writer.items[1]
    assert prediction.name == "s4" and torch.equal(prediction.x, torch.full((4,), 3.0) * torch.arange(4, 8))
    assert batch["meta"]["k"].tolist() == [4, 5, 6, 7]
    lightning = LightningStyleWriter()
    trainer.predict(DictModel(), loader, writer=lightning)
    assert lightning.calls == [(0, "s0"), (1, "s4"), (2, "s8")] and lightning.ended
    assert [p.name for p in trainer.predict(DictModel(), loader)] == ["s0", "s4", "s8"]
    with pytest.raises(TypeError, match="writer"):
        trainer.predict(DictModel(), loader, writer=object())


class Formats(TinyRegressor):
    def __init__(self, kind):
        super().__init__(scheduler=None)
        self.kind = kind

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {
            "opt": opt,
            "tuple": (opt, sched),
            "lists": ([opt], [sched]),
            "dict_step": {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}},
            "two": [opt, torch.optim.SGD(self.parameters(), lr=0.1)],
            "bad": "sgd",
        }[self.kind]


@pytest.mark.parametrize("kind,lr", [("opt", 0.1), ("tuple", 0.025), ("lists", 0.025), ("dict_step", 0.1 * 0.5 ** 4)])
def test_configure_optimizers_formats(kind, lr):
    # 16 samples / batch 8 = 2 steps per epoch; 4 steps = 2 epochs.
    trainer = Trainer(cfg(max_steps=4))
    trainer.fit(Formats(kind), make_loader(16, 8))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr)


@pytest.mark.parametrize("kind,error", [("two", ValueError), ("bad", TypeError)])
def test_configure_optimizers_errors(kind, error):
    with pytest.raises(error, match="configure_optimizers"):
        Trainer(cfg()).fit(Formats(kind), make_loader(16, 8))


class FakeMetric:
    def __init__(self):
        self.values = []

    def update(self, v):
        self.values.append(v)

    def compute(self):
        return torch.tensor(sum(self.values) / len(self.values))

    def reset(self):
        self.values = []


class Logging(LogMixin, TinyRegressor):
    def __init__(self):
        super().__init__(scheduler=None)
        self.metric = FakeMetric()

    def training_step(self, batch, step):
        loss = super().training_step(batch, step)["loss"]
        self.log("train/step_index", float(step))
        self.log("train/max_step", float(step), reduce_fx="max", on_step=False, on_epoch=True)
        self.metric.update(2.0 * step)
        self.log("train/metric", self.metric, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, index):
        x, _ = batch
        self.log("val/size_weighted", float(len(x)), batch_size=len(x))
        return None


def test_log_handle_values_reductions_and_weights(tmp_path):
    model = Logging()
    trainer = Trainer(cfg(max_steps=4, log_every_n_steps=2, log_dir=str(tmp_path), loggers=("jsonl",)))
    trainer.fit(model, make_loader(16, 4, shuffle=False), make_loader(10, 4, shuffle=False))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/step_index" in r]
    assert [r["train/step_index"] for r in steps] == [0.5, 2.5]  # mean over each interval
    epoch = [r for r in rows if "train/max_step" in r][0]
    assert epoch["train/max_step"] == 3.0 and epoch["train/metric"] == 3.0
    val = [r for r in rows if "val/size_weighted" in r][0]
    assert val["val/size_weighted"] == pytest.approx((4 * 4 + 4 * 4 + 2 * 2) / 10)
    log("outside/any", 1.0)  # outside a trainer: a no-op
    with pytest.raises(TypeError, match="outside/bad"):
        from foldops.train.metrics import MetricStore

        store = MetricStore()
        with store.active("train"):
            log("outside/bad", "text")
    with pytest.raises(ValueError, match="scalar"):
        with store.active("train"):
            log("vec", torch.ones(2))


def test_unsized_iterable_loader_and_epochs():
    batches = list(make_loader(12, 4, shuffle=False))

    class Replay:
        def __iter__(self):
            return iter(batches)

    trainer = Trainer(cfg(max_steps=None, max_epochs=2, accumulate_grad_batches=2))
    trainer.fit(_model(), Replay())
    assert trainer.epoch == 2 and trainer.global_step == 4  # windows 2 + a flushed partial 1, twice


def test_empty_loader_is_an_error():
    with pytest.raises(ValueError, match="train_loader"):
        Trainer(cfg()).fit(_model(), [])


def test_top_k_and_best_model_path(tmp_path):
    trainer = Trainer(cfg(max_steps=6, val_every_n_steps=1, checkpoint_dir=str(tmp_path), monitor="val/loss",
                          save_top_k=2))
    trainer.fit(_model(), make_loader(32, 4), make_loader(8, 8, shuffle=False))
    assert len(list(tmp_path.glob("best-*.ckpt"))) == 2
    assert trainer.best_model_path.exists()
    scores = [b["score"] for b in trainer.checkpoints.best]
    assert scores == sorted(scores)


def test_resume_drops_log_rows_written_after_the_checkpoint(tmp_path):
    Trainer(cfg(max_steps=4, log_every_n_steps=1, checkpoint_dir=str(tmp_path), loggers=("jsonl", "csv"))).fit(
        _model(), make_loader())
    with open(tmp_path / "metrics.jsonl", "a") as f:  # an interrupted run got further
        f.write(json.dumps({"step": 99, "train/loss": 1.0}) + "\n")
    Trainer(cfg(max_steps=6, log_every_n_steps=1, checkpoint_dir=str(tmp_path), loggers=("jsonl", "csv"))).fit(
        _model(), make_loader(), resume="last")
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 99 not in steps and steps[-1] == 6
    train_steps = [s for s in steps if s <= 6]
    assert train_steps == sorted(train_steps)


def test_progress_bar_line():
    stream = io.StringIO()
    bar = ProgressBar(100, stream=stream, refresh_s=0.0, log_interval_s=0.0)
    bar.start(0)
    bar.add_samples(32)
    import time

    time.sleep(0.01)
    bar.update(10, 0, loss=torch.tensor(0.25), force=True)
    line = stream.getvalue()
    assert "10/100" in line and "loss 0.25" in line and "it/s" in line and "ETA" in line and "samples/s" in line


def test_progress_bar_in_fit(capsys):
    Trainer(cfg(max_steps=2, progress_bar=True)).fit(_model(), make_loader())
    assert "loss" in capsys.readouterr().err


def test_optional_loggers_need_their_packages(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a))
    for name in ("tensorboard", "wandb"):
        with pytest.raises(ImportError, match=f"pip install {name}"):
            Trainer(cfg(max_steps=1, log_dir=str(tmp_path), loggers=(name,))).fit(_model(), make_loader())


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(max_steps=None, max_epochs=None), ValueError, "max_steps / max_epochs"),
    (dict(precision="fp8"), ValueError, "precision"),
    (dict(accumulate_grad_batches=0), ValueError, "accumulate_grad_batches"),
    (dict(gradient_clip_val=-1.0), ValueError, "gradient_clip_val"),
    (dict(gradient_clip_algorithm="max"), ValueError, "gradient_clip_algorithm"),
    (dict(monitor_mode="best"), ValueError, "monitor_mode"),
    (dict(loggers=("mlflow",)), ValueError, "loggers"),
    (dict(save_top_k=-2), ValueError, "save_top_k"),
    (dict(ema_decay=2.0), ValueError, "ema_decay"),
    (dict(seed="1"), TypeError, "seed"),
    (dict(strategy="deepspeed"), ValueError, "strategy"),
    (dict(max_steps=0), ValueError, "max_steps"),
])
def test_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        TrainerConfig(**{"max_steps": 1, **kwargs})


def test_config_aliases_and_round_trip():
    c = TrainerConfig(device="cpu", max_steps=3, precision="16-mixed", loggers="csv")
    assert c.precision == "fp16-mixed" and c.loggers == ("csv",)
    assert TrainerConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown fields"):
        TrainerConfig.from_dict({"max_steps": 1, "gpus": 8})
    t = Trainer(c, max_steps=9)
    assert t.config.max_steps == 9 and t.config.precision == "fp16-mixed"
    with pytest.raises(TypeError, match="config"):
        Trainer({"max_steps": 1})


def test_bad_models_and_steps():
    with pytest.raises(TypeError, match="training_step"):
        Trainer(cfg()).fit(nn.Linear(2, 2), make_loader())

    class NoValidation(TinyRegressor):
        validation_step = None

    with pytest.raises(TypeError, match="validation_step"):
        Trainer(cfg()).fit(NoValidation(), make_loader(), make_loader())

    class NoLoss(TinyRegressor):
        def training_step(self, batch, step):
            return {"out": torch.zeros(())}

    class Vector(TinyRegressor):
        def training_step(self, batch, step):
            return torch.zeros(3, requires_grad=True)

    with pytest.raises(ValueError, match="without a 'loss'"):
        Trainer(cfg()).fit(NoLoss(), make_loader())
    with pytest.raises(ValueError, match="scalar"):
        Trainer(cfg()).fit(Vector(), make_loader())
    with pytest.raises(TypeError, match="loader"):
        Trainer(cfg()).fit(_model(), 5)
    with pytest.raises(ValueError, match="device"):
        Trainer(cfg(device="xpu")).fit(_model(), make_loader())
    with pytest.raises(ValueError, match="strategy"):
        Trainer(cfg(strategy="ddp")).fit(_model(), make_loader())
    with pytest.raises(TypeError, match="resume"):
        Trainer(cfg()).fit(_model(), make_loader(), resume=3)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        Trainer(cfg()).fit(_model(), make_loader(), resume="last")


def test_dataset_helper_shapes():
    ds = make_dataset(5)
    assert len(ds) == 5 and ds[0][0].shape == (6,)


def test_tensorboard_and_wandb_loggers_through_fakes(monkeypatch, tmp_path):
    """The glue to both packages, with stand-ins (neither is a dependency)."""
    import importlib.util
    import sys
    import types

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("tensorboard", "wandb") else real(name, *a))
    scalars, wandb_rows = [], []

    class FakeWriter:
        def __init__(self, log_dir=None, purge_step=None):
            self.log_dir = log_dir

        def add_scalar(self, k, v, step):
            scalars.append((k, v, step))

        def add_text(self, *a):
            pass

        def close(self):
            pass

    class FakeRun:
        config = types.SimpleNamespace(update=lambda *a, **k: None)

        def log(self, row, step):
            wandb_rows.append((step, row))

        def finish(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **k: FakeRun()))
    Trainer(cfg(max_steps=2, log_every_n_steps=1, log_dir=str(tmp_path), loggers=("tensorboard", "wandb"))).fit(
        _model(), make_loader())
    assert [step for k, _, step in scalars if k == "train/loss"] == [1, 2]
    assert [step for step, row in wandb_rows if "train/loss" in row] == [1, 2]


def test_save_checkpoint_by_hand(tmp_path):
    model = _model()
    trainer = Trainer(cfg(max_steps=2))
    trainer.fit(model, make_loader())
    trainer.save_checkpoint(tmp_path / "manual.ckpt")
    from foldops.compat import load_checkpoint

    twin = _model(seed=4)
    info = load_checkpoint(tmp_path / "manual.ckpt", twin)
    assert info.global_step == 2 and all(torch.equal(a, b) for a, b in zip(twin.parameters(), model.parameters()))


def test_config_groups_and_flat_names_are_one_config():
    import typing

    from foldops.train import CheckpointConfig, NumericsConfig, OptimConfig, RunConfig

    flat = TrainerConfig(max_steps=5, precision="bf16", accumulate_grad_batches=2, checkpoint_dir="runs/x")
    nested = TrainerConfig(run=RunConfig(max_steps=5), numerics=NumericsConfig(precision="bf16-mixed"),
                           optim=OptimConfig(accumulate_grad_batches=2),
                           checkpointing=CheckpointConfig(checkpoint_dir="runs/x"))
    assert flat == nested and flat.to_dict() == nested.to_dict()
    assert flat.run.max_steps == flat.max_steps == 5 and flat.numerics.precision == "bf16-mixed"
    flat.max_steps = 7  # flat writes reach the group
    assert flat.run.max_steps == 7
    assert TrainerConfig.from_dict(nested.to_nested_dict()) == nested
    mixed = TrainerConfig(run=RunConfig(max_steps=5), max_steps=9)  # flat fields override a group
    assert mixed.max_steps == 9 and mixed.run is not None
    assert typing.get_args(typing.get_type_hints(NumericsConfig)["precision"]) == ("fp32", "bf16-mixed", "fp16-mixed")
    with pytest.raises(TypeError, match="unknown fields"):
        TrainerConfig(max_steps=1, gpus=8)
    with pytest.raises(TypeError, match="run: expected a RunConfig"):
        TrainerConfig(run={"max_steps": 1})
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        nested.replace(accumulate_grad_batches=0)


def test_progress_bar_prints_values_with_a_fixed_precision():
    from foldops.train.progress import format_value

    assert [format_value(x) for x in (2.652, 0.1, 0.73301, 12.5, 0.0)] == ["2.6520", "0.1000", "0.7330", "12.5000",
                                                                        "0.0000"]
    assert format_value(3.21e-5) == "3.2100e-05" and format_value(float("nan")) == "nan"
