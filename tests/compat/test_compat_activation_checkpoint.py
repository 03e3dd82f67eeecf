"""checkpoint_wrapper: fairscale's drop-in with real checkpointing; seed_everything."""

import copy
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from foldops.compat import checkpoint_wrapper, is_checkpoint_wrapped, remove_checkpoint_wrapper, seed_everything


class Block(nn.Module):
    def __init__(self, d=16, dtype=torch.float64):
        super().__init__()
        self.a = nn.Linear(d, 4 * d, dtype=dtype)
        self.b = nn.Linear(4 * d, d, dtype=dtype)
        self.drop = nn.Dropout(0.2)
        self.calls = 0

    def forward(self, x, mask=None, *, scale=1.0):
        self.calls += 1
        h = self.drop(self.b(torch.tanh(self.a(x))))
        if mask is not None:
            h = h * mask[..., None]
        return x + scale * h


def _stack(wrap, offload=False, n=5):
    torch.manual_seed(0)
    blocks = nn.ModuleList([Block() for _ in range(n)])
    if wrap:
        for i, b in enumerate(blocks):
            assert checkpoint_wrapper(b, offload_to_cpu=offload) is b
    return blocks


def _run(blocks, x, mask, saved=None):
    def pack(t):
        if saved is not None:
            saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)  # dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = x
        for b in blocks:
            h = b(h, mask, scale=0.5)
    return h


@pytest.mark.parametrize("offload", [False, True])
def test_same_outputs_and_gradients(offload):
    x0 = torch.randn(3, 7, 16, dtype=torch.float64)
    mask = (torch.rand(3, 7) > 0.3).double()
    mask[0] = 0  # a fully masked row
    results = []
    for wrap in (False, True):
        blocks = _stack(wrap, offload)
        x = x0.clone().requires_grad_()
        out = _run(blocks, x, mask)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        results.append((out.detach(), x.grad, [p.grad for p in blocks.parameters()], [b.calls for b in blocks]))
    (o1, gx1, gp1, calls1), (o2, gx2, gp2, calls2) = results
    assert torch.equal(o1, o2) and torch.equal(gx1, gx2)
    assert all(torch.equal(a, b) for a, b in zip(gp1, gp2))  # dropout replayed exactly
    assert torch.isfinite(gx2).all()
    assert calls1 == [1] * 5 and calls2 == [2] * 5  # each wrapped block ran again in backward


def test_saves_a_fraction_of_the_activations():
    x = torch.randn(4, 9, 16, dtype=torch.float64, requires_grad=True)
    plain, wrapped = [], []
    _run(_stack(False), x, None, plain).sum().backward()
    _run(_stack(True), x, None, wrapped).sum().backward()
    assert sum(wrapped) * 3 <= sum(plain)


def test_pass_through_in_eval_and_no_grad():
    blocks = _stack(True)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    blocks.eval()
    _run(blocks, x, None).sum().backward()
    assert [b.calls for b in blocks] == [1] * 5  # eval: no recomputation
    blocks.train()
    with torch.no_grad():
        _run(blocks, x, None)
    assert [b.calls for b in blocks] == [2] * 5


def test_module_identity_state_dict_copy_and_removal():
    plain, wrapped = _stack(False), _stack(True)
    assert list(plain.state_dict()) == list(wrapped.state_dict())  # keys of existing checkpoints fit
    wrapped.load_state_dict(plain.state_dict(), strict=True)
    assert all(is_checkpoint_wrapped(b) and isinstance(b, Block) for b in wrapped)
    assert checkpoint_wrapper(wrapped[0]) is wrapped[0]  # idempotent
    twin = copy.deepcopy(wrapped)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    _run(twin, x, None).sum().backward()
    assert [b.calls for b in twin] == [2] * 5 and [b.calls for b in wrapped] == [0] * 5
    remove_checkpoint_wrapper(twin[0])
    assert not is_checkpoint_wrapped(twin[0])
    twin[0](x).sum().backward()
    assert twin[0].calls == 3


def test_bad_arguments():
    with pytest.raises(TypeError, match="module"):
        checkpoint_wrapper(lambda x: x)
    with pytest.raises(TypeError, match="offload_to_cpu"):
        checkpoint_wrapper(Block(), offload_to_cpu="yes")


def test_seed_everything():
    assert seed_everything(123) == 123 and os.environ["FOLDOPS_GLOBAL_SEED"] == "123"
    a = (random.random(), np.random.rand(), torch.rand(1))
    seed_everything(123)
    b = (random.random(), np.random.rand(), torch.rand(1))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert seed_everything() == 123  # from the environment
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)
    with pytest.raises(TypeError, match="seed"):
        seed_everything(1.5)
