"""The Trainer and checkpoint_wrapper on a GPU (skipped without one)."""

import pytest
import torch
from torch import nn

from foldops import device as fdevice
from foldops.compat import checkpoint_wrapper
from foldops.train import Trainer, TrainerConfig

from train_helpers import TinyRegressor, make_loader, params_of

pytestmark = pytest.mark.gpu


def _gpu():
    return fdevice.resolve_device("auto")


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_resume_is_bitwise_on_the_gpu_with_device_rng(tmp_path, precision):
    def config(d, steps):
        return TrainerConfig(device=str(_gpu()), max_steps=steps, precision=precision, accumulate_grad_batches=2,
                             ema_decay=0.9, seed=3, progress_bar=False, checkpoint_dir=d, loggers=())

    def model(seed=0):
        torch.manual_seed(seed)
        return TinyRegressor(dropout=0.3)  # dropout draws from the device generator

    straight = model()
    Trainer(config(None, 10)).fit(straight, make_loader(30, 4))
    Trainer(config(str(tmp_path), 5)).fit(model(), make_loader(30, 4))
    resumed = model(seed=9)
    t = Trainer(config(str(tmp_path), 10))
    t.fit(resumed, make_loader(30, 4), resume="last")
    assert next(resumed.parameters()).device.type == _gpu().type
    a, b = params_of(straight), params_of(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Block(nn.Module):
    def __init__(self, d=256):
        super().__init__()
        self.a = nn.Linear(d, 4 * d)
        self.b = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


def _retained_after_forward(blocks, x):
    dev = x.device
    fdevice.synchronize(dev)
    before = fdevice.memory_allocated_bytes(dev)
    h = x
    for b in blocks:
        h = b(h)
    fdevice.synchronize(dev)
    retained = fdevice.memory_allocated_bytes(dev) - before
    h.float().pow(2).mean().backward()
    return retained


def test_checkpoint_wrapper_offload_on_the_gpu():
    dev = _gpu()
    torch.manual_seed(0)
    template = nn.ModuleList(Block() for _ in range(6)).to(dev)
    x0 = torch.randn(64, 128, 256, device=dev)
    grads, retained = [], []
    for mode in ("plain", "checkpoint", "offload"):
        blocks = nn.ModuleList(Block() for _ in range(6)).to(dev)
        blocks.load_state_dict(template.state_dict())
        if mode != "plain":
            for b in blocks:
                checkpoint_wrapper(b, offload_to_cpu=mode == "offload")
        x = x0.clone().requires_grad_()
        retained.append(_retained_after_forward(blocks, x))
        grads.append([x.grad] + [p.grad for p in blocks.parameters()])
    for g_plain, g_other in zip(grads[0], grads[1]):
        assert torch.equal(g_plain, g_other)
    for g_plain, g_other in zip(grads[0], grads[2]):
        assert torch.equal(g_plain, g_other)
    plain, ckpt, offload = retained
    assert ckpt * 3 <= plain  # only block inputs are kept
    assert offload < ckpt  # and with offload they are kept in host memory
