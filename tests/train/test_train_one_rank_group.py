"""DDP / FSDP2 in a process group of one (gloo, in this process) give the one-process result.

A group of one runs every wrapper hook (FSDP2's unshard/reshard, DDP's reducer) without
the cost of starting processes: what a model's parameters outside the sharded blocks, and a
``torchrun --nproc_per_node 1`` start, need is checked here.
"""

import socket
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from foldops.train import Trainer, TrainerConfig

from train_helpers import make_loader

COMMON = dict(device="cpu", seed=3, progress_bar=False, loggers=(), dist_timeout_s=60.0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BlocksAndHead(nn.Module):
    """A stack of blocks (what FSDP2's default shards one by one) and a head outside it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(6, 6, dtype=torch.float64) for _ in range(2)])
        self.head = nn.Linear(6, 1, dtype=torch.float64)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x).squeeze(-1)

    def training_step(self, batch, step):
        x, y = batch
        return (self(x) - y).pow(2).mean()

    def validation_step(self, batch, index):
        x, y = batch
        return (self(x) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _full_state(trainer, model):
    return {k: v.detach().clone() for k, v in trainer._model_state().items()} if trainer._strategy == "fsdp" \
        else {k: v.detach().clone() for k, v in model.state_dict().items()}


def _reference(steps):
    model = BlocksAndHead()
    trainer = Trainer(TrainerConfig(max_steps=steps, **COMMON))
    trainer.fit(model, make_loader(24, 4, dtype=torch.float64), make_loader(8, 4, dtype=torch.float64))
    return _full_state(trainer, model), trainer.callback_metrics["val/loss"]


def _assert_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-12), (k, (a[k] - b[k]).abs().max())


@pytest.fixture
def gloo_group_of_one(monkeypatch):
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_wrapped_training_with_parameters_outside_the_blocks_matches_one_process(gloo_group_of_one, strategy):
    model = BlocksAndHead()
    trainer = Trainer(TrainerConfig(max_steps=6, strategy=strategy, **COMMON))  # default fsdp_blocks
    trainer.fit(model, make_loader(24, 4, dtype=torch.float64), make_loader(8, 4, dtype=torch.float64))
    assert trainer._strategy == strategy and trainer.world_size == 1 and trainer.global_step == 6
    want, want_val = _reference(6)
    _assert_close(_full_state(trainer, model), want)
    assert trainer.callback_metrics["val/loss"] == pytest.approx(want_val, rel=1e-12)


def _torchrun_env(monkeypatch):
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                            LOCAL_RANK="0").items():
        monkeypatch.setenv(name, value)
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_with_one_process_joins_the_group(monkeypatch, strategy):
    _torchrun_env(monkeypatch)
    assert not dist.is_initialized()
    model = BlocksAndHead()
    try:
        trainer = Trainer(TrainerConfig(max_steps=6, strategy=strategy, **COMMON))
        trainer.fit(model, make_loader(24, 4, dtype=torch.float64), make_loader(8, 4, dtype=torch.float64))
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert trainer._strategy == strategy and trainer.world_size == 1
        state = _full_state(trainer, model)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    _assert_close(state, _reference(6)[0])


def test_torchrun_with_one_process_and_auto_stays_single(monkeypatch):
    _torchrun_env(monkeypatch)
    trainer = Trainer(TrainerConfig(max_steps=1, **COMMON))
    try:
        trainer.fit(BlocksAndHead(), make_loader(8, 4, dtype=torch.float64))
        assert not dist.is_initialized() and trainer._strategy == "single"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_without_torchrun_or_a_group_is_refused(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="strategy: 'ddp' needs a process group"):
        Trainer(TrainerConfig(max_steps=1, strategy="ddp", **COMMON)).fit(BlocksAndHead(), make_loader(8, 4))
