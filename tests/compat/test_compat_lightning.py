"""load_checkpoint: Lightning .ckpt files (built here, Lightning is not installed) and foldops ones."""

import argparse
import pathlib
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from foldops.compat import (
    AttributeDict,
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    remap_keys,
)
from foldops.train import Trainer, TrainerConfig


class Net(nn.Module):
    def __init__(self, hidden=8):
        super().__init__()
        self.pairformer_module = nn.ModuleList([nn.Linear(4, hidden), nn.Linear(hidden, 4)])
        self.norm = nn.BatchNorm1d(4)


def _install_fake(monkeypatch, module_name, class_name, base=dict):
    """Put a class where a pickle will look for it (a stand-in for an uninstalled package)."""
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    cls = type(class_name, (base,), {"__module__": module_name})
    setattr(sys.modules[module_name], class_name, cls)
    return cls


def _lightning_checkpoint(net, ema_net, hyper_parameters, prefix=""):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    weights = {prefix + k: v for k, v in net.state_dict().items()}
    ema_weights = {prefix + k: v.clone() for k, v in ema_net.state_dict().items()}
    return {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "2.2.1",
        "state_dict": weights,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {
            "EMA": {"cur_step": 1200, "ema_weights": ema_weights},
            "ModelCheckpoint{'monitor': 'val/lddt', 'mode': 'max'}": {
                "best_model_score": torch.tensor(0.8),
                "best_model_path": "/runs/epoch=2.ckpt",
                "best_k_models": {"/runs/epoch=2.ckpt": torch.tensor(0.8)},
            },
        },
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": hyper_parameters,
        "ema": {"cur_step": 1200, "ema_weights": ema_weights},
    }


@pytest.fixture
def nets():
    torch.manual_seed(0)
    net, ema_net = Net(), Net()
    return net, ema_net


def _save_lightning(tmp_path, monkeypatch, nets, hparams_extra=None, prefix=""):
    fake_attr_dict = _install_fake(monkeypatch, "pytorch_lightning.utilities.parsing", "AttributeDict")
    hparams = fake_attr_dict(token_s=384, training_args={"max_lr": 1e-3}, data=pathlib.PurePosixPath("/data"),
                             weight=np.float64(0.5), bins=np.arange(3), **(hparams_extra or {}))
    path = tmp_path / "model.ckpt"
    torch.save(_lightning_checkpoint(*nets, hparams, prefix=prefix), path)
    # Lightning is not installed where the file is read:
    for name in [m for m in sys.modules if m.startswith("pytorch_lightning")]:
        monkeypatch.delitem(sys.modules, name)
    return path


def test_lightning_checkpoint_loads_safely(tmp_path, monkeypatch, nets):
    path = _save_lightning(tmp_path, monkeypatch, nets)
    fresh = Net()
    info = load_checkpoint(path, fresh)
    assert info.format == "lightning" and info.epoch == 3 and info.global_step == 1200
    for k, v in nets[0].state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    hp = info.hyper_parameters
    assert hp["token_s"] == 384 and hp["training_args"]["max_lr"] == 1e-3
    assert isinstance(hp, AttributeDict) and hp.token_s == 384
    assert str(hp["data"]) == "/data" and float(hp["weight"]) == 0.5 and list(hp["bins"]) == [0, 1, 2]
    assert info.ema_state_dict is not None and not info.used_ema


