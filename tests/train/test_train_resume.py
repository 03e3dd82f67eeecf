"""Exact resume: N steps straight == N/2 steps, stop, resume("last"), N/2 more (bitwise, CPU)."""

import pytest
import torch

from foldops.train import Trainer, TrainerConfig
from foldops.train.checkpointing import read_checkpoint

from train_helpers import TinyRegressor, make_loader, params_of


def _config(tmp, max_steps, **kw):
    base = dict(device="cpu", max_steps=max_steps, accumulate_grad_batches=2, gradient_clip_val=1.0, val_every_n_steps=3,
                ema_decay=0.9, seed=7, progress_bar=False, checkpoint_dir=str(tmp) if tmp else None,
                log_every_n_steps=2)
    base.update(kw)
    return TrainerConfig(**base)


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyRegressor(dropout=0.25, val_rng=True)


# 30 samples, batch 4 -> 8 batches (last one of 2); accumulation 2 -> 4 steps per epoch.
# N=10 stops at step 5, mid-epoch; N=8 stops at step 4, exactly at an epoch end.
@pytest.mark.parametrize("total", [10, 8])
def test_resume_is_bitwise_identical(tmp_path, total):
    loader, val = make_loader(30, 4), make_loader(12, 5, shuffle=False, seed=1)

    straight = _model()
    t_straight = Trainer(_config(None, total))
    t_straight.fit(straight, loader, val)
    rng_straight = torch.get_rng_state()

    first = _model()
    Trainer(_config(tmp_path, total // 2)).fit(first, loader, val)
    ckpt = read_checkpoint(tmp_path / "last.ckpt")
    assert ckpt["global_step"] == total // 2

    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    t_resumed = Trainer(_config(tmp_path, total))
    t_resumed.fit(resumed, loader, val, resume="last")
    rng_resumed = torch.get_rng_state()

    assert t_resumed.global_step == t_straight.global_step == total
    assert t_resumed.epoch == t_straight.epoch
    a, b = params_of(straight), params_of(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea, eb = t_straight.ema.export(), t_resumed.ema.export()
    for k in ea:
        assert torch.equal(ea[k], eb[k]), f"ema {k}"
    sa, sb = t_straight.optimizer.state_dict()["state"], t_resumed.optimizer.state_dict()["state"]
    for i in sa:
        assert torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])
    assert t_straight.scheduler.state_dict()["last_epoch"] == t_resumed.scheduler.state_dict()["last_epoch"]
    # the global RNG stream continued exactly (dropout and validation drew the same numbers)
    assert torch.equal(rng_straight, rng_resumed)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    model = _model()
    t = Trainer(_config(tmp_path, 2))
    t.fit(model, make_loader(), resume="last")
    assert t.global_step == 2
    assert (tmp_path / "last.ckpt").exists()


def test_resume_after_finish_does_nothing_more(tmp_path):
    model = _model()
    Trainer(_config(tmp_path, 3)).fit(model, make_loader())
    before = params_of(model)
    again = _model(seed=5)
    t = Trainer(_config(tmp_path, 3))
    t.fit(again, make_loader(), resume="last")
    assert t.global_step == 3
    for k, v in before.items():
        assert torch.equal(v, again.state_dict()[k])


def test_resume_path_and_rng_restored(tmp_path):
    model = _model()
    Trainer(_config(tmp_path, 2, checkpoint_every_n_steps=1)).fit(model, make_loader())
    step1 = tmp_path / "step=00000001.ckpt"
    assert step1.exists() and (tmp_path / "step=00000002.ckpt").exists()
    ckpt = read_checkpoint(step1)
    assert ckpt["global_step"] == 1
    assert {"python", "torch", "numpy"} <= set(ckpt["rng"][0])
    assert ckpt["data"]["batches"] == 2 and ckpt["data"]["epoch"] == 0
    assert ckpt["config"]["max_steps"] == 2