def test_lightning_ema_weights(tmp_path, monkeypatch, nets):
    path = _save_lightning(tmp_path, monkeypatch, nets)
    fresh = Net()
    load_checkpoint(path, fresh, use_ema=True)
    for k, v in nets[1].state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_ema_from_the_callbacks_entry_only(tmp_path, nets):
    ckpt = _lightning_checkpoint(*nets, {"a": 1})
    del ckpt["ema"]
    path = tmp_path / "cb.ckpt"
    torch.save(ckpt, path)
    fresh = Net()
    load_checkpoint(path, fresh, use_ema=True)
    assert torch.equal(fresh.pairformer_module[0].weight, nets[1].pairformer_module[0].weight)
    del ckpt["callbacks"]["EMA"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_checkpoint(path, Net(), use_ema=True)


def test_prefix_remapping(tmp_path, monkeypatch, nets):
    path = _save_lightning(tmp_path, monkeypatch, nets, prefix="model.")
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        load_checkpoint(path, Net())
    fresh = Net()
    load_checkpoint(path, fresh, prefix_map={"model.": ""})
    assert torch.equal(fresh.pairformer_module[1].bias, nets[0].pairformer_module[1].bias)
    keys = {"module._orig_mod.a._checkpoint_wrapped_module.w": 1, "module.b": 2}
    assert remap_keys(keys) == {"a.w": 1, "b": 2}
    assert remap_keys({"x.a": 1, "x.b": 2, "y": 3}, {"x.": "z.", "y": None}) == {"z.a": 1, "z.b": 2}
    with pytest.raises(CheckpointError, match="two checkpoint keys"):
        remap_keys({"a.w": 1, "b.w": 2}, {"a.": "", "b.": ""})


def test_unsafe_objects_need_the_opt_in(tmp_path, monkeypatch, nets):
    omegaconf_like = _install_fake(monkeypatch, "omegaconf.dictconfig", "DictConfig")
    for hparams, name in [(argparse.Namespace(token_s=384), "argparse.Namespace"),
                          (omegaconf_like(token_s=384), "omegaconf.dictconfig.DictConfig")]:
        path = tmp_path / "unsafe.ckpt"
        torch.save(_lightning_checkpoint(*nets, hparams), path)
        with pytest.raises(UnsafeCheckpointError) as info:
            load_checkpoint(path, Net())
        assert "trust_checkpoint=True" in str(info.value) and name in str(info.value)
        fresh = Net()
        loaded = load_checkpoint(path, fresh, trust_checkpoint=True)
        assert loaded.hyper_parameters["token_s"] == 384 if isinstance(hparams, dict) else \
            loaded.raw["hyper_parameters"].token_s == 384
        assert torch.equal(fresh.pairformer_module[0].weight, nets[0].pairformer_module[0].weight)
        if isinstance(hparams, argparse.Namespace):  # or allow just that class
            assert load_checkpoint(path, Net(), safe_globals=[argparse.Namespace]).raw["hyper_parameters"].token_s == 384


def test_shape_mismatch_names_keys(tmp_path, nets):
    path = tmp_path / "w.ckpt"
    torch.save({"state_dict": nets[0].state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"pairformer_module.0.weight: model \(16, 4\) vs checkpoint w.ckpt \(8, 4\)"):
        load_checkpoint(path, Net(hidden=16))
    with pytest.raises(CheckpointError, match="different shapes"):
        load_checkpoint(path, Net(hidden=16), strict=False)


def test_non_strict_reports_missing_and_unexpected(tmp_path, nets):
    sd = dict(nets[0].state_dict())
    sd.pop("norm.weight")
    sd["extra.w"] = torch.zeros(1)
    path = tmp_path / "w.ckpt"
    torch.save(sd, path)  # a bare state dict
    info = load_checkpoint(path, Net(), strict=False)
    assert info.format == "state_dict" and info.missing_keys == ["norm.weight"] and info.unexpected_keys == ["extra.w"]


class Trainable(Net):
    def training_step(self, batch, step):
        (x,) = batch
        h = self.pairformer_module[1](torch.tanh(self.pairformer_module[0](x)))
        return self.norm(h).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_foldops_checkpoint_and_ema(tmp_path):
    torch.manual_seed(0)
    model = Trainable()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4)
    trainer = Trainer(TrainerConfig(device="cpu", max_steps=3, ema_decay=0.5, checkpoint_dir=str(tmp_path), progress_bar=False))
    trainer.fit(model, loader)
    fresh = Trainable()
    info = load_checkpoint(tmp_path / "last.ckpt", fresh)
    assert info.format == "foldops" and info.global_step == 3
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    load_checkpoint(tmp_path / "last.ckpt", fresh, use_ema=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trainer.ema.export().items())


def test_bad_arguments(tmp_path, nets):
    path = tmp_path / "x.ckpt"
    torch.save({"something": 1}, path)
    with pytest.raises(CheckpointError, match="no model weights"):
        load_checkpoint(path)
    torch.save(nets[0].state_dict(), path)
    with pytest.raises(TypeError, match="model"):
        load_checkpoint(path, model="net")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.ckpt")
